"""Forgery datasets made offline from images that PyPI packages ship.

Real "videos" are crops of scikit-image's bundled photographs and scikit-learn's two sample
images, brought down to ``size`` pixels (down-sampling only, with Pillow's Lanczos filter,
so real frames carry no up-sampling trace); the frames of a video are the same crop moved by
a few pixels with slightly different brightness.

Fakes are made from other real crops by the two operations face-forgery pipelines leave
traces of:

- **generative up-sampling** (``nearest``, ``bilinear``, ``transposed``): the frame is
  encoded to half resolution and decoded by a small random decoder: nearest-neighbour or
  bilinear up-sampling, or a transposed convolution whose kernel is a perturbed bilinear
  kernel (the checkerboard of GAN decoders), each followed by a random two-layer residual
  convolution. A family has ``decoders_per_family`` decoders, drawn from its own seed; a
  fake video uses one decoder for all its frames.
- **blending** (``blend``): a face of scikit-image's ``lfw_subset`` is scaled to an
  elliptical region, its colours matched to the region's, and pasted with a soft (blurred)
  elliptical mask, as face swaps do.

:func:`generate` writes the frames as PNG files plus a parquet manifest and a DeepfakeBench
JSON (:mod:`vision.forensics.manifest`), so the tests, the demo and a real FF++ copy go
through the same readers. Splits are by video.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

METHODS = ("nearest", "bilinear", "transposed", "blend")
PHOTOGRAPHS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
               "china.jpg", "flower.jpg")
"""scikit-image function names and scikit-learn sample-image file names."""
FAMILY_SEEDS = {"nearest": 11, "bilinear": 23, "transposed": 37, "blend": 53}


def photographs() -> list[np.ndarray]:
    """The real source images, uint8 ``[H, W, 3]``."""
    import skimage.data
    from sklearn.datasets import load_sample_image

    images = []
    for name in PHOTOGRAPHS:
        image = load_sample_image(name) if name.endswith(".jpg") else getattr(skimage.data, name)()
        images.append(np.ascontiguousarray(image[..., :3]))
    return images


def faces() -> np.ndarray:
    """scikit-image's 100 LFW faces, float ``[100, 25, 25]`` in [0, 1]."""
    import skimage.data

    return skimage.data.lfw_subset()[:100]


def _crop(image: np.ndarray, top: int, left: int, side: int, size: int, brightness: float) -> np.ndarray:
    from PIL import Image

    patch = Image.fromarray(image[top: top + side, left: left + side]).resize((size, size), Image.LANCZOS)
    return np.clip(np.asarray(patch, dtype=np.float32) * brightness, 0, 255) / 255.0


def real_video(rng: np.random.Generator, images: Sequence[np.ndarray], size: int, frames: int) -> np.ndarray:
    """``[frames, 3, size, size]`` float in [0, 1]: one crop, jittered per frame."""
    image = images[int(rng.integers(len(images)))]
    height, width = image.shape[:2]
    side = int(rng.integers(max(size, min(height, width) // 5), max(size + 1, min(height, width) // 2)))
    top = int(rng.integers(4, height - side - 4)) if height - side > 8 else 0
    left = int(rng.integers(4, width - side - 4)) if width - side > 8 else 0
    out = []
    for _ in range(frames):
        dy, dx = (int(v) for v in rng.integers(-4, 5, size=2)) if height - side > 8 and width - side > 8 else (0, 0)
        out.append(_crop(image, top + dy, left + dx, side, size, float(rng.uniform(0.97, 1.03))))
    return np.stack(out).transpose(0, 3, 1, 2)


class Decoder:
    """One random up-sampling decoder of a family (see the module docstring)."""

    def __init__(self, method: str, seed: int, hidden: int = 8, refinement: float = 0.08):
        if method not in ("nearest", "bilinear", "transposed"):
            raise ValueError(f"not an up-sampling method: {method!r}")
        generator = torch.Generator().manual_seed(seed)
        self.method, self.refinement = method, refinement
        if method == "transposed":
            taps = torch.tensor([0.25, 0.75, 0.75, 0.25])
            bilinear = torch.outer(taps, taps)
            kernel = torch.zeros(3, 3, 4, 4)
            for channel in range(3):
                kernel[channel, channel] = bilinear
            self.kernel = kernel + 0.03 * torch.randn(3, 3, 4, 4, generator=generator)
        self.conv1 = torch.randn(hidden, 3, 3, 3, generator=generator) / math.sqrt(27)
        self.conv2 = torch.randn(3, hidden, 3, 3, generator=generator) / math.sqrt(9 * hidden)

    @torch.no_grad()
    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        low = F.avg_pool2d(frames, 2)
        if self.method == "transposed":
            up = F.conv_transpose2d(low, self.kernel, stride=2, padding=1)
        else:
            up = F.interpolate(low, scale_factor=2, mode=self.method,
                               **({"align_corners": False} if self.method == "bilinear" else {}))
        up = up[..., : frames.shape[-2], : frames.shape[-1]]
        residual = F.conv2d(torch.tanh(F.conv2d(up, self.conv1, padding=1)), self.conv2, padding=1)
        return (up + self.refinement * residual).clamp(0.0, 1.0)


def blend(frames: torch.Tensor, face: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """Paste ``face`` (grey, [0, 1]) into an elliptical region of every frame with a soft mask."""
    from PIL import Image

    from vision.forensics.mat import gaussian_blur

    _, _, height, width = frames.shape
    centre_y, centre_x = (float(v) for v in rng.uniform(0.4, 0.6, size=2) * (height, width))
    radius_y, radius_x = (float(v) for v in rng.uniform(0.22, 0.34, size=2) * (height, width))
    top, left = int(max(0, centre_y - radius_y)), int(max(0, centre_x - radius_x))
    bottom, right = int(min(height, centre_y + radius_y)), int(min(width, centre_x + radius_x))
    donor = Image.fromarray((face[3:22, 3:22] * 255).astype(np.uint8)).resize((right - left, bottom - top), Image.BICUBIC)
    donor = torch.from_numpy(np.asarray(donor, dtype=np.float32) / 255.0)
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32), indexing="ij")
    inside = (((ys - centre_y) / radius_y) ** 2 + ((xs - centre_x) / radius_x) ** 2 <= 1.0).float()
    sigma = float(rng.uniform(1.0, 2.5))
    mask = gaussian_blur(inside[None, None], 2 * math.ceil(2 * sigma) + 1, sigma)[0, 0]
    out = frames.clone()
    region = (slice(None), slice(None), slice(top, bottom), slice(left, right))
    target = frames[region]
    weights = mask[top:bottom, left:right]
    # colour transfer: the donor's contrast and mean per channel become the region's
    mean = (target * weights).sum((2, 3), keepdim=True) / weights.sum()
    spread = (((target - mean) ** 2 * weights).sum((2, 3), keepdim=True) / weights.sum()).sqrt()
    standardised = (donor - donor.mean()) / donor.std().clamp_min(1e-3)
    pasted = (standardised[None, None] * spread + mean).clamp(0.0, 1.0)
    out[region] = target * (1 - weights) + pasted * weights
    return out


def generate(out_dir: str | Path, methods: Sequence[str] = METHODS, videos_per_method: int = 20, real_videos: int | None = None,
             frames_per_video: int = 4, size: int = 64, decoders_per_family: int = 6,
             split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2), seed: int = 0) -> dict[str, Any]:
    """Write a dataset under ``out_dir``: ``frames/<method>/<video>/<n>.png``,
    ``manifest.parquet`` and ``dataset.json`` (DeepfakeBench layout, dataset ``Synthetic``).

    ``real_videos`` defaults to ``videos_per_method`` times the number of fake methods, so
    reals and fakes are balanced. Returns the rows and the two manifests' paths.
    """
    from PIL import Image

    from vision.forensics.manifest import write_deepfakebench_json, write_parquet_manifest

    unknown = [method for method in methods if method not in METHODS]
    if unknown:
        raise ValueError(f"unknown forgery methods {unknown}; available: {', '.join(METHODS)}")
    if abs(sum(split_fractions) - 1.0) > 1e-6:
        raise ValueError(f"split_fractions must sum to 1, got {split_fractions}")
    out = Path(out_dir)
    images, face_bank = photographs(), faces()
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    groups = [("real", real_videos if real_videos is not None else videos_per_method * len(methods))]
    groups += [(method, videos_per_method) for method in methods]
    for method, count in groups:
        decoders = [Decoder(method, FAMILY_SEEDS[method] * 1000 + index) for index in range(decoders_per_family)] \
            if method in ("nearest", "bilinear", "transposed") else []
        splits = _split_names(count, split_fractions, rng)
        for index in range(count):
            frames = torch.from_numpy(real_video(rng, images, size, frames_per_video))
            if decoders:
                frames = decoders[int(rng.integers(len(decoders)))](frames)
            elif method == "blend":
                frames = blend(frames, face_bank[int(rng.integers(len(face_bank)))], rng)
            video = f"{method}_{index:04d}"
            folder = out / "frames" / method / video
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (frames.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            for number, frame in enumerate(pixels):
                path = folder / f"{number:03d}.png"
                Image.fromarray(frame).save(path)
                rows.append({"path": str(path), "label": int(method != "real"), "video_id": video, "method": method,
                             "split": splits[index]})
    parquet = write_parquet_manifest(rows, out / "manifest.parquet", root=out)
    json_path = write_deepfakebench_json(rows, out / "dataset.json", "Synthetic", root=out)
    return {"rows": rows, "parquet": str(parquet), "json": str(json_path)}


def _split_names(count: int, fractions: tuple[float, float, float], rng: np.random.Generator) -> list[str]:
    train = round(count * fractions[0])
    val = round(count * fractions[1])
    names = ["train"] * train + ["val"] * val + ["test"] * (count - train - val)
    return [names[i] for i in rng.permutation(count)]
