"""BEiT's masked image modelling: predict the tokenizer's ids of the masked patches.

The ViT sees the image with the masked patches replaced by its mask token
(:meth:`vision.backbones.vit.VisionTransformer.forward_tokens`); a linear head over the
vocabulary reads the output tokens of the masked positions only, and the loss is the
cross-entropy against the tokenizer's ids there: visible patches cost nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vision.backbones.vit import VisionTransformer


class MaskedImageModel(nn.Module):
    def __init__(self, backbone: VisionTransformer, vocab_size: int):
        super().__init__()
        self.backbone = backbone
        self.lm_head = nn.Linear(backbone.embed_dim, vocab_size)
        nn.init.trunc_normal_(self.lm_head.weight, std=0.02)
        nn.init.zeros_(self.lm_head.bias)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits ``[number of masked patches, vocab]``, in ``mask``'s row-major order."""
        tokens = self.backbone.forward_tokens(images, mask)[:, 1:]
        return self.lm_head(tokens[mask])


def mim_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy, number of correct predictions) over the masked positions:
    ``logits`` from :class:`MaskedImageModel` (masked positions only), ``ids`` and ``mask``
    ``[B, N]``."""
    targets = ids[mask]
    if targets.numel() != logits.shape[0]:
        raise ValueError(f"{logits.shape[0]} logits for {targets.numel()} masked positions")
    return F.cross_entropy(logits.float(), targets), (logits.argmax(-1) == targets).sum()
