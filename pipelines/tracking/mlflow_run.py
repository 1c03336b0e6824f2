"""MLflow, the one record of every run, trial and job.

Default tracking URI: a SQLite file ``mlflow.db`` in the working directory (embedded, no
server), with artifacts in ``mlartifacts/`` beside it. A spec's ``tracking.uri`` or the
``MLFLOW_TRACKING_URI`` variable points somewhere else, such as an ``mlflow server``.
Only the driver (or rank 0 of a Ray Train job) writes here.
"""

from __future__ import annotations

import math
import os
import platform
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

# MLflow 3 reports usage to its authors unless told not to; a research cluster's runs
# should not phone home (set MLFLOW_DISABLE_TELEMETRY=false to allow it).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

DEFAULT_DB_NAME = "mlflow.db"
ARTIFACTS_DIR_NAME = "mlartifacts"
PARAM_VALUE_LIMIT = 6000
"""MLflow refuses longer parameter values; longer ones are cut with a marker."""

TAG_KIND = "raysmith.kind"
TAG_SPEC_HASH = "raysmith.spec_hash"
TAG_TRIAL_ID = "raysmith.trial_id"
TAG_PARENT = "mlflow.parentRunId"
TAG_RUN_NAME = "mlflow.runName"


JOB_HOME_NAME = "raysmith"


def job_home() -> Path | None:
    """``~/raysmith`` on the node running a job submitted by ``raysmith submit``, else None.

    A job's working directory is a copy Ray deletes later; its default MLflow store and
    run folders go here instead.
    """
    if not os.environ.get("RAYSMITH_SUBMISSION_ID"):
        return None
    home = Path.home() / JOB_HOME_NAME
    home.mkdir(parents=True, exist_ok=True)
    return home


def resolve_tracking_uri(spec_uri: str | None = None, cwd: Path | None = None) -> str:
    """The URI runs go to: the spec's, else ``MLFLOW_TRACKING_URI``, else ``./mlflow.db``
    (``~/raysmith/mlflow.db`` inside a submitted job).

    Relative SQLite paths are made absolute so that a job, a Tune trial and ``mlflow ui``
    started elsewhere all read the same file.
    """
    uri = spec_uri or os.environ.get("MLFLOW_TRACKING_URI")
    base = (cwd or job_home() or Path.cwd()).resolve()
    if not uri:
        return f"sqlite:///{base / DEFAULT_DB_NAME}"
    if is_relative_sqlite(uri):
        return f"sqlite:///{(base / uri[len('sqlite:///'):]).resolve()}"
    return uri


def is_relative_sqlite(uri: str) -> bool:
    return uri.startswith("sqlite:///") and not uri.startswith("sqlite:////")


def artifact_root_for(uri: str) -> str | None:
    """Where experiments created on a SQLite store keep artifacts: beside the database."""
    if uri.startswith("sqlite:///"):
        db_path = Path(uri[len("sqlite:///"):])
        return (db_path.parent / ARTIFACTS_DIR_NAME).resolve().as_uri()
    return None


def ui_command(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri}"


def make_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_experiment(client, name: str, uri: str) -> str:
    """Id of experiment ``name``, created (artifacts beside a SQLite store) if missing."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_root_for(uri))
    except MlflowException:
        # another process created it between our lookup and our create
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def git_commit(directory: Path | str | None = None) -> tuple[str | None, bool]:
    """(commit, dirty) of the repository holding ``directory``; (None, False) outside git."""
    if os.environ.get("RAYSMITH_GIT_COMMIT"):
        return os.environ["RAYSMITH_GIT_COMMIT"], os.environ.get("RAYSMITH_GIT_DIRTY") == "1"
    cwd = str(directory or Path.cwd())
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5
        )
        if commit.returncode != 0:
            return None, False
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd, capture_output=True, text=True, timeout=5,
        )
        return commit.stdout.strip(), bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, False


def environment_tags(spec_file: str | None = None) -> dict[str, str]:
    """Tags every run carries: code version, Ray version, host."""
    import ray

    commit, dirty = git_commit(Path(spec_file).resolve().parent if spec_file else None)
    tags = {
        "raysmith.ray_version": ray.__version__,
        "raysmith.host": socket.gethostname(),
        "raysmith.python": platform.python_version(),
    }
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["raysmith.git_dirty"] = str(dirty).lower()
    if spec_file:
        tags["mlflow.source.name"] = str(spec_file)
    if os.environ.get("RAYSMITH_SUBMISSION_ID"):
        tags["raysmith.submission_id"] = os.environ["RAYSMITH_SUBMISSION_ID"]
    return tags


def finite_number(value: Any) -> float | None:
    """``value`` as a float if it is a finite number, else None."""
    if isinstance(value, bool):
        return float(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


class RunTracker:
    """One MLflow run: params, metrics with steps, tags, artifacts, and its end."""

    def __init__(self, uri: str, run_id: str, experiment_id: str, client=None):
        self.uri = uri
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.client = client or make_client(uri)

    @classmethod
    def start(
        cls,
        uri: str,
        experiment: str,
        run_name: str,
        tags: Mapping[str, str] | None = None,
        parent_run_id: str | None = None,
    ) -> "RunTracker":
        client = make_client(uri)
        experiment_id = ensure_experiment(client, experiment, uri)
        all_tags = {TAG_RUN_NAME: run_name, **(tags or {})}
        if parent_run_id:
            all_tags[TAG_PARENT] = parent_run_id
        run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        return cls(uri, run.info.run_id, experiment_id, client)

    @classmethod
    def reopen(cls, uri: str, run_id: str) -> "RunTracker":
        client = make_client(uri)
        run = client.get_run(run_id)
        if run.info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
        return cls(uri, run_id, run.info.experiment_id, client)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = []
        for key, value in params.items():
            text = "" if value is None else str(value)
            if len(text) > PARAM_VALUE_LIMIT:
                text = text[: PARAM_VALUE_LIMIT - 14] + "...[truncated]"
            items.append(Param(str(key)[:250], text))
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> dict[str, float]:
        """Log the finite numbers among ``metrics`` at ``step``; returns what was logged."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        logged = {}
        for key, value in metrics.items():
            number = finite_number(value)
            if number is not None:
                logged[key] = number
        items = [Metric(key, value, now, int(step)) for key, value in logged.items()]
        for start in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[start : start + 1000])
        return logged

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(str(k), str(v)) for k, v in tags.items()]
        if items:
            self.client.log_batch(self.run_id, tags=items)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)]

    def log_learning_curve(
        self, metrics: Iterable[str], xlabel: str, title: str, artifact_file: str = "learning_curve.png"
    ) -> bool:
        """Draw ``metrics`` against the step from what this run logged; False if none."""
        from pipelines.tracking.plots import plot_curves

        curves = {key: self.metric_history(key) for key in metrics}
        curves = {key: points for key, points in curves.items() if points}
        if not curves:
            return False
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / artifact_file
            plot_curves(curves, target, xlabel=xlabel, title=title)
            self.log_artifact(target)
        return True

    def finish(self, status: str = "FINISHED") -> None:
        """End the run: FINISHED, FAILED or KILLED."""
        self.client.set_terminated(self.run_id, status=status)

    def describe(self) -> str:
        return f"run {self.run_id} (experiment {self.experiment_id}) at {self.uri}"
