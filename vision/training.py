"""The pieces of a supervised vision training recipe (DeiT/CSWin style), in plain PyTorch.

AdamW without weight decay on biases and normalisation weights, a learning rate that warms
up linearly and then follows a cosine to ``min_lr`` (per step), label-smoothed soft-target
cross-entropy (which also takes mixup/cutmix targets), and an exponential moving average of
the weights.
"""

from __future__ import annotations

import copy
import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weights, and without decay biases, 1-D parameters (norms) and
    the names a sub-module lists in ``NO_WEIGHT_DECAY`` (a ViT's position embedding, class
    and mask tokens)."""
    skip = {f"{prefix}.{name}" if prefix else name
            for prefix, module in model.named_modules() for name in getattr(module, "NO_WEIGHT_DECAY", ())}
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (no_decay if parameter.ndim <= 1 or name.endswith(".bias") or name in skip else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def learning_rate(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float) -> float:
    """Linear warm-up from 0 over ``warmup_steps``, then a cosine from ``base_lr`` to ``min_lr``."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def soft_targets(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """One-hot targets with ``smoothing`` spread uniformly over all classes."""
    targets = torch.full((labels.shape[0], num_classes), smoothing / num_classes, device=labels.device)
    return targets.scatter_(1, labels[:, None], 1.0 - smoothing + smoothing / num_classes)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum_c targets_c log softmax(logits)_c``."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


class ModelEMA:
    """``ema = decay * ema + (1 - decay) * weights`` after every optimizer step; buffers copied."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        averaged = list(self.module.parameters())
        torch._foreach_lerp_(averaged, [p.detach() for p in model.parameters()], 1.0 - self.decay)
        for mine, theirs in zip(self.module.buffers(), model.buffers()):
            mine.copy_(theirs)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)


@torch.no_grad()
def count_correct(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[int, int, float]:
    """(correct, seen, summed cross-entropy) of ``model`` in eval mode over ``batches``."""
    was_training = model.training
    model.eval()
    correct = seen = 0
    loss = 0.0
    for images, labels in batches:
        logits = model(images)
        correct += int((logits.argmax(-1) == labels).sum())
        seen += int(labels.shape[0])
        loss += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
    model.train(was_training)
    return correct, seen, loss
