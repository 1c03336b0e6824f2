"""One run of a spec in this process (``raysmith run``, and the body of a Ray Job)."""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from pipelines.cluster import ray_session
from pipelines.errors import RunFailed
from pipelines.progress import ProgressLine
from pipelines.session import LocalSession
from pipelines.spec import LoadedSpec, flatten
from pipelines.tracking.mlflow_run import (
    TAG_KIND,
    TAG_SPEC_HASH,
    RunTracker,
    environment_tags,
    job_home,
    resolve_tracking_uri,
)


@dataclass
class RunOutcome:
    run_id: str
    experiment_id: str
    tracking_uri: str
    summary: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None


def output_root(output_dir: str) -> Path:
    """Where local runs keep checkpoints: ``output_dir``, relative to the working directory
    (to ``~/raysmith`` inside a submitted job, whose working directory is temporary)."""
    path = Path(output_dir).expanduser()
    if not path.is_absolute():
        path = (job_home() or Path.cwd()) / path
    return path.resolve()


def start_tracker(loaded: LoadedSpec, command: str) -> RunTracker:
    """Open the MLflow run for ``loaded`` with its params, tags and spec files."""
    spec = loaded.spec
    uri = resolve_tracking_uri(spec.tracking.uri)
    tags = {
        TAG_KIND: spec.kind,
        TAG_SPEC_HASH: loaded.spec_hash(),
        "raysmith.command": command,
        **environment_tags(loaded.source),
    }
    tracker = RunTracker.start(uri, spec.tracking.experiment or spec.name, spec.name, tags=tags)
    tracker.log_params(flatten(spec.model_dump(mode="json", exclude={"search"})))
    tracker.log_text(loaded.resolved_yaml(), "spec/resolved.yaml")
    if loaded.text:
        tracker.log_text(loaded.text, f"spec/{Path(loaded.source).name}")
    return tracker


def _record_outcome(tracker: RunTracker, pipeline, spec, session: LocalSession, summary: dict[str, Any]) -> None:
    tracker.log_learning_curve(pipeline.curve_metrics, xlabel=pipeline.step_metric.replace("_", " "), title=spec.name)
    checkpoint = session.latest_checkpoint
    if checkpoint is not None:
        summary["checkpoint"] = str(checkpoint)
        tracker.set_tags({"raysmith.checkpoint": str(checkpoint)})
        if spec.tracking.log_checkpoints:
            tracker.log_artifact(checkpoint, "checkpoint")
    tracker.log_text("\n".join(f"{key}: {value}" for key, value in summary.items()) + "\n", "summary.txt")


def run_local(
    loaded: LoadedSpec,
    *,
    address: str | None = None,
    restore: str | None = None,
    console: Console | None = None,
) -> RunOutcome:
    """Run ``loaded`` to its stop condition, recording everything in one MLflow run.

    Raises :class:`pipelines.errors.BadInput` if Ray cannot be reached (nothing is
    recorded then) and :class:`RunFailed` if the pipeline fails (the run is marked FAILED
    with the traceback as an artifact).
    """
    console = console or Console(stderr=True)
    spec = loaded.spec
    pipeline = loaded.pipeline
    with ray_session(spec.ray, address) as where:
        console.print(f"[bold]{spec.kind}[/] '{spec.name}' on {where}")
        tracker = start_tracker(loaded, "run")
        console.print(f"MLflow {tracker.describe()}", markup=False)
        run_dir = output_root(spec.output_dir) / spec.name / tracker.run_id
        progress = ProgressLine(
            spec.name,
            total=pipeline.progress_total(spec),
            step_label=pipeline.step_metric.replace("_", " "),
            metrics=pipeline.key_metrics,
            console=console,
        )
        session = LocalSession(
            tracker, run_dir, keep_checkpoints=pipeline.checkpoints_to_keep(spec),
            progress=progress, restore_from=restore,
        )
        try:
            with progress:
                summary = pipeline.run(spec, session)
            _record_outcome(tracker, pipeline, spec, session, summary)
        except (KeyboardInterrupt, SystemExit):
            # Ctrl-C, or SIGTERM (`raysmith jobs stop`), which ray.init turns into SystemExit
            tracker.finish("KILLED")
            raise
        except Exception as err:
            tracker.log_text(traceback.format_exc(), "error/traceback.txt")
            tracker.set_tags({"raysmith.error": f"{type(err).__name__}: {err}"[:5000]})
            tracker.finish("FAILED")
            raise RunFailed(f"{spec.kind} run '{spec.name}' failed: {type(err).__name__}: {err}") from err
        tracker.finish("FINISHED")
        return RunOutcome(tracker.run_id, tracker.experiment_id, tracker.uri, summary, summary.get("checkpoint"))
