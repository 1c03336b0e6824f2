"""Watermarking on Ray: ``watermark-train`` (MBRS on Ray Train) and ``watermark-eval``
(a Ray Data robustness grid).

``watermark-train`` trains an MBRS model (or the HiDDeN-style baseline) with
``scaling.num_workers`` Ray Train workers. Each step every worker draws its share of the
batch as random crops of the training photographs (or of a folder's images), a random
message, and one noise layer for the whole step (``noise``: a list is MBRS's per-mini-batch
choice, e.g. real JPEG, JpegMask, identity), and updates the encoder-decoder (image MSE +
10 x message MSE + 1e-4 x adversarial) and the discriminator; gradients are averaged across
workers by one all-reduce each, BatchNorm statistics before validation. After each epoch
a fixed set of validation crops (of the training photographs, other crops than any step
draws, from their own seed) is scored: PSNR, BER with no noise and BER under real JPEG at
``val_jpeg_quality``. The evaluation's ``photos`` are other photographs. Checkpoints (``state.pt`` to resume, ``mbrs.pt`` for
``watermark-eval``) are kept by ``val/bit_accuracy_jpeg``.

``watermark-eval``:

For every image and every method (:mod:`vision.watermark.methods`: MBRS, the HiDDeN-style
baseline, invisible-watermark's dwtDct, dwtDctSvd and RivaGAN) a random message (seeded by
the image and the method) is embedded, the watermarked image is scored against the cover
(PSNR, SSIM), and every attack at every strength of the grid (:mod:`vision.watermark.attacks`,
chains included) is applied before the message is read back (bit accuracy, BER).

Ray Data: the image list is read (a folder, a parquet manifest with a ``path`` column, or
``photos``: crops of held-out bundled photographs written once as PNG files), and an actor
pool (``ActorPoolStrategy``; each actor builds the methods once, RivaGAN's ONNX sessions
included) reads, converts to RGB, brings each image to each method's size (resize of the
shorter side and a centre crop; the size is in every output row) and runs the grid. A file
that cannot be read yields one error row; rows out = images x methods x grid cells + errors.

MLflow gets, per method x attack x strength, the mean BER and bit accuracy
(``ber/<method>/<attack>_<strength>``), per method the mean PSNR and SSIM, the per-row results
(``results/grid.parquet``), the aggregate table (``results/summary.csv``), the errors table,
and one BER-vs-strength plot per attack (``plots/ber_<attack>.png``).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
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
    CropSource,
    RayTrainSpec,
    StepTrainSettings,
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

METHOD_NAMES = ("mbrs", "hidden", "dwtDct", "dwtDctSvd", "rivaGan")
HELD_OUT_PHOTOS = ("immunohistochemistry", "retina", "china.jpg", "flower.jpg", "colorwheel")
"""Bundled photographs the ``photos`` source crops for evaluation (none is used in training)."""
TRAINING_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field")


class MethodSettings(SpecModel):
    name: Literal["mbrs", "hidden", "dwtDct", "dwtDctSvd", "rivaGan"]
    checkpoint: str | None = None
    """``mbrs``/``hidden``: a checkpoint written by ``vision.watermark.methods.save_mbrs`` (e.g.
    a ``watermark-train`` run's ``mbrs.pt``), or ``builtin:<name>``: weights shipped in
    ``vision/watermark/weights/`` (``builtin:mbrs_tiny_jpeg``, ``builtin:mbrs_tiny_diffusion_crop``)."""
    strength: float = Field(1.0, gt=0.0)
    """``mbrs``/``hidden``: residual scale at embedding."""
    message_length: int = Field(32, ge=1)
    """invisible-watermark methods (RivaGAN: 32); MBRS's comes from its checkpoint."""
    label: str | None = None
    """Name in the results (default: ``name``; set it to compare two checkpoints or strengths).
    Letters, digits, ``_ . : -`` only: it names MLflow metrics (``ber/<label>/...``)."""

    @model_validator(mode="after")
    def _checkpoint(self) -> "MethodSettings":
        if self.label is not None and not re.fullmatch(r"[A-Za-z0-9_.:-]+", self.label):
            raise ValueError(f"label {self.label!r} may only hold letters, digits and _ . : - (it names MLflow metrics)")
        if self.name in ("mbrs", "hidden") and not self.checkpoint:
            raise ValueError(f"method {self.name} needs a checkpoint (a file, or builtin:<name> for shipped weights)")
        return self


class AttackSettings(SpecModel):
    name: str
    """An attack of ``vision.watermark.attacks`` (``jpeg420``/``jpeg444`` for JPEG with that
    subsampling), applied at each of ``strengths``."""
    strengths: list[float] = Field(default_factory=lambda: [0.0])
    chain: list[tuple[str, float]] | None = None
    """Attacks applied first, in order, before ``name`` at each strength (e.g. crop_resize 0.75
    then JPEG); the results name the cell ``crop_resize0.75+jpeg``."""

    def label(self) -> str:
        prefix = "".join(f"{name}{strength:g}+" for name, strength in self.chain or [])
        return prefix + self.name


class WatermarkData(SpecModel):
    source: Literal["photos", "folder", "parquet"] = "photos"
    path: str | None = None
    count: int = Field(24, ge=1)
    """``photos``: how many crops of the held-out photographs."""
    crop_size: int = Field(256, ge=32)
    """``photos``: side of each crop, in pixels of the photograph."""
    directory: str = "raysmith_data/watermark"
    seed: int = 0

    @model_validator(mode="after")
    def _path(self) -> "WatermarkData":
        if self.source != "photos" and not self.path:
            raise ValueError(f"data.source {self.source} needs data.path")
        return self


class GridInference(SpecModel):
    actors: int = Field(2, ge=1)
    cpus_per_actor: float = Field(1.0, gt=0.0)
    batch_size: int = Field(4, ge=1)
    """Images per actor call."""


class WatermarkEvalSpec(ExperimentSpec):
    kind: Literal["watermark-eval"] = "watermark-eval"
    size: int = Field(128, ge=32)
    """Images are brought to this square for a method without a size of its own (every
    method here has one: MBRS its model's, invisible-watermark 256)."""
    methods: list[MethodSettings]
    attacks: list[AttackSettings]
    data: WatermarkData = Field(default_factory=WatermarkData)
    inference: GridInference = Field(default_factory=GridInference)

    @model_validator(mode="after")
    def _distinct(self) -> "WatermarkEvalSpec":
        labels = [m.label or m.name for m in self.methods]
        twice = sorted({label for label in labels if labels.count(label) > 1})
        if twice:
            raise ValueError(f"methods {twice} appear twice; give each a distinct label")
        cells = [a.label() for a in self.attacks]
        twice = sorted({cell for cell in cells if cells.count(cell) > 1})
        if twice:
            raise ValueError(f"attacks {twice} appear twice; put all strengths of one attack in one entry")
        return self


def photo_crops(data: WatermarkData) -> list[str]:
    """PNG crops of the held-out photographs (written once per settings); their paths."""
    import numpy as np
    from PIL import Image

    digest = hashlib.sha256(json.dumps({"count": data.count, "crop": data.crop_size, "seed": data.seed,
                                        "photos": HELD_OUT_PHOTOS}).encode()).hexdigest()[:12]
    folder = Path(data.directory).expanduser().resolve() / f"photos-{digest}"
    paths = [folder / f"{index:04d}.png" for index in range(data.count)]
    if all(path.is_file() for path in paths):
        return [str(path) for path in paths]
    folder.mkdir(parents=True, exist_ok=True)
    images = [_bundled(name) for name in HELD_OUT_PHOTOS]
    rng = np.random.default_rng(data.seed)
    for index, path in enumerate(paths):
        image = images[index % len(images)]
        side = min(data.crop_size, *image.shape[:2])
        top = int(rng.integers(0, image.shape[0] - side + 1))
        left = int(rng.integers(0, image.shape[1] - side + 1))
        Image.fromarray(image[top: top + side, left: left + side]).save(path)
    return [str(path) for path in paths]


def _bundled(name: str):
    import numpy as np

    if name.endswith(".jpg"):
        from sklearn.datasets import load_sample_image

        return load_sample_image(name)
    import skimage.data

    return np.ascontiguousarray(getattr(skimage.data, name)()[..., :3])


def image_paths(data: WatermarkData) -> list[str]:
    if data.source == "photos":
        return photo_crops(data)
    if data.source == "folder":
        suffixes = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
        return sorted(str(p) for p in Path(data.path).rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    import pyarrow.parquet as pq

    table = pq.read_table(data.path)
    if "path" not in table.column_names:
        raise ValueError(f"{data.path}: the manifest has no 'path' column; columns: {', '.join(table.column_names)}")
    base = Path(data.path) if Path(data.path).is_dir() else Path(data.path).parent
    return [p if Path(p).is_absolute() else str(base / p) for p in table.column("path").to_pylist()]


def fit_square(image, size: int):
    """Shorter side resized to ``size`` (bicubic), then the centre ``size`` x ``size``."""
    import numpy as np
    from PIL import Image

    picture = Image.fromarray(image)
    scale = size / min(picture.size)
    picture = picture.resize((max(size, round(picture.width * scale)), max(size, round(picture.height * scale))),
                             Image.BICUBIC)
    left, top = (picture.width - size) // 2, (picture.height - size) // 2
    return np.asarray(picture.crop((left, top, left + size, top + size)))


class GridWorker:
    """Ray Data actor: builds the methods once; runs the whole grid for each image of a batch."""

    def __init__(self, spec: dict[str, Any], threads: int):
        import torch

        from vision.watermark.methods import build_method

        torch.set_num_threads(max(1, threads))
        self.spec = WatermarkEvalSpec.model_validate(spec)
        self.methods = [(m.label or m.name, build_method(m.name, m.checkpoint, m.strength, m.message_length, threads=threads))
                        for m in self.spec.methods]

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np
        from PIL import Image, UnidentifiedImageError
        from skimage.metrics import structural_similarity

        from vision.watermark.attacks import attack, chain

        columns: dict[str, list] = {key: [] for key in ("path", "image", "method", "size", "attack", "strength", "psnr",
                                                         "ssim", "bit_accuracy", "ber", "error")}

        def emit(**row):
            for key in columns:
                columns[key].append(row.get(key, "" if key in ("method", "attack", "error") else float("nan")))

        for index, path in zip(batch["index"], batch["path"]):
            path = str(path)
            try:
                with Image.open(path) as picture:
                    original = np.asarray(picture.convert("RGB"))
            except (OSError, UnidentifiedImageError, ValueError) as err:
                emit(path=path, image=int(index), error=f"{type(err).__name__}: {err}"[:300])
                continue
            for method_index, (label, method) in enumerate(self.methods):
                size = method.image_size or self.spec.size
                cover = fit_square(original, size)
                rng = np.random.default_rng([self.spec.seed, int(index), method_index])
                bits = rng.integers(0, 2, method.message_length)
                marked = method.embed(cover, bits)
                quality = 10 * math.log10(255.0 ** 2 / max(1e-12, float(((marked.astype(float) - cover) ** 2).mean())))
                similarity = float(structural_similarity(cover, marked, channel_axis=2, data_range=255))
                for settings in self.spec.attacks:
                    base = chain(marked, settings.chain, seed=int(index)) if settings.chain else marked
                    for strength in settings.strengths:
                        options = {"cover": cover} if settings.name in ("dropout", "cropout") else {}
                        attacked = attack(base, settings.name, strength, seed=int(index), **options)
                        accuracy = float((method.extract(attacked) == bits).mean())
                        emit(path=path, image=int(index), method=label, size=float(size), attack=settings.label(),
                             strength=float(strength), psnr=quality, ssim=similarity, bit_accuracy=accuracy,
                             ber=1.0 - accuracy)
        return {key: np.asarray(values, dtype=object if key in ("path", "method", "attack", "error") else None)
                for key, values in columns.items()}


def run_grid(spec: WatermarkEvalSpec, paths: list[str]):
    """The grid's rows as a pandas frame (Ray Data, actor pool)."""
    import ray

    items = [{"index": index, "path": path} for index, path in enumerate(paths)]
    dataset = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 64)))
    scored = dataset.map_batches(GridWorker, fn_constructor_kwargs={"spec": spec.model_dump(mode="json"),
                                                                    "threads": max(1, round(spec.inference.cpus_per_actor))},
                                 batch_size=spec.inference.batch_size, num_cpus=spec.inference.cpus_per_actor,
                                 compute=ray.data.ActorPoolStrategy(size=spec.inference.actors))
    return scored.to_pandas()


def summarise(frame):
    """Mean BER, bit accuracy, PSNR and SSIM per method x attack x strength (rows without errors)."""
    rows = frame[frame["error"] == ""]
    return (rows.groupby(["method", "size", "attack", "strength"], as_index=False)
            .agg(images=("ber", "size"), ber=("ber", "mean"), bit_accuracy=("bit_accuracy", "mean"),
                 psnr=("psnr", "mean"), ssim=("ssim", "mean")))


def _plots(summary, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for attack_name, part in summary.groupby("attack"):
        if part["strength"].nunique() < 2:
            continue
        figure, axes = plt.subplots(figsize=(5, 3.5))
        for method, curve in part.groupby("method"):
            curve = curve.sort_values("strength")
            axes.plot(curve["strength"], curve["ber"], marker="o", label=str(method))
        axes.set(xlabel="strength", ylabel="bit error rate", title=str(attack_name))
        axes.legend()
        figure.tight_layout()
        path = folder / f"ber_{str(attack_name).replace('+', '_then_')}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written


def _metric_name(*parts: Any) -> str:
    return "/".join(str(part).replace("+", "_then_") for part in parts)


@register
class WatermarkEvalPipeline(Pipeline):
    kind = "watermark-eval"
    spec_model = WatermarkEvalSpec
    summary = "watermark robustness grid (methods x attacks x strengths) with Ray Data: PSNR, SSIM, BER"
    key_metrics = ("grid/rows", "grid/errors", "grid/images")

    def check(self, spec: WatermarkEvalSpec) -> list[Problem]:
        import numpy as np

        from vision.watermark.attacks import ATTACKS, attack, chain
        from vision.watermark.methods import resolve_checkpoint

        known = [*ATTACKS, "jpeg420", "jpeg444"]
        probe = np.full((64, 64, 3), 128, dtype=np.uint8)
        for index, settings in enumerate(spec.attacks):
            for name in [settings.name] + [n for n, _ in settings.chain or []]:
                if name not in known:
                    return [Problem(f"attacks.{index}.name", f"unknown attack '{name}'{did_you_mean(name, known)}; "
                                                             f"available: {', '.join(known)}")]
            for strength in settings.strengths:  # every cell once on a grey image: bad strengths fail here
                try:
                    base = chain(probe, settings.chain) if settings.chain else probe
                    options = {"cover": probe} if settings.name in ("dropout", "cropout") else {}
                    attack(base, settings.name, strength, **options)
                except (ValueError, IndexError) as err:
                    return [Problem(f"attacks.{index}", f"{settings.label()} at strength {strength:g}: {err}")]
        for index, method in enumerate(spec.methods):
            if method.checkpoint:
                try:  # an unknown builtin:<name> lists the shipped ones
                    if not resolve_checkpoint(method.checkpoint).is_file():
                        return [Problem(f"methods.{index}.checkpoint", f"no such file: {method.checkpoint}")]
                except ValueError as err:
                    return [Problem(f"methods.{index}.checkpoint", str(err))]
            if method.name in ("dwtDct", "dwtDctSvd", "rivaGan"):
                try:
                    import imwatermark  # noqa: F401
                except ImportError:
                    return [Problem(f"methods.{index}.name", f"{method.name} needs the invisible-watermark package: "
                                                             f"pip install 'raysmith[peers]'")]
            if method.name == "rivaGan" and method.message_length != 32:
                return [Problem(f"methods.{index}.message_length", "RivaGAN carries exactly 32 bits")]
        if spec.data.source != "photos" and not Path(spec.data.path).exists():
            return [Problem("data.path", f"no such file or folder: {spec.data.path}")]
        return []

    def reported_metrics(self, spec: WatermarkEvalSpec) -> tuple[set[str], tuple[str, ...]]:
        return set(self.key_metrics) | {"iteration"}, ("ber/", "bit_accuracy/", "psnr/", "ssim/")

    def trial_resources(self, spec: WatermarkEvalSpec) -> list[dict[str, float]]:
        return [{"CPU": 1.0}] + [{"CPU": spec.inference.cpus_per_actor} for _ in range(spec.inference.actors)]

    def run(self, spec: WatermarkEvalSpec, session: Session) -> dict[str, Any]:
        import ray

        total = float(ray.cluster_resources().get("CPU", 0.0))
        needed = spec.inference.actors * spec.inference.cpus_per_actor
        if needed > total + 1e-9:
            raise ValueError(f"inference.actors {spec.inference.actors} x inference.cpus_per_actor "
                             f"{spec.inference.cpus_per_actor:g} = {needed:g} CPUs, but this cluster has {total:g}")
        paths = image_paths(spec.data)
        if not paths:
            raise ValueError(f"no images found for data.source {spec.data.source} at {spec.data.path}")
        started = time.perf_counter()
        frame = run_grid(spec, paths)
        seconds = time.perf_counter() - started
        errors = frame[frame["error"] != ""]
        rows = frame[frame["error"] == ""]
        cells = sum(len(a.strengths) for a in spec.attacks) * len(spec.methods)
        if len(rows) + len(errors) * cells != len(paths) * cells:
            raise RuntimeError(f"{len(paths)} images x {cells} grid cells went in, but {len(rows)} result rows and "
                               f"{len(errors)} failed images came out")
        summary = summarise(frame)
        metrics: dict[str, float] = {"grid/images": float(len(paths) - len(errors)), "grid/errors": float(len(errors)),
                                     "grid/rows": float(len(rows)), "grid/seconds": seconds}
        for row in summary.itertuples():
            cell = f"{row.attack}_{row.strength:g}"
            metrics[_metric_name("ber", row.method, cell)] = float(row.ber)
            metrics[_metric_name("bit_accuracy", row.method, cell)] = float(row.bit_accuracy)
        for method, part in summary.groupby("method"):
            metrics[_metric_name("psnr", method)] = float(part["psnr"].mean())
            metrics[_metric_name("ssim", method)] = float(part["ssim"].mean())
        session.report(metrics, step=1)
        with tempfile.TemporaryDirectory() as directory:
            folder = Path(directory)
            (folder / "results").mkdir()
            (folder / "plots").mkdir()
            rows.drop(columns=["error"]).to_parquet(folder / "results" / "grid.parquet", index=False)
            summary.to_csv(folder / "results" / "summary.csv", index=False)
            errors[["path", "error"]].to_parquet(folder / "results" / "errors.parquet", index=False)
            _plots(summary, folder / "plots")
            for sub in ("results", "plots"):
                session.log_artifact(folder / sub, sub)
        return {"images": len(paths), "rows": len(rows), "seconds": round(seconds, 1),
                "errors": [f"{r.path}: {r.error}" for r in errors.head(20).itertuples()]}


# ----------------------------------------------------------------------------- training

CHECKPOINT_FILE = "state.pt"
METHOD_FILE = "mbrs.pt"


class WatermarkModelSettings(SpecModel):
    preset: Literal["mbrs_128_64", "mbrs_128_30_diffusion", "mbrs_256_256", "mbrs_tiny", "mbrs_tiny_diffusion",
                    "hidden_tiny"] = "mbrs_tiny"
    """The paper's presets (128 px with 64 bits; 128 px with 30 bits, diffusion; 256 px with 256
    bits) or the 32 px, 16-bit tiny ones (``mbrs_tiny_diffusion`` with the diffusion layer);
    ``hidden_tiny`` is the baseline without SE blocks."""
    channels: int | None = Field(None, ge=4)
    """Override the preset's width (64 in the paper's presets)."""


class WatermarkTrainData(CropSource):
    """``photos``: random crops of bundled photographs that ``watermark-eval``'s photos never use."""


class WatermarkTrainSettings(StepTrainSettings):
    image_weight: float = Field(1.0, ge=0.0)
    message_weight: float = Field(10.0, ge=0.0)
    adversarial_weight: float = Field(1e-4, ge=0.0)
    val_jpeg_quality: int = Field(50, ge=1, le=100)
    val_noise: Any = None
    """A noise layer (as in ``noise``, one layer) that validation also decodes through, e.g.
    ``{crop: {fraction: 0.25}}`` for a diffusion model; reported as ``val/ber_noise`` and
    ``val/bit_accuracy_noise``, and ``val/rank`` then counts the bits read correctly through it
    instead of through JPEG. Drawn per image (a crop box each) from a fixed seed, so every
    epoch sees the same noise."""


class WatermarkCheckpoints(SpecModel):
    keep: int = Field(2, ge=1)
    score: Literal["val/rank", "val/bit_accuracy_jpeg", "val/bit_accuracy_noise", "val/bit_accuracy", "val/psnr"] = "val/rank"
    """``val/rank`` orders by the validation bits read correctly under JPEG (or through
    ``train.val_noise`` when set), then by PSNR
    (``correct bits + min(PSNR, 99) / 100``): among equally accurate checkpoints the one that
    hides the bits best wins."""


class WatermarkTrainSpec(RayTrainSpec):
    kind: Literal["watermark-train"] = "watermark-train"
    model: WatermarkModelSettings = Field(default_factory=WatermarkModelSettings)
    noise: list[Any] = Field(default_factory=lambda: ["real_jpeg", "jpeg_mask", "identity"])
    """Training noise layers (``vision.watermark.noise``): names or ``{name: options}``; one per
    step, drawn uniformly (MBRS's JPEG setting by default)."""
    data: WatermarkTrainData = Field(default_factory=WatermarkTrainData)
    train: WatermarkTrainSettings
    checkpoint: WatermarkCheckpoints = Field(default_factory=WatermarkCheckpoints)


def build_preset(settings: WatermarkModelSettings):
    from vision.watermark import mbrs

    return getattr(mbrs, settings.preset)(**({"channels": settings.channels} if settings.channels else {}))


def training_pictures(data: WatermarkTrainData) -> list:
    import numpy as np
    from PIL import Image

    if data.source == "photos":
        return [_bundled(name) for name in TRAINING_PHOTOS]
    pictures = []
    for path in image_paths(WatermarkData(source="folder", path=data.path)):
        try:
            with Image.open(path) as picture:
                pictures.append(np.asarray(picture.convert("RGB")))
        except OSError:
            continue
    if not pictures:
        raise ValueError(f"no readable images under {data.path}")
    return pictures


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One rank of a ``watermark-train`` run."""
    import numpy as np
    import torch

    from vision.watermark.methods import save_mbrs
    from vision.data import random_crops
    from vision.watermark.mbrs import bit_error_rate, discriminator_loss, mbrs_losses, psnr
    from vision.watermark.noise import RealJpeg, build_noise

    spec = WatermarkTrainSpec.model_validate(config["spec"])
    rank, world, device = worker_context(spec.scaling)
    torch.manual_seed(spec.seed)
    model = build_preset(spec.model).to(device)
    noise = build_noise(spec.noise).to(device)
    coder = [*model.encoder.parameters(), *model.decoder.parameters()]
    critic = list(model.discriminator.parameters())
    optimizer = torch.optim.Adam(coder, lr=spec.train.lr)
    critic_optimizer = torch.optim.Adam(critic, lr=spec.train.lr)
    pictures = training_pictures(spec.data)
    validation_rng = np.random.default_rng([spec.seed, 999_983])
    val_images = random_crops(pictures, spec.data.val_images, model.size, validation_rng).to(device)
    val_bits = torch.from_numpy(validation_rng.integers(0, 2, (spec.data.val_images, model.message_length))).to(device)
    start_epoch, elapsed = 0, 0.0
    checkpoint = starting_checkpoint(config)
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        critic_optimizer.load_state_dict(state["critic_optimizer"])
        start_epoch, elapsed = int(state["epoch"]), float(state["elapsed"])
    broadcast_from_rank_zero(model, world)
    per_worker = spec.train.batch_size // world
    jpeg = RealJpeg(spec.train.val_jpeg_quality)
    val_noise = build_noise(spec.train.val_noise).to(device) if spec.train.val_noise is not None else None
    for epoch in range(start_epoch, spec.train.epochs):
        rng = np.random.default_rng([spec.seed, epoch, rank])
        noise_draws = np.random.default_rng([spec.seed, epoch])  # the same noise layer on every rank each step
        torch.manual_seed(spec.seed * 1_000_003 + epoch * world + rank)  # each rank its own masks, a resume its epoch's
        started = time.perf_counter()
        model.train()
        sums = np.zeros(4)
        for _ in range(spec.train.steps_per_epoch):
            cover = random_crops(pictures, per_worker, model.size, rng).to(device)
            bits = torch.from_numpy(rng.integers(0, 2, (per_worker, model.message_length))).to(device)
            if hasattr(noise, "layers"):
                layer = noise.layers[int(noise_draws.integers(len(noise.layers)))]
            else:
                layer = noise
            losses, encoded, _ = mbrs_losses(model, cover, bits, layer, spec.train.image_weight,
                                             spec.train.message_weight, spec.train.adversarial_weight)
            optimizer.zero_grad(set_to_none=True)
            losses.total.backward()
            if world > 1:
                average_gradients(coder, world)
            optimizer.step()
            critic_loss = discriminator_loss(model, cover, encoded)
            critic_optimizer.zero_grad(set_to_none=True)
            critic_loss.backward()
            if world > 1:
                average_gradients(critic, world)
            critic_optimizer.step()
            sums += [float(losses.total.detach()), losses.image_mse, losses.message_mse, float(critic_loss.detach())]
        average_buffers(model, world)
        seconds = torch.tensor([time.perf_counter() - started], dtype=torch.float64, device=device)
        if world > 1:  # every rank adds the same time, so all stop at the same epoch
            import torch.distributed as dist

            dist.all_reduce(seconds)
        elapsed += float(seconds.cpu()) / world
        model.eval()
        with torch.no_grad():
            marked = model.embed(val_images, val_bits)
            clean = bit_error_rate(model.decoder(marked), val_bits)
            compressed = bit_error_rate(model.decoder(jpeg(marked)), val_bits)
            quality = float(psnr(marked, val_images).mean())
            if val_noise is not None:  # one draw per image (a crop box each), the same draws every epoch
                torch.manual_seed(spec.seed + 7_777)  # (the next epoch reseeds for training)
                noised = torch.cat([val_noise(image[None], cover[None]) for image, cover in zip(marked, val_images)])
                noisy = bit_error_rate(model.decoder(noised), val_bits)
        steps = spec.train.steps_per_epoch
        metrics = {"epoch": epoch + 1, "train/loss": sums[0] / steps, "train/image_mse": sums[1] / steps,
                   "train/message_mse": sums[2] / steps, "train/discriminator_loss": sums[3] / steps,
                   "val/psnr": quality, "val/ber": clean, "val/bit_accuracy": 1 - clean,
                   f"val/ber_jpeg{spec.train.val_jpeg_quality}": compressed, "val/bit_accuracy_jpeg": 1 - compressed,
                   "val/rank": round((1 - compressed) * val_bits.numel()) + min(quality, 99.0) / 100,
                   "time/train_s": elapsed}
        if val_noise is not None:
            metrics.update({"val/ber_noise": noisy, "val/bit_accuracy_noise": 1 - noisy,
                            "val/rank": round((1 - noisy) * val_bits.numel()) + min(quality, 99.0) / 100})
        done = spec.train.time_limit_s is not None and elapsed >= spec.train.time_limit_s
        def write_checkpoint(folder: Path) -> None:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "critic_optimizer": critic_optimizer.state_dict(), "epoch": epoch + 1, "elapsed": elapsed,
                        "spec": config["spec"]}, folder / CHECKPOINT_FILE)
            save_mbrs(model.cpu(), folder / METHOD_FILE, epoch=epoch + 1)
            model.to(device)

        report_epoch(rank, metrics, write_checkpoint)
        if done:
            break


@register
class WatermarkTrainPipeline(Pipeline):
    kind = "watermark-train"
    spec_model = WatermarkTrainSpec
    summary = "train MBRS (or the HiDDeN-style baseline) on Ray Train; PSNR and BER every epoch"
    step_metric = "epoch"
    time_attr = "epoch"
    key_metrics = ("val/psnr", "val/ber", "val/bit_accuracy_jpeg", "train/loss", "epoch")
    curve_metrics = ("val/psnr", "val/bit_accuracy", "val/bit_accuracy_jpeg")

    def check(self, spec: WatermarkTrainSpec) -> list[Problem]:
        from vision.watermark.noise import build_noise

        import torch

        val_noise = spec.train.val_noise
        if isinstance(val_noise, (list, tuple)):
            return [Problem("train.val_noise", "one noise layer (a name or {name: options}), not a list")]
        size = build_preset(spec.model).size
        probe = torch.rand(2, 3, size, size)
        for field, layers in (("noise", spec.noise), ("train.val_noise", [] if val_noise is None else [val_noise])):
            for layer in layers:  # each once on a probe batch: options that cannot run fail here
                try:
                    build_noise(layer)(probe, probe)
                except (ValueError, TypeError, RuntimeError) as err:
                    return [Problem(field, f"{layer}: {err}")]
        if spec.checkpoint.score == "val/bit_accuracy_noise" and val_noise is None:
            return [Problem("checkpoint.score", "val/bit_accuracy_noise needs train.val_noise (the noise to validate through)")]
        if spec.data.source == "folder" and not Path(spec.data.path).is_dir():
            return [Problem("data.path", f"no such folder: {spec.data.path}")]
        return []

    def reported_metrics(self, spec: WatermarkTrainSpec) -> tuple[set[str], tuple[str, ...]]:
        return set(self.key_metrics) | {"iteration", "val/bit_accuracy", "time/train_s"}, ("train/", "val/")

    def trial_resources(self, spec: WatermarkTrainSpec) -> list[dict[str, float]]:
        worker = {"CPU": spec.scaling.cpus_per_worker, **({"GPU": 1.0} if spec.scaling.use_gpu else {})}
        return [{"CPU": 1.0}] + [dict(worker) for _ in range(spec.scaling.num_workers)]

    def progress_total(self, spec: WatermarkTrainSpec) -> int | None:
        return spec.train.epochs

    def run(self, spec: WatermarkTrainSpec, session: Session) -> dict[str, Any]:
        def make_trainer(callback):
            return torch_trainer(train_loop_per_worker, {"spec": spec.model_dump(mode="json")}, spec, session,
                                 CHECKPOINT_FILE, "watermark-train", callback)

        result, last, best = fit_and_report(make_trainer, session, spec.checkpoint.score)
        summary: dict[str, Any] = {key: last[key] for key in self.key_metrics if key in last}
        summary[f"best/{spec.checkpoint.score}"] = best
        checkpoint = best_checkpoint_path(result, spec.checkpoint.score)
        if checkpoint is not None:
            summary["checkpoint"] = checkpoint
            summary["method_checkpoint"] = str(Path(checkpoint) / METHOD_FILE)
        return summary
