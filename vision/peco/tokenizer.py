"""PeCo's tokenizer: a VQGAN-style VQ-VAE trained with pixel, perceptual and adversarial losses.

- :class:`VQTokenizer`: convolutional encoder (residual blocks with GroupNorm and SiLU, a
  strided convolution per down-sampling level) to ``embed_dim`` channels, a codebook of
  ``vocab_size`` entries (:class:`VectorQuantizer`), and a mirrored decoder (nearest
  up-sampling). One token per ``2 ** (len(channel_mult) - 1)`` pixels a side: PeCo's 16 (a 14 x 14
  grid for 224 px, one token per ViT-B/16 patch), 4 in the 32-px tiny presets.
- :class:`VectorQuantizer`: nearest-code assignment, the straight-through estimator, the
  commitment loss ``beta * ||z - sg(e)||^2``; either a learned codebook (loss
  ``||sg(z) - e||^2``) or an exponential-moving-average one (van den Oord et al., 2017,
  appendix), with dead codes (average use below ``dead_threshold`` assignments per step)
  restarted at random encoder outputs. Across Ray Train ranks the EMA statistics are
  all-reduced and rank 0's restarts broadcast, so every rank keeps the same codebook.
- :class:`PerceptualLoss`: the distance between the multi-scale features of a frozen
  self-supervised ViT (PeCo: MoCo v3) on the input and on the reconstruction: per chosen
  block, every token's feature vector is normalised to unit length, and the squared
  difference is summed over channels and averaged over tokens; the layers' terms are
  averaged. Zero for identical images, growing with distortion.
- :class:`PatchDiscriminator` (PatchGAN) with hinge losses and VQGAN's adaptive weight
  ``||grad_L(rec)|| / (||grad_L(gan)|| + 1e-4)`` at the decoder's last layer ``L``.

Total generator loss: ``|x - x'|_1 + perceptual_weight * perceptual + codebook loss +
adaptive_weight * disc_weight * gan`` (the GAN terms from ``disc_start`` steps on);
``perceptual_weight=0`` is the plain pixel-loss codebook (BEiT's stand-in).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.body = nn.Sequential(_norm(in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1),
                                  _norm(out_channels), nn.SiLU(), nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


class Encoder(nn.Module):
    def __init__(self, channels: int, channel_mult: Sequence[int], res_blocks: int, embed_dim: int, in_chans: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_chans, channels, 3, padding=1)]
        width = channels
        for level, mult in enumerate(channel_mult):
            for _ in range(res_blocks):
                layers.append(ResBlock(width, channels * mult))
                width = channels * mult
            if level < len(channel_mult) - 1:
                layers.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
        layers += [ResBlock(width, width), _norm(width), nn.SiLU(), nn.Conv2d(width, embed_dim, 1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Decoder(nn.Module):
    def __init__(self, channels: int, channel_mult: Sequence[int], res_blocks: int, embed_dim: int, out_chans: int = 3):
        super().__init__()
        width = channels * channel_mult[-1]
        layers: list[nn.Module] = [nn.Conv2d(embed_dim, width, 3, padding=1), ResBlock(width, width)]
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(res_blocks):
                layers.append(ResBlock(width, channels * mult))
                width = channels * mult
            if level > 0:
                layers += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(width, width, 3, padding=1)]
        layers += [_norm(width), nn.SiLU()]
        self.layers = nn.Sequential(*layers)
        self.conv_out = nn.Conv2d(width, out_chans, 3, padding=1)
        """The last layer: VQGAN's adaptive GAN weight compares gradients here."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.layers(z))


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class VectorQuantizer(nn.Module):
    def __init__(self, vocab_size: int, embed_dim: int, beta: float = 0.25, ema: bool = True, decay: float = 0.99,
                 dead_threshold: float = 0.03, epsilon: float = 1e-5):
        super().__init__()
        self.vocab_size, self.embed_dim, self.beta = vocab_size, embed_dim, beta
        self.ema, self.decay, self.dead_threshold, self.epsilon = ema, decay, dead_threshold, epsilon
        codebook = torch.empty(vocab_size, embed_dim).uniform_(-1.0 / vocab_size, 1.0 / vocab_size)
        if ema:
            self.register_buffer("codebook", codebook)
            self.register_buffer("ema_sum", codebook.clone())
        else:
            self.codebook = nn.Parameter(codebook)
        self.register_buffer("ema_count", torch.ones(vocab_size))
        """Exponential moving average of every code's assignments per step (all ranks' sum)."""

    def assign(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each row of ``flat`` ``[M, D]``."""
        codebook = self.codebook.detach()
        distances = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(1)[None]
        return distances.argmin(1)

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, ids: torch.Tensor) -> None:
        world = _world()
        onehot = F.one_hot(ids, self.vocab_size).type(flat.dtype)
        counts, sums = onehot.sum(0), onehot.t() @ flat
        if world > 1:
            dist.all_reduce(counts)
            if self.ema:
                dist.all_reduce(sums)
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        if self.ema:
            self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            total = self.ema_count.sum()
            smoothed = (self.ema_count + self.epsilon) / (total + self.vocab_size * self.epsilon) * total
            self.codebook.copy_(self.ema_sum / smoothed[:, None])
        dead = self.ema_count < self.dead_threshold
        if bool(dead.any()):  # restart dead codes at random encoder outputs (rank 0's, broadcast)
            picks = flat[torch.randint(0, flat.shape[0], (int(dead.sum()),), device=flat.device)]
            codebook = self.codebook.data
            codebook[dead] = picks.to(codebook.dtype)
            if world > 1:
                dist.broadcast(codebook, src=0)
            self.ema_count[dead] = 1.0
            if self.ema:
                self.ema_sum[dead] = codebook[dead]

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
        """``z`` ``[B, D, H, W]`` -> (quantised ``z`` with straight-through gradient, ids
        ``[B, H, W]``, codebook loss, usage statistics of this batch)."""
        batch, channels, height, width = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, channels)
        ids = self.assign(flat.detach())
        chosen = self.codebook[ids]
        if self.ema:
            loss = self.beta * F.mse_loss(flat, chosen.detach())
        else:
            loss = F.mse_loss(chosen, flat.detach()) + self.beta * F.mse_loss(flat, chosen.detach())
        if self.training:
            self._update(flat.detach().float(), ids)
        quantised = flat + (chosen - flat).detach()
        usage = torch.bincount(ids, minlength=self.vocab_size).float() / ids.numel()
        entropy = -(usage[usage > 0] * usage[usage > 0].log()).sum()
        stats = {"perplexity": float(entropy.exp()), "used_codes": int((usage > 0).sum()),
                 "dead_codes": int((self.ema_count < self.dead_threshold).sum())}
        return (quantised.view(batch, height, width, channels).permute(0, 3, 1, 2), ids.view(batch, height, width),
                loss, stats)


@dataclass(frozen=True)
class TokenizerConfig:
    image_size: int = 224
    vocab_size: int = 8192
    embed_dim: int = 256
    channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    res_blocks: int = 2
    ema: bool = True
    beta: float = 0.25

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def grid(self) -> int:
        return self.image_size // self.downsample


PRESETS = {
    "peco_vqgan_224": TokenizerConfig(),
    "peco_tiny_32": TokenizerConfig(image_size=32, vocab_size=256, embed_dim=32, channels=32, channel_mult=(1, 2, 2),
                                    res_blocks=1),
}


class VQTokenizer(nn.Module):
    def __init__(self, config: TokenizerConfig):
        super().__init__()
        if config.image_size % config.downsample:
            raise ValueError(f"image_size {config.image_size} is not a multiple of the down-sampling {config.downsample}")
        self.config = config
        self.encoder = Encoder(config.channels, config.channel_mult, config.res_blocks, config.embed_dim)
        self.quantizer = VectorQuantizer(config.vocab_size, config.embed_dim, config.beta, config.ema)
        self.decoder = Decoder(config.channels, config.channel_mult, config.res_blocks, config.embed_dim)

    @staticmethod
    def _scale(images: torch.Tensor) -> torch.Tensor:
        return images * 2.0 - 1.0  # [0, 1] -> [-1, 1]

    def forward(self, images: torch.Tensor):
        """``images`` in [0, 1] -> (reconstruction in [0, 1] scale, ids, codebook loss, stats)."""
        quantised, ids, loss, stats = self.quantizer(self.encoder(self._scale(images)))
        return (self.decoder(quantised) + 1.0) / 2.0, ids, loss, stats

    @torch.no_grad()
    def tokenize(self, images: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, grid * grid]`` of images in [0, 1] (no codebook update)."""
        z = self.encoder(self._scale(images))
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        return self.quantizer.assign(flat).view(images.shape[0], -1)


class PerceptualLoss(nn.Module):
    """Feature distance under a frozen ViT (see the module docstring)."""

    def __init__(self, model: nn.Module, layers: Sequence[int], mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.model = model.eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.layers = list(layers)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def train(self, mode: bool = True) -> "PerceptualLoss":
        super().train(mode)
        self.model.eval()  # always frozen: no dropout, no drop-path
        return self

    def forward(self, images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        """Per-image distance ``[B]``; images in [0, 1]."""
        both = torch.cat([images, reconstructions]).sub(self.mean).div(self.std)
        size = self.model.img_size
        if both.shape[-1] != size:
            both = F.interpolate(both, size=(size, size), mode="bilinear", align_corners=False)
        total = 0.0
        for features in self.model.intermediate(both, self.layers):
            features = F.normalize(features, dim=-1, eps=1e-10)
            first, second = features.chunk(2)
            total = total + (first - second).pow(2).sum(-1).mean(-1)
        return total / len(self.layers)


def default_layers(depth: int) -> list[int]:
    """The last block of each quarter of the network: 3, 6, 9, 12 for ViT-B."""
    return sorted({max(1, round(depth * quarter / 4)) for quarter in (1, 2, 3, 4)})


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al.): 4 x 4 convolutions, ``layers`` of them with stride 2."""

    def __init__(self, channels: int = 64, layers: int = 3, in_chans: int = 3):
        super().__init__()
        modules: list[nn.Module] = [nn.Conv2d(in_chans, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for index in range(1, layers + 1):
            out = channels * min(2 ** index, 8)
            stride = 2 if index < layers else 1
            modules += [nn.Conv2d(width, out, 4, stride, 1, bias=False), nn.BatchNorm2d(out), nn.LeakyReLU(0.2)]
            width = out
        modules.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.layers = nn.Sequential(*modules)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images * 2.0 - 1.0)


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def adaptive_weight(reconstruction_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor,
                    disc_weight: float) -> torch.Tensor:
    """VQGAN's balance of the GAN term against the reconstruction terms at ``last_layer``."""
    rec_grad = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (gan_grad.norm() + 1e-4)
    return weight.clamp(0.0, 1e4).detach() * disc_weight


@dataclass
class TokenizerLosses:
    total: torch.Tensor
    l1: float
    perceptual: float
    codebook: float
    gan: float
    gan_weight: float
    stats: dict


def tokenizer_losses(tokenizer: VQTokenizer, images: torch.Tensor, perceptual: PerceptualLoss | None,
                     perceptual_weight: float, discriminator: PatchDiscriminator | None, disc_weight: float,
                     use_gan: bool) -> tuple[TokenizerLosses, torch.Tensor]:
    """The generator's losses on ``images`` (and the reconstruction, for the discriminator)."""
    reconstruction, _, codebook_loss, stats = tokenizer(images)
    l1 = (images - reconstruction).abs().mean()
    rec = l1
    perceptual_value = torch.zeros((), device=images.device)
    if perceptual is not None and perceptual_weight > 0:
        perceptual_value = perceptual(images, reconstruction).mean()
        rec = rec + perceptual_weight * perceptual_value
    total = rec + codebook_loss
    gan_value, weight = torch.zeros((), device=images.device), torch.zeros((), device=images.device)
    if use_gan and discriminator is not None and disc_weight > 0:
        gan_value = -discriminator(reconstruction).mean()
        weight = adaptive_weight(rec, gan_value, tokenizer.decoder.conv_out.weight, disc_weight)
        total = total + weight * gan_value
    losses = TokenizerLosses(total, float(l1.detach()), float(perceptual_value.detach()), float(codebook_loss.detach()),
                             float(gan_value.detach()), float(weight), stats)
    return losses, reconstruction


def reconstruction_grid(images: torch.Tensor, reconstructions: torch.Tensor, path, columns: int = 8) -> None:
    """A PNG of originals (odd rows) over their reconstructions (even rows)."""
    import numpy as np
    from PIL import Image

    count = min(columns * 4, images.shape[0])
    rows = math.ceil(count / columns)
    size = images.shape[-1]
    canvas = np.zeros((rows * 2 * size, columns * size, 3), np.uint8)
    for index in range(count):
        row, column = divmod(index, columns)
        for offset, source in enumerate((images, reconstructions)):
            tile = source[index].detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
            top = (row * 2 + offset) * size
            canvas[top: top + size, column * size: (column + 1) * size] = (tile * 255).round().astype(np.uint8)
    Image.fromarray(canvas).save(path)
