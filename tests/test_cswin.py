"""CSWin Transformer: the reference's sizes and names, stripes and LePE, any input size, checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vision.backbones.cswin import (
    FACTORIES,
    CSWinTransformer,
    StripeAttention,
    count_parameters,
    cswin_nano_32,
    cswin_tiny_224,
    flops,
    load_checkpoint,
)

# parameters with a 1000-class head, as the reference implementation builds them (the paper
# rounds: T 23M, S 35M, B 78M, L 173M)
REFERENCE_PARAMETERS = {
    "cswin_tiny_224": 22_320_552, "cswin_small_224": 34_643_304, "cswin_base_224": 77_382_184,
    "cswin_large_224": 173_262_664, "cswin_base_384": 77_382_184, "cswin_large_384": 173_262_664,
}


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMETERS))
def test_parameter_counts_match_the_reference(name):
    with torch.device("meta"):  # sizes only, no memory
        model = FACTORIES[name]()
    assert count_parameters(model) == REFERENCE_PARAMETERS[name]
    paper = {"tiny": 23e6, "small": 35e6, "base": 78e6, "large": 173e6}[name.split("_")[1]]
    assert abs(count_parameters(model) - paper) < 0.75e6


def test_parameter_names_and_shapes_are_the_references():
    with torch.device("meta"):
        state = cswin_tiny_224().state_dict()
    expected = {
        "stage1_conv_embed.0.weight": (64, 3, 7, 7), "stage1_conv_embed.2.weight": (64,),
        "stage1.0.qkv.weight": (192, 64), "stage1.0.qkv.bias": (192,), "stage1.0.proj.weight": (64, 64),
        "stage1.0.attns.0.get_v.weight": (32, 1, 3, 3), "stage1.0.attns.1.get_v.bias": (32,),
        "stage1.0.mlp.fc1.weight": (256, 64), "stage1.0.mlp.fc2.weight": (64, 256), "stage1.0.norm2.bias": (64,),
        "merge1.conv.weight": (128, 64, 3, 3), "merge1.norm.weight": (128,),
        "stage3.20.qkv.weight": (768, 256), "merge3.conv.weight": (512, 256, 3, 3),
        "stage4.0.attns.0.get_v.weight": (512, 1, 3, 3), "norm.weight": (512,), "head.weight": (1000, 512),
    }
    for name, shape in expected.items():
        assert tuple(state[name].shape) == shape, name
    assert "stage4.0.attns.1.get_v.weight" not in state  # the last stage attends globally: one branch
    assert not any(name.startswith("stage3.21") for name in state)  # depths 1-2-21-1
    assert len(state) == 4 + 3 * 4 + (1 + 2 + 21) * 16 + 1 * 14 + 4  # stem, merges, blocks, norm and head


def test_flops_at_224_are_the_papers():
    for name, paper in (("cswin_tiny_224", 4.3), ("cswin_small_224", 6.9), ("cswin_base_224", 15.0)):
        with torch.device("meta"):
            model = FACTORIES[name]()
        assert flops(model, 224) / 1e9 == pytest.approx(paper, abs=0.1), name


def direct_stripe_attention(q, k, v, attention: StripeAttention):
    """Attention within each stripe, one stripe and one head at a time, from the definition."""
    batch, height, width, channels = q.shape
    window_h, window_w = attention.window(height, width)
    pad_h, pad_w = (-height) % window_h, (-width) % window_w
    top, left = pad_h // 2, pad_w // 2
    q, k, v = (F.pad(t, (0, 0, left, pad_w - left, top, pad_h - top)) for t in (q, k, v))
    out = torch.zeros_like(q)
    heads = attention.num_heads
    head_dim = channels // heads
    for row in range(0, q.shape[1], window_h):
        for col in range(0, q.shape[2], window_w):
            part = (slice(None), slice(row, row + window_h), slice(col, col + window_w))
            qs, ks, vs = q[part], k[part], v[part]  # [B, wh, ww, C]
            lepe = F.conv2d(vs.permute(0, 3, 1, 2), attention.get_v.weight, attention.get_v.bias, padding=1,
                            groups=channels).permute(0, 2, 3, 1)
            for head in range(heads):
                c = slice(head * head_dim, (head + 1) * head_dim)
                qh, kh, vh = (t[..., c].reshape(batch, -1, head_dim) for t in (qs, ks, vs))
                weights = torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(head_dim), dim=-1)
                out[part + (c,)] = (weights @ vh).reshape(batch, window_h, window_w, head_dim) + lepe[..., c]
    return out[:, top : top + height, left : left + width]


@pytest.mark.parametrize("mode", ["sdpa", "matmul"])
@pytest.mark.parametrize("orientation", [0, 1, -1])
@pytest.mark.parametrize("size", [(8, 12), (7, 10)])  # divisible, and padded to the stripe grid
def test_stripes_and_lepe_against_a_direct_computation(orientation, size, mode):
    torch.manual_seed(orientation + 3)
    attention = StripeAttention(dim=8, num_heads=2, orientation=orientation, split_size=4, attention=mode)
    q, k, v = (torch.randn(2, *size, 8) for _ in range(3))
    with torch.no_grad():
        torch.testing.assert_close(attention(q, k, v), direct_stripe_attention(q, k, v, attention), rtol=1e-5,
                                   atol=1e-5)


def test_both_attention_modes_give_the_same_outputs_and_gradients():
    torch.manual_seed(0)
    models = {mode: cswin_nano_32(num_classes=5, attention=mode) for mode in ("sdpa", "matmul")}
    models["matmul"].load_state_dict(models["sdpa"].state_dict())
    x = torch.randn(3, 3, 36, 30)
    outputs, gradients = {}, {}
    for mode, model in models.items():
        outputs[mode] = model(x)
        outputs[mode].square().sum().backward()
        gradients[mode] = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(outputs["sdpa"], outputs["matmul"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gradients["sdpa"], gradients["matmul"], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="attention must be one of"):
        cswin_nano_32(attention="flash")


def test_the_two_halves_attend_in_crossed_stripes():
    """A change at one position reaches, in one block, only its column stripe (first half of
    the channels) and its row stripe (second half)."""
    torch.manual_seed(0)
    attention_columns = StripeAttention(4, 1, orientation=0, split_size=2)
    attention_rows = StripeAttention(4, 1, orientation=1, split_size=2)
    q, k, v = (torch.randn(1, 8, 8, 4) for _ in range(3))
    for attention, reached in ((attention_columns, (slice(None), slice(2, 4))), (attention_rows, (slice(2, 4), slice(None)))):
        with torch.no_grad():
            before = attention(q, k, v)
            v2 = v.clone()
            v2[0, 3, 3] += 1.0
            changed = (attention(q, k, v2) - before).abs().sum(-1)[0] > 0
        mask = torch.zeros(8, 8, dtype=torch.bool)
        mask[reached] = True
        assert changed[mask].all() and not changed[~mask].any()


def test_any_input_size_and_the_four_stage_maps():
    torch.manual_seed(0)
    model = cswin_nano_32(num_classes=7).eval()
    for height, width in ((32, 32), (37, 45), (20, 64)):
        x = torch.randn(2, 3, height, width)
        maps = model.forward_features(x)
        h, w = (height - 3) // 4 + 1, (width - 3) // 4 + 1
        for stage, feature in enumerate(maps):
            assert feature.shape == (2, 32 * 2**stage, h, w)
            h, w = (h + 1) // 2, (w + 1) // 2
        assert model(x).shape == (2, 7)
    with pytest.raises(ValueError, match="batch, channels, height, width"):
        model(torch.randn(3, 32, 32))


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = cswin_nano_32(drop_path_rate=0.0)
    recomputed = cswin_nano_32(drop_path_rate=0.0, use_checkpoint=True)
    recomputed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    for model in (plain, recomputed):
        model(x).square().sum().backward()
    for a, b in zip(plain.parameters(), recomputed.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def test_stochastic_depth_rises_linearly_and_is_off_in_eval():
    model = CSWinTransformer(embed_dim=16, depth=(1, 1, 2, 1), split_size=(1, 1, 1, 1), num_heads=(2, 2, 2, 2),
                             num_classes=3, drop_path_rate=0.4)
    rates = [block.drop_path.p for stage in range(1, 5) for block in getattr(model, f"stage{stage}")]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), model(x))


def test_checkpoint_round_trip_and_refusals(tmp_path):
    torch.manual_seed(0)
    model = cswin_nano_32().eval()
    x = torch.randn(2, 3, 32, 32)
    # the reference's training checkpoints: EMA and raw weights side by side, DDP's "module." prefix
    state = {f"module.{name}": value for name, value in model.state_dict().items()}
    torch.save({"state_dict_ema": state, "state_dict": {}, "epoch": 299}, tmp_path / "ref.pth")
    restored = cswin_nano_32().eval()
    extra = load_checkpoint(restored, tmp_path / "ref.pth")
    assert extra == {"epoch": 299}
    assert torch.equal(restored(x), model(x))
    torch.save(model.state_dict(), tmp_path / "plain.pth")  # a bare state dict
    load_checkpoint(cswin_nano_32(), tmp_path / "plain.pth")

    broken = dict(model.state_dict())
    del broken["norm.weight"]
    broken["stage9.0.qkv.weight"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.pth")
    fresh = cswin_nano_32()
    before = {name: value.clone() for name, value in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=r"1 missing: norm\.weight.*1 unexpected: stage9\.0\.qkv\.weight"):
        load_checkpoint(fresh, tmp_path / "broken.pth")
    assert all(torch.equal(before[name], value) for name, value in fresh.state_dict().items())  # nothing loaded
    torch.save(cswin_nano_32(num_classes=5).state_dict(), tmp_path / "other_head.pth")
    with pytest.raises(ValueError, match=r"head\.weight \(5, 256\) vs model \(10, 256\)"):
        load_checkpoint(cswin_nano_32(), tmp_path / "other_head.pth")
    # weights_only: a pickle that would run code is refused
    torch.save({"state_dict": model.state_dict(), "callable": print}, tmp_path / "unsafe.pth")
    with pytest.raises(Exception, match="weights_only|Unsupported"):
        load_checkpoint(cswin_nano_32(), tmp_path / "unsafe.pth")
