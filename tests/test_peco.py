"""PeCo's pieces: BEiT's masks, the VQ tokenizer, the perceptual loss, MoCo v3, the MIM loss,
the token-semantics measures, and the ViT backbone hand-over to fine-tuning and probing."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from vision.backbones.vit import VisionTransformer, load_backbone, vit_base_patch16_224, vit_nano_patch4_32
from vision.peco.masking import BlockMaskGenerator
from vision.peco.mim import MaskedImageModel, mim_loss
from vision.peco.moco import MoCoV3, momentum_at, two_views
from vision.peco.semantics import histogram_probe, mutual_information
from vision.peco.tokenizer import (
    PRESETS,
    PerceptualLoss,
    TokenizerConfig,
    VectorQuantizer,
    VQTokenizer,
    default_layers,
    tokenizer_losses,
)


def test_vit_base_has_the_published_size():
    # timm's vit_base_patch16_224 has 86,567,656 parameters; ours adds BEiT's 768-d mask token
    assert sum(p.numel() for p in vit_base_patch16_224().parameters()) == 86_567_656 + 768


def test_beit_masks_reach_their_count_with_blocks_of_the_asked_shape():
    generator = BlockMaskGenerator(14, num_masking_patches=75, min_num_patches=16, min_aspect=0.3)
    counts, ratios = [], []
    for seed in range(300):
        mask = generator(random.Random(seed))
        counts.append(int(mask.sum()))
        union = np.zeros_like(mask)
        for top, left, rows, cols in generator.blocks:
            assert rows < 14 and cols < 14
            if 75 - union.sum() >= 16:  # while 16 or more are still to mask, a block's area is drawn from [16, ...]
                assert rows * cols >= 11  # less what rounding sqrt(s r) and sqrt(s / r) can take
                ratios.append(rows / cols)
            union[top: top + rows, left: left + cols] = True
        assert (union == mask).all()  # the mask is exactly its blocks
    assert max(counts) <= 75  # never over the target
    assert np.mean(counts) > 72 and np.mean(np.array(counts) == 75) > 0.5  # about 40% of 196, as BEiT
    assert min(ratios) >= 0.2 and max(ratios) <= 5.0  # aspect 0.3..3.33 up to rounding
    assert min(ratios) < 0.5 and max(ratios) > 2.0  # both orientations of elongated blocks occur
    squares = BlockMaskGenerator(14, num_masking_patches=75, min_aspect=1.0)
    squares(random.Random(0))
    assert all(rows == cols for _, _, rows, cols in squares.blocks)


def test_beit_masks_are_deterministic_under_a_seed():
    generator = BlockMaskGenerator(8, num_masking_patches=26, min_num_patches=4)
    first, again = generator.batch(4, random.Random(3)), generator.batch(4, random.Random(3))
    assert (first == again).all() and first.shape == (4, 64)
    assert not (first == generator.batch(4, random.Random(4))).all()
    with pytest.raises(ValueError, match="num_masking_patches must be in 1..64"):
        BlockMaskGenerator(8, num_masking_patches=65)


def test_vq_straight_through_passes_the_gradient_unchanged():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(16, 4, ema=False).eval()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    quantised, ids, _, _ = quantizer(z)
    assert torch.allclose(quantised, quantizer.codebook[ids].permute(0, 3, 1, 2))  # values: the chosen codes
    weights = torch.randn_like(quantised)
    (quantised * weights).sum().backward()
    assert torch.allclose(z.grad, weights)  # gradient: the identity


def test_learned_codebook_gets_gradient_only_for_chosen_codes():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(32, 4, ema=False).eval()
    z = torch.randn(1, 4, 2, 2)
    _, ids, loss, _ = quantizer(z)
    loss.backward()
    used = torch.zeros(32, dtype=torch.bool)
    used[ids.unique()] = True
    norms = quantizer.codebook.grad.norm(dim=1)
    assert (norms[used] > 0).all() and (norms[~used] == 0).all()


def test_ema_codebook_moves_to_its_inputs_and_dead_codes_restart():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(8, 2, ema=True, decay=0.5, dead_threshold=0.05)
    target = torch.tensor([3.0, -2.0])
    z = (target + 0.01 * torch.randn(64, 2)).view(8, 8, 2).permute(2, 0, 1).unsqueeze(0)  # [1, 2, 8, 8]
    for _ in range(12):
        _, ids, _, stats = quantizer(z)
    used = ids.unique()
    assert torch.allclose(quantizer.codebook[used].mean(0), target, atol=0.05)  # the EMA average of its members
    # codes never chosen were restarted at encoder outputs: all codes now lie on the data
    assert (quantizer.codebook - target).norm(dim=1).max() < 0.1
    assert stats["dead_codes"] >= 0 and stats["used_codes"] >= 1


def test_perceptual_loss_is_zero_for_identical_images_and_grows_with_distortion():
    torch.manual_seed(0)
    loss = PerceptualLoss(vit_nano_patch4_32(num_classes=0), [1, 2])
    images = torch.rand(8, 3, 32, 32)
    assert float(loss(images, images).abs().max()) < 1e-6
    noisy = [float(loss(images, (images + sigma * torch.randn_like(images)).clamp(0, 1)).mean())
             for sigma in (0.02, 0.1, 0.3)]
    assert noisy[0] < noisy[1] < noisy[2]
    assert default_layers(12) == [3, 6, 9, 12] and default_layers(4) == [1, 2, 3, 4]


def test_tokenizer_losses_fall_with_perceptual_and_gan_terms():
    torch.manual_seed(0)
    tokenizer = VQTokenizer(TokenizerConfig(image_size=16, vocab_size=32, embed_dim=8, channels=8,
                                            channel_mult=(1, 2), res_blocks=1))
    perceptual = PerceptualLoss(VisionTransformer(img_size=16, patch_size=4, num_classes=0, embed_dim=16, depth=2,
                                                  num_heads=2), [1, 2])
    from vision.peco.tokenizer import PatchDiscriminator

    discriminator = PatchDiscriminator(8, 1)
    optimizer = torch.optim.Adam(tokenizer.parameters(), lr=3e-3)
    # a fixed batch of smooth images: the tokenizer should learn it
    images = torch.nn.functional.interpolate(torch.rand(8, 3, 4, 4), size=16, mode="bilinear", align_corners=False)
    first = None
    for step in range(60):
        losses, _ = tokenizer_losses(tokenizer, images, perceptual, 1.0, discriminator, 0.8, use_gan=step >= 30)
        optimizer.zero_grad()
        losses.total.backward()
        optimizer.step()
        first = first if first is not None else (losses.l1, losses.perceptual)
    assert losses.l1 < 0.6 * first[0] and losses.perceptual < 0.6 * first[1]
    assert losses.gan_weight > 0 and np.isfinite(losses.gan_weight)
    assert tokenizer.tokenize(images).shape == (8, 64)


def test_paper_tokenizer_gives_one_token_per_vit_b16_patch():
    config = PRESETS["peco_vqgan_224"]
    assert config.vocab_size == 8192 and config.grid == 14 == 224 // 16


def test_mim_loss_counts_masked_positions_only_and_masked_pixels_are_unseen():
    torch.manual_seed(0)
    model = MaskedImageModel(vit_nano_patch4_32(num_classes=0), vocab_size=16).eval()
    images = torch.rand(2, 3, 32, 32)
    mask = torch.from_numpy(BlockMaskGenerator(8, num_masking_patches=20, min_num_patches=4).batch(2, random.Random(0)))
    ids = torch.randint(0, 16, (2, 64))
    logits = model(images, mask)
    assert logits.shape == (int(mask.sum()), 16)
    loss, _ = mim_loss(logits, ids, mask)
    other = ids.clone()
    other[~mask] = (other[~mask] + 1) % 16  # other targets where nothing is masked: same loss
    assert torch.equal(mim_loss(logits, other, mask)[0], loss)
    other = ids.clone()
    other[mask] = (other[mask] + 1) % 16
    assert not torch.equal(mim_loss(logits, other, mask)[0], loss)
    # the pixels under the mask do not reach the model: they enter as the mask token
    patches = mask.view(2, 8, 8).repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1)
    scrambled = torch.where(patches, torch.rand_like(images), images)
    assert torch.allclose(model(scrambled, mask), logits, atol=1e-5)


def test_moco_contrastive_loss_prefers_matching_keys_and_momentum_rises_to_one():
    torch.manual_seed(0)
    model = MoCoV3(vit_nano_patch4_32(num_classes=0, global_pool="token"), dim=16, mlp_dim=32)
    q = torch.randn(16, 16)
    assert float(model.contrastive(q, q + 0.01 * torch.randn(16, 16))) < float(model.contrastive(q, torch.randn(16, 16)))
    assert momentum_at(0, 100) == pytest.approx(0.99) and momentum_at(100, 100) == pytest.approx(1.0)
    images = torch.rand(4, 3, 32, 32)
    first, second = two_views(images, 32, torch.Generator().manual_seed(0))
    assert first.shape == second.shape == images.shape and not torch.equal(first, second)
    assert 0 <= float(first.min()) and float(first.max()) <= 1
    before = [p.clone() for p in model.momentum.parameters()]
    loss = model(first, second, 0.9)
    loss.backward()
    assert all(p.grad is None for p in model.momentum.parameters())  # keys carry no gradient
    assert model.base.head[0].weight.grad is not None and model.predictor[0].weight.grad is not None
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    model.update_momentum(0.9)
    moved = [not torch.equal(a, b) for a, b in zip(before, model.momentum.parameters())]
    assert any(moved)
    assert "head.0.weight" not in model.backbone_state() and "blocks.0.attn.qkv.weight" in model.backbone_state()


def test_token_semantics_measures():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 50)
    informative = np.stack([rng.integers(label * 8, label * 8 + 8, 16) for label in labels])  # tokens name the label
    noise = rng.integers(0, 32, (200, 16))
    assert mutual_information(informative, labels, 32) == pytest.approx(2.0, abs=1e-9)  # H(Y) = log2 4
    assert mutual_information(noise, labels, 32) < 0.2
    train, test = slice(0, 200, 2), slice(1, 200, 2)
    assert histogram_probe(informative[train], labels[train], informative[test], labels[test], 32) == 1.0
    assert histogram_probe(noise[train], labels[train], noise[test], labels[test], 32) < 0.6


def test_pretrained_backbone_hands_over_to_fine_tuning_and_linear_probing(tmp_path):
    from pipelines.classify import ModelSettings, build_model

    torch.manual_seed(0)
    pretrained = MaskedImageModel(vit_nano_patch4_32(num_classes=0, layer_scale_init=0.1), 16).backbone
    for block in pretrained.blocks:  # trained gammas, not their initial value
        torch.nn.init.uniform_(block.gamma_1, 0.5, 1.5)
    path = tmp_path / "backbone.pt"
    torch.save({"backbone": pretrained.state_dict(), "factory": "vit_nano_patch4_32", "img_size": 32}, path)
    images = torch.rand(3, 3, 32, 32)
    finetune = build_model(ModelSettings(name="vit_nano_patch4_32", num_classes=10, pretrained=str(path))).eval()
    assert torch.allclose(finetune.forward_features(images), pretrained.eval().forward_features(images), atol=1e-6)
    probe = build_model(ModelSettings(name="vit_nano_patch4_32", num_classes=10, pretrained=str(path), linear_probe=True))
    trainable = {name for name, p in probe.named_parameters() if p.requires_grad}
    assert trainable == {"head.1.weight", "head.1.bias"}
    with pytest.raises(ValueError, match="drop_path_rate must be 0"):
        ModelSettings(name="vit_nano_patch4_32", linear_probe=True, drop_path_rate=0.1)
    wrong = tmp_path / "wrong.pt"
    torch.save({"backbone": vit_base_patch16_224(num_classes=0).state_dict()}, wrong)
    with pytest.raises(ValueError, match="does not fit this ViT.*other shapes.*nothing was loaded"):
        load_backbone(vit_nano_patch4_32(num_classes=10), wrong)
    # the workers get the file's bytes; errors still name the file
    with pytest.raises(ValueError, match=r"wrong.pt does not fit this ViT"):
        build_model(ModelSettings(name="vit_nano_patch4_32", pretrained=str(wrong)), weights=wrong.read_bytes())
    # weights the model has no place for are refused, not dropped (a layer-scale checkpoint into a plain ViT)
    with pytest.raises(ValueError, match=r"4 without a place in it \(blocks.0.gamma_1"):
        load_backbone(vit_nano_patch4_32(num_classes=10), path)


def test_any_vit_checkpoint_of_ours_serves_as_the_perceptual_model(tmp_path):
    from pipelines.classify import ModelSettings, build_model
    from pipelines.peco import perceptual_network

    torch.manual_seed(0)
    classifier = build_model(ModelSettings(name="vit_nano_patch4_32", num_classes=10)).eval()
    state = {"model": classifier.state_dict(), "spec": {"model": {"name": "vit_nano_patch4_32"}, "data": {"image_size": 32}}}
    loss = perceptual_network(state, [2])
    images = torch.rand(2, 3, 32, 32)
    assert torch.equal(loss.model.intermediate(images, [2])[0], classifier.intermediate(images, [2])[0])
    with pytest.raises(ValueError, match="holds a cswin_nano_32, not a ViT"):
        perceptual_network({"model": {}, "spec": {"model": {"name": "cswin_nano_32"}}}, None)
    with pytest.raises(ValueError, match="not a ViT checkpoint of raysmith's"):
        perceptual_network({"weights": {}}, None)


def _cross_rank_bn(rank: int, world: int, port: int, out) -> None:
    import torch.distributed as dist

    from vision.peco.moco import CrossRankBatchNorm1d

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    x = torch.randn(8, 5) * 3 + 1  # the same global batch on every rank; each takes its half
    norm = CrossRankBatchNorm1d(5)
    torch.nn.init.uniform_(norm.weight)
    part = x[rank * 4: rank * 4 + 4].clone().requires_grad_(True)
    y = norm(part)
    (y * torch.arange(5.0)).sum().backward()
    out.put((rank, *(t.detach().numpy().copy() for t in (y, part.grad, norm.running_mean, norm.running_var))))
    dist.destroy_process_group()


def test_cross_rank_batchnorm_equals_batchnorm_over_the_global_batch():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    workers = [context.Process(target=_cross_rank_bn, args=(rank, 2, port, queue)) for rank in range(2)]
    for worker in workers:
        worker.start()
    results = dict((item[0], item[1:]) for item in (queue.get() for _ in range(2)))
    for worker in workers:
        worker.join(timeout=60)
    torch.manual_seed(0)
    x = (torch.randn(8, 5) * 3 + 1).requires_grad_(True)
    reference = torch.nn.BatchNorm1d(5)
    torch.nn.init.uniform_(reference.weight)
    y = reference(x)
    (y * torch.arange(5.0)).sum().backward()
    for rank in range(2):
        out, grad, running_mean, running_var = (torch.from_numpy(a) for a in results[rank])
        assert torch.allclose(out, y[rank * 4: rank * 4 + 4].detach(), atol=1e-5)
        assert torch.allclose(grad, x.grad[rank * 4: rank * 4 + 4], atol=1e-5)
        assert torch.allclose(running_mean, reference.running_mean, atol=1e-6)
        assert torch.allclose(running_var, reference.running_var, atol=1e-5)
