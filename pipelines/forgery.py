"""Face-forgery detection: ``forgery-train`` (Ray Train) and ``forgery-eval`` (Ray Data).

``forgery-train`` fits a detector of :mod:`vision.forensics` (Xception, SPSL, MAT) with
``scaling.num_workers`` Ray Train workers. Each epoch draws as many training frames as the
split has, with replacement and with probability inversely proportional to their class's
size, so real and fake frames are equally likely (class balance by sampling); the draw is
seeded by the epoch and shared out between the workers. Gradients are averaged across
workers with one all-reduce per step (MAT's attention-guided pass is a second forward pass
in the same step, which DDP's hooks do not allow). After every epoch all workers score the
validation split; the frame AUC, video AUC, EER, AP and accuracy go to MLflow and Ray Train
keeps the best checkpoints by ``val/auc``.

``forgery-eval`` scores a split with a trained detector as a Ray Data pipeline: the
manifest's rows are read, frames are read, decoded and resized in Ray Data (by each scoring
actor for its own batch, or by separate tasks: ``inference.decode``), an actor pool
(``ActorPoolStrategy``, the model loaded once per actor) scores them in batches, and the
driver computes frame-level and video-level AUC, EER, AP, accuracy at 0.5 and a breakdown
per manipulation method. Artifacts: the ROC curve (PNG), every frame's prediction
(parquet) and the errors table (parquet: path, error) of frames that could not be read,
which never stop the pipeline; predictions + errors = input rows, always.

Data (both kinds): a parquet manifest or a DeepfakeBench JSON
(:mod:`vision.forensics.manifest`), or ``generated``: a dataset written once from images that
PyPI packages ship (:mod:`vision.forensics.synthetic`) and reused while its settings stay the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from pipelines.errors import Problem
from pipelines.pipeline import Pipeline
from pipelines.registry import register
from pipelines.session import Session
from pipelines.spec import ExperimentSpec, SpecModel, did_you_mean
from pipelines.train_driver import (
    RayTrainSpec,
    average_buffers,
    average_gradients,
    best_checkpoint_path,
    broadcast_from_rank_zero,
    fit_and_report,
    report_epoch,
    starting_checkpoint,
    torch_trainer,
    worker_context,
)

CHECKPOINT_FILE = "state.pt"
METHOD_NAMES = ("nearest", "bilinear", "transposed", "blend")


# ----------------------------------------------------------------------------- spec sections

class GeneratedData(SpecModel):
    """A dataset made by :func:`vision.forensics.synthetic.generate` (nothing downloaded)."""

    methods: list[Literal["nearest", "bilinear", "transposed", "blend"]] = list(METHOD_NAMES)
    videos_per_method: int = Field(20, ge=5)
    frames_per_video: int = Field(4, ge=1)
    size: int = Field(64, ge=16)
    seed: int = 0
    directory: str = "raysmith_data/forgery"
    """Datasets are written under this folder, one sub-folder per set of settings (shared
    storage on a multi-node cluster: the workers read the frames from there)."""


class ForgeryData(SpecModel):
    source: Literal["generated", "parquet", "deepfakebench"] = "generated"
    path: str | None = None
    """``parquet``: the manifest (file or folder); ``deepfakebench``: the dataset JSON."""
    root: str | None = None
    """Relative frame paths are resolved against this (default: the manifest's folder)."""
    compression: str | None = None
    """DeepfakeBench's FaceForensics++-style files: ``c23``, ``c40`` or ``raw``."""
    generated: GeneratedData = Field(default_factory=GeneratedData)
    image_size: int = Field(64, ge=16)
    """Frames are resized (shorter side) and centre-cropped to this square."""
    frames_per_video: int | None = Field(None, ge=1)
    """Use at most this many frames of each video (the first ones)."""

    @model_validator(mode="after")
    def _path(self) -> "ForgeryData":
        if self.source != "generated" and not self.path:
            raise ValueError(f"data.source {self.source} needs data.path")
        return self


class DetectorSettings(SpecModel):
    name: str = "spsl_tiny"
    """A detector of :mod:`vision.forensics`: xception, xception_tiny, spsl_xception,
    spsl_tiny, mat_efficientnet_b4, mat_tiny."""
    pretrained: str | None = None
    """A user-supplied checkpoint loaded before training (``weights_only``; a 3-channel stem
    is adapted for SPSL; a head of another class count is left as initialised)."""


class MATSettings(SpecModel):
    """MAT's extra losses (ignored by the other detectors); the authors' values."""

    aux_weight: float = Field(0.5, ge=0.0)
    agda_weight: float = Field(1.0, ge=0.0)
    margin_real: float = Field(0.2, ge=0.0)
    margin_fake: float = Field(0.8, ge=0.0)
    margin_centres: float = Field(0.8, ge=0.0)
    momentum: float = Field(0.05, gt=0.0, le=1.0)
    momentum_decay: float = Field(0.9, gt=0.0, le=1.0)
    """The centres' momentum is multiplied by this every epoch."""


class ForgeryTrainSettings(SpecModel):
    epochs: int = Field(ge=1)
    batch_size: int = Field(32, ge=2)
    """Global batch, split evenly across the workers."""
    lr: float = Field(2e-4, gt=0.0)
    min_lr: float = Field(1e-6, ge=0.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    warmup_epochs: float = Field(0.0, ge=0.0)
    flip: bool = True
    """Random horizontal flips."""
    time_limit_s: float | None = Field(None, gt=0.0)
    """Stop after the epoch during which this much training time has passed."""


class TrainCheckpoints(SpecModel):
    keep: int = Field(2, ge=1)
    score: Literal["val/auc", "val/video_auc", "val/ap", "val/accuracy"] = "val/auc"


class ForgeryTrainSpec(RayTrainSpec):
    kind: Literal["forgery-train"] = "forgery-train"
    model: DetectorSettings = Field(default_factory=DetectorSettings)
    mat: MATSettings = Field(default_factory=MATSettings)
    data: ForgeryData = Field(default_factory=ForgeryData)
    train_split: str = "train"
    val_split: str = "val"
    train_methods: list[str] | None = None
    """Fake methods trained on (real frames always); default: all."""
    val_methods: list[str] | None = None
    train: ForgeryTrainSettings
    checkpoint: TrainCheckpoints = Field(default_factory=TrainCheckpoints)


class InferenceSettings(SpecModel):
    actors: int = Field(2, ge=1)
    """Size of the actor pool that scores frames (each loads the model once)."""
    cpus_per_actor: float = Field(1.0, gt=0.0)
    gpus_per_actor: float = Field(0.0, ge=0.0)
    batch_size: int = Field(32, ge=1)
    decode: Literal["auto", "in_actors", "tasks"] = "auto"
    """Where frames are read, decoded and resized: ``in_actors`` (each scoring actor decodes
    its own batch, so pixels never cross the object store: faster on CPU machines, measured),
    ``tasks`` (separate Ray Data tasks feed the actors: keeps GPU actors busy), ``auto``
    (``tasks`` when the actors have GPUs, else ``in_actors``)."""
    decode_cpus: float = Field(0.25, gt=0.0)
    """CPUs of each decoding task (``decode: tasks``)."""

    def decode_in_tasks(self) -> bool:
        return self.decode == "tasks" or (self.decode == "auto" and self.gpus_per_actor > 0)


class ForgeryEvalSpec(ExperimentSpec):
    kind: Literal["forgery-eval"] = "forgery-eval"
    checkpoint: str
    """A ``forgery-train`` checkpoint: its folder or its ``state.pt``."""
    data: ForgeryData = Field(default_factory=ForgeryData)
    split: str | None = "test"
    """The manifest split to score (None: every row)."""
    methods: list[str] | None = None
    """Fake methods scored (real frames always); default: all."""
    inference: InferenceSettings = Field(default_factory=InferenceSettings)


# ----------------------------------------------------------------------------- data

def _generated_directory(settings: GeneratedData) -> Path:
    digest = hashlib.sha256(json.dumps(settings.model_dump(mode="json", exclude={"directory"}),
                                       sort_keys=True).encode()).hexdigest()[:12]
    return Path(settings.directory).expanduser().resolve() / f"synthetic-{digest}"


def ensure_generated(settings: GeneratedData) -> Path:
    """The generated dataset's parquet manifest, writing the dataset first if needed."""
    from vision.forensics.synthetic import generate

    folder = _generated_directory(settings)
    manifest = folder / "manifest.parquet"
    if not manifest.is_file():
        partial = folder.with_name(folder.name + f".partial-{os.getpid()}")
        generate(partial, methods=settings.methods, videos_per_method=settings.videos_per_method,
                 frames_per_video=settings.frames_per_video, size=settings.size, seed=settings.seed)
        try:
            partial.rename(folder)  # atomic: a concurrent run either sees all of it or none
        except OSError:
            import shutil

            shutil.rmtree(partial, ignore_errors=True)  # another run finished first
    return manifest


def select_rows(data: ForgeryData, split: str | None, methods: list[str] | None) -> list[dict[str, Any]]:
    """The manifest rows of ``split`` (all when None) whose fakes are of ``methods``."""
    from vision.forensics.manifest import read_deepfakebench_json, read_parquet_manifest

    if data.source == "deepfakebench":
        rows = read_deepfakebench_json(data.path, split=split, compression=data.compression, root=data.root)
    else:
        path = ensure_generated(data.generated) if data.source == "generated" else data.path
        rows = read_parquet_manifest(path, root=data.root)
        if split is not None:
            rows = [row for row in rows if row["split"] == split]
    if methods is not None:
        rows = [row for row in rows if row["label"] == 0 or row["method"] in methods]
    if data.frames_per_video is not None:
        seen: dict[str, int] = {}
        kept = []
        for row in rows:
            count = seen.get(row["video_id"], 0)
            if count < data.frames_per_video:
                kept.append(row)
            seen[row["video_id"]] = count + 1
        rows = kept
    return rows


def read_frame(path: str, size: int) -> tuple[Any, str]:
    """(uint8 ``[size, size, 3]`` or None, error message or '')."""
    from vision.data import decode_image

    try:
        if "://" in path:
            import pyarrow.fs

            filesystem, location = pyarrow.fs.FileSystem.from_uri(path)
            with filesystem.open_input_file(location) as handle:
                data = handle.read()
        else:
            data = Path(path).read_bytes()
    except (OSError, ValueError) as err:
        return None, f"unreadable: {type(err).__name__}: {err}"[:300]
    image = decode_image(data, size, 3)
    if image is None:
        return None, "not a decodable image"
    return image, ""


def _check_data(data: ForgeryData, split_fields: dict[str, str | None], method_fields: dict[str, list[str] | None]) -> list[Problem]:
    if data.source != "generated":
        if "://" not in data.path and not Path(data.path).exists():
            return [Problem("data.path", f"no such file or folder: {data.path}")]
        if data.source == "deepfakebench" and not data.path.endswith(".json"):
            return [Problem("data.path", f"a DeepfakeBench dataset is a .json file, not {data.path}")]
        return []
    for field, methods in method_fields.items():
        unknown = [method for method in methods or [] if method not in data.generated.methods]
        if unknown:
            return [Problem(field, f"{unknown} not among data.generated.methods ({', '.join(data.generated.methods)})")]
    for field, split in split_fields.items():
        if split is not None and split not in ("train", "val", "test"):
            return [Problem(field, f"generated data has splits train, val and test, not '{split}'")]
    return []


def _check_detector(name: str, field: str) -> list[Problem]:
    from vision.forensics import DETECTORS

    if name not in DETECTORS:
        return [Problem(field, f"unknown detector '{name}'{did_you_mean(name, DETECTORS)}; available: {', '.join(DETECTORS)}")]
    return []


# ----------------------------------------------------------------------------- training

def _frames_dataset(rows: list[dict[str, Any]], size: int):
    import numpy as np
    import torch
    from torch.utils.data import Dataset

    class Frames(Dataset):
        """(uint8 [3, size, size], label, readable) per row; an unreadable frame is zeros."""

        def __len__(self) -> int:
            return len(rows)

        def __getitem__(self, index: int):
            image, error = read_frame(rows[index]["path"], size)
            if image is None:
                image = np.zeros((size, size, 3), dtype=np.uint8)
            return torch.from_numpy(np.array(image)).permute(2, 0, 1), rows[index]["label"], not error

    return Frames()


def balanced_indices(labels: list[int], count: int, seed: int, epoch: int):
    """``count`` row indices drawn with replacement, each class equally likely overall."""
    import torch

    y = torch.tensor(labels)
    counts = torch.bincount(y, minlength=2).clamp_min(1).float()
    weights = (1.0 / counts)[y]
    generator = torch.Generator().manual_seed(seed * 7919 + epoch)
    return torch.multinomial(weights, count, replacement=True, generator=generator)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One rank of a ``forgery-train`` run."""
    import numpy as np
    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader

    from vision.data import random_flip
    from vision.forensics import build_detector
    from vision.forensics.metrics import detection_report
    from vision.forensics.training import detector_loss, fake_probability, make_regional_loss
    from vision.forensics.xception import load_checkpoint
    from vision.training import learning_rate, parameter_groups

    spec = ForgeryTrainSpec.model_validate(config["spec"])
    rank, world, device = worker_context(spec.scaling)
    train_rows = select_rows(spec.data, spec.train_split, spec.train_methods)
    val_rows = select_rows(spec.data, spec.val_split, spec.val_methods)
    size = spec.data.image_size
    per_worker = spec.train.batch_size // world
    steps_per_epoch = len(train_rows) // spec.train.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_rows)} training frames make no batch of {spec.train.batch_size}")

    torch.manual_seed(spec.seed)  # the same initial weights on every rank
    model = build_detector(spec.model.name)
    if spec.model.pretrained:
        load_checkpoint(model, spec.model.pretrained, strict_head=False)
    model.to(device)
    regional = make_regional_loss(model, margin_real=spec.mat.margin_real, margin_fake=spec.mat.margin_fake,
                                  margin_centres=spec.mat.margin_centres, momentum=spec.mat.momentum,
                                  sum_across_ranks=dist.all_reduce if world > 1 else None)
    if regional is not None:
        regional.to(device)
    optimizer = torch.optim.AdamW(parameter_groups(model, spec.train.weight_decay), lr=spec.train.lr)
    start_epoch = step = 0
    elapsed, best = 0.0, None
    checkpoint = starting_checkpoint(config)
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if regional is not None and state.get("regional") is not None:
            regional.load_state_dict(state["regional"])
            regional.momentum = float(state["regional_momentum"])
        start_epoch, step, elapsed = int(state["epoch"]), int(state["step"]), float(state["elapsed"])
        best = state.get("best")
    parameters = [p for p in model.parameters() if p.requires_grad]
    broadcast_from_rank_zero(model, world)

    train_data = _frames_dataset(train_rows, size)
    labels = [row["label"] for row in train_rows]
    total_steps, warmup_steps = spec.train.epochs * steps_per_epoch, round(spec.train.warmup_epochs * steps_per_epoch)
    my_val = list(range(rank, len(val_rows), world))
    for epoch in range(start_epoch, spec.train.epochs):
        generator = torch.Generator().manual_seed(spec.seed * 1_000_003 + epoch * world + rank)
        indices = balanced_indices(labels, steps_per_epoch * spec.train.batch_size, spec.seed, epoch)
        loader = DataLoader(train_data, batch_size=per_worker, sampler=indices[rank::world].tolist(), drop_last=True)
        started = time.perf_counter()
        model.train()
        sums: dict[str, float] = {}
        seen = unreadable = 0
        for pixels, batch_labels, readable in loader:
            rate = learning_rate(step, total_steps, warmup_steps, spec.train.lr, spec.train.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = rate
            unreadable += int((~readable).sum())
            weight = readable.float()
            pixels = pixels.float().div_(255.0)
            if spec.train.flip:
                pixels = random_flip(pixels, generator)
            pixels, batch_labels = pixels.to(device), batch_labels.to(device)
            keep = readable.to(device)
            if bool(keep.any()):
                loss, parts = detector_loss(model, pixels[keep], batch_labels[keep], regional, spec.mat.aux_weight,
                                            spec.mat.agda_weight, generator)
            else:  # still one step like every other rank, with no weight
                loss, parts = model(pixels).sum() * 0.0, {}
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:
                average_gradients(parameters, world)
            optimizer.step()
            step += 1
            counted = int(weight.sum())
            seen += counted
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + value * counted
        if regional is not None:
            regional.decay_momentum(spec.mat.momentum_decay)
        epoch_s = time.perf_counter() - started
        average_buffers(model, world)  # every rank scores, and rank 0 saves, the same model

        scores, val_unreadable = [], 0
        for start in range(0, len(my_val), 64):
            chunk = my_val[start:start + 64]
            batch = [read_frame(val_rows[i]["path"], size) for i in chunk]
            good = [(i, image) for i, (image, error) in zip(chunk, batch) if not error]
            val_unreadable += len(chunk) - len(good)
            if good:
                pixels = torch.from_numpy(np.stack([image for _, image in good])).permute(0, 3, 1, 2).float().div_(255.0)
                probabilities = fake_probability(model, pixels.to(device)).cpu().tolist()
                scores += [(i, p) for (i, _), p in zip(good, probabilities)]
        gathered: list[Any] = [None] * world
        totals = torch.tensor([sums.get("ce", 0.0), seen, unreadable + val_unreadable, epoch_s,
                               sums.get("regional", 0.0), sums.get("agda_ce", 0.0)], dtype=torch.float64, device=device)
        if world > 1:  # nccl reduces device tensors only
            dist.all_gather_object(gathered, scores)
            dist.all_reduce(totals)
        else:
            gathered = [scores]
        ce_sum, trained, corrupt, worker_seconds, regional_sum, agda_sum = totals.cpu().tolist()
        merged = sorted(pair for part in gathered for pair in part)
        elapsed += worker_seconds / world
        metrics: dict[str, Any] = {
            "epoch": epoch + 1, "step": step, "lr": rate, "train/ce": ce_sum / max(1.0, trained),
            "time/epoch_s": worker_seconds / world, "time/train_s": elapsed,
            "throughput/images_per_s": trained / max(1e-9, worker_seconds / world),
            "data/train_frames": len(train_rows), "data/val_frames": len(val_rows), "data/corrupt_images": corrupt,
        }
        if regional is not None:
            metrics["train/regional"] = regional_sum / max(1.0, trained)
            metrics["train/agda_ce"] = agda_sum / max(1.0, trained)
        labels_val = [val_rows[i]["label"] for i, _ in merged]
        if len(set(labels_val)) != 2:  # the same merged scores on every rank: all ranks stop here
            raise ValueError(f"epoch {epoch + 1}: the readable frames of validation split '{spec.val_split}' "
                             f"({len(merged)} of {len(val_rows)}) have labels {sorted(set(labels_val))}; "
                             f"AUC needs real (0) and fake (1) frames")
        report = detection_report(labels_val, [p for _, p in merged], [val_rows[i]["video_id"] for i, _ in merged])
        metrics.update({"val/auc": report.frame_auc, "val/video_auc": report.video_auc, "val/eer": report.eer,
                        "val/ap": report.ap, "val/accuracy": report.accuracy})
        best = report.frame_auc if best is None else max(best, report.frame_auc)
        metrics["val/best_auc"] = best
        done = spec.train.time_limit_s is not None and elapsed >= spec.train.time_limit_s
        metrics["stopped_early"] = float(done and epoch + 1 < spec.train.epochs)
        report_epoch(rank, metrics, lambda folder: torch.save({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "detector": spec.model.name,
            "regional": regional.state_dict() if regional is not None else None,
            "regional_momentum": regional.momentum if regional is not None else None,
            "epoch": epoch + 1, "step": step, "elapsed": elapsed, "best": best,
            "image_size": size, "spec": config["spec"]}, folder / CHECKPOINT_FILE))
        if done:
            break


TRAIN_REPORTED = ("val/auc", "val/video_auc", "val/eer", "val/ap", "val/accuracy", "val/best_auc", "train/ce", "epoch")


@register
class ForgeryTrainPipeline(Pipeline):
    kind = "forgery-train"
    spec_model = ForgeryTrainSpec
    summary = "train a face-forgery detector (Xception, SPSL, MAT) on Ray Train; AUC every epoch"
    step_metric = "epoch"
    time_attr = "epoch"
    key_metrics = ("val/auc", "val/video_auc", "val/eer", "train/ce", "epoch")
    curve_metrics = ("val/auc", "val/video_auc")

    def check(self, spec: ForgeryTrainSpec) -> list[Problem]:
        problems = _check_detector(spec.model.name, "model.name")
        if spec.model.pretrained and not Path(spec.model.pretrained).is_file():
            problems.append(Problem("model.pretrained", f"no such file: {spec.model.pretrained}"))
        problems += _check_data(spec.data, {"train_split": spec.train_split, "val_split": spec.val_split},
                                {"train_methods": spec.train_methods, "val_methods": spec.val_methods})
        return problems

    def reported_metrics(self, spec: ForgeryTrainSpec) -> tuple[set[str], tuple[str, ...]]:
        return set(TRAIN_REPORTED) | {"time/train_s", "iteration"}, ("train/", "val/")

    def trial_resources(self, spec: ForgeryTrainSpec) -> list[dict[str, float]]:
        worker = {"CPU": spec.scaling.cpus_per_worker, **({"GPU": 1.0} if spec.scaling.use_gpu else {})}
        return [{"CPU": 1.0}] + [dict(worker) for _ in range(spec.scaling.num_workers)]

    def progress_total(self, spec: ForgeryTrainSpec) -> int | None:
        return spec.train.epochs

    def run(self, spec: ForgeryTrainSpec, session: Session) -> dict[str, Any]:
        train_rows = select_rows(spec.data, spec.train_split, spec.train_methods)  # generates the data once, here
        val_rows = select_rows(spec.data, spec.val_split, spec.val_methods)
        for name, rows in (("train_split", train_rows), ("val_split", val_rows)):
            classes = {row["label"] for row in rows}
            if classes != {0, 1}:
                raise ValueError(f"{name} '{getattr(spec, name)}' has {len(rows)} frames with labels {sorted(classes)}; "
                                 f"it needs real (0) and fake (1) frames")
        def make_trainer(callback):
            return torch_trainer(train_loop_per_worker, {"spec": spec.model_dump(mode="json")}, spec, session,
                                 CHECKPOINT_FILE, "forgery-train", callback)

        result, last, _ = fit_and_report(make_trainer, session, spec.checkpoint.score)
        summary: dict[str, Any] = {key: last[key] for key in self.key_metrics if key in last}
        summary["best/val_auc"] = last.get("val/best_auc")
        checkpoint = best_checkpoint_path(result, spec.checkpoint.score)
        if checkpoint is not None:
            summary["checkpoint"] = checkpoint
        return summary


# ----------------------------------------------------------------------------- evaluation

def checkpoint_file(path: str) -> Path:
    location = Path(path)
    return location / CHECKPOINT_FILE if location.is_dir() else location


def load_detector(path: str):
    """(model in eval mode, its image size) from a ``forgery-train`` checkpoint."""
    import torch

    from vision.forensics import build_detector

    state = torch.load(checkpoint_file(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "detector" not in state or "model" not in state:
        raise ValueError(f"{path} is not a forgery-train checkpoint (it has no 'detector' and 'model')")
    model = build_detector(state["detector"])
    model.load_state_dict(state["model"])
    return model.eval(), int(state.get("image_size") or 0)


class DecodeFrames:
    """Ray Data batch function: read and resize each row's frame; a failure is kept as an
    ``error`` with a zero image, so no row is lost."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        images, errors = [], []
        for path in batch["path"]:
            image, error = read_frame(str(path), self.size)
            images.append(image if image is not None else np.zeros((self.size, self.size, 3), dtype=np.uint8))
            errors.append(error)
        return {**batch, "image": np.stack(images), "error": np.array(errors, dtype=object)}


class ScoreFrames:
    """Ray Data actor: loads the detector once, scores the readable frames of each batch
    (decoding them first when ``decode_size`` is set)."""

    def __init__(self, checkpoint: str, threads: int, decode_size: int | None = None):
        import torch

        torch.set_num_threads(max(1, threads))
        self.model, _ = load_detector(checkpoint)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.decode = DecodeFrames(decode_size) if decode_size else None

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np
        import torch

        from vision.forensics.training import fake_probability

        if self.decode is not None:
            batch = self.decode(batch)
        ok = np.array([not error for error in batch["error"]], dtype=bool)
        scores = np.full(len(ok), np.nan, dtype=np.float64)
        if ok.any():
            pixels = torch.from_numpy(np.ascontiguousarray(batch["image"][ok])).permute(0, 3, 1, 2).float().div_(255.0)
            scores[ok] = fake_probability(self.model, pixels.to(self.device)).cpu().numpy()
        out = {key: value for key, value in batch.items() if key != "image"}
        out["score"] = scores
        return out


def evaluate_rows(rows: list[dict[str, Any]], checkpoint: str, size: int, inference: InferenceSettings):
    """Score ``rows`` with a Ray Data pipeline; a pandas frame with every row and its
    ``score`` (NaN) and ``error`` ('' when read)."""
    import ray

    dataset = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // inference.batch_size, 64)))
    in_tasks = inference.decode_in_tasks()
    if in_tasks:
        dataset = dataset.map_batches(DecodeFrames(size), batch_size=inference.batch_size, num_cpus=inference.decode_cpus)
    scored = dataset.map_batches(
        ScoreFrames, fn_constructor_kwargs={"checkpoint": str(checkpoint_file(checkpoint)),
                                            "threads": max(1, round(inference.cpus_per_actor)),
                                            "decode_size": None if in_tasks else size},
        batch_size=inference.batch_size, num_cpus=inference.cpus_per_actor, num_gpus=inference.gpus_per_actor or None,
        compute=ray.data.ActorPoolStrategy(size=inference.actors))
    return scored.to_pandas()


def roc_png(labels, scores, title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vision.forensics.metrics import roc_auc, roc_curve

    fpr, tpr, _ = roc_curve(labels, scores)
    figure, axes = plt.subplots(figsize=(4.5, 4.5))
    axes.plot(fpr, tpr, label=f"AUC {roc_auc(labels, scores):.4f}")
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":")
    axes.set(xlabel="false-positive rate (real called fake)", ylabel="true-positive rate", title=title)
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


@register
class ForgeryEvalPipeline(Pipeline):
    kind = "forgery-eval"
    spec_model = ForgeryEvalSpec
    summary = "score a forgery detector over a manifest with Ray Data (AUC, video AUC, EER, AP, per method)"
    key_metrics = ("eval/frame_auc", "eval/video_auc", "eval/eer", "eval/frames", "eval/errors")

    def check(self, spec: ForgeryEvalSpec) -> list[Problem]:
        if not checkpoint_file(spec.checkpoint).is_file():
            return [Problem("checkpoint", f"no forgery-train checkpoint at {spec.checkpoint} "
                                          f"(a checkpoint folder with {CHECKPOINT_FILE}, or the file)")]
        return _check_data(spec.data, {"split": spec.split}, {"methods": spec.methods})

    def reported_metrics(self, spec: ForgeryEvalSpec) -> tuple[set[str], tuple[str, ...]]:
        return set(self.key_metrics) | {"iteration"}, ("eval/",)

    def trial_resources(self, spec: ForgeryEvalSpec) -> list[dict[str, float]]:
        actor = {"CPU": spec.inference.cpus_per_actor, **({"GPU": spec.inference.gpus_per_actor}
                                                           if spec.inference.gpus_per_actor else {})}
        decoding = [{"CPU": spec.inference.decode_cpus}] if spec.inference.decode_in_tasks() else []
        return [{"CPU": 1.0}] + [dict(actor) for _ in range(spec.inference.actors)] + decoding

    def run(self, spec: ForgeryEvalSpec, session: Session) -> dict[str, Any]:
        import numpy as np

        from vision.forensics.metrics import detection_report

        import ray

        total = float(ray.cluster_resources().get("CPU", 0.0))
        decoding = spec.inference.decode_cpus if spec.inference.decode_in_tasks() else 0.0
        needed = spec.inference.actors * spec.inference.cpus_per_actor + decoding
        if needed > total + 1e-9:
            raise ValueError(f"the scoring actors{' and one decoding task' if decoding else ''} need {needed:g} CPUs "
                             f"(inference.actors {spec.inference.actors} x inference.cpus_per_actor "
                             f"{spec.inference.cpus_per_actor:g}{f' + inference.decode_cpus {decoding:g}' if decoding else ''}) "
                             f"but this cluster has {total:g}; lower them (fractions work)")
        rows = select_rows(spec.data, spec.split, spec.methods)
        if not rows:
            raise ValueError(f"no frames to score: split '{spec.split}' and methods {spec.methods} select none")
        _, trained_size = load_detector(spec.checkpoint)
        started = time.perf_counter()
        frame = evaluate_rows(rows, spec.checkpoint, spec.data.image_size, spec.inference)
        seconds = time.perf_counter() - started
        errors = frame[frame["error"] != ""]
        scored = frame[frame["error"] == ""]
        if len(scored) + len(errors) != len(rows):
            raise RuntimeError(f"{len(rows)} rows went in but {len(scored)} predictions and {len(errors)} errors came out")
        metrics: dict[str, float] = {"eval/frames": float(len(scored)), "eval/errors": float(len(errors)),
                                     "eval/rows": float(len(rows)), "eval/seconds": seconds,
                                     "eval/frames_per_s": len(rows) / max(seconds, 1e-9)}
        summary: dict[str, Any] = {}
        labels = scored["label"].to_numpy().astype(np.int64)
        scores = scored["score"].to_numpy().astype(np.float64)
        if len(set(labels.tolist())) == 2:
            report = detection_report(labels, scores, scored["video_id"].astype(str).to_numpy())
            metrics.update(report.as_metrics("eval/"))
            real = scored["label"] == 0
            for method in sorted(set(scored.loc[~real, "method"])):
                part = scored[real | (scored["method"] == method)]
                part_report = detection_report(part["label"].to_numpy(), part["score"].to_numpy(),
                                               part["video_id"].astype(str).to_numpy())
                metrics[f"eval/{method}/frame_auc"] = part_report.frame_auc
                metrics[f"eval/{method}/video_auc"] = part_report.video_auc
                metrics[f"eval/{method}/frames"] = float((scored["method"] == method).sum())
        elif len(scored):
            metrics["eval/accuracy"] = float(((scores >= 0.5).astype(np.int64) == labels).mean())
        session.report(metrics, step=1)
        with tempfile.TemporaryDirectory() as directory:
            folder = Path(directory)
            scored.drop(columns=["error"]).to_parquet(folder / "predictions.parquet", index=False)
            errors[["path", "video_id", "method", "label", "error"]].to_parquet(folder / "errors.parquet", index=False)
            if "eval/frame_auc" in metrics:
                roc_png(labels, scores, f"{spec.name}: frame-level ROC", folder / "roc.png")
            for file in sorted(folder.iterdir()):
                session.log_artifact(file, "evaluation")
        summary.update({key: metrics[key] for key in self.key_metrics if key in metrics})
        if trained_size and trained_size != spec.data.image_size:
            summary["note"] = f"the detector was trained at {trained_size} px, scored at {spec.data.image_size} px"
        summary["errors"] = [f"{row.path}: {row.error}" for row in errors.head(20).itertuples()]
        return summary
