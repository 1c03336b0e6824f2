"""EfficientNet (Tan & Le, ICML 2019), the backbone of the multi-attentional detector (MAT).

One class over the B0 stage table, scaled by a width and a depth coefficient (B4: 1.4 and
1.8, 19.34M parameters with a 1000-class head; B0: 5.29M; both checked by tests). Blocks are
MBConv: 1x1 expansion, depthwise k x k, squeeze-and-excitation (a quarter of the block's
input channels), 1x1 projection, residual with stochastic depth when the shape is kept.

:meth:`EfficientNet.stages` returns every stage's output by name, as MAT's reference code
names them: ``b0`` is the stem, ``b1`` ... ``b7`` the seven MBConv stages, ``final`` the
1x1 head convolution's output.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# (expansion, kernel, stride, output channels, repeats) of B0's seven stages
STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
          (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
COEFFICIENTS = {  # width, depth, dropout (the paper's; resolutions 224, 240, 260, 300, 380)
    "efficientnet_b0": (1.0, 1.0, 0.2), "efficientnet_b1": (1.0, 1.1, 0.2), "efficientnet_b2": (1.1, 1.2, 0.3),
    "efficientnet_b3": (1.2, 1.4, 0.3), "efficientnet_b4": (1.4, 1.8, 0.4),
    "efficientnet_tiny": (0.25, 0.3, 0.1),
}


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """``channels * width`` to a multiple of ``divisor``, never more than 10% below it."""
    value = channels * width
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(depth * repeats))


class ConvBNAct(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1,
                 act: bool = True):
        super().__init__(nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(out_channels, eps=1e-3),
                         nn.SiLU(inplace=True) if act else nn.Identity())


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, squeezed: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.expand = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.expand(nn.functional.silu(self.reduce(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(scale)


class MBConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, expansion: int, kernel: int, stride: int,
                 drop_path: float):
        super().__init__()
        hidden = in_channels * expansion
        layers: list[nn.Module] = [ConvBNAct(in_channels, hidden, 1)] if expansion != 1 else []
        layers += [ConvBNAct(hidden, hidden, kernel, stride, groups=hidden),
                   SqueezeExcite(hidden, max(1, in_channels // 4)), ConvBNAct(hidden, out_channels, 1, act=False)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        if not self.residual:
            return out
        if self.training and self.drop_path > 0:
            keep = 1.0 - self.drop_path
            mask = x.new_empty(x.shape[0], 1, 1, 1).bernoulli_(keep) / keep
            out = out * mask
        return x + out


class EfficientNet(nn.Module):
    def __init__(self, width: float = 1.0, depth: float = 1.0, dropout: float = 0.2, num_classes: int = 1000,
                 in_chans: int = 3, drop_path_rate: float = 0.2):
        super().__init__()
        stem = round_filters(32, width)
        self.stem = ConvBNAct(in_chans, stem, 3, 2)
        total = sum(round_repeats(stage[4], depth) for stage in STAGES)
        index, channels = 0, stem
        self.blocks = nn.ModuleList()
        self.stage_channels = {"b0": stem}
        for number, (expansion, kernel, stride, out, repeats) in enumerate(STAGES, start=1):
            out = round_filters(out, width)
            stage = []
            for repeat in range(round_repeats(repeats, depth)):
                stage.append(MBConv(channels, out, expansion, kernel, stride if repeat == 0 else 1,
                                    drop_path_rate * index / total))
                channels, index = out, index + 1
            self.blocks.append(nn.Sequential(*stage))
            self.stage_channels[f"b{number}"] = out
        self.num_features = 4 * channels  # 1280 for B0, 1792 for B4
        self.head = ConvBNAct(channels, self.num_features, 1)
        self.stage_channels["final"] = self.num_features
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.num_features, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                bound = 1.0 / math.sqrt(module.out_features)
                nn.init.uniform_(module.weight, -bound, bound)
                nn.init.zeros_(module.bias)

    def stages(self, x: torch.Tensor, until: str = "final") -> dict[str, torch.Tensor]:
        """Outputs of the stem (``b0``), of each MBConv stage (``b1``-``b7``) and of the head
        convolution (``final``), computed up to and including ``until``."""
        if until not in self.stage_channels:
            raise ValueError(f"unknown stage '{until}'; stages: {', '.join(self.stage_channels)}")
        outputs = {"b0": self.stem(x)}
        x = outputs["b0"]
        for number, stage in enumerate(self.blocks, start=1):
            if until == f"b{number - 1}":
                return outputs
            x = stage(x)
            outputs[f"b{number}"] = x
        if until != "final":
            return outputs
        outputs["final"] = self.head(x)
        return outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.stages(x)["final"].mean((2, 3))
        return self.classifier(self.dropout(features))


def efficientnet(name: str, num_classes: int = 1000, **kwargs) -> EfficientNet:
    if name not in COEFFICIENTS:
        raise ValueError(f"unknown EfficientNet '{name}'; available: {', '.join(COEFFICIENTS)}")
    width, depth, dropout = COEFFICIENTS[name]
    return EfficientNet(width, depth, dropout, num_classes=num_classes, **kwargs)
