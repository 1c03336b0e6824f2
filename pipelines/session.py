"""How a running pipeline reports: straight to MLflow (a local run or a Ray Job) or to Tune.

A pipeline calls :meth:`Session.report` once per iteration with flat metrics, asks
:meth:`Session.checkpoint_due` whether to save, and saves into
:meth:`Session.new_checkpoint_dir`. It resumes from :attr:`Session.restore_from` when set.
"""

from __future__ import annotations

import shutil
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipelines.progress import ProgressLine
from pipelines.tracking.mlflow_run import RunTracker


class Session(ABC):
    restore_from: str | None = None
    """Checkpoint directory the pipeline resumes from, if any."""

    @abstractmethod
    def report(self, metrics: Mapping[str, Any], *, step: int, checkpoint: Path | None = None) -> None:
        """Record one iteration's metrics at ``step``, with the checkpoint saved for it."""

    @abstractmethod
    def new_checkpoint_dir(self) -> Path:
        """An empty directory for the pipeline to save the next checkpoint into."""

    def checkpoint_due(self, iteration: int, every: int) -> bool:
        return iteration % every == 0


class LocalSession(Session):
    """A run in this process: metrics go to its MLflow run, checkpoints under ``run_dir``."""

    def __init__(
        self,
        tracker: RunTracker,
        run_dir: Path,
        *,
        keep_checkpoints: int,
        progress: ProgressLine | None = None,
        restore_from: str | None = None,
    ):
        self.tracker = tracker
        self.run_dir = run_dir
        self.keep_checkpoints = keep_checkpoints
        self.progress = progress
        self.restore_from = restore_from
        self.checkpoints: list[Path] = []
        self._counter = 0

    @property
    def latest_checkpoint(self) -> Path | None:
        return self.checkpoints[-1] if self.checkpoints else None

    def new_checkpoint_dir(self) -> Path:
        self._counter += 1
        path = self.run_dir / "checkpoints" / f"checkpoint_{self._counter:06d}"
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path

    def report(self, metrics: Mapping[str, Any], *, step: int, checkpoint: Path | None = None) -> None:
        self.tracker.log_metrics(metrics, step=step)
        if self.progress is not None:
            self.progress.update(step, metrics)
        if checkpoint is not None:
            self.checkpoints.append(Path(checkpoint))
            while len(self.checkpoints) > self.keep_checkpoints:
                shutil.rmtree(self.checkpoints.pop(0), ignore_errors=True)


class TuneSession(Session):
    """A Tune trial: metrics and checkpoints go to Tune; the driver's callback writes MLflow.

    Tune's schedulers need the search metric in every result. Metrics named in
    ``required`` are repeated from the last report that had them (and marked as repeated,
    so MLflow records each value once); before the first value exists nothing is reported.
    """

    def __init__(self, required: Sequence[str], step_metric: str, checkpoint_interval: int | None = None):
        from ray import tune

        self.required = tuple(required)
        self.step_metric = step_metric
        self.checkpoint_interval = checkpoint_interval
        self._carry: dict[str, Any] = {}
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            self.restore_from = checkpoint.to_directory(tempfile.mkdtemp(prefix="raysmith-restore-"))

    def checkpoint_due(self, iteration: int, every: int) -> bool:
        interval = self.checkpoint_interval
        return iteration % every == 0 or bool(interval and iteration % interval == 0)

    def new_checkpoint_dir(self) -> Path:
        return Path(tempfile.mkdtemp(prefix="raysmith-checkpoint-"))

    def report(self, metrics: Mapping[str, Any], *, step: int, checkpoint: Path | None = None) -> None:
        from ray import tune

        from pipelines.tracking.tune_callback import CARRIED_KEY

        payload = dict(metrics)
        payload[self.step_metric] = step
        carried = []
        for key in self.required:
            if key in metrics:
                self._carry[key] = metrics[key]
            elif key in self._carry:
                payload[key] = self._carry[key]
                carried.append(key)
        try:
            if all(key in payload for key in self.required):
                payload[CARRIED_KEY] = ",".join(carried)
                tune.report(payload, checkpoint=tune.Checkpoint.from_directory(str(checkpoint)) if checkpoint else None)
        finally:
            if checkpoint is not None:
                shutil.rmtree(checkpoint, ignore_errors=True)
