"""Face-forgery detectors and their pieces, in plain PyTorch (no Ray).

- :mod:`vision.forensics.phase`: SPSL's phase-only image.
- :mod:`vision.forensics.xception`: Xception, the baseline, and SPSL's shallow 4-channel variant.
- :mod:`vision.forensics.efficientnet`: EfficientNet-B0..B4 (MAT's backbone) and a tiny one.
- :mod:`vision.forensics.mat`: the multi-attentional detector and its regional independence loss.
- :mod:`vision.forensics.metrics`: frame/video AUC, EER, AP, accuracy.
- :mod:`vision.forensics.synthetic`: forgery datasets made from images that PyPI packages ship.
"""

from __future__ import annotations


from typing import Callable

from torch import nn


def _factories() -> dict[str, Callable[..., nn.Module]]:
    from vision.forensics.mat import mat_efficientnet_b4, mat_tiny
    from vision.forensics.xception import spsl_tiny, spsl_xception, xception, xception_tiny

    return {"xception": xception, "xception_tiny": xception_tiny, "spsl_xception": spsl_xception, "spsl_tiny": spsl_tiny,
            "mat_efficientnet_b4": mat_efficientnet_b4, "mat_tiny": mat_tiny}


DETECTORS = ("xception", "xception_tiny", "spsl_xception", "spsl_tiny", "mat_efficientnet_b4", "mat_tiny")
"""Detector factories by name: the papers' networks and their 2-core variants."""


def build_detector(name: str, num_classes: int = 2, **kwargs) -> nn.Module:
    """A detector by name (:data:`DETECTORS`); it takes RGB pixels in [0, 1] and returns logits."""
    factories = _factories()
    if name not in factories:
        raise ValueError(f"unknown detector '{name}'; available: {', '.join(DETECTORS)}")
    return factories[name](num_classes=num_classes, **kwargs)
