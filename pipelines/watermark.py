"""Watermark robustness: the ``watermark-eval`` kind, a Ray Data pipeline over a grid.

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

METHOD_NAMES = ("mbrs", "hidden", "dwtDct", "dwtDctSvd", "rivaGan")
HELD_OUT_PHOTOS = ("immunohistochemistry", "retina", "china.jpg", "flower.jpg", "colorwheel")
"""Bundled photographs the ``photos`` source crops for evaluation (none is used in training)."""
TRAINING_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "cat")


class MethodSettings(SpecModel):
    name: Literal["mbrs", "hidden", "dwtDct", "dwtDctSvd", "rivaGan"]
    checkpoint: str | None = None
    """``mbrs``/``hidden``: a checkpoint written by ``vision.watermark.methods.save_mbrs``."""
    strength: float = Field(1.0, gt=0.0)
    """``mbrs``/``hidden``: residual scale at embedding."""
    message_length: int = Field(32, ge=1)
    """invisible-watermark methods (RivaGAN: 32); MBRS's comes from its checkpoint."""
    label: str | None = None
    """Name in the results (default: ``name``; set it to compare two checkpoints)."""

    @model_validator(mode="after")
    def _checkpoint(self) -> "MethodSettings":
        if self.name in ("mbrs", "hidden") and not self.checkpoint:
            raise ValueError(f"method {self.name} needs a checkpoint")
        return self


class AttackSettings(SpecModel):
    name: str
    """An attack of ``vision.watermark.attacks`` (``jpeg420``/``jpeg444`` for JPEG with that
    subsampling), or a label for ``chain``."""
    strengths: list[float] = Field(default_factory=lambda: [0.0])
    chain: list[tuple[str, float]] | None = None
    """Attacks applied first, in order, before ``name`` at each strength (e.g. crop_resize 0.75
    then JPEG)."""


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
    """Images are brought to this square for methods that take any size."""
    methods: list[MethodSettings]
    attacks: list[AttackSettings]
    data: WatermarkData = Field(default_factory=WatermarkData)
    inference: GridInference = Field(default_factory=GridInference)


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
                        emit(path=path, image=int(index), method=label, size=float(size), attack=settings.name
                             if not settings.chain else f"{'+'.join(n for n, _ in settings.chain)}+{settings.name}",
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
        from vision.watermark.attacks import ATTACKS

        known = [*ATTACKS, "jpeg420", "jpeg444"]
        for index, settings in enumerate(spec.attacks):
            for name in [settings.name] + [n for n, _ in settings.chain or []]:
                if name not in known:
                    return [Problem(f"attacks.{index}.name", f"unknown attack '{name}'{did_you_mean(name, known)}; "
                                                             f"available: {', '.join(known)}")]
        for index, method in enumerate(spec.methods):
            if method.checkpoint and not Path(method.checkpoint).is_file():
                return [Problem(f"methods.{index}.checkpoint", f"no such file: {method.checkpoint}")]
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
