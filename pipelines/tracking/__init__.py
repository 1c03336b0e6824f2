"""MLflow tracking: where runs go, one run's record, and Tune trials as nested runs."""

from pipelines.tracking.mlflow_run import (
    RunTracker,
    environment_tags,
    resolve_tracking_uri,
    ui_command,
)

__all__ = ["RunTracker", "environment_tags", "resolve_tracking_uri", "ui_command"]
