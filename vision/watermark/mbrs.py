"""MBRS (Jia, Fang, Zhang; ACM MM 2021): an encoder that hides a bit string in an image, a
decoder that reads it back after noise, and a discriminator, in plain PyTorch.

- **Encoder**: the image through a conv-BN-ReLU layer and squeeze-and-excitation (SE)
  bottleneck blocks; the message, as a square map (``sqrt(L) x sqrt(L)``; the diffusion
  variant first maps it through a linear layer to a fixed 16 x 16 = 256 map, which spreads
  every bit over the image and survives crops), through a conv-BN-ReLU layer, transposed
  convolutions that double it up to the image's size, and SE blocks; the two are
  concatenated, fused by conv-BN-ReLU, concatenated with the cover image, and a 1x1
  convolution gives the encoded image (initialised to pass the cover through plus a small
  residual, so training starts from a high PSNR instead of a random image). At test time ``strength`` scales the residual:
  ``cover + strength (encoded - cover)``.
- **Decoder**: conv-BN-ReLU, SE blocks that halve the resolution down to the message map
  (doubling channels), more SE blocks, a conv to one channel read as the message (diffusion:
  then a linear layer from 256 values to ``L``).
- **Discriminator**: strided conv-BN-ReLU layers, global pooling, a linear logit.
- Loss (:func:`mbrs_losses`): ``1 x MSE(encoded, cover) + 10 x MSE(decoded, message) +
  1e-4 x adversarial``, as the reference. Messages are +-1 (bit 1 -> +1), images in [0, 1].

``se_blocks=False`` replaces every SE block by a plain conv-BN-ReLU layer: with a single
noise layer in training that is the HiDDeN-style baseline (Zhu et al., ECCV 2018).
Presets: :func:`mbrs_128_64` (128 x 128, 64 bits), :func:`mbrs_128_30_diffusion`
(128 x 128, 30 bits, diffusion), :func:`mbrs_256_256` (256 x 256, 256 bits), and
:func:`mbrs_tiny` (32 x 32, 16 bits, 16 channels) and :func:`mbrs_tiny_diffusion` (the same with
the diffusion layer) for tests and benchmarks on 2 cores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

DIFFUSION_LENGTH = 256


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__(nn.Conv2d(in_channels, out_channels, 3, stride, 1), nn.BatchNorm2d(out_channels),
                         nn.ReLU(inplace=True))


class SEBottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 with BN, squeeze-and-excitation (reduction 8), residual."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, reduction: int = 8):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, stride, 1, bias=False), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True), nn.Conv2d(out_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        squeezed = max(1, out_channels // reduction)
        self.excite = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(out_channels, squeezed, 1), nn.ReLU(inplace=True),
                                    nn.Conv2d(squeezed, out_channels, 1), nn.Sigmoid())
        self.shortcut = nn.Identity() if in_channels == out_channels and stride == 1 else nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        body = self.body(x)
        return torch.relu(body * self.excite(body) + self.shortcut(x))


def _blocks(in_channels: int, out_channels: int, count: int, se: bool, stride_after_first: int = 1,
            grow: int = 1) -> tuple[nn.Sequential, int]:
    """``count`` SE blocks (or conv-BN-ReLU layers); after the first, each has stride
    ``stride_after_first`` and multiplies the channels by ``grow``. Returns (layers, channels)."""
    layers, channels = [], out_channels
    block = SEBottleneck if se else ConvBNReLU
    layers.append(block(in_channels, out_channels))
    for _ in range(count - 1):
        layers.append(block(channels, channels * grow, stride_after_first))
        channels *= grow
    return nn.Sequential(*layers), channels


class Encoder(nn.Module):
    def __init__(self, size: int, message_length: int, channels: int = 64, blocks: int = 4, diffusion: bool = False,
                 se_blocks: bool = True):
        super().__init__()
        self.size, self.message_length, self.diffusion = size, message_length, diffusion
        side = math.isqrt(DIFFUSION_LENGTH if diffusion else message_length)
        if side * side != (DIFFUSION_LENGTH if diffusion else message_length):
            raise ValueError(f"message_length {message_length} is not a square; use diffusion=True for other lengths")
        if size % side or (size // side) & (size // side - 1):
            raise ValueError(f"image size {size} must be the message map's side {side} times a power of two")
        self.side = side
        expansions = int(math.log2(size // side))
        self.diffuse = nn.Linear(message_length, DIFFUSION_LENGTH) if diffusion else None
        self.image_pre = ConvBNReLU(3, channels)
        self.image_blocks, _ = _blocks(channels, channels, blocks, se_blocks)
        expand = [ConvBNReLU(1, channels)]
        for _ in range(expansions):
            expand += [nn.ConvTranspose2d(channels, channels, 3, 2, 1, output_padding=1), nn.BatchNorm2d(channels),
                       nn.ReLU(inplace=True)]
        self.message_pre = nn.Sequential(*expand)
        self.message_blocks, _ = _blocks(channels, channels, blocks, se_blocks)
        self.fuse = ConvBNReLU(2 * channels, channels)
        self.final = nn.Conv2d(channels + 3, 3, 1)
        with torch.no_grad():  # start as the identity on the cover plus a small residual
            self.final.weight[:, :channels].mul_(0.1)
            self.final.weight[:, channels:] = torch.eye(3)[:, :, None, None]
            self.final.bias.zero_()

    def forward(self, cover: torch.Tensor, message: torch.Tensor) -> torch.Tensor:
        if cover.shape[-2:] != (self.size, self.size):
            raise ValueError(f"the encoder takes {self.size} x {self.size} images, got {tuple(cover.shape[-2:])}")
        if message.shape[-1] != self.message_length:
            raise ValueError(f"the encoder takes {self.message_length}-bit messages, got {message.shape[-1]}")
        image = self.image_blocks(self.image_pre(cover))
        spread = self.diffuse(message) if self.diffuse is not None else message
        grid = spread.view(-1, 1, self.side, self.side)
        fused = self.fuse(torch.cat([image, self.message_blocks(self.message_pre(grid))], 1))
        return self.final(torch.cat([fused, cover], 1))


class Decoder(nn.Module):
    def __init__(self, size: int, message_length: int, channels: int = 64, blocks: int = 4, diffusion: bool = False,
                 se_blocks: bool = True):
        super().__init__()
        side = math.isqrt(DIFFUSION_LENGTH if diffusion else message_length)
        strides = int(math.log2(size // side))
        down, grown = _blocks(channels, channels, strides + 1, se_blocks, stride_after_first=2, grow=2)
        self.down = nn.Sequential(ConvBNReLU(3, channels), *down)
        self.squeeze = ConvBNReLU(grown, channels)
        self.keep, _ = _blocks(channels, channels, max(blocks - strides, 1), se_blocks)
        self.read = nn.Conv2d(channels, 1, 1)
        self.undiffuse = nn.Linear(DIFFUSION_LENGTH, message_length) if diffusion else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grid = self.read(self.keep(self.squeeze(self.down(images))))
        values = grid.flatten(1)
        return self.undiffuse(values) if self.undiffuse is not None else values


class Discriminator(nn.Module):
    def __init__(self, channels: int = 64, blocks: int = 2):
        super().__init__()
        layers, width = [], 3
        for _ in range(blocks):
            layers.append(ConvBNReLU(width, channels, stride=2))
            width = channels
        self.layers = nn.Sequential(*layers)
        self.logit = nn.Linear(channels, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logit(self.layers(images).mean((2, 3)))[:, 0]


class MBRS(nn.Module):
    """Encoder + decoder (+ discriminator for training) for ``size`` x ``size`` images and
    ``message_length``-bit messages."""

    def __init__(self, size: int = 128, message_length: int = 64, channels: int = 64, blocks: int = 4,
                 diffusion: bool = False, se_blocks: bool = True, discriminator_blocks: int = 2):
        super().__init__()
        self.size, self.message_length = size, message_length
        self.config = {"size": size, "message_length": message_length, "channels": channels, "blocks": blocks,
                       "diffusion": diffusion, "se_blocks": se_blocks, "discriminator_blocks": discriminator_blocks}
        """The constructor's arguments: what a checkpoint needs to rebuild the model."""
        self.encoder = Encoder(size, message_length, channels, blocks, diffusion, se_blocks)
        self.decoder = Decoder(size, message_length, channels, blocks, diffusion, se_blocks)
        self.discriminator = Discriminator(channels, discriminator_blocks)

    def embed(self, cover: torch.Tensor, bits: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """[0, 1] cover images and {0, 1} bits -> watermarked images in [0, 1]."""
        encoded = self.encoder(cover, bits_to_message(bits))
        return (cover + strength * (encoded - cover)).clamp(0, 1)

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> {0, 1} bits."""
        return (self.decoder(images) > 0).to(torch.int64)


def bits_to_message(bits: torch.Tensor) -> torch.Tensor:
    return bits.float() * 2.0 - 1.0


@dataclass
class Losses:
    total: torch.Tensor
    image_mse: float
    message_mse: float
    adversarial: float


def mbrs_losses(model: MBRS, cover: torch.Tensor, bits: torch.Tensor, noise: nn.Module, image_weight: float = 1.0,
                message_weight: float = 10.0, adversarial_weight: float = 1e-4) -> tuple[Losses, torch.Tensor, torch.Tensor]:
    """The encoder-decoder's loss on one batch: (losses, encoded images, decoded values)."""
    message = bits_to_message(bits)
    encoded = model.encoder(cover, message)
    decoded = model.decoder(noise(encoded, cover))
    image_mse = F.mse_loss(encoded, cover)
    message_mse = F.mse_loss(decoded, message)
    fooled = F.binary_cross_entropy_with_logits(model.discriminator(encoded), torch.ones(len(cover), device=cover.device))
    total = image_weight * image_mse + message_weight * message_mse + adversarial_weight * fooled
    return Losses(total, float(image_mse.detach()), float(message_mse.detach()), float(fooled.detach())), encoded, decoded


def discriminator_loss(model: MBRS, cover: torch.Tensor, encoded: torch.Tensor) -> torch.Tensor:
    """Cover images are real (1), encoded ones fake (0)."""
    real = model.discriminator(cover)
    fake = model.discriminator(encoded.detach())
    return (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
            + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))


def bit_error_rate(decoded: torch.Tensor, bits: torch.Tensor) -> float:
    """Share of wrong bits; ``decoded`` are real values (sign) or {0, 1} bits."""
    predicted = (decoded > 0).to(torch.int64) if decoded.is_floating_point() else decoded
    return float((predicted != bits).float().mean())


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of [0, 1] images."""
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(1.0 / mse)


def mbrs_128_64(**kwargs) -> MBRS:
    return MBRS(128, 64, **kwargs)


def mbrs_128_30_diffusion(**kwargs) -> MBRS:
    return MBRS(128, 30, diffusion=True, **kwargs)


def mbrs_256_256(**kwargs) -> MBRS:
    return MBRS(256, 256, **kwargs)


def mbrs_tiny(**kwargs) -> MBRS:
    return MBRS(32, 16, **{"channels": 16, "blocks": 2, **kwargs})


def mbrs_tiny_diffusion(**kwargs) -> MBRS:
    """The diffusion variant at the tiny size: 16 bits spread over a 16 x 16 map of a 32 x 32 image."""
    return MBRS(32, 16, **{"channels": 16, "blocks": 2, "diffusion": True, **kwargs})


def hidden_tiny(**kwargs) -> MBRS:
    """The HiDDeN-style baseline at the tiny size: no SE blocks."""
    return MBRS(32, 16, **{"channels": 16, "blocks": 2, "se_blocks": False, **kwargs})
