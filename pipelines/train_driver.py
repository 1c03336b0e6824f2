"""What the Ray Train pipeline kinds (``classify``, ``forgery-train``, ``watermark-train``) share,
on the driver and in the workers.

A :class:`~ray.train.torch.TorchTrainer` runs in a thread; a Train callback hands rank 0's
metrics to the driver through a Ray queue, and the driver reports them to the session (and
so to MLflow or Tune) as they arrive, with the epoch as the step.
"""

from __future__ import annotations

import os
import queue as queue_module
import threading
from pathlib import Path
from typing import Any

from typing import Literal

from pydantic import Field, model_validator

from pipelines.session import Session
from pipelines.spec import ExperimentSpec, SpecModel


class ScalingSettings(SpecModel):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    torch_threads: int | None = Field(None, ge=1)
    """Math threads per worker (default: cpus_per_worker, rounded)."""


class CropSource(SpecModel):
    """Training images drawn as random crops: of bundled photographs, or of a folder's images."""

    source: Literal["photos", "folder"] = "photos"
    path: str | None = None
    val_images: int = Field(64, ge=8)
    """Held-out crops (their own seed) scored after every epoch: the same ones every epoch."""

    @model_validator(mode="after")
    def _path(self) -> "CropSource":
        if self.source == "folder" and not self.path:
            raise ValueError("data.source folder needs data.path")
        return self


class StepTrainSettings(SpecModel):
    """Training counted in steps of random draws (no fixed dataset to pass over)."""

    epochs: int = Field(ge=1)
    steps_per_epoch: int = Field(100, ge=1)
    batch_size: int = Field(32, ge=1)
    """Global batch, split evenly across the workers."""
    lr: float = Field(1e-3, gt=0.0)
    time_limit_s: float | None = Field(None, gt=0.0)
    """Stop after the epoch during which this much training time has passed."""


class RayTrainSpec(ExperimentSpec):
    """What every Ray Train kind's spec has: ``scaling``, ``max_failures``, ``storage_path``,
    and a ``train.batch_size`` (the global batch) split evenly across the workers."""

    scaling: ScalingSettings = Field(default_factory=ScalingSettings)
    max_failures: int = Field(0, ge=0)
    """Worker-group restarts (from the latest checkpoint) before the run fails."""
    storage_path: str | None = None
    """Where Ray Train persists checkpoints (a shared path or ``s3://...`` on multi-node
    clusters); default: the run's directory."""

    @model_validator(mode="after")
    def _batch_splits(self) -> "RayTrainSpec":
        batch = getattr(getattr(self, "train", None), "batch_size", None)
        if batch is not None and batch % self.scaling.num_workers:
            raise ValueError(f"train.batch_size {batch} must be divisible by scaling.num_workers "
                             f"{self.scaling.num_workers}")
        return self


def relay_callback(channel):
    from ray.train.v2.api.callback import UserCallback

    class RankZeroRelay(UserCallback):
        """Hands rank 0's metrics (and the persisted checkpoint's path) to the driver."""

        def after_report(self, run_context, metrics, checkpoint):
            channel.put((dict(metrics[0]), checkpoint.path if checkpoint is not None else None))

    return RankZeroRelay()


def torch_trainer(loop, loop_config: dict[str, Any], spec, session: Session, checkpoint_file: str, kind: str,
                  callback, datasets: dict[str, Any] | None = None):
    """The TorchTrainer of a Train pipeline's spec: its ``scaling``, ``checkpoint`` (keep the best
    ``keep`` by ``score``), ``max_failures`` and ``storage_path`` (default: under the run's
    folder). With ``session.restore_from`` set the loop starts from that checkpoint (see
    :func:`starting_checkpoint`)."""
    import tempfile
    import uuid

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resume = resume_checkpoint(session.restore_from, checkpoint_file, kind)
    if resume is not None:  # Train V2 has no resume_from_checkpoint: the loop reads this path
        loop_config = {**loop_config, RESUME_KEY: resume}
    run_dir = getattr(session, "run_dir", None)
    storage = spec.storage_path or str(Path(run_dir or tempfile.mkdtemp(prefix="raysmith-train-")) / "ray_train")
    # Ray Train picks up any state under storage/name: on shared storage every run gets a name of its own
    name = spec.name if not spec.storage_path else f"{spec.name}-{uuid.uuid4().hex[:8]}"
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        datasets=datasets or None,
        scaling_config=ScalingConfig(num_workers=spec.scaling.num_workers, use_gpu=spec.scaling.use_gpu,
                                     resources_per_worker={"CPU": spec.scaling.cpus_per_worker}),
        run_config=RunConfig(
            name=name, storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep,
                                               checkpoint_score_attribute=spec.checkpoint.score,
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=spec.max_failures),
            callbacks=[callback],
        ),
    )


def fit_and_report(make_trainer, session: Session, score: str) -> tuple[Any, dict[str, Any], float | None]:
    """Build the trainer with ``make_trainer(callback)``, fit it, and report every epoch's
    metrics to ``session`` while it runs. Returns (Train result, last metrics, best ``score``)."""
    from ray.util.queue import Queue

    channel = Queue()
    trainer = make_trainer(relay_callback(channel))
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # re-raised in the driver's thread
            outcome["error"] = err

    worker = threading.Thread(target=fit, name="raysmith-train-fit", daemon=True)
    worker.start()
    last: dict[str, Any] = {}
    best: float | None = None
    try:
        while worker.is_alive() or not channel.empty():
            try:
                metrics, checkpoint_path = channel.get(timeout=0.5)
            except queue_module.Empty:
                continue
            except Exception:  # the queue actor's own Empty
                if not worker.is_alive() and channel.empty():
                    break
                continue
            last = metrics
            tracker = getattr(session, "tracker", None)  # a local run: where to --restore from, as it goes
            if checkpoint_path and tracker is not None:
                tracker.set_tags({"raysmith.latest_checkpoint": str(checkpoint_path)})
            value = metrics.get(score)
            if value is not None:
                best = value if best is None else max(best, value)
            session.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=int(metrics["epoch"]))
        worker.join()
    finally:
        channel.shutdown()  # a still-running fit then fails at its next report
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"], last, best


def best_checkpoint(result, score: str):
    """The kept checkpoint (a ``ray.train.Checkpoint``) with the highest ``score`` (else the latest)."""
    kept = getattr(result, "best_checkpoints", None) or []
    if kept:  # (checkpoint, metrics) pairs
        checkpoint, _ = max(kept, key=lambda pair: pair[1].get(score, float("-inf")))
        return checkpoint
    return result.checkpoint


def best_checkpoint_path(result, score: str) -> str | None:
    """The path of :func:`best_checkpoint`."""
    checkpoint = best_checkpoint(result, score)
    return checkpoint.path if checkpoint is not None else None


RESUME_KEY = "raysmith_resume_from"


def resume_checkpoint(path: str | None, file: str, kind: str) -> str | None:
    """The checkpoint folder to resume from (None without a path); refuses one without ``file``."""
    if not path:
        return None
    if not Path(path, file).is_file():
        raise ValueError(f"{path} is not a {kind} checkpoint (no {file})")
    return os.fspath(Path(path).resolve())


def starting_checkpoint(config: dict[str, Any]):
    """In a train loop: the checkpoint to start from. Ray Train's own (after a worker group
    restart) comes first; else the one the run was asked to resume from; else None."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config.get(RESUME_KEY):
        checkpoint = ray.train.Checkpoint.from_directory(config[RESUME_KEY])
    return checkpoint


def average_buffers(model, world: int) -> None:
    """Make every rank's floating-point buffers (BatchNorm running statistics) their mean
    across ranks, so all ranks evaluate, and rank 0 saves, the same model."""
    import torch
    import torch.distributed as dist

    buffers = [b for b in model.buffers() if torch.is_floating_point(b)]
    if world <= 1 or not buffers:
        return
    flat = torch.cat([b.detach().reshape(-1) for b in buffers])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for buffer in buffers:
        buffer.copy_(flat[offset: offset + buffer.numel()].view_as(buffer))
        offset += buffer.numel()


def average_gradients(parameters, world: int) -> None:
    """One all-reduce of every gradient, flattened, then divided by the world size."""
    import torch
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for parameter, grad in zip(parameters, grads):
        count = grad.numel()
        if parameter.grad is None:
            parameter.grad = flat[offset: offset + count].view_as(parameter).clone()
        else:
            parameter.grad.copy_(flat[offset: offset + count].view_as(parameter))
        offset += count


def worker_context(scaling: ScalingSettings):
    """In a train loop: (rank, world size, device), with this worker's math threads set."""
    import ray.train
    import ray.train.torch
    import torch

    context = ray.train.get_context()
    torch.set_num_threads(scaling.torch_threads or max(1, round(scaling.cpus_per_worker)))
    return context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device()


def broadcast_from_rank_zero(model, world: int) -> None:
    """Every rank starts from rank 0's parameters and buffers (no DDP wrapper does it here)."""
    if world <= 1:
        return
    import torch.distributed as dist

    for tensor in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(tensor.data, src=0)


def report_epoch(rank: int, metrics: dict[str, Any], write_checkpoint) -> None:
    """Every rank reports the epoch's metrics; rank 0 with a checkpoint that
    ``write_checkpoint(folder)`` writes (Ray Train persists and prunes it)."""
    import tempfile

    import ray.train

    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        write_checkpoint(Path(directory))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
