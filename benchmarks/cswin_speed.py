"""Forward + backward throughput of raysmith's CSWin-T against the reference's way of computing it.

The peer is the same architecture with the same weights, computed as the reference
implementation does: tokens kept as ``[B, L, C]``, each branch cutting q, k and v into
stripes with its own image reshapes, attention as explicit ``(q * scale) @ k^T``, softmax,
``@ v``, and LePE through a separate image-to-window pass of v. Both run in this process,
alternately, on the same inputs; their outputs are checked equal (max abs difference)
before timing. raysmith is timed twice: as it runs on CPU by default (``attention="auto"``:
batched matrix products) and with ``attention="sdpa"`` (what ``auto`` picks on GPUs).

    python benchmarks/cswin_speed.py                       # CSWin-T at 224, batch 16, 2 threads
    python benchmarks/cswin_speed.py --batch 4 --repeats 5 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vision.backbones.cswin import CSWinBlock, CSWinTransformer, StripeAttention, cswin_tiny_224  # noqa: E402


def reference_style_attention(attention: StripeAttention, q, k, v, height: int, width: int):
    """One branch the reference's way: q, k, v as tokens ``[B, L, C]``."""
    batch, _, channels = q.shape
    window_h, window_w = attention.window(height, width)
    heads = attention.num_heads
    head_dim = channels // heads
    scale = head_dim**-0.5

    def image_to_windows(tokens):
        image = tokens.transpose(-2, -1).contiguous().view(batch, channels, height, width)
        image = image.view(batch, channels, height // window_h, window_h, width // window_w, window_w)
        windows = image.permute(0, 2, 4, 3, 5, 1).contiguous().reshape(-1, window_h * window_w, channels)
        return windows.reshape(-1, window_h * window_w, heads, head_dim).permute(0, 2, 1, 3).contiguous()

    def lepe_of(tokens):
        image = tokens.transpose(-2, -1).contiguous().view(batch, channels, height, width)
        image = image.view(batch, channels, height // window_h, window_h, width // window_w, window_w)
        image = image.permute(0, 2, 4, 1, 3, 5).contiguous().reshape(-1, channels, window_h, window_w)
        lepe = attention.get_v(image)
        lepe = lepe.reshape(-1, heads, head_dim, window_h * window_w).permute(0, 1, 3, 2).contiguous()
        values = image.reshape(-1, heads, head_dim, window_h * window_w).permute(0, 1, 3, 2).contiguous()
        return values, lepe

    q, k = image_to_windows(q), image_to_windows(k)
    v, lepe = lepe_of(v)
    weights = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    out = (weights @ v) + lepe
    out = out.transpose(1, 2).reshape(-1, window_h * window_w, channels)
    out = out.view(batch, height // window_h, width // window_w, window_h, window_w, channels)
    return out.permute(0, 1, 3, 2, 4, 5).contiguous().view(batch, height * width, channels)


def reference_style_block(block: CSWinBlock, x, height: int, width: int):
    batch, length, channels = x.shape
    qkv = block.qkv(block.norm1(x)).reshape(batch, length, 3, channels).permute(2, 0, 1, 3)
    if len(block.attns) == 1:
        attended = reference_style_attention(block.attns[0], qkv[0], qkv[1], qkv[2], height, width)
    else:
        half = channels // 2
        attended = torch.cat([
            reference_style_attention(block.attns[0], qkv[0, :, :, :half], qkv[1, :, :, :half], qkv[2, :, :, :half],
                                      height, width),
            reference_style_attention(block.attns[1], qkv[0, :, :, half:], qkv[1, :, :, half:], qkv[2, :, :, half:],
                                      height, width),
        ], dim=2)
    x = x + block.drop_path(block.proj(attended))
    return x + block.drop_path(block.mlp(block.norm2(x)))


def reference_style_forward(model: CSWinTransformer, images):
    conv, _, norm = model.stage1_conv_embed
    image = conv(images)
    batch, channels, height, width = image.shape
    x = norm(image.flatten(2).transpose(1, 2))
    for stage in range(4):
        for block in getattr(model, f"stage{stage + 1}"):
            x = reference_style_block(block, x, height, width)
        if stage < 3:
            merge = getattr(model, f"merge{stage + 1}")
            image = x.transpose(-2, -1).contiguous().view(batch, -1, height, width)
            image = merge.conv(image)
            height, width = image.shape[-2:]
            x = merge.norm(image.flatten(2).transpose(1, 2))
    return model.head(model.norm(x).mean(dim=1))


def step(forward, model, images, labels):
    model.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(forward(images), labels)
    loss.backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds, each timing both, alternating")
    parser.add_argument("--steps", type=int, default=3, help="forward+backward steps per timing")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = cswin_tiny_224(img_size=args.size).train()
    images = torch.randn(args.batch, 3, args.size, args.size)
    labels = torch.randint(0, 1000, (args.batch,))
    with torch.no_grad():
        difference = (model(images[:2]) - reference_style_forward(model, images[:2])).abs().max().item()
    print(f"max |ours - reference way| on the logits: {difference:.2e} (must be < 1e-4)")
    if difference >= 1e-4:
        raise SystemExit("outputs differ: the comparison is void")
    def ours(mode):
        def forward(x):
            for module in model.modules():
                if isinstance(module, StripeAttention):
                    module.attention = mode
            return model(x)
        return forward

    candidates = {"raysmith": ours("auto"), "raysmith, SDPA": ours("sdpa"),
                  "reference way": lambda x: reference_style_forward(model, x)}
    for forward in candidates.values():  # warm-up
        step(forward, model, images, labels)
    rates: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(args.repeats):
        for name, forward in candidates.items():
            started = time.perf_counter()
            for _ in range(args.steps):
                step(forward, model, images, labels)
            rates[name].append(args.batch * args.steps / (time.perf_counter() - started))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    print(f"CSWin-T at {args.size}, batch {args.batch}, {args.threads} threads, forward+backward, images/s:")
    for name, values in rates.items():
        print(f"  {name:15s} {medians[name]:7.2f}  (runs: {', '.join(f'{v:.2f}' for v in values)})")
    print(f"ratio raysmith / reference way: {medians['raysmith'] / medians['reference way']:.2f}x (target >= 1.3x); "
          f"with SDPA on this CPU: {medians['raysmith, SDPA'] / medians['reference way']:.2f}x")
    print(json.dumps({"batch": args.batch, "size": args.size, "threads": args.threads, "max_abs_difference": difference,
                      "images_per_s": medians, "runs": rates}))


if __name__ == "__main__":
    main()
