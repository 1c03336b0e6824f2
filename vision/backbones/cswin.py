"""CSWin Transformer (Dong et al., "CSWin Transformer: A General Vision Transformer Backbone
with Cross-Shaped Windows", CVPR 2022, arXiv 2107.00652).

Architecture, as in the paper and its reference implementation (microsoft/CSWin-Transformer):

- stem: 7x7 convolution, stride 4, then LayerNorm over channels;
- four stages of blocks; between stages a 3x3 stride-2 convolution doubles the channels
  (then LayerNorm);
- a block is pre-norm attention then pre-norm MLP (ratio 4, GELU), each residual, with
  stochastic depth rising linearly over all blocks;
- cross-shaped window attention: the channels (and heads) are split in two halves; the first
  half attends within stripes of full height and width ``split_size``, the second within
  stripes of full width and height ``split_size``; the last stage attends globally;
- LePE: a depthwise 3x3 convolution of V inside each stripe, added to the attention output;
- head: final LayerNorm, mean over tokens, linear classifier.

Parameter names and shapes are those of the reference implementation, so its released
ImageNet checkpoints load unchanged (:func:`load_checkpoint`). Beyond the reference:

- any input height and width: each attention branch zero-pads q, k and v to its stripe grid
  (centred) and crops the output back, as the reference's segmentation backbone does;
- :meth:`CSWinTransformer.forward_features` returns the four stage maps for dense tasks;
- q, k and v of all stripes and heads are cut out of the qkv projection by one permuted
  copy; attention runs through ``torch.nn.functional.scaled_dot_product_attention`` on
  accelerators and as two batched matrix products on CPU (``attention=``, measured faster
  there for these short stripes);
- ``use_checkpoint`` recomputes each block in the backward pass (activation checkpointing).

The reference switches a block of stages 1-3 to global attention when the stage's
resolution equals its split size; that never happens at 224 or 384 with the released
configurations, and here only stage 4 is global, whatever the input size.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def init_transformer_weights(module: nn.Module) -> None:
    """The reference transformers' rule (CSWin, ViT, BEiT): linear layers ~ truncated normal
    (std 0.02) with zero bias; LayerNorm 1, 0; convolutions keep PyTorch's default."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for a whole sample with probability ``p``."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


ATTENTION_MODES = ("auto", "sdpa", "matmul")
"""How stripe attention is computed: ``sdpa`` (``F.scaled_dot_product_attention``: fused
kernels, no stored attention matrix), ``matmul`` (explicit batched products and softmax),
``auto`` (``sdpa`` on accelerators, ``matmul`` on CPU, where it measured faster for
CSWin's stripes of 49-98 tokens; see ``benchmarks/cswin_speed.py``). All give the same
outputs to float rounding."""


def _centred_padding(size: int, window: int) -> tuple[int, int]:
    extra = (window - size % window) % window
    return extra // 2, extra - extra // 2


class StripeAttention(nn.Module):
    """Self-attention of ``num_heads`` heads within stripes of one orientation, plus LePE.

    ``orientation`` 0: stripes of full height and width ``split_size``; 1: full width and
    height ``split_size``; -1: the whole map (global attention, the last stage). Its only
    parameters are LePE's depthwise convolution ``get_v`` (the reference's name).
    """

    def __init__(self, dim: int, num_heads: int, orientation: int, split_size: int, attention: str = "auto"):
        super().__init__()
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        self.attention = attention
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if orientation not in (-1, 0, 1):
            raise ValueError(f"orientation must be -1, 0 or 1, got {orientation}")
        self.num_heads = num_heads
        self.orientation = orientation
        self.split_size = split_size
        self.get_v = nn.Conv2d(dim, dim, kernel_size=3, stride=1, padding=1, groups=dim)

    def window(self, height: int, width: int) -> tuple[int, int]:
        if self.orientation == -1:
            return height, width
        if self.orientation == 0:
            return height, self.split_size
        return self.split_size, width

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: ``[B, H, W, C]`` maps; returns the attention output, ``[B, H, W, C]``."""
        return self.attend(torch.stack((q, k, v), dim=3))

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """``qkv``: ``[B, H, W, 3, C]`` (q, k, v of each position, any strides); returns ``[B, H, W, C]``.

        q, k and v of every stripe and head are cut out of ``qkv`` by one permuted copy, so
        each head's tokens are contiguous for the two batched matrix products; LePE convolves
        v's stripes in channels-last layout.
        """
        batch, height, width, _, channels = qkv.shape
        window_h, window_w = self.window(height, width)
        top, bottom = _centred_padding(height, window_h)
        left, right = _centred_padding(width, window_w)
        if top or bottom or left or right:  # zero q, k, v outside the map, as the reference's segmentation backbone
            qkv = F.pad(qkv, (0, 0, 0, 0, left, right, top, bottom))
        padded_h, padded_w = height + top + bottom, width + left + right
        rows, cols = padded_h // window_h, padded_w // window_w
        heads, head_dim = self.num_heads, channels // self.num_heads
        tokens = window_h * window_w
        grid = qkv.reshape(batch, rows, window_h, cols, window_w, 3, heads, head_dim)
        # [3, B * rows * cols, heads, tokens, head_dim], one copy (4-D: SDPA's fused kernels need it)
        q, k, v = grid.permute(5, 0, 1, 3, 6, 2, 4, 7).reshape(3, -1, heads, tokens, head_dim).unbind(0)
        if self.attention == "sdpa" or (self.attention == "auto" and q.device.type != "cpu"):
            out = F.scaled_dot_product_attention(q, k, v)
        else:  # two batched products and a softmax: faster than SDPA's CPU kernel for stripes this short
            q3, k3 = q.flatten(0, 1), k.flatten(0, 1)
            weights = torch.baddbmm(q3.new_empty(()).expand(q3.shape[0], tokens, tokens), q3, k3.transpose(1, 2),
                                    beta=0.0, alpha=head_dim**-0.5).softmax(dim=-1)
            out = torch.bmm(weights, v.flatten(0, 1))
        out = out.view(batch, rows, cols, heads, window_h, window_w, head_dim)
        # LePE: depthwise 3x3 inside each stripe, on v's stripes [B * windows, C, window_h, window_w] (channels last)
        v_windows = v.view(-1, heads, window_h, window_w, head_dim).permute(0, 2, 3, 1, 4)
        v_windows = v_windows.reshape(-1, window_h, window_w, channels)
        lepe = self.get_v(v_windows.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        out = out.permute(0, 1, 4, 2, 5, 3, 6) + lepe.reshape(batch, rows, cols, window_h, window_w, heads, head_dim).transpose(2, 3)
        out = out.reshape(batch, padded_h, padded_w, channels)
        if top or bottom or left or right:
            out = out[:, top : top + height, left : left + width]
        return out


class CSWinBlock(nn.Module):
    """Pre-norm cross-shaped window attention and MLP, each with a residual connection."""

    def __init__(self, dim: int, num_heads: int, split_size: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, last_stage: bool = False, attention: str = "auto"):
        super().__init__()
        self.dim = dim
        # registration order follows the reference's state dict
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm1 = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)
        if last_stage:
            self.attns = nn.ModuleList([StripeAttention(dim, num_heads, -1, split_size, attention)])
        else:
            if num_heads % 2 or dim % 2:
                raise ValueError(f"cross-shaped attention splits heads and channels in two; got {num_heads} heads, dim {dim}")
            self.attns = nn.ModuleList(
                StripeAttention(dim // 2, num_heads // 2, orientation, split_size, attention) for orientation in (0, 1)
            )
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm2 = nn.LayerNorm(dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, H, W, C]`` (channels last)."""
        qkv = self.qkv(self.norm1(x)).unflatten(-1, (3, self.dim))
        if len(self.attns) == 1:
            attended = self.attns[0].attend(qkv)
        else:
            half = self.dim // 2
            first, second = qkv.split(half, dim=-1)  # (its gradient is one concatenation)
            attended = torch.cat([self.attns[0].attend(first), self.attns[1].attend(second)], dim=-1)
        x = x + self.drop_path(self.proj(attended))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class _Tokens(nn.Module):
    """``[B, C, H, W]`` -> ``[B, H, W, C]`` (the reference's parameter-free rearrange in the stem)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


class MergeBlock(nn.Module):
    """3x3 stride-2 convolution (halves the resolution, changes the channels), then LayerNorm."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, out_dim, kernel_size=3, stride=2, padding=1)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class CSWinTransformer(nn.Module):
    """CSWin Transformer classifier; see the module docstring and the factory functions.

    Args:
        img_size: the training resolution (kept for reference; any input size is accepted).
        num_classes: classifier outputs (0: no head, :meth:`forward` returns pooled features).
        embed_dim: channels of stage 1 (doubled by each merge).
        depth: blocks per stage.
        split_size: stripe width per stage (stage 4's is unused: it attends globally).
        num_heads: attention heads per stage.
        drop_path_rate: stochastic depth of the last block (rising linearly from 0).
        use_checkpoint: recompute blocks in the backward pass to save activation memory.
        attention: one of :data:`ATTENTION_MODES` (default ``auto``).
    """

    def __init__(self, img_size: int = 224, in_chans: int = 3, num_classes: int = 1000, embed_dim: int = 64,
                 depth: Sequence[int] = (1, 2, 21, 1), split_size: Sequence[int] = (1, 2, 7, 7),
                 num_heads: Sequence[int] = (2, 4, 8, 16), mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path_rate: float = 0.0, use_checkpoint: bool = False, attention: str = "auto"):
        super().__init__()
        if not (len(depth) == len(split_size) == len(num_heads) == 4):
            raise ValueError("depth, split_size and num_heads need one entry per stage (4)")
        self.img_size = img_size
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.stage1_conv_embed = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim, kernel_size=7, stride=4, padding=2), _Tokens(), nn.LayerNorm(embed_dim)
        )
        blocks_total = sum(depth)
        rates = [drop_path_rate * index / max(1, blocks_total - 1) for index in range(blocks_total)]
        dims = [embed_dim * 2**stage for stage in range(4)]
        self.dims = dims
        first = 0
        for stage in range(4):
            blocks = nn.ModuleList(
                CSWinBlock(dims[stage], num_heads[stage], split_size[stage], mlp_ratio, qkv_bias,
                           rates[first + index], last_stage=stage == 3, attention=attention)
                for index in range(depth[stage])
            )
            first += depth[stage]
            self.add_module(f"stage{stage + 1}", blocks)
            if stage < 3:
                self.add_module(f"merge{stage + 1}", MergeBlock(dims[stage], dims[stage + 1]))
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_transformer_weights)

    def _run(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four stages' output maps, ``[B, C_s, H_s, W_s]`` (strides 4, 8, 16, 32)."""
        if x.dim() != 4:
            raise ValueError(f"expected images [batch, channels, height, width], got shape {tuple(x.shape)}")
        x = self.stage1_conv_embed(x)
        maps = []
        for stage in range(4):
            for block in getattr(self, f"stage{stage + 1}"):
                x = self._run(block, x)
            maps.append(x.permute(0, 3, 1, 2))
            if stage < 3:
                x = getattr(self, f"merge{stage + 1}")(x)
        return maps

    def forward_head(self, last_map: torch.Tensor) -> torch.Tensor:
        """Final LayerNorm, mean over positions, classifier."""
        tokens = self.norm(last_map.permute(0, 2, 3, 1))
        return self.head(tokens.mean(dim=(1, 2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x)[-1])


VARIANTS: dict[str, dict[str, Any]] = {
    # the reference implementation's settings (its base/large heads differ from the paper's table)
    "tiny": {"embed_dim": 64, "depth": (1, 2, 21, 1), "num_heads": (2, 4, 8, 16)},
    "small": {"embed_dim": 64, "depth": (2, 4, 32, 2), "num_heads": (2, 4, 8, 16)},
    "base": {"embed_dim": 96, "depth": (2, 4, 32, 2), "num_heads": (4, 8, 16, 32)},
    "large": {"embed_dim": 144, "depth": (2, 4, 32, 2), "num_heads": (6, 12, 24, 24)},
}
SPLIT_SIZES = {224: (1, 2, 7, 7), 384: (1, 2, 12, 12)}


def _build(variant: str, resolution: int, num_classes: int, drop_path_rate: float, img_size: int | None,
           **kwargs: Any) -> CSWinTransformer:
    settings = {**VARIANTS[variant], "split_size": SPLIT_SIZES[resolution], **kwargs}
    return CSWinTransformer(img_size=img_size or resolution, num_classes=num_classes,
                            drop_path_rate=drop_path_rate, **settings)


def cswin_tiny_224(num_classes: int = 1000, drop_path_rate: float = 0.0, img_size: int | None = None,
                   **kwargs: Any) -> CSWinTransformer:
    return _build("tiny", 224, num_classes, drop_path_rate, img_size, **kwargs)


def cswin_small_224(num_classes: int = 1000, drop_path_rate: float = 0.0, img_size: int | None = None,
                    **kwargs: Any) -> CSWinTransformer:
    return _build("small", 224, num_classes, drop_path_rate, img_size, **kwargs)


def cswin_base_224(num_classes: int = 1000, drop_path_rate: float = 0.0, img_size: int | None = None,
                   **kwargs: Any) -> CSWinTransformer:
    return _build("base", 224, num_classes, drop_path_rate, img_size, **kwargs)


def cswin_large_224(num_classes: int = 1000, drop_path_rate: float = 0.0, img_size: int | None = None,
                    **kwargs: Any) -> CSWinTransformer:
    return _build("large", 224, num_classes, drop_path_rate, img_size, **kwargs)


def cswin_base_384(num_classes: int = 1000, drop_path_rate: float = 0.0, img_size: int | None = None,
                   **kwargs: Any) -> CSWinTransformer:
    return _build("base", 384, num_classes, drop_path_rate, img_size, **kwargs)


def cswin_large_384(num_classes: int = 1000, drop_path_rate: float = 0.0, img_size: int | None = None,
                    **kwargs: Any) -> CSWinTransformer:
    return _build("large", 384, num_classes, drop_path_rate, img_size, **kwargs)


def cswin_nano_32(num_classes: int = 10, drop_path_rate: float = 0.0, img_size: int | None = None,
                  **kwargs: Any) -> CSWinTransformer:
    """A tiny preset for 32 x 32 inputs on CPU: the same architecture, 32 channels, depths
    1-1-2-1; stage resolutions 8, 4, 2, 1 with stripe widths 1, 2, 2 (each divides its stage)."""
    settings = {"embed_dim": 32, "depth": (1, 1, 2, 1), "num_heads": (2, 4, 8, 8), "split_size": (1, 2, 2, 1),
                **kwargs}
    return CSWinTransformer(img_size=img_size or 32, num_classes=num_classes, drop_path_rate=drop_path_rate,
                            **settings)


FACTORIES = {
    "cswin_tiny_224": cswin_tiny_224, "cswin_small_224": cswin_small_224, "cswin_base_224": cswin_base_224,
    "cswin_large_224": cswin_large_224, "cswin_base_384": cswin_base_384, "cswin_large_384": cswin_large_384,
    "cswin_nano_32": cswin_nano_32,
}

CHECKPOINT_KEYS = ("state_dict_ema", "state_dict", "model")
"""Where a checkpoint file may keep the weights, in the order they are looked for (the
reference's training script saves both the EMA and the raw weights; EMA is what it releases)."""


def load_checkpoint(model: nn.Module, path: str | Path | dict, key: str | None = None,
                    label: Any = None) -> dict[str, Any]:
    """Load a reference (or raysmith) CSWin checkpoint into ``model``, strictly.

    The file is read with ``weights_only=True`` (``path`` may also be its loaded contents, named
    ``label`` in errors). Its weights are taken from ``key`` if given,
    else from the first of :data:`CHECKPOINT_KEYS` present, else the file is the state dict
    itself; a ``module.`` prefix (DistributedDataParallel) is removed. Missing or unexpected
    parameter names, or shapes that differ, raise ``ValueError`` listing them: nothing is
    loaded then. Returns the checkpoint's other entries (epoch, arguments...), if any.
    """
    checkpoint_data = path if isinstance(path, dict) else torch.load(Path(path), map_location="cpu", weights_only=True)
    if isinstance(path, dict):
        path = label or "the checkpoint"
    if not isinstance(checkpoint_data, dict):
        raise ValueError(f"{path}: expected a dict of weights, got {type(checkpoint_data).__name__}")
    if key is not None:
        if key not in checkpoint_data:
            raise ValueError(f"{path} has no '{key}'; its keys: {sorted(checkpoint_data)[:20]}")
        state, extra = checkpoint_data[key], {k: v for k, v in checkpoint_data.items() if k != key}
    else:
        found = next((name for name in CHECKPOINT_KEYS if isinstance(checkpoint_data.get(name), dict)), None)
        if found is None:
            state, extra = checkpoint_data, {}
        else:
            state = checkpoint_data[found]
            extra = {k: v for k, v in checkpoint_data.items() if k not in CHECKPOINT_KEYS}
    state = {(name[len("module."):] if name.startswith("module.") else name): value for name, value in state.items()}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(name for name in set(expected) & set(state) if tuple(expected[name].shape) != tuple(state[name].shape))
    if missing or unexpected or mismatched:
        problems = []
        for label, names in (("missing", missing), ("unexpected", unexpected)):
            if names:
                problems.append(f"{len(names)} {label}: {', '.join(names[:12])}{' ...' if len(names) > 12 else ''}")
        if mismatched:
            shapes = [f"{name} {tuple(state[name].shape)} vs model {tuple(expected[name].shape)}" for name in mismatched[:8]]
            problems.append(f"{len(mismatched)} with other shapes: {'; '.join(shapes)}")
        raise ValueError(f"{path} does not fit this model ({'; '.join(problems)}); nothing was loaded")
    model.load_state_dict(state, strict=True)
    return extra


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def flops(model: CSWinTransformer, height: int, width: int | None = None) -> float:
    """Multiply-accumulates of one forward pass (matmuls, convolutions, attention), in the
    convention the paper's FLOPs figures use (one multiply-add = one FLOP)."""
    width = width or height
    total = 0.0
    h, w = (height + 4 - 7) // 4 + 1, (width + 4 - 7) // 4 + 1
    conv = model.stage1_conv_embed[0]
    total += h * w * conv.out_channels * conv.in_channels * 49
    for stage in range(4):
        for block in getattr(model, f"stage{stage + 1}"):
            dim, tokens = block.dim, h * w
            total += tokens * (3 * dim * dim + dim * dim + 2 * dim * block.mlp.fc1.out_features)
            for attention in block.attns:
                channels = attention.get_v.in_channels
                window_h, window_w = attention.window(h, w)
                padded = math.ceil(h / window_h) * window_h * math.ceil(w / window_w) * window_w
                total += 2 * padded * window_h * window_w * channels  # q k^T and attn v
                total += padded * channels * 9  # LePE
        if stage < 3:
            merge = getattr(model, f"merge{stage + 1}")
            h, w = (h + 1) // 2, (w + 1) // 2
            total += h * w * merge.conv.out_channels * merge.conv.in_channels * 9
    return total + model.dims[-1] * (model.num_classes or 0)
