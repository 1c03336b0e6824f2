"""Multi-attentional deepfake detection (MAT; Zhao et al., CVPR 2021).

The detector looks at several local regions at once instead of one global feature:

- **attention maps**: ``num_attentions`` (M, default 4) non-negative maps from a mid-level
  backbone stage (3x3 conv, BN, ReLU, 1x1 conv to M maps, BN, ELU + 1);
- **textural feature enhancement** on a shallow stage: the residual of a local average
  (features minus their average over the cells of the attention grid) keeps the high-frequency
  texture that blending and up-sampling disturb, and a densely connected convolution block
  (5x5, then three 3x3 convolutions each seeing all previous outputs, 1x1 fusion) enhances it;
- **bilinear attention pooling**: for each map, the attention-weighted average of the
  textural features, L2-normalised (an M x C matrix), beside the final semantic features
  averaged under the sum of the maps; a two-layer head classifies their concatenation;
- **regional independence loss** (:class:`RegionalIndependenceLoss`): keeps each map's
  textural feature near a per-map centre for real faces and far from it for fakes, and the
  centres apart from each other, so that the maps attend to different regions;
- **attention-guided data augmentation** (:func:`attention_guided_augmentation`): degrades the
  region under one sampled attention map, so the other maps have to find evidence too.

The backbone is EfficientNet (:mod:`vision.forensics.efficientnet`): B4 with texture from
stage ``b2`` and attention from ``b5`` in the paper preset, as in the authors' example run.
Settings not fixed by the paper follow the authors' released configuration (M 4, head width
256, dropout 0.25, margins, momentum 0.05).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vision.forensics.efficientnet import efficientnet


class AttentionMaps(nn.Module):
    def __init__(self, in_channels: int, num_attentions: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, padding=1, bias=False), nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, num_attentions, 1, bias=False), nn.BatchNorm2d(num_attentions))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(self.layers(x)) + 1.0


class TextureEnhancement(nn.Module):
    """Residual of the local average, then a densely connected block (DenseNet-style)."""

    def __init__(self, channels: int, grid: int):
        super().__init__()
        self.grid = grid
        self.extract = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv0 = nn.Conv2d(channels, channels, 5, padding=2)
        self.dense = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(channels * k), nn.ReLU(inplace=True), nn.Conv2d(channels * k, channels, 3, padding=1))
            for k in (1, 2, 3))
        self.fuse = nn.Sequential(nn.BatchNorm2d(channels * 4), nn.ReLU(inplace=True), nn.Conv2d(channels * 4, channels, 1),
                                  nn.BatchNorm2d(channels), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = self.extract(x)
        if tuple(grid) != tuple(x.shape[-2:]):  # at equal resolution the residual would be zero: skipped
            x = x - F.interpolate(F.adaptive_avg_pool2d(x, grid), size=x.shape[-2:], mode="nearest")
        features = [self.conv0(x)]
        for layer in self.dense:
            features.append(layer(torch.cat(features, dim=1)))
        return self.fuse(torch.cat(features, dim=1))


def attention_pooling(features: torch.Tensor, attentions: torch.Tensor, normalise: str = "l2") -> torch.Tensor:
    """Bilinear attention pooling: ``[B, C, H, W]`` features and ``[B, M, h, w]`` maps ->
    ``[B, M, C]``; each map is resized to the features. ``l2``: each map's vector is the
    weighted mean over positions, L2-normalised; ``area``: the weighted sum divided by the
    map's total weight."""
    if attentions.shape[-2:] != features.shape[-2:]:
        attentions = F.interpolate(attentions, size=features.shape[-2:], mode="bilinear", align_corners=False)
    pooled = torch.einsum("bmhw,bchw->bmc", attentions, features)
    if normalise == "l2":
        return F.normalize(pooled / (features.shape[-1] * features.shape[-2]), dim=-1)
    if normalise == "area":
        return pooled / attentions.sum((-2, -1))[..., None].clamp_min(1e-8)
    raise ValueError(f"normalise must be 'l2' or 'area', not {normalise!r}")


@dataclass
class MATOutput:
    logits: torch.Tensor
    """``[B, num_classes]``."""
    attentions: torch.Tensor
    """``[B, M, h, w]`` at the attention stage's resolution."""
    region_features: torch.Tensor
    """``[B, M, C]``: the L2-normalised textural feature of each map (what the regional
    independence loss acts on)."""


class MAT(nn.Module):
    def __init__(self, backbone: str = "efficientnet_b4", num_classes: int = 2, num_attentions: int = 4,
                 texture_layer: str = "b2", attention_layer: str = "b5", head_width: int = 256, dropout: float = 0.25,
                 drop_path_rate: float = 0.2, mean: tuple[float, ...] = (0.485, 0.456, 0.406),
                 std: tuple[float, ...] = (0.229, 0.224, 0.225)):
        super().__init__()
        self.backbone = efficientnet(backbone, num_classes=1, drop_path_rate=drop_path_rate)
        names = list(self.backbone.stage_channels)
        for field, layer in (("texture_layer", texture_layer), ("attention_layer", attention_layer)):
            if layer not in names or layer == "final":
                raise ValueError(f"{field} '{layer}' is not a backbone stage; stages: {', '.join(names[:-1])}")
        if names.index(texture_layer) > names.index(attention_layer):
            raise ValueError(f"texture_layer {texture_layer} must not come after attention_layer {attention_layer}")
        del self.backbone.classifier  # MAT has its own head
        self.texture_layer, self.attention_layer = texture_layer, attention_layer
        self.num_attentions = num_attentions
        texture_channels = self.backbone.stage_channels[texture_layer]
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.attention = AttentionMaps(self.backbone.stage_channels[attention_layer], num_attentions)
        self.texture = TextureEnhancement(texture_channels, grid=0)
        self.head = nn.Sequential(
            nn.Linear(num_attentions * texture_channels + self.backbone.num_features, head_width), nn.Hardswish(),
            nn.Dropout(dropout), nn.Linear(head_width, num_classes))

    def forward_all(self, pixels: torch.Tensor) -> MATOutput:
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"detectors take RGB pixels [B, 3, H, W] in [0, 1], got {tuple(pixels.shape)}")
        stages = self.backbone.stages((pixels - self.mean) / self.std)
        attentions = self.attention(stages[self.attention_layer])
        textures = self.texture(stages[self.texture_layer], grid=tuple(attentions.shape[-2:]))
        regions = attention_pooling(textures, attentions, "l2")
        semantic = attention_pooling(stages["final"], attentions.sum(1, keepdim=True), "area")[:, 0]
        logits = self.head(torch.cat([regions.flatten(1), semantic], dim=1))
        return MATOutput(logits, attentions, regions)

    def forward(self, pixels: torch.Tensor, return_all: bool = False):
        """Logits ``[B, num_classes]`` (class 1 = fake); with ``return_all`` the whole
        :class:`MATOutput` (how a DDP-wrapped model hands out its attention maps)."""
        output = self.forward_all(pixels)
        return output if return_all else output.logits


def mat_efficientnet_b4(num_classes: int = 2, **kwargs) -> MAT:
    """The paper preset: EfficientNet-B4, texture from b2, attention from b5, 4 maps."""
    return MAT("efficientnet_b4", num_classes=num_classes, **kwargs)


def mat_tiny(num_classes: int = 2, **kwargs) -> MAT:
    """The same detector on a tiny EfficientNet (texture b1, attention b4), for 2 CPU cores."""
    kwargs = {"texture_layer": "b1", "attention_layer": "b4", "head_width": 64, **kwargs}
    return MAT("efficientnet_tiny", num_classes=num_classes, **kwargs)


class RegionalIndependenceLoss(nn.Module):
    """``L = (1/M) [sum_m relu(s(y) (||V_m - c_m|| - m_in(y))) + sum_{j != k} relu(m_out - ||c_j - c_k||)]``.

    ``V_m`` is a sample's textural feature for map ``m`` (unit length), ``c_m`` that map's
    centre. A real face is pulled to within ``margin_real`` of each centre; a fake is pushed at
    least ``margin_fake`` away (``s(y)`` = +1 for real, -1 for fake); centres closer than
    ``margin_centres`` are pushed apart. The centres are not learnt by gradient: each step
    they move towards the batch's mean real feature, ``c <- c + beta mean(V_real - c)`` with
    ``beta = momentum``, and the inter-centre term is computed on the moved centres, as in
    the paper's equation, so its gradient reaches the real features scaled by ``beta``. (The
    authors' code also divides that term by ``beta``; with unit-length features that made it
    dominate the cross-entropy by two orders of magnitude in our tiny runs, so it is not
    done here.) :meth:`decay_momentum` lowers ``beta`` per
    epoch (the authors' 0.9). Distances are Euclidean; margins are the authors' example run's.
    """

    def __init__(self, num_attentions: int, channels: int, margin_real: float = 0.2, margin_fake: float = 0.8,
                 margin_centres: float = 0.8, momentum: float = 0.05, sum_across_ranks=None):
        super().__init__()
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        self.margin_real, self.margin_fake, self.margin_centres = margin_real, margin_fake, margin_centres
        self.momentum = momentum
        self.sum_across_ranks = sum_across_ranks
        """``torch.distributed.all_reduce`` under data parallelism: the centres then move by the
        mean real feature of the global batch, identically on every rank (called every step)."""
        self.register_buffer("centres", torch.zeros(num_attentions, channels))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``features [B, M, C]``, ``labels [B]`` (0 real, 1 fake) -> the loss; moves the
        centres when the module is in training mode."""
        if features.shape[1:] != self.centres.shape:
            raise ValueError(f"features are {tuple(features.shape)}, centres {tuple(self.centres.shape)}")
        real = (labels.to(features.device) == 0).to(features.dtype)
        real_sum, real_count = (features * real[:, None, None]).sum(0), real.sum()
        global_sum, global_count = real_sum.detach(), real_count.detach()
        if self.sum_across_ranks is not None:
            stats = torch.cat([real_sum.detach().reshape(-1), real_count.detach().reshape(1)])
            self.sum_across_ranks(stats)
            global_sum, global_count = stats[:-1].view_as(real_sum), stats[-1]
        has_real = bool(global_count > 0)
        if not bool(self.initialised) and has_real:
            with torch.no_grad():
                self.centres.copy_(global_sum / global_count)
                self.initialised.fill_(True)
        centres = self.centres.detach()
        distance = (features - centres).norm(dim=-1)  # [B, M]
        fake = (1 - real)[:, None]
        intra = torch.relu(distance - self.margin_real) * (1 - fake) + torch.relu(self.margin_fake - distance) * fake
        loss = intra.sum(1).mean()
        if has_real:
            # the global mean's value, with the gradient of this rank's own real features
            real_mean = (real_sum + (global_sum - real_sum.detach())) / global_count
            moved = centres + self.momentum * (real_mean - centres)
            pairs = moved[:, None] - moved[None]
            off_diagonal = ~torch.eye(moved.shape[0], dtype=torch.bool, device=moved.device)
            separation = (pairs[off_diagonal].pow(2).sum(-1) + 1e-12).sqrt()
            loss = loss + torch.relu(self.margin_centres - separation).sum()
            if self.training:
                self.centres.copy_(moved.detach())
        return loss / features.shape[1]

    def decay_momentum(self, factor: float = 0.9) -> None:
        self.momentum *= factor


def gaussian_blur(images: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflected borders."""
    radius = kernel_size // 2
    offsets = torch.arange(kernel_size, dtype=images.dtype, device=images.device) - radius
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    x = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, kernel_size), groups=channels)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, kernel_size, 1), groups=channels)


def attention_guided_augmentation(pixels: torch.Tensor, attentions: torch.Tensor, generator: torch.Generator | None = None,
                                  blur_kernel: int = 11, blur_sigma: float = 7.0, noise: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Degrade each image where one of its attention maps looks.

    Per image one map is drawn with probability proportional to ``sqrt(sum(map) + 1)``,
    resized to the image, divided by its maximum and passed through a soft threshold
    ``(sigmoid(z (a - t)) - sigmoid(-z t)) / (1 - sigmoid(-z t))`` with ``t ~ U(0.4, 0.6)``
    and ``z ~ U(3, 5)``. The degraded image is the picture at half resolution, blurred and
    with Gaussian noise, brought back to full size; the output is
    ``x (1 - A) + degraded A``, clipped to [0, 1]. Returns (augmented pixels, chosen map index).
    """
    batch, maps = attentions.shape[:2]
    device = pixels.device
    weights = torch.sqrt(attentions.detach().float().sum((2, 3)) + 1.0)
    chosen = torch.multinomial(weights.cpu(), 1, generator=generator)[:, 0].to(device)
    attention = attentions.detach()[torch.arange(batch, device=device), chosen][:, None]
    attention = F.interpolate(attention, size=pixels.shape[-2:], mode="bilinear", align_corners=False)
    attention = attention / attention.amax((2, 3), keepdim=True).clamp_min(1e-8)
    threshold = (torch.rand(batch, 1, 1, 1, generator=generator) * 0.2 + 0.4).to(device)
    steepness = (torch.rand(batch, 1, 1, 1, generator=generator) * 2.0 + 3.0).to(device)
    floor = torch.sigmoid(-steepness * threshold)
    mask = ((torch.sigmoid(steepness * (attention - threshold)) - floor) / (1 - floor)).clamp(0.0, 1.0)
    height, width = pixels.shape[-2:]
    small = F.interpolate(pixels, scale_factor=0.5, mode="bilinear", align_corners=False)
    kernel = min(blur_kernel, 2 * (min(small.shape[-2:]) // 2) - 1)  # reflect padding needs a smaller radius
    small = gaussian_blur(small, kernel, blur_sigma) if kernel >= 3 else small
    small = small + noise * torch.randn(small.shape, generator=generator).to(device)
    degraded = F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)
    return (pixels * (1 - mask) + degraded * mask).clamp(0.0, 1.0), chosen
