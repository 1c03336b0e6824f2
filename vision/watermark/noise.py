"""Training noise layers: what a watermark must survive, as torch modules on ``[B, 3, H, W]``
images in [0, 1]. Each is differentiable where MBRS's is; :class:`Combined` picks one per
mini-batch, the MBRS idea (one batch sees real JPEG, the next simulated JPEG, the next none).

- :class:`Identity`;
- :class:`RealJpeg`: Pillow's libjpeg at a quality and chroma subsampling. Not
  differentiable, as in the paper: the decoder learns from it, the encoder gets no gradient
  from that batch (``straight_through=True`` passes the gradient as if it were the identity);
- :class:`DiffJpeg`: JPEG written out in torch (YCbCr, chroma subsampling, 8x8 DCT,
  quantisation with the standard tables at libjpeg's quality scaling, dequantisation,
  inverse DCT), rounding by straight-through estimation;
- :class:`JpegSS`: the same with rounding approximated by ``round(x) + (x - round(x))^3``;
- :class:`JpegMask`: the 8x8 DCT keeping only the low frequencies (5x5 of luma, 3x3 of
  chroma), no quantisation;
- :class:`Crop` (keep a random rectangle, the rest zero), :class:`Cropout` (a random
  rectangle of the encoded image, the cover elsewhere), :class:`Dropout` (pixels from the
  cover), :class:`GaussianFilter`, :class:`GaussianNoise`, :class:`MedianFilter`,
  :class:`SaltPepper`, :class:`Resize` (down and back up).

Layers that mix in the cover image take it as the second argument: ``layer(encoded, cover)``.
"""

from __future__ import annotations

import math
import random
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LUMA_TABLE = torch.tensor([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55], [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62], [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], dtype=torch.float32)
CHROMA_TABLE = torch.tensor([
    [17, 18, 24, 47, 99, 99, 99, 99], [18, 21, 26, 66, 99, 99, 99, 99], [24, 26, 56, 99, 99, 99, 99, 99],
    [47, 66, 99, 99, 99, 99, 99, 99]] + [[99] * 8] * 4, dtype=torch.float32)
"""The JPEG standard's (Annex K) quantisation tables, which libjpeg scales by quality."""


def quality_table(table: torch.Tensor, quality: float) -> torch.Tensor:
    """libjpeg's integer scaling: 5000 // q below 50, 200 - 2q from 50; entries in 1..255."""
    quality = min(100, max(1, int(round(quality))))
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return torch.clamp(torch.floor((table * scale + 50.0) / 100.0), 1.0, 255.0)


def dct_matrix(size: int = 8) -> torch.Tensor:
    """The orthonormal DCT-II matrix: ``coefficients = D @ block @ D.T``."""
    n = torch.arange(size, dtype=torch.float64)
    matrix = torch.cos(math.pi * (2 * n[None, :] + 1) * n[:, None] / (2 * size)) * math.sqrt(2.0 / size)
    matrix[0] /= math.sqrt(2.0)
    return matrix.float()


def rgb_to_ycbcr(images: torch.Tensor) -> torch.Tensor:
    """[0, 255] RGB -> JFIF YCbCr (Cb, Cr centred at 128)."""
    r, g, b = images.unbind(1)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128.0
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128.0
    return torch.stack([y, cb, cr], 1)


def ycbcr_to_rgb(images: torch.Tensor) -> torch.Tensor:
    y, cb, cr = images.unbind(1)
    cb, cr = cb - 128.0, cr - 128.0
    return torch.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], 1)


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """[B, H, W] -> [B, H/8, W/8, 8, 8]."""
    batch, height, width = x.shape
    return x.view(batch, height // 8, 8, width // 8, 8).permute(0, 1, 3, 2, 4)


def _unblocks(x: torch.Tensor) -> torch.Tensor:
    batch, rows, cols = x.shape[:3]
    return x.permute(0, 1, 3, 2, 4).reshape(batch, rows * 8, cols * 8)


class _DctCodec(nn.Module):
    """YCbCr, optional 4:2:0 chroma, 8x8 DCT, a coefficient transform, inverse: the JPEG family."""

    def __init__(self, subsampling: str = "420"):
        super().__init__()
        if subsampling not in ("444", "420"):
            raise ValueError(f"subsampling must be '444' or '420', got {subsampling!r}")
        self.subsampling = subsampling
        self.register_buffer("dct", dct_matrix(), persistent=False)

    def transform(self, coefficients: torch.Tensor, channel: int) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor, cover: torch.Tensor | None = None) -> torch.Tensor:
        batch, _, height, width = images.shape
        pad_h, pad_w = (-height) % 16, (-width) % 16  # whole 8x8 blocks, also after 2x chroma subsampling
        x = F.pad(images.clamp(0, 1) * 255.0, (0, pad_w, 0, pad_h), mode="replicate")
        ycbcr = rgb_to_ycbcr(x)
        out = []
        for channel in range(3):
            plane = ycbcr[:, channel]
            subsampled = channel > 0 and self.subsampling == "420"
            if subsampled:
                plane = F.avg_pool2d(plane[:, None], 2)[:, 0]
            blocks = _blocks(plane - 128.0)
            coefficients = self.dct @ blocks @ self.dct.T
            blocks = self.dct.T @ self.transform(coefficients, channel) @ self.dct
            plane = _unblocks(blocks) + 128.0
            if subsampled:
                plane = F.interpolate(plane[:, None], scale_factor=2, mode="bilinear", align_corners=False)[:, 0]
            out.append(plane)
        rgb = ycbcr_to_rgb(torch.stack(out, 1)) / 255.0
        return rgb[..., :height, :width].clamp(0, 1)


class DiffJpeg(_DctCodec):
    """JPEG at ``quality`` in torch; rounding of the quantised coefficients is straight-through."""

    def __init__(self, quality: float = 50, subsampling: str = "420"):
        super().__init__(subsampling)
        self.quality = quality
        self.register_buffer("tables", torch.stack([quality_table(LUMA_TABLE, quality),
                                                    quality_table(CHROMA_TABLE, quality)]), persistent=False)

    def round(self, x: torch.Tensor) -> torch.Tensor:
        return x + (torch.round(x) - x).detach()

    def transform(self, coefficients: torch.Tensor, channel: int) -> torch.Tensor:
        table = self.tables[min(channel, 1)]
        return self.round(coefficients / table) * table


class JpegSS(DiffJpeg):
    """DiffJpeg with rounding approximated by ``round(x) + (x - round(x))^3`` (a gradient near 0
    for values near integers, 3(x - round(x))^2)."""

    def round(self, x: torch.Tensor) -> torch.Tensor:
        rounded = torch.round(x)
        return rounded + (x - rounded) ** 3


class JpegMask(_DctCodec):
    """Keep the 5x5 lowest DCT frequencies of luma and the 3x3 of chroma; zero the rest."""

    def __init__(self, subsampling: str = "420", luma_keep: int = 5, chroma_keep: int = 3):
        super().__init__(subsampling)
        masks = torch.zeros(2, 8, 8)
        masks[0, :luma_keep, :luma_keep] = 1.0
        masks[1, :chroma_keep, :chroma_keep] = 1.0
        self.register_buffer("masks", masks, persistent=False)

    def transform(self, coefficients: torch.Tensor, channel: int) -> torch.Tensor:
        return coefficients * self.masks[min(channel, 1)]


class RealJpeg(nn.Module):
    """Pillow's JPEG at ``quality``; no gradient (the paper's), or identity's (``straight_through``)."""

    def __init__(self, quality: float = 50, subsampling: str = "420", straight_through: bool = False):
        super().__init__()
        self.quality, self.subsampling, self.straight_through = int(round(quality)), subsampling, straight_through

    def forward(self, images: torch.Tensor, cover: torch.Tensor | None = None) -> torch.Tensor:
        from vision.watermark.attacks import jpeg

        pixels = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        decoded = np.stack([jpeg(np.ascontiguousarray(image), self.quality, self.subsampling) for image in pixels])
        out = torch.from_numpy(decoded).permute(0, 3, 1, 2).to(images.device, images.dtype) / 255.0
        return images + (out - images).detach() if self.straight_through else out


class Identity(nn.Module):
    def forward(self, images: torch.Tensor, cover: torch.Tensor | None = None) -> torch.Tensor:
        return images


def _random_box(height: int, width: int, fraction: float, generator: torch.Generator | None) -> tuple[int, int, int, int]:
    side = math.sqrt(fraction)
    box_h, box_w = max(1, round(height * side)), max(1, round(width * side))
    top = int(torch.randint(0, height - box_h + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - box_w + 1, (1,), generator=generator))
    return top, left, box_h, box_w


class Crop(nn.Module):
    """Keep a random rectangle of ``fraction`` of the area, zero elsewhere (size unchanged)."""

    def __init__(self, fraction: float = 0.5):
        super().__init__()
        if not 0 < fraction <= 1:
            raise ValueError(f"the kept area fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction

    def forward(self, images: torch.Tensor, cover: torch.Tensor | None = None) -> torch.Tensor:
        top, left, box_h, box_w = _random_box(*images.shape[-2:], self.fraction, None)
        mask = torch.zeros_like(images[:, :1])
        mask[..., top: top + box_h, left: left + box_w] = 1.0
        return images * mask


class Cropout(Crop):
    """A random rectangle of the encoded image, the cover image elsewhere."""

    def forward(self, images: torch.Tensor, cover: torch.Tensor | None = None) -> torch.Tensor:
        if cover is None:
            raise ValueError("Cropout needs the cover image: layer(encoded, cover)")
        kept = super().forward(torch.ones_like(images[:, :1]))
        return images * kept + cover * (1 - kept)


class Dropout(nn.Module):
    """Each pixel kept with probability ``keep``, else the cover image's."""

    def __init__(self, keep: float = 0.6):
        super().__init__()
        if not 0 <= keep <= 1:
            raise ValueError(f"the kept pixel fraction must be in [0, 1], got {keep}")
        self.keep = keep

    def forward(self, images: torch.Tensor, cover: torch.Tensor | None = None) -> torch.Tensor:
        if cover is None:
            raise ValueError("Dropout needs the cover image: layer(encoded, cover)")
        mask = (torch.rand_like(images[:, :1]) < self.keep).to(images.dtype)
        return images * mask + cover * (1 - mask)


class GaussianFilter(nn.Module):
    def __init__(self, sigma: float = 2.0, kernel_size: int = 7):
        super().__init__()
        self.sigma, self.kernel_size = sigma, kernel_size

    def forward(self, images: torch.Tensor, cover: torch.Tensor | None = None) -> torch.Tensor:
        from vision.forensics.mat import gaussian_blur

        return gaussian_blur(images, self.kernel_size, self.sigma)


class GaussianNoise(nn.Module):
    def __init__(self, std: float = 0.05):
        super().__init__()
        self.std = std

    def forward(self, images: torch.Tensor, cover: torch.Tensor | None = None) -> torch.Tensor:
        return images + self.std * torch.randn_like(images)


class MedianFilter(nn.Module):
    """Median over each ``k x k`` window (the gradient flows to the median pixel)."""

    def __init__(self, kernel_size: int = 3):
        super().__init__()
        self.kernel_size = kernel_size

    def forward(self, images: torch.Tensor, cover: torch.Tensor | None = None) -> torch.Tensor:
        k = self.kernel_size
        padded = F.pad(images, (k // 2,) * 4, mode="reflect")
        windows = padded.unfold(2, k, 1).unfold(3, k, 1)  # [B, C, H, W, k, k]
        return windows.reshape(*windows.shape[:4], -1).median(dim=-1).values


class SaltPepper(nn.Module):
    def __init__(self, fraction: float = 0.05):
        super().__init__()
        self.fraction = fraction

    def forward(self, images: torch.Tensor, cover: torch.Tensor | None = None) -> torch.Tensor:
        draws = torch.rand_like(images[:, :1])
        salt = (draws < self.fraction / 2).to(images.dtype)
        pepper = ((draws >= self.fraction / 2) & (draws < self.fraction)).to(images.dtype)
        kept = 1 - salt - pepper
        return images * kept + salt  # pepper pixels are 0


class Resize(nn.Module):
    """Down (or up) by ``scale`` and back to the original size, bilinear."""

    def __init__(self, scale: float = 0.5):
        super().__init__()
        self.scale = scale

    def forward(self, images: torch.Tensor, cover: torch.Tensor | None = None) -> torch.Tensor:
        height, width = images.shape[-2:]
        small = F.interpolate(images, scale_factor=self.scale, mode="bilinear", align_corners=False)
        return F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)


class Combined(nn.Module):
    """One of ``layers`` per call (per mini-batch), uniformly at random: MBRS's training noise."""

    def __init__(self, layers: Sequence[nn.Module], seed: int = 0):
        super().__init__()
        if not layers:
            raise ValueError("Combined needs at least one noise layer")
        self.layers = nn.ModuleList(layers)
        self.random = random.Random(seed)
        self.last: int | None = None

    def forward(self, images: torch.Tensor, cover: torch.Tensor | None = None) -> torch.Tensor:
        self.last = self.random.randrange(len(self.layers))
        return self.layers[self.last](images, cover)


NOISE_LAYERS = {"identity": Identity, "real_jpeg": RealJpeg, "diff_jpeg": DiffJpeg, "jpeg_ss": JpegSS,
                "jpeg_mask": JpegMask, "crop": Crop, "cropout": Cropout, "dropout": Dropout,
                "gaussian_filter": GaussianFilter, "gaussian_noise": GaussianNoise, "median_filter": MedianFilter,
                "salt_pepper": SaltPepper, "resize": Resize}


def build_noise(spec: str | dict | Sequence) -> nn.Module:
    """A noise layer from a name, ``{name: {options}}`` or a list of those (-> :class:`Combined`).

    ``["real_jpeg", "jpeg_mask", "identity"]`` is MBRS's JPEG setting."""
    if isinstance(spec, (list, tuple)):
        return Combined([build_noise(item) for item in spec])
    if isinstance(spec, dict):
        if len(spec) != 1:
            raise ValueError(f"a noise layer is {{name: options}} with one name, got {spec}")
        (name, options), = spec.items()
    else:
        name, options = spec, {}
    if name not in NOISE_LAYERS:
        raise ValueError(f"unknown noise layer '{name}'; available: {', '.join(NOISE_LAYERS)}")
    return NOISE_LAYERS[name](**(options or {}))
