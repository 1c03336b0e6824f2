"""ImageNet training augmentations in plain torch (no torchvision): random-resized crops,
RandAugment and random erasing, as the CSWin/DeiT recipes use them.

Images are float ``[B, C, H, W]`` batches in [0, 1] (random erasing runs after
normalisation, as in the recipes). Every random draw comes from the ``generator`` passed
in, so a seeded generator gives the same augmentations again.

- :func:`sample_crop_box` / :func:`random_resized_crop`: a box of ``scale`` of the area and
  aspect ratio in ``ratio`` (log-uniform), ten tries, else the centre crop at the nearest
  allowed ratio (the usual ``RandomResizedCrop`` rule); the decoder of streamed images uses
  the same box rule on the full-resolution picture.
- :func:`rand_augment`: RandAugment (Cubuk et al., 2020) with the ``inc`` ("increasing")
  operation set the reference training uses (``rand-m9-mstd0.5-inc1``): each image gets
  ``num_ops`` operations drawn with replacement from 15, each applied with probability 1/2 at
  a magnitude drawn from N(m, mstd) clipped to [0, 10].
- :func:`random_erasing`: with probability ``p`` one box of 2%-33% of the image, aspect ratio
  0.3-3.3, is filled with standard normal noise per pixel (Zhong et al., 2020, "pixel" mode).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

MAX_LEVEL = 10.0


def _uniform(generator: torch.Generator | None, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def sample_crop_box(height: int, width: int, scale: Sequence[float] = (0.08, 1.0),
                    ratio: Sequence[float] = (3 / 4, 4 / 3),
                    generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """``(top, left, box_height, box_width)`` of a random-resized crop of an image of that size."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(generator, scale[0], scale[1])
        aspect = math.exp(_uniform(generator, *log_ratio))
        box_w = round(math.sqrt(target * aspect))
        box_h = round(math.sqrt(target / aspect))
        if 0 < box_w <= width and 0 < box_h <= height:
            top = int(torch.randint(0, height - box_h + 1, (), generator=generator))
            left = int(torch.randint(0, width - box_w + 1, (), generator=generator))
            return top, left, box_h, box_w
    aspect = width / height
    if aspect < min(ratio):
        box_w, box_h = width, round(width / min(ratio))
    elif aspect > max(ratio):
        box_h, box_w = height, round(height * max(ratio))
    else:
        box_h, box_w = height, width
    return (height - box_h) // 2, (width - box_w) // 2, box_h, box_w


def random_resized_crop(images: torch.Tensor, size: int, scale: Sequence[float] = (0.08, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3),
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image cropped to its own random box and resized (bilinear, antialiased) to ``size``."""
    height, width = images.shape[-2:]
    out = []
    for image in images:
        top, left, box_h, box_w = sample_crop_box(height, width, scale, ratio, generator)
        crop = image[None, :, top : top + box_h, left : left + box_w]
        out.append(F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True))
    return torch.cat(out).clamp_(0.0, 1.0)


# ---------------------------------------------------------------- RandAugment operations
# Each takes images [N, C, H, W] in [0, 1], magnitudes [N] in [0, 10] and signs [N] (+-1),
# and returns the transformed images.

def _levels(images: torch.Tensor) -> torch.Tensor:
    return (images * 255.0).round_().clamp_(0, 255)


def _gray(images: torch.Tensor) -> torch.Tensor:
    if images.shape[1] != 3:
        return images.mean(dim=1, keepdim=True)
    weights = images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def _blend(degenerate: torch.Tensor, images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (degenerate + factor.view(-1, 1, 1, 1) * (images - degenerate)).clamp_(0.0, 1.0)


def _enhance_factor(magnitude: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """The "increasing" enhancement factor: 1 +- 0.9 * m / 10 (further from 1 as m grows)."""
    return 1.0 + sign * 0.9 * magnitude / MAX_LEVEL


def auto_contrast(images, magnitude=None, sign=None):
    low = images.amin(dim=(2, 3), keepdim=True)
    high = images.amax(dim=(2, 3), keepdim=True)
    span = high - low
    stretched = (images - low) / span.clamp_min(1e-6)
    return torch.where(span > 0, stretched, images)


def equalize(images, magnitude=None, sign=None):
    """Histogram equalisation of each channel over 256 levels (PIL's ``ImageOps.equalize`` rule)."""
    batch, channels, height, width = images.shape
    levels = _levels(images).long().reshape(batch * channels, -1)
    histogram = torch.zeros(batch * channels, 256, dtype=torch.long, device=images.device)
    histogram.scatter_add_(1, levels, torch.ones_like(levels))
    last = 255 - torch.argmax((histogram.flip(1) > 0).long(), dim=1)  # highest occupied level
    step = (histogram.sum(1) - histogram.gather(1, last[:, None]).squeeze(1)) // 255
    before = torch.cumsum(histogram, 1) - histogram  # pixels below each level
    lut = ((before + (step // 2)[:, None]) // step.clamp_min(1)[:, None]).clamp_(0, 255)
    mapped = lut.gather(1, levels).float() / 255.0
    out = torch.where(step[:, None] > 0, mapped, levels.float() / 255.0)
    return out.view(batch, channels, height, width)


def invert(images, magnitude=None, sign=None):
    return 1.0 - images


def posterize(images, magnitude, sign=None):
    bits = (4 - (magnitude / MAX_LEVEL * 4).long()).clamp(0, 8)  # 4 bits kept at m=0, fewer as m grows
    step = (2.0 ** (8 - bits)).view(-1, 1, 1, 1)
    return torch.floor(_levels(images) / step) * step / 255.0


def solarize(images, magnitude, sign=None):
    threshold = (256 - (magnitude / MAX_LEVEL * 256).long()).view(-1, 1, 1, 1)
    levels = _levels(images)
    return torch.where(levels >= threshold, 255.0 - levels, levels) / 255.0


def solarize_add(images, magnitude, sign=None):
    added = (magnitude / MAX_LEVEL * 110).long().view(-1, 1, 1, 1)
    levels = _levels(images)
    return torch.where(levels < 128, (levels + added).clamp(max=255), levels) / 255.0


def color(images, magnitude, sign):
    gray = _levels(_gray(images)) / 255.0  # PIL blends with the greyscale picture in whole levels
    return _blend(gray.expand_as(images), images, _enhance_factor(magnitude, sign))


def contrast(images, magnitude, sign):
    mean = _levels(_gray(images)).mean(dim=(1, 2, 3), keepdim=True).add_(0.5).floor_() / 255.0
    return _blend(mean.expand_as(images), images, _enhance_factor(magnitude, sign))


def brightness(images, magnitude, sign):
    return _blend(torch.zeros_like(images), images, _enhance_factor(magnitude, sign))


def sharpness(images, magnitude, sign):
    """Blend with PIL's smoothing filter (1 1 1 / 1 5 1 / 1 1 1, over 13); border pixels kept."""
    channels = images.shape[1]
    kernel = images.new_tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    smooth = F.conv2d(images, kernel.expand(channels, 1, 3, 3), padding=1, groups=channels)
    degenerate = images.clone()
    degenerate[..., 1:-1, 1:-1] = _levels(smooth[..., 1:-1, 1:-1]) / 255.0
    return _blend(degenerate, images, _enhance_factor(magnitude, sign))


def _affine(images: torch.Tensor, matrices: torch.Tensor, offsets: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Resample with output pixel p (centred coordinates) read from input ``M p + t`` (bilinear),
    filling what comes from outside the image with ``fill``."""
    batch, channels, height, width = images.shape
    to_unit = images.new_tensor([2.0 / width, 2.0 / height])
    theta = torch.empty(batch, 2, 3, dtype=images.dtype, device=images.device)
    theta[:, :, :2] = matrices * to_unit.view(1, 2, 1) / to_unit.view(1, 1, 2)
    theta[:, :, 2] = offsets * to_unit
    grid = F.affine_grid(theta, [batch, channels + 1, height, width], align_corners=False)
    with_mask = torch.cat([images, torch.ones_like(images[:, :1])], dim=1)
    sampled = F.grid_sample(with_mask, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    inside = sampled[:, -1:]
    return (sampled[:, :-1] + (1.0 - inside) * fill.view(1, -1, 1, 1)).clamp_(0.0, 1.0)


def _geometric(kind: str):
    def apply(images, magnitude, sign, fill):
        batch, _, height, width = images.shape
        eye = torch.eye(2, dtype=images.dtype, device=images.device).expand(batch, 2, 2).clone()
        offsets = images.new_zeros(batch, 2)
        level = magnitude.to(images.dtype) / MAX_LEVEL * sign.to(images.dtype)
        if kind == "rotate":  # up to 30 degrees either way, about the centre
            angle = torch.deg2rad(level * 30.0)
            eye = torch.stack([torch.stack([angle.cos(), -angle.sin()], -1),
                               torch.stack([angle.sin(), angle.cos()], -1)], dim=1)
        elif kind == "shear_x":  # x_in = x + s * y about the image's top-left corner (PIL's affine), s up to 0.3
            eye[:, 0, 1] = level * 0.3
            offsets[:, 0] = level * 0.3 * height / 2
        elif kind == "shear_y":
            eye[:, 1, 0] = level * 0.3
            offsets[:, 1] = level * 0.3 * width / 2
        elif kind == "translate_x":  # up to 45% of the width
            offsets[:, 0] = level * 0.45 * width
        else:
            offsets[:, 1] = level * 0.45 * height
        return _affine(images, eye, offsets, fill)

    apply.__name__ = kind
    apply.geometric = True
    return apply


OPERATIONS: dict[str, Callable] = {
    "AutoContrast": auto_contrast, "Equalize": equalize, "Invert": invert, "Rotate": _geometric("rotate"),
    "PosterizeIncreasing": posterize, "SolarizeIncreasing": solarize, "SolarizeAdd": solarize_add,
    "ColorIncreasing": color, "ContrastIncreasing": contrast, "BrightnessIncreasing": brightness,
    "SharpnessIncreasing": sharpness, "ShearX": _geometric("shear_x"), "ShearY": _geometric("shear_y"),
    "TranslateXRel": _geometric("translate_x"), "TranslateYRel": _geometric("translate_y"),
}
"""The "increasing" RandAugment set (``inc1``), by the names the reference's recipe uses."""


@dataclass(frozen=True)
class RandAugmentSettings:
    num_ops: int = 2
    magnitude: float = 9.0
    magnitude_std: float = 0.5
    probability: float = 0.5

    @classmethod
    def parse(cls, text: str) -> "RandAugmentSettings":
        """The recipe's notation: ``rand-m9-mstd0.5-inc1`` (``m`` magnitude 0-10, ``n``
        operations per image, ``mstd`` magnitude noise, ``p`` per-operation probability;
        ``inc1``, the increasing operation set, is the only set provided)."""
        parts = text.split("-")
        if parts[0] != "rand":
            raise ValueError(f"RandAugment settings start with 'rand-', got {text!r} (e.g. 'rand-m9-mstd0.5-inc1')")
        values: dict[str, float] = {}
        for part in parts[1:]:
            match = re.fullmatch(r"(mstd|inc|m|n|p)([0-9.]+)", part)
            if match is None:
                raise ValueError(f"unknown RandAugment setting {part!r} in {text!r}; allowed: m<magnitude>, "
                                 "n<operations>, mstd<std>, p<probability>, inc1")
            values[match.group(1)] = float(match.group(2))
        if values.pop("inc", 1.0) != 1.0:
            raise ValueError(f"{text!r}: only the increasing operation set (inc1) is provided")
        settings = cls(num_ops=int(values.get("n", 2)), magnitude=values.get("m", 9.0),
                       magnitude_std=values.get("mstd", 0.5), probability=values.get("p", 0.5))
        if not 0 <= settings.magnitude <= MAX_LEVEL or settings.num_ops < 1 or not 0 <= settings.probability <= 1:
            raise ValueError(f"{text!r}: need 0 <= m <= 10, n >= 1 and 0 <= p <= 1")
        return settings


def rand_augment(images: torch.Tensor, settings: RandAugmentSettings, fill: Sequence[float] | float = 0.5,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """RandAugment of a batch: per image, ``num_ops`` operations in sequence, each drawn from
    :data:`OPERATIONS` (with replacement) and applied with ``probability``; ``fill`` is the
    colour geometric operations bring in from outside the image."""
    batch = images.shape[0]
    names = list(OPERATIONS)
    fill_tensor = torch.as_tensor(fill, dtype=images.dtype, device=images.device).expand(images.shape[1])
    out = images.clone()
    for _ in range(settings.num_ops):
        chosen = torch.randint(len(names), (batch,), generator=generator)
        applied = torch.rand(batch, generator=generator) < settings.probability
        magnitude = torch.randn(batch, generator=generator) * settings.magnitude_std + settings.magnitude
        magnitude = magnitude.clamp_(0.0, MAX_LEVEL).to(images.device)
        sign = torch.where(torch.rand(batch, generator=generator) < 0.5, -1.0, 1.0).to(images.device)
        for index, name in enumerate(names):
            rows = torch.nonzero(applied & (chosen == index)).flatten().to(images.device)
            if rows.numel() == 0:
                continue
            operation = OPERATIONS[name]
            arguments = (out[rows], magnitude[rows], sign[rows])
            if getattr(operation, "geometric", False):
                out[rows] = operation(*arguments, fill_tensor)
            else:
                out[rows] = operation(*arguments)
    return out


def random_erasing(images: torch.Tensor, probability: float, area: Sequence[float] = (0.02, 1 / 3),
                   aspect: Sequence[float] = (0.3, 1 / 0.3), generator: torch.Generator | None = None) -> torch.Tensor:
    """Random erasing: with ``probability``, one box per image filled with N(0, 1) noise per pixel."""
    if probability <= 0:
        return images
    out = images.clone()
    channels, height, width = images.shape[1:]
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    for row in range(images.shape[0]):
        if _uniform(generator) >= probability:
            continue
        for _ in range(10):
            target = height * width * _uniform(generator, *area)
            ratio = math.exp(_uniform(generator, *log_aspect))
            box_h, box_w = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if box_h < height and box_w < width:
                top = int(torch.randint(0, height - box_h + 1, (), generator=generator))
                left = int(torch.randint(0, width - box_w + 1, (), generator=generator))
                noise = torch.randn(channels, box_h, box_w, generator=generator).to(images)
                out[row, :, top : top + box_h, left : left + box_w] = noise
                break
    return out
