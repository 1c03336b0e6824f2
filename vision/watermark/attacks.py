"""Attacks on watermarked images, standalone and parameterised, for robustness evaluation.

Every attack takes and returns ``uint8 [H, W, 3]`` RGB arrays (what a user's image pipeline
holds) and is deterministic given its ``seed``. Geometric attacks that change the size
(``resize``, ``crop``) return the changed image; the evaluation decides how a method reads
it back (see each method's ``extract``). :func:`attack` looks one up by name with its
strength, and :func:`chain` composes several.

| name | strength | effect |
|---|---|---|
| ``jpeg`` | quality 1-100 (``subsampling`` ``444`` or ``420``) | Pillow's libjpeg round trip |
| ``resize`` | scale factor | bilinear resize (the image's size changes) |
| ``crop`` | kept area fraction | centred crop (the size changes) |
| ``crop_resize`` | kept area fraction | centred crop resized back to the original size |
| ``cropout`` | kept area fraction | outside a random rectangle of that area, the cover image (or black) |
| ``crop_black`` | kept area fraction | a random rectangle of that area kept in place, black elsewhere (MBRS's Crop) |
| ``dropout`` | kept pixel fraction | other pixels replaced by the cover image's (or black) |
| ``rotation`` | degrees | rotation about the centre, same size, black corners |
| ``gaussian_blur`` | sigma | Gaussian blur |
| ``gaussian_noise`` | standard deviation (0-255 scale) | additive noise |
| ``median_filter`` | kernel size (odd) | median filter |
| ``brightness`` | factor | Pillow's ImageEnhance.Brightness |
| ``contrast`` | factor | Pillow's ImageEnhance.Contrast |
| ``salt_pepper`` | fraction of pixels | set to 0 or 255 |
"""

from __future__ import annotations

import io
import math
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter


def _check(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"attacks take uint8 [H, W, 3] RGB images, got {image.dtype} {image.shape}")
    return image


def jpeg(image: np.ndarray, quality: float, subsampling: str = "420", seed: int = 0) -> np.ndarray:
    """Encode and decode with Pillow (libjpeg) at ``quality``; ``subsampling`` ``444`` or ``420``."""
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    modes = {"444": 0, "422": 1, "420": 2}
    if subsampling not in modes:
        raise ValueError(f"subsampling must be one of {', '.join(modes)}, got {subsampling!r}")
    buffer = io.BytesIO()
    Image.fromarray(_check(image)).save(buffer, format="JPEG", quality=int(round(quality)), subsampling=modes[subsampling])
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"))


def jpeg_size(image: np.ndarray, quality: float, subsampling: str = "420") -> int:
    """Bytes of the JPEG file :func:`jpeg` would decode."""
    buffer = io.BytesIO()
    Image.fromarray(_check(image)).save(buffer, format="JPEG", quality=int(round(quality)),
                                        subsampling={"444": 0, "422": 1, "420": 2}[subsampling])
    return buffer.tell()


def resize(image: np.ndarray, scale: float, seed: int = 0) -> np.ndarray:
    if scale <= 0:
        raise ValueError(f"resize scale must be positive, got {scale}")
    height, width = _check(image).shape[:2]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


def _centred_box(height: int, width: int, fraction: float) -> tuple[int, int, int, int]:
    if not 0 < fraction <= 1:
        raise ValueError(f"the kept fraction must be in (0, 1], got {fraction}")
    side = math.sqrt(fraction)
    box_h, box_w = max(1, round(height * side)), max(1, round(width * side))
    top, left = (height - box_h) // 2, (width - box_w) // 2
    return top, left, box_h, box_w


def crop(image: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """The centred rectangle of ``fraction`` of the area (same aspect)."""
    top, left, box_h, box_w = _centred_box(*_check(image).shape[:2], fraction)
    return image[top: top + box_h, left: left + box_w].copy()


def crop_resize(image: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    height, width = _check(image).shape[:2]
    return np.asarray(Image.fromarray(crop(image, fraction)).resize((width, height), Image.BILINEAR))


def cropout(image: np.ndarray, fraction: float, seed: int = 0, cover: np.ndarray | None = None) -> np.ndarray:
    """Keep a random rectangle of ``fraction`` of the area; elsewhere the cover image (or black)."""
    height, width = _check(image).shape[:2]
    _, _, box_h, box_w = _centred_box(height, width, fraction)
    rng = np.random.default_rng(seed)
    top, left = int(rng.integers(0, height - box_h + 1)), int(rng.integers(0, width - box_w + 1))
    out = cover.copy() if cover is not None else np.zeros_like(image)
    out[top: top + box_h, left: left + box_w] = image[top: top + box_h, left: left + box_w]
    return out


def crop_black(image: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """A random rectangle of ``fraction`` of the area kept where it is, every other pixel black:
    the crop that MBRS's diffusion model is tested under (its ``Crop`` noise layer)."""
    return cropout(image, fraction, seed=seed, cover=None)


def dropout(image: np.ndarray, fraction: float, seed: int = 0, cover: np.ndarray | None = None) -> np.ndarray:
    """Keep each pixel with probability ``fraction``; the others come from the cover (or black)."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"the kept fraction must be in [0, 1], got {fraction}")
    keep = np.random.default_rng(seed).random(_check(image).shape[:2]) < fraction
    other = cover if cover is not None else np.zeros_like(image)
    return np.where(keep[..., None], image, other).astype(np.uint8)


def rotation(image: np.ndarray, degrees: float, seed: int = 0) -> np.ndarray:
    return np.asarray(Image.fromarray(_check(image)).rotate(degrees, resample=Image.BILINEAR))


def gaussian_blur(image: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    if sigma < 0:
        raise ValueError(f"blur sigma must be >= 0, got {sigma}")
    return np.asarray(Image.fromarray(_check(image)).filter(ImageFilter.GaussianBlur(radius=sigma)))


def gaussian_noise(image: np.ndarray, std: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0.0, std, _check(image).shape)
    return np.clip(image.astype(np.float64) + noise, 0, 255).round().astype(np.uint8)


def median_filter(image: np.ndarray, size: float, seed: int = 0) -> np.ndarray:
    kernel = int(size)
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"median filter size must be an odd integer >= 1, got {size}")
    return np.asarray(Image.fromarray(_check(image)).filter(ImageFilter.MedianFilter(kernel)))


def brightness(image: np.ndarray, factor: float, seed: int = 0) -> np.ndarray:
    return np.asarray(ImageEnhance.Brightness(Image.fromarray(_check(image))).enhance(factor))


def contrast(image: np.ndarray, factor: float, seed: int = 0) -> np.ndarray:
    return np.asarray(ImageEnhance.Contrast(Image.fromarray(_check(image))).enhance(factor))


def salt_pepper(image: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    draws = rng.random(_check(image).shape[:2])
    out = image.copy()
    out[draws < fraction / 2] = 0
    out[(draws >= fraction / 2) & (draws < fraction)] = 255
    return out


def identity(image: np.ndarray, strength: float = 0.0, seed: int = 0) -> np.ndarray:
    return _check(image).copy()


ATTACKS: dict[str, Callable[..., np.ndarray]] = {
    "identity": identity, "jpeg": jpeg, "resize": resize, "crop": crop, "crop_resize": crop_resize,
    "cropout": cropout, "crop_black": crop_black, "dropout": dropout, "rotation": rotation, "gaussian_blur": gaussian_blur,
    "gaussian_noise": gaussian_noise, "median_filter": median_filter, "brightness": brightness,
    "contrast": contrast, "salt_pepper": salt_pepper,
}


def attack(image: np.ndarray, name: str, strength: float, seed: int = 0, **options) -> np.ndarray:
    """Apply the attack ``name`` (:data:`ATTACKS`) at ``strength``; ``jpeg420``/``jpeg444`` are
    ``jpeg`` with that subsampling."""
    if name in ("jpeg420", "jpeg444"):
        return jpeg(image, strength, subsampling=name[4:], seed=seed)
    if name not in ATTACKS:
        raise ValueError(f"unknown attack '{name}'; available: {', '.join([*ATTACKS, 'jpeg420', 'jpeg444'])}")
    return ATTACKS[name](image, strength, seed=seed, **options)


def chain(image: np.ndarray, steps: Sequence[tuple[str, float]], seed: int = 0) -> np.ndarray:
    """Apply ``(name, strength)`` attacks in order (e.g. crop_resize then jpeg)."""
    for index, (name, strength) in enumerate(steps):
        image = attack(image, name, strength, seed=seed * 1009 + index)
    return image
