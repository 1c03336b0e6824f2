"""A plain Vision Transformer (Dosovitskiy et al.) in the form BEiT and MoCo v3 train it.

Patch embedding by a strided convolution, a class token, learned absolute position
embeddings, pre-norm blocks (multi-head self-attention, GELU MLP) with optional layer-scale
(BEiT: ``gamma`` initialised to 0.1 for ViT-B) and stochastic depth, a final LayerNorm.

- :meth:`VisionTransformer.forward_tokens` takes an optional boolean ``mask`` ``[B, N]``:
  masked patch embeddings are replaced by the learned ``mask_token`` before the position
  embeddings are added (BEiT's corruption). It returns the normalised tokens, class token first.
- :meth:`VisionTransformer.intermediate` returns the patch tokens after the given blocks (the
  multi-scale features of PeCo's perceptual loss).
- :meth:`VisionTransformer.forward_features` pools the tokens (``mean`` of the patch tokens, as
  BEiT fine-tunes, or the class ``token``, as MoCo v3); :meth:`forward` adds the linear head.

Factories: the paper sizes (``vit_small_patch16_224``, ``vit_base_patch16_224``) and CPU sizes
for 32-pixel images (``vit_tiny_patch4_32``: 64 patches of 4 x 4).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vision.backbones.cswin import DropPath, Mlp, init_transformer_weights


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, count, dim = x.shape
        q, k, v = self.qkv(x).view(batch, count, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, count, dim))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, layer_scale_init: float | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)
        if layer_scale_init is not None:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attended = self.attn(self.norm1(x))
        x = x + self.drop_path(attended if self.gamma_1 is None else self.gamma_1 * attended)
        mixed = self.mlp(self.norm2(x))
        return x + self.drop_path(mixed if self.gamma_2 is None else self.gamma_2 * mixed)


class VisionTransformer(nn.Module):
    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_path_rate: float = 0.0, layer_scale_init: float | None = None,
                 global_pool: str = "mean"):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        if global_pool not in ("mean", "token"):
            raise ValueError(f"global_pool must be 'mean' or 'token', not {global_pool!r}")
        self.img_size, self.patch_size, self.embed_dim, self.depth = img_size, patch_size, embed_dim, depth
        self.grid = img_size // patch_size
        self.num_patches = self.grid ** 2
        self.global_pool = global_pool
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, rate, layer_scale_init)
                                    for rate in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        for parameter in (self.cls_token, self.mask_token, self.pos_embed):
            nn.init.trunc_normal_(parameter, std=0.02)
        self.apply(init_transformer_weights)

    def _embed(self, images: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if images.shape[-1] != self.img_size or images.shape[-2] != self.img_size:
            raise ValueError(f"this ViT takes {self.img_size} x {self.img_size} images, got "
                             f"{tuple(images.shape[-2:])}")
        patches = self.patch_embed(images).flatten(2).transpose(1, 2)
        if mask is not None:
            if mask.shape != patches.shape[:2]:
                raise ValueError(f"mask must be [batch, {self.num_patches}], got {tuple(mask.shape)}")
            chosen = mask.to(patches.dtype).unsqueeze(-1)
            patches = patches * (1 - chosen) + self.mask_token.to(patches.dtype) * chosen
        tokens = torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1)
        return tokens + self.pos_embed

    def forward_tokens(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised tokens ``[B, 1 + N, D]`` (class token first); masked patches (``mask``
        True) enter as the mask token."""
        x = self._embed(images, mask)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def intermediate(self, images: torch.Tensor, layers: Sequence[int]) -> list[torch.Tensor]:
        """The patch tokens ``[B, N, D]`` after each of ``layers`` (1-based block indices)."""
        wanted = sorted(set(int(layer) for layer in layers))
        if not wanted or wanted[0] < 1 or wanted[-1] > self.depth:
            raise ValueError(f"layers must be block indices in 1..{self.depth}, got {list(layers)}")
        x, outputs = self._embed(images, None), []
        for index, block in enumerate(self.blocks[: wanted[-1]], start=1):
            x = block(x)
            if index in wanted:
                outputs.append(x[:, 1:])
        return outputs

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.forward_tokens(images)
        return tokens[:, 1:].mean(1) if self.global_pool == "mean" else tokens[:, 0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(images))

    NO_WEIGHT_DECAY = ("pos_embed", "cls_token", "mask_token")
    """Parameters BEiT and MoCo v3 train without weight decay (besides biases and norms)."""


def _factory(embed_dim: int, depth: int, num_heads: int, img_size: int, patch_size: int):
    def build(num_classes: int = 1000, drop_path_rate: float = 0.0, img_size: int | None = img_size,
              in_chans: int = 3, **kwargs: Any) -> VisionTransformer:
        kwargs.pop("use_checkpoint", None)  # the classification pipeline's CSWin option
        return VisionTransformer(img_size=img_size or build.img_size, patch_size=patch_size, in_chans=in_chans,
                                 num_classes=num_classes, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                                 drop_path_rate=drop_path_rate, **kwargs)

    build.img_size = img_size
    return build


vit_base_patch16_224 = _factory(768, 12, 12, 224, 16)
vit_small_patch16_224 = _factory(384, 12, 6, 224, 16)
vit_tiny_patch4_32 = _factory(128, 4, 4, 32, 4)
vit_nano_patch4_32 = _factory(64, 2, 2, 32, 4)

FACTORIES = {
    "vit_base_patch16_224": vit_base_patch16_224,
    "vit_small_patch16_224": vit_small_patch16_224,
    "vit_tiny_patch4_32": vit_tiny_patch4_32,
    "vit_nano_patch4_32": vit_nano_patch4_32,
}

def backbone_weights(source: str | Path | dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, other entries) of a ViT checkpoint of ours: a ``peco-mim``/``peco-moco``
    ``backbone.pt`` (or its contents), a ``classify`` ``state.pt`` of a ViT, or a bare state
    dict; a ``module.`` prefix (DistributedDataParallel) is removed."""
    data = source if isinstance(source, dict) else torch.load(Path(source), map_location="cpu", weights_only=True)
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a dict of weights, got {type(data).__name__}")
    for key in ("backbone", "model"):
        if isinstance(data.get(key), dict):
            state, extra = data[key], {k: v for k, v in data.items() if k != key}
            break
    else:
        state, extra = data, {}
    state = {(name[len("module."):] if name.startswith("module.") else name): value for name, value in state.items()
             if torch.is_tensor(value)}
    return state, extra


def build_pretrained(factory: str, source: str | Path | dict, label: Any = None, **kwargs: Any) -> VisionTransformer:
    """``FACTORIES[factory](**kwargs)`` with the checkpoint's layer-scale (present or not) and
    its backbone weights loaded (:func:`load_backbone`); errors name ``label`` (the file)."""
    state, _ = backbone_weights(source)
    if any(name.endswith(".gamma_1") for name in state):
        kwargs["layer_scale_init"] = 0.1  # any value: the checkpoint's gammas replace it
    else:
        kwargs.pop("layer_scale_init", None)
    model = FACTORIES[factory](**kwargs)
    load_backbone(model, {"backbone": state}, label or (source if not isinstance(source, dict) else "the checkpoint"))
    return model


def load_backbone(model: VisionTransformer, source: str | Path | dict, label: Any = None) -> dict[str, Any]:
    """Load a pre-trained backbone (see :func:`backbone_weights`) into ``model`` for
    fine-tuning, probing or perceptual features: every backbone weight must be present with
    the model's shape and every weight of the checkpoint must have a place in the model, the
    classification head excepted (it is left as initialised). Nothing is loaded otherwise."""
    label = label or ("the checkpoint" if isinstance(source, dict) else source)
    state, extra = backbone_weights(source)
    expected = {name: value for name, value in model.state_dict().items() if not name.startswith("head.")}
    given = {name: value for name, value in state.items() if not name.startswith("head.")}
    missing, unexpected = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    mismatched = sorted(name for name in set(expected) & set(given) if tuple(expected[name].shape) != tuple(given[name].shape))
    if missing or unexpected or mismatched:
        shapes = [f"{name} {tuple(given[name].shape)} vs {tuple(expected[name].shape)}" for name in mismatched[:6]]
        raise ValueError(f"{label} does not fit this ViT: {len(missing)} missing ({', '.join(missing[:8])}); "
                         f"{len(unexpected)} without a place in it ({', '.join(unexpected[:8])}); "
                         f"{len(mismatched)} with other shapes ({'; '.join(shapes)}); nothing was loaded")
    model.load_state_dict(given, strict=False)
    return {key: value for key, value in extra.items() if not torch.is_tensor(value) and not isinstance(value, dict)}
