"""How a running pipeline reports: straight to MLflow (a local run or a Ray Job) or to Tune.

A pipeline calls :meth:`Session.report` once per iteration with flat metrics, asks
:meth:`Session.checkpoint_due` whether to save, and saves into
:meth:`Session.new_checkpoint_dir`. It resumes from :attr:`Session.restore_from` when set.
"""

from __future__ import annotations

import json
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

    def checkpoint_due(self, iteration: int, every: int, metrics: Mapping[str, Any] | None = None) -> bool:
        """Whether the iteration that produced ``metrics`` should save a checkpoint."""
        return iteration % every == 0

    @abstractmethod
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Keep a file (plot, table) the run produced, under ``artifact_path``."""


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

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.tracker.log_artifact(path, artifact_path)

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
    so MLflow records each value once). The repeated values travel inside checkpoints, so
    a trial restored by PBT or after a failure reports from its first iteration on. Before a
    value exists at all nothing is reported, and a checkpoint saved meanwhile waits for the
    next report rather than being dropped.

    With ``checkpoint_every=(time_attr, interval)`` (PBT), a checkpoint is also saved
    whenever ``time_attr`` has advanced by ``interval`` since the last one: the rule PBT
    uses to decide when to exploit, so there is always a fresh checkpoint to clone.
    """

    STATE_FILE = "raysmith_session.json"

    def __init__(self, required: Sequence[str], step_metric: str, restore_from: str | None = None,
                 checkpoint_every: tuple[str, float] | None = None):
        self.required = tuple(required)
        self.step_metric = step_metric
        self.restore_from = restore_from
        self.checkpoint_every = checkpoint_every
        self._carry: dict[str, Any] = {}
        self._last_checkpoint_time = 0.0
        self._pending: Path | None = None
        state_file = Path(restore_from, self.STATE_FILE) if restore_from else None
        if state_file is not None and state_file.is_file():
            state = json.loads(state_file.read_text())
            self._carry = state.get("carried", {})
            self._last_checkpoint_time = state.get("last_checkpoint_time", 0.0)

    def checkpoint_due(self, iteration: int, every: int, metrics: Mapping[str, Any] | None = None) -> bool:
        due = super().checkpoint_due(iteration, every, metrics)
        if self.checkpoint_every is not None and metrics is not None:
            attribute, interval = self.checkpoint_every
            value = metrics.get(attribute)
            # the same rule, on the same reported values, as PBT's "time to perturb?"
            if value is not None and float(value) - self._last_checkpoint_time >= interval:
                self._last_checkpoint_time = float(value)
                due = True
        return due

    def new_checkpoint_dir(self) -> Path:
        return Path(tempfile.mkdtemp(prefix="raysmith-checkpoint-"))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copied into the trial's directory (``artifacts/<artifact_path>``), beside Tune's results."""
        from ray import tune

        target = Path(tune.get_context().get_trial_dir()) / "artifacts" / (artifact_path or "")
        target.mkdir(parents=True, exist_ok=True)
        source = Path(path)
        if source.is_dir():
            shutil.copytree(source, target / source.name, dirs_exist_ok=True)
        else:
            shutil.copy2(source, target / source.name)

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
        if checkpoint is not None:
            if self._pending is not None:
                shutil.rmtree(self._pending, ignore_errors=True)
            self._pending = Path(checkpoint)
        if not all(key in payload for key in self.required):
            return  # nothing to report yet; a checkpoint waits in self._pending
        payload[CARRIED_KEY] = ",".join(carried)
        pending, self._pending = self._pending, None
        try:
            if pending is not None:
                state = {"carried": self._carry, "last_checkpoint_time": self._last_checkpoint_time}
                (pending / self.STATE_FILE).write_text(json.dumps(state))
            tune.report(payload, checkpoint=tune.Checkpoint.from_directory(str(pending)) if pending else None)
        finally:
            if pending is not None:
                shutil.rmtree(pending, ignore_errors=True)
