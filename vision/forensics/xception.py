"""Xception (Chollet, CVPR 2017), the face-forgery baseline, and SPSL's shallow 4-channel variant.

The network is the one FaceForensics++ and DeepfakeBench use (the Keras/"legacy" Xception):
an entry flow (two plain 3x3 convolutions, then three residual blocks of separable
convolutions that halve the resolution: 128, 256, 728 channels), a middle flow of eight
728-channel residual blocks, and an exit flow (a 728 -> 1024 block, separable convolutions to
1536 and 2048 channels, global average pooling, a linear head). Parameter names follow that
implementation (``conv1``, ``block1`` ... ``block12``, ``conv3``, ``conv4``, ``fc``) so its
checkpoints load.

SPSL (Liu et al., CVPR 2021) keeps the entry and exit flows and drops the middle flow
(``middle_blocks=0``): local texture, not high-level semantics, gives forgeries away. Its
input has a 4th channel, the phase-only image (:mod:`vision.forensics.phase`).

Every detector here takes RGB pixels in [0, 1] and normalises them itself (``mean``/``std``
buffers), so training, evaluation and a user's own images go through the same forward pass;
an SPSL model computes its phase channel from the same pixels.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vision.forensics.phase import with_phase_channel


class SeparableConv2d(nn.Sequential):
    """Depthwise ``k x k`` convolution then pointwise ``1 x 1`` (no biases: a BatchNorm follows)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, padding: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, in_channels, kernel_size, padding=padding, groups=in_channels, bias=False)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)


class Block(nn.Module):
    """``reps`` x (ReLU, separable conv, BN), then a 3x3 max-pool of stride ``stride``; plus a
    1x1 strided projection of the input when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, reps: int, stride: int = 1, start_with_relu: bool = True,
                 grow_first: bool = True):
        super().__init__()
        if out_channels != in_channels or stride != 1:
            self.skip = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
            self.skipbn = nn.BatchNorm2d(out_channels)
        else:
            self.skip = None
        layers: list[nn.Module] = []
        channels = in_channels
        widths = [out_channels] * reps if grow_first else [in_channels] * (reps - 1) + [out_channels]
        for width in widths:
            layers += [nn.ReLU(inplace=True), SeparableConv2d(channels, width), nn.BatchNorm2d(width)]
            channels = width
        if not start_with_relu:
            layers = layers[1:]
        else:
            layers[0] = nn.ReLU(inplace=False)  # the block's input is also the skip's input
        if stride != 1:
            layers.append(nn.MaxPool2d(3, stride, 1))
        self.rep = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.skipbn(self.skip(x)) if self.skip is not None else x
        return self.rep(x) + skip


class Xception(nn.Module):
    """Xception; ``width`` scales every channel count (1.0 = the paper), ``middle_blocks`` is
    the middle flow's depth (8 = the paper, 0 = SPSL's shallow network)."""

    def __init__(self, num_classes: int = 2, in_chans: int = 3, width: float = 1.0, middle_blocks: int = 8,
                 phase_channel: bool = False, drop_rate: float = 0.0, mean: tuple[float, ...] = (0.5, 0.5, 0.5),
                 std: tuple[float, ...] = (0.5, 0.5, 0.5)):
        super().__init__()
        if phase_channel and in_chans != 4:
            raise ValueError(f"phase_channel adds a 4th input channel: in_chans must be 4, not {in_chans}")

        def c(channels: int) -> int:
            return max(8, int(round(channels * width / 8)) * 8) if width != 1.0 else channels

        self.phase_channel = phase_channel
        self.in_chans = in_chans
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.conv1 = nn.Conv2d(in_chans, c(32), 3, 2, 0, bias=False)
        self.bn1 = nn.BatchNorm2d(c(32))
        self.conv2 = nn.Conv2d(c(32), c(64), 3, bias=False)
        self.bn2 = nn.BatchNorm2d(c(64))
        self.block1 = Block(c(64), c(128), 2, 2, start_with_relu=False)
        self.block2 = Block(c(128), c(256), 2, 2)
        self.block3 = Block(c(256), c(728), 2, 2)
        for index in range(middle_blocks):  # block4 ... block11 in the paper's network
            self.add_module(f"block{4 + index}", Block(c(728), c(728), 3, 1))
        self.middle_blocks = middle_blocks
        self.block12 = Block(c(728), c(1024), 2, 2, grow_first=False)
        self.conv3 = SeparableConv2d(c(1024), c(1536))
        self.bn3 = nn.BatchNorm2d(c(1536))
        self.conv4 = SeparableConv2d(c(1536), c(2048))
        self.bn4 = nn.BatchNorm2d(c(2048))
        self.num_features = c(2048)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def prepare(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] RGB -> the network's input (normalised, plus the phase channel for SPSL)."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"detectors take RGB pixels [B, 3, H, W] in [0, 1], got {tuple(pixels.shape)}")
        x = (pixels - self.mean) / self.std
        if self.phase_channel:
            x = torch.cat([x, with_phase_channel(pixels)[:, 3:]], dim=1)
        return x

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.prepare(pixels)
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        for index in range(1, 4 + self.middle_blocks):
            x = getattr(self, f"block{index}")(x)
        x = self.block12(x)
        x = torch.relu(self.bn3(self.conv3(x)))
        return torch.relu(self.bn4(self.conv4(x)))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` (class 1 = fake)."""
        features = self.forward_features(pixels).mean((2, 3))
        return self.fc(self.drop(features))


def xception(num_classes: int = 2, **kwargs) -> Xception:
    """The paper's Xception (22.86M parameters with a 1000-class head)."""
    return Xception(num_classes=num_classes, **kwargs)


def spsl_xception(num_classes: int = 2, **kwargs) -> Xception:
    """SPSL: RGB + phase channel, no middle flow."""
    return Xception(num_classes=num_classes, in_chans=4, middle_blocks=0, phase_channel=True, **kwargs)


def xception_tiny(num_classes: int = 2, **kwargs) -> Xception:
    """A quarter of the widths and two middle blocks: the same code on 2 CPU cores."""
    return Xception(num_classes=num_classes, width=0.25, middle_blocks=kwargs.pop("middle_blocks", 2), **kwargs)


def spsl_tiny(num_classes: int = 2, **kwargs) -> Xception:
    return Xception(num_classes=num_classes, width=0.25, in_chans=4, middle_blocks=0, phase_channel=True, **kwargs)


def adapt_stem(state: dict[str, torch.Tensor], in_chans: int, key: str = "conv1.weight") -> dict[str, torch.Tensor]:
    """A 3-channel checkpoint for an ``in_chans``-channel stem: the first convolution's weights
    are averaged over the input channels and the average is repeated for every channel."""
    weight = state.get(key)
    if weight is None or weight.ndim != 4:
        raise ValueError(f"the checkpoint has no 4-D '{key}' to adapt (keys: {', '.join(list(state)[:6])}...)")
    if weight.shape[1] == in_chans:
        return state
    adapted = dict(state)
    adapted[key] = weight.mean(dim=1, keepdim=True).repeat(1, in_chans, 1, 1)
    return adapted


def load_checkpoint(model: nn.Module, path: str | Path, strict_head: bool = True) -> nn.Module:
    """Load a user-supplied checkpoint (``weights_only``) into ``model``.

    Accepts a bare state dict or one under ``model``/``state_dict``, drops a ``module.``
    prefix, reads the Keras-converted ImageNet Xception's 2-D pointwise kernels and
    ``last_linear`` head, adapts a 3-channel stem to a 4-channel SPSL model (:func:`adapt_stem`) and, with
    ``strict_head=False``, leaves ``fc`` as initialised when the class counts differ (an
    ImageNet checkpoint for a 2-class detector). The middle-flow blocks a shallow model does
    not have (SPSL: ``block4``-``block11``) are skipped. Refuses missing, unexpected or
    mis-shaped keys with the list, before changing any weight.
    """
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    state = {name.removeprefix("module."): value for name, value in state.items()}
    # the Keras-converted ImageNet weights FF++ starts from: 2-D pointwise kernels, last_linear
    state = {name.replace("last_linear.", "fc.", 1) if name.startswith("last_linear.") else name:
             value[..., None, None] if name.endswith("pointwise.weight") and value.ndim == 2 else value
             for name, value in state.items()}
    own = model.state_dict()
    if isinstance(model, Xception):
        absent = tuple(f"block{index}." for index in range(4 + model.middle_blocks, 12))
        state = {name: value for name, value in state.items() if not name.startswith(absent)}
    if "conv1.weight" in own:
        state = adapt_stem(state, own["conv1.weight"].shape[1])
    if not strict_head:
        for name in [name for name in state if name.startswith("fc.")]:
            if name in own and own[name].shape != state[name].shape:
                state[name] = own[name]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(name for name in set(own) & set(state) if own[name].shape != state[name].shape)
    if missing or unexpected or shapes:
        raise ValueError(f"{path} does not fit {type(model).__name__}: missing {missing[:8]}, unexpected "
                         f"{unexpected[:8]}, mis-shaped {[(n, tuple(state[n].shape), tuple(own[n].shape)) for n in shapes[:8]]}")
    model.load_state_dict(state)
    return model
