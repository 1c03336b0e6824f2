"""MoCo v3 (Chen, Xie, He, 2021) for ViTs: PeCo's perceptual model.

A base encoder (ViT, class-token features) with a 3-layer projection MLP, a 2-layer
prediction MLP on top of it, and a momentum encoder (ViT + projection MLP, no predictor)
that follows the base by ``m`` (0.99 rising to 1 on a cosine). Two augmented views of each
image; the loss is symmetric InfoNCE, ``ctr(q1, k2) + ctr(q2, k1)`` with ``ctr(q, k) =
2 tau * CE(q k^T / tau, positives on the diagonal)`` over L2-normalised vectors, the keys
gathered from every rank (tau 0.2 for ViTs). BatchNorm in the MLPs (the last without affine
parameters) over the global batch (:class:`CrossRankBatchNorm1d`), as the paper. Augmentations: BYOL's, in torch (:func:`two_views`).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vision.augment import random_resized_crop


class _SumAcrossRanks(torch.autograd.Function):
    """All-reduce (sum) whose gradient is the all-reduced gradient: every rank's output
    depends on every rank's input."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


class CrossRankBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm over the whole global batch: in training, with several ranks, the batch
    statistics are all-reduced (differentiably), as MoCo v3's SyncBatchNorm, so no rank's keys
    are normalised by its own batch alone; on CPU too, where ``nn.SyncBatchNorm`` is refused.
    One process, or evaluation: plain BatchNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return super().forward(x)
        channels = x.shape[1]
        local = torch.cat([x.sum(0), (x * x).sum(0), x.new_tensor([float(x.shape[0])])])
        total = _SumAcrossRanks.apply(local)
        count = total[-1]
        mean = total[:channels] / count
        var = (total[channels: 2 * channels] / count - mean * mean).clamp_min(0.0)
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.mul_(1 - self.momentum).add_(mean.detach(), alpha=self.momentum)
            unbiased = var.detach() * count / (count - 1).clamp_min(1.0)
            self.running_var.mul_(1 - self.momentum).add_(unbiased, alpha=self.momentum)
        out = (x - mean) / torch.sqrt(var + self.eps)
        return out * self.weight + self.bias if self.affine else out


def mlp(in_dim: int, hidden: int, out_dim: int, layers: int, last_bn: bool = True) -> nn.Sequential:
    """MoCo v3's MLP: linear layers without bias, BatchNorm + ReLU between them, and a last
    BatchNorm without affine parameters."""
    modules: list[nn.Module] = []
    width = in_dim
    for index in range(layers):
        last = index == layers - 1
        out = out_dim if last else hidden
        modules.append(nn.Linear(width, out, bias=False))
        if not last:
            modules += [CrossRankBatchNorm1d(out), nn.ReLU(inplace=True)]
        elif last_bn:
            modules.append(CrossRankBatchNorm1d(out, affine=False))
        width = out
    return nn.Sequential(*modules)


class MoCoV3(nn.Module):
    def __init__(self, backbone: nn.Module, dim: int = 256, mlp_dim: int = 4096, temperature: float = 0.2):
        super().__init__()
        self.temperature = temperature
        self.base = backbone
        self.base.head = mlp(backbone.embed_dim, mlp_dim, dim, 3)
        self.predictor = mlp(dim, mlp_dim, dim, 2)  # ViTs keep the last BatchNorm (ResNets drop it)
        self.momentum = copy.deepcopy(self.base)
        for parameter in self.momentum.parameters():
            parameter.requires_grad_(False)

    @torch.no_grad()
    def update_momentum(self, m: float) -> None:
        for online, target in zip(self.base.parameters(), self.momentum.parameters()):
            target.mul_(m).add_(online.detach(), alpha=1 - m)

    def contrastive(self, q: torch.Tensor, k: torch.Tensor, gather: bool = True) -> torch.Tensor:
        """``2 tau * CE(q k^T / tau)`` with the positives on the diagonal; with ``gather`` the
        keys of every rank are the negatives (each rank's queries against all keys)."""
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        rank, world = 0, 1
        if gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            rank, world = dist.get_rank(), dist.get_world_size()
            gathered = [torch.empty_like(k) for _ in range(world)]
            dist.all_gather(gathered, k.contiguous())
            k = torch.cat(gathered)
        logits = q @ k.t() / self.temperature
        labels = torch.arange(q.shape[0], device=q.device) + rank * q.shape[0]
        return F.cross_entropy(logits, labels) * 2 * self.temperature

    def forward(self, first: torch.Tensor, second: torch.Tensor, m: float) -> torch.Tensor:
        q1, q2 = self.predictor(self.base(first)), self.predictor(self.base(second))
        with torch.no_grad():
            self.update_momentum(m)
            k1, k2 = self.momentum(first), self.momentum(second)
        return self.contrastive(q1, k2) + self.contrastive(q2, k1)

    def backbone_state(self) -> dict[str, torch.Tensor]:
        """The base encoder's backbone, without the projector: what MoCo v3 hands to linear
        probing and fine-tuning."""
        return {name: value for name, value in self.base.state_dict().items() if not name.startswith("head.")}


def momentum_at(step: int, total: int, base: float = 0.99) -> float:
    """MoCo v3's schedule: ``1 - (1 - base) * (cos(pi t / T) + 1) / 2``."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * step / max(1, total)) + 1) / 2


def _jitter(images: torch.Tensor, generator: torch.Generator, strength=(0.4, 0.4, 0.2, 0.1)) -> torch.Tensor:
    """Colour jitter in random order per batch: brightness, contrast, saturation, hue."""
    brightness, contrast, saturation, hue = strength
    count = images.shape[0]

    def factor(spread: float) -> torch.Tensor:
        return (1 + (torch.rand(count, 1, 1, 1, generator=generator) * 2 - 1) * spread).to(images)

    grey = lambda x: (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])  # noqa: E731
    steps = torch.randperm(4, generator=generator).tolist()
    for step in steps:
        if step == 0:
            images = images * factor(brightness)
        elif step == 1:
            images = (images - grey(images).mean((1, 2, 3), keepdim=True)) * factor(contrast) + grey(images).mean((1, 2, 3), keepdim=True)
        elif step == 2:
            images = (images - grey(images)) * factor(saturation) + grey(images)
        else:  # rotate the chroma plane of YIQ by up to hue * 2 pi
            angle = ((torch.rand(count, generator=generator) * 2 - 1) * hue * 2 * math.pi).to(images)
            to_yiq = images.new_tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
            yiq = torch.einsum("ij,bjhw->bihw", to_yiq, images)
            cos, sin = angle.cos().view(-1, 1, 1), angle.sin().view(-1, 1, 1)
            i, q = yiq[:, 1], yiq[:, 2]
            yiq = torch.stack([yiq[:, 0], cos * i - sin * q, sin * i + cos * q], 1)
            images = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(to_yiq), yiq)
        images = images.clamp(0, 1)
    return images


def _blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    size = max(3, int(images.shape[-1] * 0.1) | 1)
    offsets = torch.arange(size, dtype=images.dtype) - size // 2
    kernels = torch.exp(-offsets[None] ** 2 / (2 * sigma[:, None].to(images.dtype) ** 2))
    kernels = kernels / kernels.sum(1, keepdim=True)
    count, channels = images.shape[:2]
    flat = images.reshape(1, count * channels, *images.shape[-2:])
    weights = kernels.repeat_interleave(channels, 0)
    flat = F.conv2d(F.pad(flat, (size // 2, size // 2, 0, 0), mode="reflect"), weights.view(-1, 1, 1, size),
                    groups=count * channels)
    flat = F.conv2d(F.pad(flat, (0, 0, size // 2, size // 2), mode="reflect"), weights.view(-1, 1, size, 1),
                    groups=count * channels)
    return flat.view_as(images)


def augment_view(images: torch.Tensor, size: int, generator: torch.Generator, blur_p: float,
                 solarize_p: float, crop_scale=(0.08, 1.0)) -> torch.Tensor:
    """One BYOL view of ``images`` in [0, 1]: random-resized crop, flip, colour jitter (p 0.8),
    greyscale (p 0.2), Gaussian blur (sigma 0.1-2.0, p ``blur_p``), solarisation (p ``solarize_p``)."""
    views = random_resized_crop(images, size, crop_scale, generator=generator)
    count = views.shape[0]
    flip = torch.rand(count, generator=generator) < 0.5
    views = torch.where(flip.view(-1, 1, 1, 1), views.flip(-1), views)
    jitter = torch.rand(count, generator=generator) < 0.8
    views = torch.where(jitter.view(-1, 1, 1, 1), _jitter(views, generator), views)
    grey = torch.rand(count, generator=generator) < 0.2
    luminance = (0.299 * views[:, :1] + 0.587 * views[:, 1:2] + 0.114 * views[:, 2:3]).expand_as(views)
    views = torch.where(grey.view(-1, 1, 1, 1), luminance, views)
    blur = torch.rand(count, generator=generator) < blur_p
    sigma = 0.1 + torch.rand(count, generator=generator) * 1.9
    views = torch.where(blur.view(-1, 1, 1, 1), _blur(views, sigma), views)
    solarize = torch.rand(count, generator=generator) < solarize_p
    return torch.where(solarize.view(-1, 1, 1, 1) & (views >= 0.5), 1.0 - views, views)


def two_views(images: torch.Tensor, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo v3's asymmetric pair: blur always / solarise never, then blur 0.1 / solarise 0.2."""
    return (augment_view(images, size, generator, 1.0, 0.0), augment_view(images, size, generator, 0.1, 0.2))
