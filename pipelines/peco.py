"""PeCo on Ray Train: ``peco-moco``, ``peco-tokenizer``, ``peco-mim``, and ``peco``, the chain.

Each stage is one Ray Train run (``scaling.num_workers`` workers, gradients averaged by one
all-reduce per step) drawing its images as random crops of the bundled photographs
(``photos``) or of a folder's images (decoded as they are drawn; unreadable files are
counted in ``data/corrupt_images`` and replaced by another draw):

1. ``peco-moco``: MoCo v3 on a ViT (:mod:`vision.peco.moco`); writes ``backbone.pt`` (the
   base encoder, PeCo's perceptual model), logged to MLflow as ``model/backbone.pt``.
2. ``peco-tokenizer``: the VQGAN-style tokenizer (:mod:`vision.peco.tokenizer`) with pixel,
   perceptual (features of ``perceptual.model``) and PatchGAN losses; logs codebook use
   (perplexity, used and dead codes), PSNR, and a reconstruction grid per checkpoint;
   writes ``tokenizer.pt`` (MLflow: ``model/tokenizer.pt``). ``perceptual.weight: 0`` is the
   plain pixel-loss codebook.
3. ``peco-mim``: BEiT pre-training (:mod:`vision.peco.mim`, :mod:`vision.peco.masking`)
   against ``tokenizer``'s ids; writes ``backbone.pt`` (MLflow: ``model/backbone.pt``).
4. Downstream: ``classify`` runs with ``model.pretrained`` set to the MIM backbone, fine-tuned
   or as a linear probe (``model.linear_probe``).

A stage's input model is a file path or an MLflow artifact URI
(``runs:/<run id>/model/tokenizer.pt``), so any stage can be rerun alone. The ``peco`` kind
runs the stages it lists in order, each as a child MLflow run of the chain's run, passing
each stage's ``runs:/`` URI to the next.
"""

from __future__ import annotations

import io
import random
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from pipelines.errors import Problem
from pipelines.pipeline import Pipeline
from pipelines.registry import register
from pipelines.session import LocalSession, Session
from pipelines.spec import ExperimentSpec, SpecModel, did_you_mean
from pipelines.train_driver import (
    CropSource,
    RayTrainSpec,
    ScalingSettings,
    StepTrainSettings,
    average_buffers,
    average_gradients,
    best_checkpoint,
    broadcast_from_rank_zero,
    fit_and_report,
    report_epoch,
    starting_checkpoint,
    torch_trainer,
    worker_context,
)

CHECKPOINT_FILE = "state.pt"
BACKBONE_FILE = "backbone.pt"
TOKENIZER_FILE = "tokenizer.pt"
GRID_FILE = "reconstructions.png"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


# ------------------------------------------------------------------------------- shared parts

class PecoData(CropSource):
    """``photos``: scikit-image's and scikit-learn's bundled photographs; ``folder``: every image
    under ``path`` (recursively; a local folder or a URI pyarrow reads, e.g. ``s3://``), decoded
    when drawn."""

    image_size: int = Field(32, ge=16)


class StageTrain(StepTrainSettings):
    batch_size: int = Field(64, ge=2)
    min_lr: float = Field(1e-6, ge=0.0)
    warmup_epochs: float = Field(0.0, ge=0.0)
    weight_decay: float = Field(0.05, ge=0.0)


class StageCheckpoints(SpecModel):
    keep: int = Field(2, ge=1)
    score: str = "epoch"
    """Reported metric that ranks kept checkpoints, one where higher is better (``val/psnr``,
    ``val/accuracy``, ...); ``epoch`` keeps the latest."""


class PecoStageSpec(RayTrainSpec):
    data: PecoData = Field(default_factory=PecoData)
    checkpoint: StageCheckpoints = Field(default_factory=StageCheckpoints)


class Pictures:
    """Random square crops (side between the output size and twice it) of the stage's images."""

    def __init__(self, data: PecoData):
        self.data = data
        self.corrupt = 0
        if data.source == "photos":
            from vision.forensics.synthetic import photographs

            self.pictures, self.paths = photographs(), []
        else:
            import pyarrow.fs

            self.filesystem, root = (pyarrow.fs.FileSystem.from_uri(data.path) if "://" in data.path
                                     else (pyarrow.fs.LocalFileSystem(), str(Path(data.path).resolve())))
            found = self.filesystem.get_file_info(pyarrow.fs.FileSelector(root, recursive=True))
            self.pictures = []
            self.paths = sorted(info.path for info in found if info.type == pyarrow.fs.FileType.File
                                and Path(info.path).suffix.lower() in IMAGE_SUFFIXES)
            if not self.paths:
                raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {data.path}")

    def _picture(self, rng):
        import numpy as np
        from PIL import Image

        if self.pictures:
            return self.pictures[int(rng.integers(len(self.pictures)))]
        for _ in range(100):
            path = self.paths[int(rng.integers(len(self.paths)))]
            try:
                with self.filesystem.open_input_stream(path) as stream:
                    encoded = stream.read()
                with Image.open(io.BytesIO(encoded)) as picture:
                    return np.asarray(picture.convert("RGB"))
            except (OSError, ValueError, Image.DecompressionBombError):
                self.corrupt += 1
        raise ValueError(f"100 draws in a row from {self.data.path} could not be decoded")

    def crops(self, count: int, size: int, rng):
        from vision.data import random_crops

        return random_crops([self._picture(rng) for _ in range(count)], count, size, rng)


def load_reference(reference: str | None, run_dir: Path | None, what: str, tracking_uri: str | None) -> bytes | None:
    """The bytes of a stage's input model: a local path or ``runs:/<run id>/<artifact>``."""
    if not reference:
        return None
    if reference.startswith("runs:/"):
        from pipelines.classify import fetch_artifact

        return Path(fetch_artifact(reference, run_dir, tracking_uri, what)).read_bytes()
    if not Path(reference).is_file():
        raise ValueError(f"{what}: no such file: {reference}")
    return Path(reference).read_bytes()


def _reference_problem(field: str, reference: str | None) -> list[Problem]:
    if reference and not reference.startswith("runs:/") and not Path(reference).is_file():
        return [Problem(field, f"no such file: {reference} (give a path or runs:/<run id>/<artifact path>)")]
    return []


def _torch_load(blob: bytes) -> dict[str, Any]:
    import torch

    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


def _backbone(name: str, image_size: int, **kwargs):
    from vision.backbones.vit import FACTORIES

    return FACTORIES[name](num_classes=0, img_size=image_size, **kwargs)


def _backbone_problem(field: str, name: str) -> list[Problem]:
    from vision.backbones.vit import FACTORIES

    if name not in FACTORIES:
        return [Problem(field, f"unknown ViT '{name}'{did_you_mean(name, FACTORIES)}; available: {', '.join(FACTORIES)}")]
    return []


def _fetch(config: dict[str, Any], key: str) -> dict[str, Any] | None:
    import ray

    reference = config.get(key)
    return None if reference is None else _torch_load(ray.get(reference))


def _normalise(images):
    from vision.peco.tokenizer import IMAGENET_MEAN, IMAGENET_STD

    return (images - images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _load_state(config, objects: dict[str, Any]) -> tuple[int, int, float]:
    """Restore ``objects`` (name -> module or optimizer) from the starting checkpoint, if any:
    (epoch, step, elapsed seconds)."""
    import torch

    checkpoint = starting_checkpoint(config)
    if checkpoint is None:
        return 0, 0, 0.0
    with checkpoint.as_directory() as directory:
        state = torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    for name, thing in objects.items():
        thing.load_state_dict(state[name])
    return int(state["epoch"]), int(state["step"]), float(state["elapsed"])


def _epoch_totals(started: float, pictures: "Pictures", world: int, device) -> tuple[float, int]:
    """(the epoch's wall time averaged over ranks, so all ranks stop at the same epoch; the
    unreadable images all ranks have met so far)."""
    import torch

    totals = torch.tensor([time.perf_counter() - started, pictures.corrupt], dtype=torch.float64, device=device)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(totals)
    return float(totals[0].cpu()) / world, int(totals[1].cpu())


def _set_lr(optimizers, train: StageTrain, step: int, total: int) -> float:
    from vision.training import learning_rate

    rate = learning_rate(step, total, round(train.warmup_epochs * train.steps_per_epoch), train.lr, train.min_lr)
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = rate
    return rate


def _run_stage(pipeline: Pipeline, loop, spec: PecoStageSpec, session: Session, kind: str, references: dict[str, str | None],
               model_file: str, extra_artifacts: tuple[str, ...] = ()) -> dict[str, Any]:
    """Fetch the input models on the driver (Ray object store to the workers), fit, report, and
    log the best checkpoint's ``model_file`` to MLflow under ``model/``."""
    import ray

    config: dict[str, Any] = {"spec": spec.model_dump(mode="json")}
    run_dir = getattr(session, "run_dir", None)
    for key, (reference, what) in references.items():
        blob = load_reference(reference, run_dir, what, spec.tracking.uri)
        config[key] = None if blob is None else ray.put(blob)

    def make_trainer(callback):
        return torch_trainer(loop, config, spec, session, CHECKPOINT_FILE, kind, callback)

    result, last, best = fit_and_report(make_trainer, session, spec.checkpoint.score)
    summary: dict[str, Any] = {key: last[key] for key in pipeline.key_metrics if key in last}
    summary[f"best/{spec.checkpoint.score}"] = best
    checkpoint = best_checkpoint(result, spec.checkpoint.score)
    if checkpoint is not None:
        summary["checkpoint"] = checkpoint.path
        with checkpoint.as_directory() as folder:  # a local copy when the storage is remote
            session.log_artifact(Path(folder) / model_file, "model")
            for name in extra_artifacts:
                if Path(folder, name).is_file():
                    session.log_artifact(Path(folder) / name, "images")
    return summary


class _StagePipeline(Pipeline):
    step_metric = "epoch"
    time_attr = "epoch"
    scores: tuple[str, ...] = ("epoch",)
    """What ``checkpoint.score`` may be: reported metrics where higher is better."""

    def check_stage(self, spec: PecoStageSpec) -> list[Problem]:
        if spec.data.source == "folder" and "://" not in spec.data.path and not Path(spec.data.path).is_dir():
            return [Problem("data.path", f"no such folder: {spec.data.path}")]
        if spec.checkpoint.score not in self.scores:
            return [Problem("checkpoint.score", f"'{spec.checkpoint.score}' cannot rank checkpoints"
                                                f"{did_you_mean(spec.checkpoint.score, self.scores)}; the reported metrics "
                                                f"where higher is better: {', '.join(self.scores)}")]
        return []

    def reported_metrics(self, spec) -> tuple[set[str], tuple[str, ...]]:
        return set(self.key_metrics) | {"iteration", "epoch", "time/train_s"}, ("train/", "val/", "codebook/")

    def trial_resources(self, spec) -> list[dict[str, float]]:
        worker = {"CPU": spec.scaling.cpus_per_worker, **({"GPU": 1.0} if spec.scaling.use_gpu else {})}
        return [{"CPU": 1.0}] + [dict(worker) for _ in range(spec.scaling.num_workers)]

    def progress_total(self, spec) -> int | None:
        return spec.train.epochs


# ------------------------------------------------------------------------------- 1. MoCo v3

class MocoModel(SpecModel):
    backbone: str = "vit_tiny_patch4_32"
    dim: int = Field(256, ge=8)
    mlp_dim: int = Field(4096, ge=8)
    temperature: float = Field(0.2, gt=0.0)
    base_momentum: float = Field(0.99, ge=0.0, lt=1.0)


class MocoSpec(PecoStageSpec):
    kind: Literal["peco-moco"] = "peco-moco"
    model: MocoModel = Field(default_factory=MocoModel)
    train: StageTrain


def moco_loop(config: dict[str, Any]) -> None:
    import numpy as np
    import torch

    from vision.peco.moco import MoCoV3, momentum_at, two_views
    from vision.training import parameter_groups

    spec = MocoSpec.model_validate(config["spec"])
    rank, world, device = worker_context(spec.scaling)
    torch.manual_seed(spec.seed)
    size = spec.data.image_size
    model = MoCoV3(_backbone(spec.model.backbone, size, global_pool="token"), spec.model.dim, spec.model.mlp_dim,
                   spec.model.temperature).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameter_groups(model, spec.train.weight_decay), lr=spec.train.lr)
    pictures = Pictures(spec.data)
    val_rng = np.random.default_rng([spec.seed, 999_983])
    val_views = two_views(pictures.crops(spec.data.val_images, size, val_rng),
                          size, torch.Generator().manual_seed(spec.seed + 7))
    start_epoch, step, elapsed = _load_state(config, {"model": model, "optimizer": optimizer})
    broadcast_from_rank_zero(model, world)
    per_worker = spec.train.batch_size // world
    total = spec.train.epochs * spec.train.steps_per_epoch
    for epoch in range(start_epoch, spec.train.epochs):
        rng = np.random.default_rng([spec.seed, epoch, rank])
        generator = torch.Generator().manual_seed(spec.seed * 1_000_003 + epoch * world + rank)
        started, losses = time.perf_counter(), []
        model.train()
        for _ in range(spec.train.steps_per_epoch):
            rate = _set_lr([optimizer], spec.train, step, total)
            first, second = two_views(pictures.crops(per_worker, size, rng), size, generator)
            loss = model(_normalise(first.to(device)), _normalise(second.to(device)),
                         momentum_at(step, total, spec.model.base_momentum))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:
                average_gradients(trainable, world)
            optimizer.step()
            step += 1
            losses.append(float(loss.detach()))
        average_buffers(model, world)
        seconds, corrupt = _epoch_totals(started, pictures, world, device)
        elapsed += seconds
        model.eval()
        with torch.no_grad():
            first, second = (_normalise(view.to(device)) for view in val_views)
            q1, q2 = model.predictor(model.base(first)), model.predictor(model.base(second))
            k1, k2 = model.momentum(first), model.momentum(second)
            val_loss = float(model.contrastive(q1, k2, gather=False) + model.contrastive(q2, k1, gather=False))
            similarity = torch.nn.functional.cosine_similarity(q1, k2).mean()
        metrics = {"epoch": epoch + 1, "step": step, "lr": rate, "train/loss": float(np.mean(losses)),
                   "val/loss": val_loss, "val/positive_similarity": float(similarity),
                   "data/corrupt_images": corrupt, "time/train_s": elapsed}
        done = spec.train.time_limit_s is not None and elapsed >= spec.train.time_limit_s

        def write(folder: Path) -> None:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                        "step": step, "elapsed": elapsed}, folder / CHECKPOINT_FILE)
            torch.save({"backbone": {k: v.cpu() for k, v in model.backbone_state().items()},
                        "factory": spec.model.backbone, "img_size": size, "source": "peco-moco"}, folder / BACKBONE_FILE)

        report_epoch(rank, metrics, write)
        if done:
            break


@register
class MocoPipeline(_StagePipeline):
    kind = "peco-moco"
    spec_model = MocoSpec
    summary = "PeCo stage 1: MoCo v3 on a ViT (the perceptual model) on Ray Train"
    key_metrics = ("train/loss", "val/loss", "val/positive_similarity", "epoch")
    scores = ("epoch", "val/positive_similarity")
    curve_metrics = ("train/loss", "val/loss")

    def check(self, spec: MocoSpec) -> list[Problem]:
        return _backbone_problem("model.backbone", spec.model.backbone) or self.check_stage(spec)

    def run(self, spec: MocoSpec, session: Session) -> dict[str, Any]:
        return _run_stage(self, moco_loop, spec, session, self.kind, {}, BACKBONE_FILE)


# ------------------------------------------------------------------------------- 2. tokenizer

class TokenizerModel(SpecModel):
    preset: Literal["peco_vqgan_224", "peco_tiny_32"] = "peco_tiny_32"
    vocab_size: int | None = Field(None, ge=2)
    """Override the preset's codebook size (8192 in the paper's)."""
    ema: bool | None = None
    """EMA codebook (default) or a learned one (straight-through with codebook loss)."""


class PerceptualSettings(SpecModel):
    model: str | None = None
    """A ViT checkpoint of ours (a ``peco-moco`` or ``peco-mim`` ``backbone.pt``, a ``classify``
    ``state.pt`` of a ViT): a path or a ``runs:/`` URI."""
    layers: list[int] | None = None
    """Blocks whose features are compared (default: the last of each quarter: 3, 6, 9, 12 for ViT-B)."""
    weight: float = Field(1.0, ge=0.0)
    """0 = the plain pixel-loss codebook (BEiT's stand-in)."""


class GanSettings(SpecModel):
    disc_weight: float = Field(0.8, ge=0.0)
    """VQGAN's factor on the adaptive GAN weight; 0 switches the discriminator off."""
    disc_start: int = Field(0, ge=0)
    """Step from which the GAN terms count."""
    channels: int = Field(64, ge=4)
    layers: int = Field(3, ge=1)


class TokenizerSpec(PecoStageSpec):
    kind: Literal["peco-tokenizer"] = "peco-tokenizer"
    model: TokenizerModel = Field(default_factory=TokenizerModel)
    perceptual: PerceptualSettings = Field(default_factory=PerceptualSettings)
    gan: GanSettings = Field(default_factory=GanSettings)
    train: StageTrain

    def tokenizer_config(self):
        from dataclasses import replace

        from vision.peco.tokenizer import PRESETS

        config = replace(PRESETS[self.model.preset], image_size=self.data.image_size)
        if self.model.vocab_size is not None:
            config = replace(config, vocab_size=self.model.vocab_size)
        if self.model.ema is not None:
            config = replace(config, ema=self.model.ema)
        return config

    @model_validator(mode="after")
    def _sizes(self) -> "TokenizerSpec":
        config = self.tokenizer_config()
        if self.data.image_size % config.downsample:
            raise ValueError(f"data.image_size {self.data.image_size} is not a multiple of the tokenizer's "
                             f"down-sampling {config.downsample} ({self.model.preset})")
        if self.perceptual.weight > 0 and not self.perceptual.model:
            raise ValueError("perceptual.weight > 0 needs perceptual.model (a peco-moco backbone.pt or runs:/ URI); "
                             "set perceptual.weight: 0 for the pixel-loss codebook")
        return self


def perceptual_network(checkpoint: dict[str, Any], layers: list[int] | None):
    """The frozen perceptual model of a ViT checkpoint of ours: a ``peco-moco`` or ``peco-mim``
    ``backbone.pt``, or a ``classify`` ``state.pt`` of a ViT (its head is left out)."""
    from vision.backbones.vit import FACTORIES, build_pretrained
    from vision.peco.tokenizer import PerceptualLoss, default_layers

    if "factory" in checkpoint:
        factory, size = checkpoint["factory"], int(checkpoint["img_size"])
    elif isinstance(checkpoint.get("spec"), dict) and isinstance(checkpoint.get("model"), dict):
        factory = checkpoint["spec"]["model"]["name"]
        size = int(checkpoint["spec"].get("data", {}).get("image_size") or 0)
    else:
        raise ValueError(f"perceptual.model is not a ViT checkpoint of raysmith's (entries: {sorted(checkpoint)[:8]}); "
                         f"give a peco-moco or peco-mim backbone.pt or a classify state.pt of a ViT")
    if factory not in FACTORIES:
        raise ValueError(f"perceptual.model holds a {factory}, not a ViT ({', '.join(FACTORIES)}): the perceptual "
                         f"loss reads a ViT's block features")
    network = build_pretrained(factory, checkpoint, num_classes=0, img_size=size or FACTORIES[factory].img_size)
    return PerceptualLoss(network, layers or default_layers(network.depth))


def tokenizer_loop(config: dict[str, Any]) -> None:
    import numpy as np
    import torch

    from vision.peco.tokenizer import (
        PatchDiscriminator,
        VQTokenizer,
        hinge_discriminator_loss,
        reconstruction_grid,
        tokenizer_losses,
    )

    spec = TokenizerSpec.model_validate(config["spec"])
    rank, world, device = worker_context(spec.scaling)
    torch.manual_seed(spec.seed)
    size = spec.data.image_size
    tokenizer = VQTokenizer(spec.tokenizer_config()).to(device)
    perceptual_state = _fetch(config, "perceptual")
    perceptual = (perceptual_network(perceptual_state, spec.perceptual.layers).to(device)
                  if perceptual_state is not None and spec.perceptual.weight > 0 else None)
    discriminator = (PatchDiscriminator(spec.gan.channels, spec.gan.layers).to(device)
                     if spec.gan.disc_weight > 0 else None)
    optimizer = torch.optim.Adam(tokenizer.parameters(), lr=spec.train.lr, betas=(0.5, 0.9))
    objects: dict[str, Any] = {"tokenizer": tokenizer, "optimizer": optimizer}
    critic_optimizer = None
    if discriminator is not None:
        critic_optimizer = torch.optim.Adam(discriminator.parameters(), lr=spec.train.lr, betas=(0.5, 0.9))
        objects |= {"discriminator": discriminator, "critic_optimizer": critic_optimizer}
    pictures = Pictures(spec.data)
    val_images = pictures.crops(spec.data.val_images, size, np.random.default_rng([spec.seed, 999_983])).to(device)
    start_epoch, step, elapsed = _load_state(config, objects)
    broadcast_from_rank_zero(tokenizer, world)
    if discriminator is not None:
        broadcast_from_rank_zero(discriminator, world)
    per_worker = spec.train.batch_size // world
    total = spec.train.epochs * spec.train.steps_per_epoch
    for epoch in range(start_epoch, spec.train.epochs):
        rng = np.random.default_rng([spec.seed, epoch, rank])
        torch.manual_seed(spec.seed * 1_000_003 + epoch * world + rank)
        started = time.perf_counter()
        sums = np.zeros(6)
        tokenizer.train()
        for _ in range(spec.train.steps_per_epoch):
            rate = _set_lr([o for o in (optimizer, critic_optimizer) if o is not None], spec.train, step, total)
            images = pictures.crops(per_worker, size, rng).to(device)
            use_gan = discriminator is not None and step >= spec.gan.disc_start
            losses, reconstruction = tokenizer_losses(tokenizer, images, perceptual, spec.perceptual.weight,
                                                      discriminator, spec.gan.disc_weight, use_gan)
            optimizer.zero_grad(set_to_none=True)
            losses.total.backward()
            if world > 1:
                average_gradients(list(tokenizer.parameters()), world)
            optimizer.step()
            critic = 0.0
            if use_gan:
                critic_loss = hinge_discriminator_loss(discriminator(images), discriminator(reconstruction.detach()))
                critic_optimizer.zero_grad(set_to_none=True)
                critic_loss.backward()
                if world > 1:
                    average_gradients(list(discriminator.parameters()), world)
                critic_optimizer.step()
                critic = float(critic_loss.detach())
            step += 1
            sums += [float(losses.total.detach()), losses.l1, losses.perceptual, losses.codebook, critic,
                     losses.gan_weight]
        if discriminator is not None:
            average_buffers(discriminator, world)
        seconds, corrupt = _epoch_totals(started, pictures, world, device)
        elapsed += seconds
        tokenizer.eval()
        with torch.no_grad():
            reconstruction, _, _, stats = tokenizer(val_images)
            error = (reconstruction.clamp(0, 1) - val_images).pow(2).mean((1, 2, 3)).clamp_min(1e-10)
            val_perceptual = float(perceptual(val_images, reconstruction).mean()) if perceptual is not None else None
        steps = spec.train.steps_per_epoch
        metrics = {"epoch": epoch + 1, "step": step, "lr": rate, "train/loss": sums[0] / steps,
                   "train/l1": sums[1] / steps, "train/perceptual": sums[2] / steps, "train/codebook": sums[3] / steps,
                   "train/discriminator": sums[4] / steps, "train/gan_weight": sums[5] / steps,
                   "val/l1": float((reconstruction - val_images).abs().mean()),
                   "val/psnr": float((10 * torch.log10(1.0 / error)).mean()),
                   "codebook/perplexity": stats["perplexity"], "codebook/used_codes": stats["used_codes"],
                   "codebook/dead_codes": int((tokenizer.quantizer.ema_count < tokenizer.quantizer.dead_threshold).sum()),
                   "data/corrupt_images": corrupt, "time/train_s": elapsed}
        if val_perceptual is not None:
            metrics["val/perceptual"] = val_perceptual
        done = spec.train.time_limit_s is not None and elapsed >= spec.train.time_limit_s

        def write(folder: Path) -> None:
            from dataclasses import asdict

            torch.save({name: thing.state_dict() for name, thing in objects.items()}
                       | {"epoch": epoch + 1, "step": step, "elapsed": elapsed}, folder / CHECKPOINT_FILE)
            torch.save({"config": asdict(tokenizer.config), "state": {k: v.cpu() for k, v in tokenizer.state_dict().items()},
                        "perceptual_weight": spec.perceptual.weight, "source": "peco-tokenizer"}, folder / TOKENIZER_FILE)
            reconstruction_grid(val_images, reconstruction, folder / GRID_FILE)

        report_epoch(rank, metrics, write)
        if done:
            break


def load_tokenizer(state: dict[str, Any]):
    """A frozen :class:`~vision.peco.tokenizer.VQTokenizer` from a ``tokenizer.pt``'s contents."""
    from vision.peco.tokenizer import TokenizerConfig, VQTokenizer

    config = dict(state["config"])
    config["channel_mult"] = tuple(config["channel_mult"])
    tokenizer = VQTokenizer(TokenizerConfig(**config))
    tokenizer.load_state_dict(state["state"])
    for parameter in tokenizer.parameters():
        parameter.requires_grad_(False)
    return tokenizer.eval()


@register
class TokenizerPipeline(_StagePipeline):
    kind = "peco-tokenizer"
    spec_model = TokenizerSpec
    summary = "PeCo stage 2: VQGAN-style tokenizer with perceptual + adversarial losses on Ray Train"
    key_metrics = ("val/psnr", "val/perceptual", "codebook/perplexity", "codebook/dead_codes", "epoch")
    scores = ("epoch", "val/psnr", "codebook/perplexity", "codebook/used_codes")
    curve_metrics = ("val/psnr", "codebook/perplexity")

    def check(self, spec: TokenizerSpec) -> list[Problem]:
        return _reference_problem("perceptual.model", spec.perceptual.model) or self.check_stage(spec)

    def run(self, spec: TokenizerSpec, session: Session) -> dict[str, Any]:
        reference = spec.perceptual.model if spec.perceptual.weight > 0 else None
        return _run_stage(self, tokenizer_loop, spec, session, self.kind,
                          {"perceptual": (reference, "perceptual.model")}, TOKENIZER_FILE, (GRID_FILE,))


# ------------------------------------------------------------------------------- 3. MIM

class MimModel(SpecModel):
    backbone: str = "vit_tiny_patch4_32"
    drop_path_rate: float = Field(0.1, ge=0.0, lt=1.0)
    layer_scale_init: float | None = Field(0.1, gt=0.0)


class MaskingSettings(SpecModel):
    ratio: float = Field(0.4, gt=0.0, lt=1.0)
    """Share of the patch grid to mask (BEiT: 75 of 196)."""
    min_num_patches: int = Field(16, ge=1)
    min_aspect: float = Field(0.3, gt=0.0, le=1.0)


class MimTrain(StageTrain):
    lr: float = Field(1.5e-3, gt=0.0)
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW's betas: PeCo's (0.9, 0.98); BEiT's own pre-training used (0.9, 0.999)."""
    grad_clip: float | None = Field(3.0, gt=0.0)


class MimSpec(PecoStageSpec):
    kind: Literal["peco-mim"] = "peco-mim"
    model: MimModel = Field(default_factory=MimModel)
    tokenizer: str | None = None
    """A ``peco-tokenizer`` ``tokenizer.pt``: path or ``runs:/<run id>/model/tokenizer.pt``."""
    masking: MaskingSettings = Field(default_factory=MaskingSettings)
    train: MimTrain


def mim_loop(config: dict[str, Any]) -> None:
    import numpy as np
    import torch

    from vision.peco.masking import BlockMaskGenerator
    from vision.peco.mim import MaskedImageModel, mim_loss
    from vision.training import parameter_groups

    spec = MimSpec.model_validate(config["spec"])
    rank, world, device = worker_context(spec.scaling)
    torch.manual_seed(spec.seed)
    size = spec.data.image_size
    tokenizer = load_tokenizer(_fetch(config, "tokenizer")).to(device)
    backbone = _backbone(spec.model.backbone, size, drop_path_rate=spec.model.drop_path_rate,
                         layer_scale_init=spec.model.layer_scale_init)
    if tokenizer.config.grid != backbone.grid or tokenizer.config.image_size != size:
        raise ValueError(f"the tokenizer gives a {tokenizer.config.grid} x {tokenizer.config.grid} grid at "
                         f"{tokenizer.config.image_size} px; {spec.model.backbone} at {size} px has "
                         f"{backbone.grid} x {backbone.grid} patches: they must match")
    model = MaskedImageModel(backbone, tokenizer.config.vocab_size).to(device)
    optimizer = torch.optim.AdamW(parameter_groups(model, spec.train.weight_decay), lr=spec.train.lr,
                                  betas=spec.train.betas)
    masks = BlockMaskGenerator(backbone.grid, num_masking_patches=max(1, round(spec.masking.ratio * backbone.num_patches)),
                               min_num_patches=spec.masking.min_num_patches, min_aspect=spec.masking.min_aspect)
    pictures = Pictures(spec.data)
    val_images = pictures.crops(spec.data.val_images, size, np.random.default_rng([spec.seed, 999_983])).to(device)
    val_ids = tokenizer.tokenize(val_images)
    val_mask = torch.from_numpy(masks.batch(spec.data.val_images, random.Random(spec.seed + 11))).to(device)
    start_epoch, step, elapsed = _load_state(config, {"model": model, "optimizer": optimizer})
    broadcast_from_rank_zero(model, world)
    parameters = list(model.parameters())
    per_worker = spec.train.batch_size // world
    total = spec.train.epochs * spec.train.steps_per_epoch
    for epoch in range(start_epoch, spec.train.epochs):
        rng = np.random.default_rng([spec.seed, epoch, rank])
        mask_rng = random.Random(spec.seed * 1_000_003 + epoch * world + rank)
        torch.manual_seed(spec.seed * 1_000_003 + epoch * world + rank)
        started = time.perf_counter()
        sums, masked_total = np.zeros(2), 0
        model.train()
        for _ in range(spec.train.steps_per_epoch):
            rate = _set_lr([optimizer], spec.train, step, total)
            images = pictures.crops(per_worker, size, rng)
            flip = torch.from_numpy(rng.random(per_worker) < 0.5).view(-1, 1, 1, 1)
            images = torch.where(flip, images.flip(-1), images).to(device)
            ids = tokenizer.tokenize(images)
            mask = torch.from_numpy(masks.batch(per_worker, mask_rng)).to(device)
            loss, correct = mim_loss(model(_normalise(images), mask), ids, mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:
                average_gradients(parameters, world)
            if spec.train.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(parameters, spec.train.grad_clip)
            optimizer.step()
            step += 1
            sums += [float(loss.detach()), float(correct)]
            masked_total += int(mask.sum())
        seconds, corrupt = _epoch_totals(started, pictures, world, device)
        elapsed += seconds
        model.eval()
        with torch.no_grad():
            val_loss, val_correct = mim_loss(model(_normalise(val_images), val_mask), val_ids, val_mask)
        metrics = {"epoch": epoch + 1, "step": step, "lr": rate,
                   "train/loss": sums[0] / spec.train.steps_per_epoch, "train/accuracy": sums[1] / max(1, masked_total),
                   "train/masked_fraction": masked_total / (spec.train.steps_per_epoch * per_worker * backbone.num_patches),
                   "val/loss": float(val_loss), "val/accuracy": float(val_correct) / int(val_mask.sum()),
                   "data/corrupt_images": corrupt, "time/train_s": elapsed}
        done = spec.train.time_limit_s is not None and elapsed >= spec.train.time_limit_s

        def write(folder: Path) -> None:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                        "step": step, "elapsed": elapsed}, folder / CHECKPOINT_FILE)
            state = {k: v.cpu() for k, v in model.backbone.state_dict().items() if not k.startswith("head.")}
            torch.save({"backbone": state, "factory": spec.model.backbone, "img_size": size, "source": "peco-mim",
                        "layer_scale_init": spec.model.layer_scale_init}, folder / BACKBONE_FILE)

        report_epoch(rank, metrics, write)
        if done:
            break


@register
class MimPipeline(_StagePipeline):
    kind = "peco-mim"
    spec_model = MimSpec
    summary = "PeCo stage 3: BEiT masked image modelling against a tokenizer's ids on Ray Train"
    key_metrics = ("train/loss", "val/loss", "val/accuracy", "epoch")
    scores = ("epoch", "val/accuracy", "train/accuracy")
    curve_metrics = ("train/loss", "val/loss", "val/accuracy")

    def check(self, spec: MimSpec) -> list[Problem]:
        if not spec.tokenizer:
            return [Problem("tokenizer", "peco-mim needs tokenizer: a tokenizer.pt path or runs:/<run id>/model/tokenizer.pt")]
        return (_backbone_problem("model.backbone", spec.model.backbone)
                or _reference_problem("tokenizer", spec.tokenizer) or self.check_stage(spec))

    def run(self, spec: MimSpec, session: Session) -> dict[str, Any]:
        return _run_stage(self, mim_loop, spec, session, self.kind, {"tokenizer": (spec.tokenizer, "tokenizer")},
                          BACKBONE_FILE)


# ------------------------------------------------------------------------------- the chain

STAGES = ("moco", "tokenizer", "mim", "linear_probe", "finetune")
STAGE_KINDS = {"moco": "peco-moco", "tokenizer": "peco-tokenizer", "mim": "peco-mim", "linear_probe": "classify",
               "finetune": "classify"}


class PecoChainSpec(ExperimentSpec):
    kind: Literal["peco"] = "peco"
    stages: list[Literal["moco", "tokenizer", "mim", "linear_probe", "finetune"]] = Field(
        default_factory=lambda: list(STAGES))
    """Which stages run, in the chain's order; the others' outputs come from the ``*_model`` fields."""
    data: PecoData = Field(default_factory=PecoData)
    scaling: ScalingSettings = Field(default_factory=ScalingSettings)
    max_failures: int = Field(0, ge=0)
    storage_path: str | None = None
    """Where every stage's Ray Train checkpoints go (shared storage on multi-node clusters)."""
    moco: dict[str, Any] = Field(default_factory=dict)
    """A ``peco-moco`` spec's body (``model``, ``train``, ...); ``data``, ``scaling``, ``seed``
    come from the chain unless given here."""
    tokenizer: dict[str, Any] = Field(default_factory=dict)
    mim: dict[str, Any] = Field(default_factory=dict)
    linear_probe: dict[str, Any] = Field(default_factory=dict)
    """A ``classify`` spec's body; ``model.pretrained`` is the MIM backbone, ``model.linear_probe`` true."""
    finetune: dict[str, Any] = Field(default_factory=dict)
    perceptual_model: str | None = None
    """The perceptual model when ``moco`` does not run (path or ``runs:/`` URI)."""
    tokenizer_model: str | None = None
    """The tokenizer when ``tokenizer`` does not run."""
    pretrained_model: str | None = None
    """The MIM backbone when ``mim`` does not run."""

    @model_validator(mode="after")
    def _stages(self) -> "PecoChainSpec":
        order = [stage for stage in STAGES if stage in self.stages]
        if order != list(self.stages):
            raise ValueError(f"stages run in the order {', '.join(STAGES)} (each once); got {', '.join(self.stages)}")
        if self.search is not None:
            raise ValueError("a peco chain cannot be searched: search its stages' own specs (peco-tokenizer, ...)")
        for stage, upstream, field in self.INPUTS:
            if stage in self.stages and upstream in self.stages and self.body_input(stage) is not None:
                raise ValueError(f"{stage}.{field} is set, but the {upstream} stage runs in this chain and hands its "
                                 f"output on: drop {stage}.{field}, or {upstream} from stages")
        placeholders = {"moco": "runs:/placeholder/model/backbone.pt", "tokenizer": "runs:/placeholder/model/tokenizer.pt",
                        "mim": "runs:/placeholder/model/backbone.pt"}
        for stage in self.stages:
            self.stage_spec(stage, placeholders)  # a bad stage body is refused now, before Ray starts
        return self

    INPUTS: ClassVar[tuple[tuple[str, str, str], ...]] = (("tokenizer", "moco", "perceptual.model"), ("mim", "tokenizer", "tokenizer"),
              ("linear_probe", "mim", "model.pretrained"), ("finetune", "mim", "model.pretrained"))
    """(stage, the stage whose output it takes, the field of its body that names it instead)."""
    TOP_LEVEL: ClassVar[dict[str, str]] = {"moco": "perceptual_model", "tokenizer": "tokenizer_model", "mim": "pretrained_model"}

    def body_input(self, stage: str) -> str | None:
        """The input model ``stage``'s own body names, if any."""
        body = getattr(self, stage)
        if stage == "tokenizer":
            return (body.get("perceptual") or {}).get("model")
        if stage == "mim":
            return body.get("tokenizer")
        return (body.get("model") or {}).get("pretrained")

    def stage_spec(self, stage: str, outputs: dict[str, str]):
        """The spec of ``stage``, with upstream outputs (``runs:/`` URIs) from ``outputs``."""
        from pipelines.registry import get_pipeline

        body = dict(getattr(self, stage))
        shared = {"seed": self.seed, "tracking": self.tracking.model_dump(), "ray": self.ray.model_dump(),
                  "output_dir": self.output_dir, "scaling": self.scaling.model_dump(), "max_failures": self.max_failures,
                  "storage_path": self.storage_path}
        body = {**shared, **body, "kind": STAGE_KINDS[stage], "name": f"{self.name}-{stage.replace('_', '-')}"}
        upstream = {"moco": outputs.get("moco", self.perceptual_model), "tokenizer": outputs.get("tokenizer", self.tokenizer_model),
                    "mim": outputs.get("mim", self.pretrained_model)}
        if stage in ("moco", "tokenizer", "mim"):
            body.setdefault("data", self.data.model_dump())
        if stage == "tokenizer":
            perceptual = dict(body.get("perceptual") or {})
            if perceptual.get("weight", 1.0) > 0 and not perceptual.get("model"):
                perceptual["model"] = upstream["moco"]
            body["perceptual"] = perceptual
        elif stage == "mim":
            if body.get("tokenizer") is None:  # absent or null: the upstream output
                body["tokenizer"] = upstream["tokenizer"]
        elif stage in ("linear_probe", "finetune"):
            model = dict(body.get("model") or {})
            if model.get("pretrained") is None:  # absent or null: the MIM backbone
                model["pretrained"] = upstream["mim"]
            model.setdefault("linear_probe", stage == "linear_probe")
            body["model"] = model
        from pydantic import ValidationError

        try:
            return get_pipeline(STAGE_KINDS[stage]).spec_model.model_validate(body)
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join([stage, *map(str, e['loc'])])}: {e['msg']}" for e in err.errors())
            raise ValueError(f"stage {stage} is not a valid {STAGE_KINDS[stage]} spec: {problems}") from None


@register
class PecoChainPipeline(Pipeline):
    kind = "peco"
    spec_model = PecoChainSpec
    summary = "PeCo end to end: MoCo v3 -> perceptual tokenizer -> BEiT MIM -> linear probe / fine-tune"
    step_metric = "stage"
    time_attr = "stage"
    key_metrics = ("linear_probe/val/accuracy", "finetune/val/accuracy", "mim/val/accuracy", "tokenizer/val/psnr")

    def check(self, spec: PecoChainSpec) -> list[Problem]:
        from pipelines.registry import get_pipeline

        for stage, upstream, field in spec.INPUTS:
            if stage not in spec.stages or upstream in spec.stages:
                continue
            if stage == "tokenizer" and (spec.tokenizer.get("perceptual") or {}).get("weight", 1.0) == 0:
                continue
            top = spec.TOP_LEVEL[upstream]
            given = spec.body_input(stage) or getattr(spec, top)
            if not given:
                return [Problem(top, f"stage {stage} needs the {upstream} stage's output: run {upstream} too, or set "
                                     f"{top} (or {stage}.{field}) to a path or runs:/<run id>/<artifact>")]
            problems = _reference_problem(top if given == getattr(spec, top) else f"{stage}.{field}", given)
            if problems:
                return problems
        outputs = {stage: f"runs:/pending/{stage}" for stage in spec.stages}
        for stage in spec.stages:
            stage_spec = spec.stage_spec(stage, outputs)
            for problem in get_pipeline(STAGE_KINDS[stage]).check(stage_spec):
                if "runs:/pending" in problem.message:
                    continue
                return [Problem(f"{stage}.{problem.path}", problem.message)]
        return []

    def reported_metrics(self, spec: PecoChainSpec) -> tuple[set[str], tuple[str, ...]]:
        return {"stage", "iteration"}, tuple(f"{stage}/" for stage in STAGES)

    def progress_total(self, spec: PecoChainSpec) -> int | None:
        return len(spec.stages)

    def run(self, spec: PecoChainSpec, session: Session) -> dict[str, Any]:
        from pipelines.registry import get_pipeline
        from pipelines.spec import flatten
        from pipelines.tracking.mlflow_run import TAG_KIND, RunTracker

        if not isinstance(session, LocalSession):
            raise ValueError("a peco chain runs as a local run or a Ray Job (each stage its own MLflow run), not in Tune")
        if session.restore_from:
            raise ValueError("--restore resumes one Ray Train run: restore the stage's own spec (peco-mim, ...) from "
                             "its checkpoint (the child run's raysmith.latest_checkpoint tag), and run the later "
                             "stages with stages=[...] and the *_model fields")
        parent = session.tracker
        outputs: dict[str, str] = {}
        summary: dict[str, Any] = {}
        artifact = {"moco": "model/backbone.pt", "tokenizer": "model/tokenizer.pt", "mim": "model/backbone.pt"}
        for index, stage in enumerate(spec.stages, start=1):
            stage_spec = spec.stage_spec(stage, outputs)
            pipeline = get_pipeline(stage_spec.kind)
            tracker = RunTracker.start(parent.uri, spec.tracking.experiment or spec.name, stage_spec.name,
                                       tags={TAG_KIND: stage_spec.kind, "raysmith.peco.stage": stage},
                                       parent_run_id=parent.run_id)
            tracker.log_params(flatten(stage_spec.model_dump(mode="json", exclude={"search"})))
            child = LocalSession(tracker, session.run_dir / stage, keep_checkpoints=2)
            try:
                result = pipeline.run(stage_spec, child)
            except BaseException:
                tracker.finish("FAILED")
                raise
            tracker.log_learning_curve(pipeline.curve_metrics, xlabel="epoch", title=stage_spec.name)
            if result.get("checkpoint"):
                tracker.set_tags({"raysmith.checkpoint": str(result["checkpoint"])})
            tracker.finish("FINISHED")
            if stage in artifact:
                outputs[stage] = f"runs:/{tracker.run_id}/{artifact[stage]}"
            parent.set_tags({f"raysmith.peco.{stage}_run_id": tracker.run_id})
            numbers = {f"{stage}/{key}": value for key, value in result.items()
                       if isinstance(value, (int, float)) and not isinstance(value, bool)}
            session.report(numbers, step=index)
            summary.update(numbers)
            summary[f"{stage}/run_id"] = tracker.run_id
        return summary
