"""The forgery detectors' pieces in plain PyTorch (no Ray): phase channel, networks, losses,
metrics, manifests and the generated data."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vision.forensics import DETECTORS, build_detector
from vision.forensics.efficientnet import efficientnet
from vision.forensics.manifest import label_of, read_deepfakebench_json, read_parquet_manifest
from vision.forensics.mat import (
    MAT,
    RegionalIndependenceLoss,
    attention_guided_augmentation,
    attention_pooling,
    mat_tiny,
)
from vision.forensics.metrics import (
    average_precision,
    detection_report,
    equal_error_rate,
    roc_auc,
    video_scores,
)
from vision.forensics.phase import phase_only, with_phase_channel
from vision.forensics.training import detector_loss, make_regional_loss
from vision.forensics.xception import load_checkpoint, spsl_xception, xception


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- phase channel

def test_phase_only_has_a_unit_magnitude_spectrum_and_the_images_phase():
    images = torch.rand(3, 3, 24, 40)
    phase = phase_only(images)
    assert phase.shape == (3, 1, 24, 40)
    spectrum = torch.fft.fft2(phase[:, 0].double())
    assert torch.allclose(spectrum.abs(), torch.full_like(spectrum.abs(), math.sqrt(24 * 40)), rtol=1e-4)
    grey = (images * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1).double()
    original = torch.fft.fft2(grey)
    # same phase: the product with the conjugate is real and positive
    product = spectrum * original.conj()
    assert torch.all(product.real > 0) and torch.allclose(product.imag / product.abs(), torch.zeros(1, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(phase.pow(2).mean((1, 2, 3)), torch.ones(3), atol=1e-4)  # mean square exactly 1


def test_phase_only_is_per_image_and_ignores_contrast():
    images = torch.rand(5, 3, 32, 32)
    together = phase_only(images)
    alone = torch.cat([phase_only(images[i: i + 1]) for i in range(5)])
    assert torch.allclose(together, alone, atol=1e-5)
    shuffled = phase_only(images[[4, 2, 0, 1, 3]])
    assert torch.allclose(shuffled, together[[4, 2, 0, 1, 3]], atol=1e-5)
    assert torch.allclose(phase_only(images * 0.3), together, atol=1e-4)  # amplitude carries contrast, not phase
    rgb_plus_phase = with_phase_channel(images)
    assert rgb_plus_phase.shape == (5, 4, 32, 32) and torch.equal(rgb_plus_phase[:, :3], images)


def test_phase_only_refuses_other_shapes():
    with pytest.raises(ValueError, match=r"\[B, 1 or 3, H, W\]"):
        phase_only(torch.rand(2, 4, 8, 8))


# ----------------------------------------------------------------------------- networks

def test_xception_matches_the_papers_size_and_spsl_drops_the_middle_flow():
    assert _params(xception(num_classes=1000)) == 22_855_952
    spsl = spsl_xception()
    names = {name.split(".")[0] for name, _ in spsl.named_parameters()}
    assert not any(f"block{index}" in names for index in range(4, 12))
    assert {"block1", "block2", "block3", "block12"} <= names
    assert spsl.conv1.weight.shape == (32, 4, 3, 3)
    small = build_detector("spsl_tiny")
    assert small(torch.rand(2, 3, 64, 64)).shape == (2, 2)
    # the network sees RGB and the phase-only image
    assert torch.allclose(small.prepare(torch.rand(2, 3, 32, 32))[:, 3:].pow(2).mean(), torch.tensor(1.0), atol=1e-3)


def test_a_three_channel_xception_checkpoint_loads_into_spsl(tmp_path):
    torch.manual_seed(0)
    source = xception(num_classes=1000)
    path = tmp_path / "xception.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    target = load_checkpoint(spsl_xception(), path, strict_head=False)
    expected = source.conv1.weight.mean(1, keepdim=True).repeat(1, 4, 1, 1)
    assert torch.equal(target.conv1.weight, expected)
    assert torch.equal(target.block12.skip.weight, source.block12.skip.weight)
    assert target.fc.weight.shape == (2, 2048)  # the 1000-class head is not forced into 2 classes
    # the Keras-converted ImageNet weights: 2-D pointwise kernels and a last_linear head
    keras = {(k.replace("fc.", "last_linear.", 1) if k.startswith("fc.") else k):
             (v[:, :, 0, 0] if k.endswith("pointwise.weight") else v) for k, v in source.state_dict().items()}
    torch.save(keras, tmp_path / "keras.pth")
    converted = load_checkpoint(xception(num_classes=1000), tmp_path / "keras.pth")
    assert torch.equal(converted.conv4.pointwise.weight, source.conv4.pointwise.weight)
    assert torch.equal(converted.fc.weight, source.fc.weight)
    with pytest.raises(ValueError, match="mis-shaped"):
        load_checkpoint(spsl_xception(), path, strict_head=True)


@pytest.mark.parametrize("name, count", [("efficientnet_b0", 5_288_548), ("efficientnet_b4", 19_341_616)])
def test_efficientnet_sizes_match_the_paper(name, count):
    assert _params(efficientnet(name)) == count


def test_every_detector_scores_rgb_pixels():
    for name in ("xception_tiny", "spsl_tiny", "mat_tiny"):
        model = build_detector(name).eval()
        assert model(torch.rand(2, 3, 48, 48)).shape == (2, 2)
    from vision.forensics import _factories

    assert set(DETECTORS) == set(_factories())
    with pytest.raises(ValueError, match="available"):
        build_detector("resnet50")


# ----------------------------------------------------------------------------- MAT

def test_mat_attention_maps_and_bilinear_pooling_shapes():
    model = mat_tiny(num_attentions=3).eval()
    output = model.forward_all(torch.rand(2, 3, 64, 64))
    channels = model.backbone.stage_channels["b1"]
    assert output.logits.shape == (2, 2)
    assert output.attentions.shape == (2, 3, 4, 4) and bool((output.attentions >= 0).all())
    assert output.region_features.shape == (2, 3, channels)
    assert torch.allclose(output.region_features.norm(dim=-1), torch.ones(2, 3), atol=1e-5)
    paper = MAT("efficientnet_b4")
    assert paper.num_attentions == 4 and paper.texture_layer == "b2" and paper.attention_layer == "b5"


def test_mat_textures_differ_between_images_whatever_the_stages():
    torch.manual_seed(0)
    model = MAT("efficientnet_tiny", texture_layer="b4", attention_layer="b4", head_width=16)  # training mode
    regions = model.forward_all(torch.rand(4, 3, 64, 64)).region_features  # same resolution: no zero residual
    assert float((regions[0] - regions[1]).detach().abs().max()) > 1e-2


def test_bilinear_attention_pooling_weights_the_features_by_each_map():
    features = torch.randn(1, 5, 4, 4)
    attentions = torch.zeros(1, 2, 4, 4)
    attentions[0, 0, 1, 2] = 1.0  # map 0 looks at one position
    attentions[0, 1] = 1.0        # map 1 everywhere
    pooled = attention_pooling(features, attentions, "l2")
    assert torch.allclose(pooled[0, 0], F.normalize(features[0, :, 1, 2], dim=0), atol=1e-6)
    assert torch.allclose(pooled[0, 1], F.normalize(features[0].mean((1, 2)), dim=0), atol=1e-6)
    area = attention_pooling(features, attentions * 3.0, "area")
    assert torch.allclose(area[0, 0], features[0, :, 1, 2], atol=1e-6)


def test_regional_independence_loss_falls_and_separates_the_regions():
    torch.manual_seed(0)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    raw = torch.nn.Parameter(torch.randn(8, 4, 16) * 0.1 + torch.randn(1, 1, 16))  # all maps alike at first
    loss_fn = RegionalIndependenceLoss(4, 16, momentum=0.5)
    optimizer = torch.optim.Adam([raw], lr=0.05)
    losses = []
    for _ in range(150):
        loss = loss_fn(F.normalize(raw, dim=-1), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.2 * losses[0]
    centres = loss_fn.centres
    separation = torch.cdist(centres, centres)[~torch.eye(4, dtype=torch.bool)]
    assert float(separation.min()) > 0.6  # the margin is 0.8: the maps attend to different regions
    features = F.normalize(raw.detach(), dim=-1)
    real_distance = (features[:4] - centres).norm(dim=-1).mean()
    fake_distance = (features[4:] - centres).norm(dim=-1).mean()
    assert fake_distance > real_distance + 0.4


def test_attention_guided_augmentation_degrades_where_the_drawn_map_looks():
    torch.manual_seed(0)
    pixels = torch.rand(400, 3, 32, 32)
    attentions = torch.zeros(400, 2, 8, 8)
    attentions[:, 0, :4, :4] = 5.0  # map 0: the top-left quarter, total 80
    attentions[:, 1, 4:, 4:] = 0.5  # map 1: the bottom-right quarter, total 8
    augmented, chosen = attention_guided_augmentation(pixels, attentions, torch.Generator().manual_seed(1))
    assert augmented.shape == pixels.shape and bool((augmented >= 0).all() and (augmented <= 1).all())
    # drawn with probability proportional to sqrt(total + 1): 9 / (9 + 3) = 0.75 for map 0
    assert 0.68 < float((chosen == 0).float().mean()) < 0.82
    change = (augmented - pixels).abs().mean(1)
    top_left, bottom_right = change[:, :12, :12].mean((1, 2)), change[:, 20:, 20:].mean((1, 2))
    assert bool((top_left[chosen == 0] > 5 * bottom_right[chosen == 0]).all())
    assert bool((bottom_right[chosen == 1] > 5 * top_left[chosen == 1]).all())


def test_mat_training_loss_has_its_three_parts_and_trains():
    torch.manual_seed(0)
    model = mat_tiny()
    regional = make_regional_loss(model)
    pixels, labels = torch.rand(8, 3, 48, 48), torch.tensor([0, 1] * 4)
    pixels[labels == 1, :, ::2, ::2] = 1.0  # an obvious trace
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    first = None
    for _ in range(15):
        loss, parts = detector_loss(model, pixels, labels, regional, generator=torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        first = first if first is not None else parts
    assert set(parts) == {"ce", "regional", "agda_ce"}
    assert parts["ce"] < first["ce"]
    assert make_regional_loss(build_detector("spsl_tiny")) is None


# ----------------------------------------------------------------------------- metrics

def test_metrics_against_hand_computed_values():
    labels, scores = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    assert roc_auc(labels, scores) == pytest.approx(0.75)  # 3 of the 4 (fake, real) pairs ordered
    assert roc_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)  # a tie counts one half
    assert equal_error_rate([0, 0, 1, 1], [0.1, 0.6, 0.4, 0.9]) == pytest.approx(0.5)
    assert equal_error_rate([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == pytest.approx(0.0)
    assert average_precision([1, 0, 1], [0.9, 0.8, 0.7]) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    video_labels, video_means = video_scores(["a", "a", "b", "b", "c"], [0, 0, 1, 1, 1], [0.2, 0.6, 0.3, 0.5, 0.9])
    assert video_labels.tolist() == [0, 1, 1] and video_means.tolist() == pytest.approx([0.4, 0.4, 0.9])
    report = detection_report([0, 0, 1, 1, 1], [0.2, 0.6, 0.3, 0.5, 0.9], ["a", "a", "b", "b", "c"])
    assert report.videos == 3 and report.video_auc == pytest.approx(0.75)  # (0.4 vs 0.4 tie, 0.9 > 0.4)
    assert report.accuracy == pytest.approx(3 / 5)  # 0.2 real, 0.5 and 0.9 fake right; 0.6, 0.3 wrong
    with pytest.raises(ValueError, match="both real and fake"):
        video_scores(["a", "a"], [0, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="both real"):
        roc_auc([1, 1], [0.1, 0.2])


def test_metrics_agree_with_scikit_learn():
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(0)
    for _ in range(20):
        labels = rng.integers(0, 2, 300)
        scores = np.round(rng.random(300) + 0.3 * labels, 2)  # rounding makes ties
        assert roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
        assert average_precision(labels, scores) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


# ----------------------------------------------------------------------------- manifests and data

def test_deepfakebench_json_with_and_without_the_compression_level(tmp_path):
    layout = {"FaceForensics++": {
        "FF-real": {"test": {"c23": {"000": {"label": "FF-real", "frames": ["real/000/0.png", "real/000/1.png"]}},
                             "c40": {"000": {"label": "FF-real", "frames": ["c40/000/0.png"]}}}},
        "FF-DF": {"test": {"c23": {"000_003": {"label": "FF-DF", "frames": ["df/000_003/0.png"]}}},
                  "train": {"c23": {"001_002": {"label": "FF-DF", "frames": ["df/001_002/0.png"]}}}}}}
    path = tmp_path / "FaceForensics++.json"
    path.write_text(json.dumps(layout))
    rows = read_deepfakebench_json(path, split="test", compression="c23")
    assert [(r["label"], r["method"], r["video_id"]) for r in rows] == [
        (0, "real", "FF-real/000"), (0, "real", "FF-real/000"), (1, "FF-DF", "FF-DF/000_003")]
    assert rows[0]["path"] == str(tmp_path / "real/000/0.png")
    with pytest.raises(ValueError, match="c23, c40"):
        read_deepfakebench_json(path, split="test")
    celeb = {"Celeb-DF-v2": {"CelebDFv2_real": {"test": {"id0": {"label": "CelebDFv2_real", "frames": ["a.png"]}}},
                             "CelebDFv2_fake": {"test": {"id0_id1": {"label": "CelebDFv2_fake", "frames": ["b.png"]}}}}}
    other = tmp_path / "Celeb-DF-v2.json"
    other.write_text(json.dumps(celeb))
    assert [r["label"] for r in read_deepfakebench_json(other, split="test")] == [0, 1]
    assert label_of("DFDC_Real") == 0 and label_of("FF-NT") == 1 and label_of(1) == 1
    assert label_of(0.0) == 0 and label_of(np.float64(1.0)) == 1 and label_of(np.False_) == 0 and label_of("0") == 0
    for bad in (None, 2, 0.5, "2", ""):
        with pytest.raises(ValueError, match="labels are 0/1"):
            label_of(bad)


def test_a_parquet_manifest_with_a_bad_label_names_the_row(tmp_path):
    from vision.forensics.manifest import write_parquet_manifest

    rows = [{"path": "a.png", "label": 0, "video_id": "v", "method": "real", "split": "test"},
            {"path": "b.png", "label": 1, "video_id": "w", "method": "x", "split": "test"}]
    write_parquet_manifest(rows, tmp_path / "m.parquet")
    assert [r["label"] for r in read_parquet_manifest(tmp_path / "m.parquet")] == [0, 1]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"path": ["a.png", "b.png"], "label": [0.0, 2.0]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad.parquet, row 1 \(b.png\): label 2.0 is neither 0 nor 1"):
        read_parquet_manifest(tmp_path / "bad.parquet")


def test_generated_dataset_writes_both_manifests_consistently(tmp_path):
    from vision.forensics.synthetic import generate

    written = generate(tmp_path, methods=("transposed", "blend"), videos_per_method=5, frames_per_video=2, size=32)
    rows = written["rows"]
    assert len(rows) == (10 + 5 + 5) * 2
    assert {r["method"] for r in rows} == {"real", "transposed", "blend"}
    parquet = read_parquet_manifest(written["parquet"])
    assert [(r["path"], r["label"], r["video_id"], r["split"]) for r in parquet] == \
        [(r["path"], r["label"], r["video_id"], r["split"]) for r in rows]
    from_json = read_deepfakebench_json(written["json"])
    assert sorted((r["path"], r["label"], r["split"]) for r in from_json) == \
        sorted((r["path"], r["label"], r["split"]) for r in rows)
    for video in {r["video_id"] for r in rows}:  # splits are by video
        assert len({r["split"] for r in rows if r["video_id"] == video}) == 1
    from PIL import Image

    with Image.open(rows[0]["path"]) as image:
        assert image.size == (32, 32)


def test_generated_fakes_carry_their_familys_trace():
    """Transposed-convolution fakes have a period-2 (checkerboard) spectral peak reals lack."""
    from vision.forensics.synthetic import Decoder, photographs, real_video

    rng = np.random.default_rng(0)
    images = photographs()
    reals = torch.cat([torch.from_numpy(real_video(rng, images, 64, 1)) for _ in range(12)])
    fakes = Decoder("transposed", 5)(reals)

    def nyquist_share(frames):
        grey = frames.mean(1)
        spectrum = torch.fft.fft2(grey - grey.mean((1, 2), keepdim=True)).abs()
        return (spectrum[:, 32, :].sum((1,)) + spectrum[:, :, 32].sum((1,))) / spectrum.sum((1, 2))

    assert float(nyquist_share(fakes).mean()) > 2 * float(nyquist_share(reals).mean())


def test_spsl_learns_the_transposed_convolution_trace(tmp_path):
    """Trained in this process with the pipeline's loss and balanced sampler, SPSL separates
    real frames from transposed-convolution fakes of held-out videos (3 seeds gave 0.86-0.94)."""
    from pipelines.forgery import balanced_indices, read_frame
    from vision.forensics.synthetic import generate
    from vision.forensics.training import fake_probability

    rows = generate(tmp_path, methods=("transposed",), videos_per_method=150, frames_per_video=2, size=32)["rows"]

    def load(part):
        pixels = np.stack([read_frame(row["path"], 32)[0] for row in part])
        return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0, torch.tensor([row["label"] for row in part])

    images, labels = load([row for row in rows if row["split"] == "train"])
    test_images, test_labels = load([row for row in rows if row["split"] != "train"])
    torch.manual_seed(0)
    model = build_detector("spsl_tiny")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for epoch in range(6):
        for batch in balanced_indices(labels.tolist(), len(labels) // 32 * 32, 0, epoch).split(32):
            loss, _ = detector_loss(model, images[batch], labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert roc_auc(test_labels.numpy(), fake_probability(model, test_images).numpy()) > 0.75
