"""One training step's loss for any detector of :mod:`vision.forensics`, and scoring.

Xception and SPSL minimise cross-entropy. MAT adds its regional independence loss on the
textural region features (weight ``aux_weight``, the authors' 0.5) and the cross-entropy of
a second pass over attention-guided augmented images (weight ``agda_weight``, the authors'
1.0); the augmentation uses the clean pass's attention maps (no gradient through them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vision.forensics.mat import MAT, RegionalIndependenceLoss, attention_guided_augmentation


def make_regional_loss(model: nn.Module, **kwargs) -> RegionalIndependenceLoss | None:
    """The regional independence loss sized for ``model`` (None for detectors without one)."""
    if not isinstance(model, MAT):
        return None
    channels = model.backbone.stage_channels[model.texture_layer]
    return RegionalIndependenceLoss(model.num_attentions, channels, **kwargs)


def detector_loss(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor,
                  regional: RegionalIndependenceLoss | None = None, aux_weight: float = 0.5, agda_weight: float = 1.0,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """(loss to minimise, its parts as numbers) for pixels in [0, 1] and labels 0 real / 1 fake."""
    core = getattr(model, "module", model)  # a DDP wrapper's model
    if not isinstance(core, MAT):
        loss = F.cross_entropy(model(pixels), labels)
        return loss, {"ce": float(loss.detach())}
    output = model(pixels, return_all=True)  # through a wrapper's forward, if any
    ce = F.cross_entropy(output.logits, labels)
    loss, parts = ce, {"ce": float(ce.detach())}
    if regional is not None and aux_weight > 0:
        ril = regional(output.region_features, labels)
        loss = loss + aux_weight * ril
        parts["regional"] = float(ril.detach())
    if agda_weight > 0:
        augmented, _ = attention_guided_augmentation(pixels, output.attentions, generator=generator)
        agda = F.cross_entropy(model(augmented), labels)
        loss = loss + agda_weight * agda
        parts["agda_ce"] = float(agda.detach())
    return loss, parts


@torch.no_grad()
def fake_probability(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """P(fake) per image (softmax of the 2-class logits, class 1), model in eval mode."""
    was_training = model.training
    model.eval()
    try:
        return torch.softmax(model(pixels).float(), dim=-1)[:, 1]
    finally:
        model.train(was_training)
