"""SPSL's phase channel (Liu et al., CVPR 2021): the image rebuilt from its phase spectrum alone.

Each image is converted to grey (ITU-R 601 weights), transformed by a 2-D FFT over height
and width, every frequency is set to unit magnitude (its phase kept), and the inverse FFT's
real part is the phase-only image. Up-sampling and blending leave their traces in the phase
spectrum, which this channel exposes to a shallow network.

The spectrum of a real image is Hermitian and stays so at unit magnitude, so the inverse is
real; by Parseval its squares sum to 1 over the image. It is scaled by ``sqrt(H * W)`` so that
its mean square is exactly 1, the order of magnitude of the RGB channels, whatever the image
size. Everything is per image: the result does not depend on what else is in the batch.
"""

from __future__ import annotations

import torch

GREY_WEIGHTS = (0.299, 0.587, 0.114)


def phase_only(images: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``[B, 3, H, W]`` (or ``[B, 1, H, W]``) images -> ``[B, 1, H, W]`` phase-only images.

    A frequency with zero magnitude (e.g. a constant image's non-zero frequencies) has no
    phase; it is left at zero instead of being given an arbitrary one.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"phase_only takes [B, 1 or 3, H, W] images, got shape {tuple(images.shape)}")
    x = images.float()
    if x.shape[1] == 3:
        weights = x.new_tensor(GREY_WEIGHTS).view(1, 3, 1, 1)
        x = (x * weights).sum(1, keepdim=True)
    spectrum = torch.fft.fft2(x, dim=(-2, -1))
    magnitude = spectrum.abs()
    unit = torch.where(magnitude > eps, spectrum / magnitude.clamp_min(eps), torch.zeros_like(spectrum))
    height, width = x.shape[-2:]
    return torch.fft.ifft2(unit, dim=(-2, -1)).real * (height * width) ** 0.5


def with_phase_channel(images: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` RGB -> ``[B, 4, H, W]``: RGB and the phase-only image as the 4th channel."""
    return torch.cat([images, phase_only(images).to(images.dtype)], dim=1)
