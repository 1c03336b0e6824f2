"""The watermark-eval kind: a Ray Data grid over methods x attacks x strengths, with a broken file."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from helpers import write_spec
from mlflow.tracking import MlflowClient
from PIL import Image

from pipelines.errors import SpecError
from pipelines.runner import run_local
from pipelines.spec import load_spec
from vision.watermark.mbrs import mbrs_tiny
from vision.watermark.methods import save_mbrs


def grid_spec(tmp_path, checkpoint, folder, **overrides):
    spec = {
        "kind": "watermark-eval", "name": "grid-test", "size": 32,
        "methods": [{"name": "mbrs", "checkpoint": str(checkpoint)}, {"name": "dwtDct", "message_length": 32}],
        "attacks": [{"name": "identity"}, {"name": "jpeg420", "strengths": [30, 90]},
                    {"name": "jpeg", "strengths": [50], "chain": [["crop_resize", 0.75]]}],
        "data": {"source": "folder", "path": str(folder)},
        "inference": {"actors": 2, "cpus_per_actor": 0.5, "batch_size": 2},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"}, "output_dir": str(tmp_path / "runs"),
        **overrides,
    }
    return write_spec(tmp_path, "grid.yaml", yaml.safe_dump(spec))


@pytest.fixture
def inputs(tmp_path):
    torch.manual_seed(0)
    checkpoint = save_mbrs(mbrs_tiny(), tmp_path / "mbrs.pt")
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(3):
        Image.fromarray(rng.integers(0, 256, (300, 280, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    (folder / "broken.png").write_text("not an image")
    return checkpoint, folder


def test_bad_grid_specs_are_refused_before_ray(tmp_path, inputs):
    checkpoint, folder = inputs
    with pytest.raises(SpecError, match="unknown attack 'jepg'.*did you mean 'jpeg'"):
        load_spec(grid_spec(tmp_path, checkpoint, folder, attacks=[{"name": "jepg", "strengths": [50]}]))
    with pytest.raises(SpecError, match="needs a checkpoint"):
        load_spec(grid_spec(tmp_path, checkpoint, folder, methods=[{"name": "mbrs"}]))
    with pytest.raises(SpecError, match="jpeg at strength 0: JPEG quality must be in 1..100"):
        load_spec(grid_spec(tmp_path, checkpoint, folder, attacks=[{"name": "jpeg"}]))
    with pytest.raises(SpecError, match=r"methods \['mbrs'\] appear twice"):
        load_spec(grid_spec(tmp_path, checkpoint, folder, methods=[{"name": "mbrs", "checkpoint": str(checkpoint)}] * 2))
    with pytest.raises(SpecError, match=r"label 'mbrs@0.5' may only hold letters, digits and _ \. : -"):
        load_spec(grid_spec(tmp_path, checkpoint, folder, methods=[{"name": "mbrs", "checkpoint": str(checkpoint),
                                                                    "strength": 0.5, "label": "mbrs@0.5"}]))
    with pytest.raises(SpecError, match="no built-in MBRS weights 'mbrs_huge'; available: builtin:mbrs_tiny"):
        load_spec(grid_spec(tmp_path, checkpoint, folder, methods=[{"name": "mbrs", "checkpoint": "builtin:mbrs_huge"}]))
    with pytest.raises(SpecError, match="RivaGAN carries exactly 32 bits"):
        load_spec(grid_spec(tmp_path, checkpoint, folder, methods=[{"name": "rivaGan", "message_length": 64}]))


@pytest.mark.usefixtures("local_ray")
def test_the_grid_runs_on_an_actor_pool_and_accounts_for_every_image(tmp_path, inputs, workdir):
    checkpoint, folder = inputs
    outcome = run_local(load_spec(grid_spec(tmp_path, checkpoint, folder)))
    client = MlflowClient(outcome.tracking_uri)
    metrics = client.get_run(outcome.run_id).data.metrics
    assert metrics["grid/errors"] == 1 and metrics["grid/images"] == 3
    assert metrics["grid/rows"] == 3 * 2 * 4  # images x methods x (identity + 2 JPEG + 1 chain)
    assert metrics["ber/dwtDct/identity_0"] <= 0.05  # the peer reads its clean mark back
    assert math.isfinite(metrics["psnr/mbrs"]) and math.isfinite(metrics["ssim/dwtDct"])
    assert "ber/mbrs/crop_resize0.75_then_jpeg_50" in metrics
    folder_out = client.download_artifacts(outcome.run_id, "results", str(tmp_path / "artifacts"))
    grid = pd.read_parquet(f"{folder_out}/grid.parquet")
    assert set(grid["size"]) == {32.0, 256.0}  # MBRS at its size, invisible-watermark at its minimum
    errors = pd.read_parquet(f"{folder_out}/errors.parquet")
    assert list(errors["path"]) == [str(folder / "broken.png")]
    summary = pd.read_csv(f"{folder_out}/summary.csv")
    assert len(summary) == 2 * 4 and (summary["images"] == 3).all()
    assert client.list_artifacts(outcome.run_id, "plots")  # BER against JPEG quality


@pytest.mark.usefixtures("local_ray")
def test_mbrs_trains_on_two_workers_and_its_checkpoint_is_an_evaluation_method(tmp_path, workdir):
    from vision.watermark.methods import build_method

    spec = write_spec(tmp_path, "train.yaml", yaml.safe_dump({
        "kind": "watermark-train", "name": "mbrs-test", "seed": 0, "model": {"preset": "mbrs_tiny"},
        "noise": ["identity"], "data": {"source": "photos", "val_images": 32},
        "train": {"epochs": 2, "steps_per_epoch": 40, "batch_size": 32, "val_noise": {"crop": {"fraction": 0.5}}},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"}, "output_dir": str(tmp_path / "runs")}))
    for field, value, message in (("val_noise", ["identity", "crop"], "one noise layer"),
                                  ("val_noise", {"crop": {"share": 0.5}}, "share"),
                                  ("val_noise", "sharpen", "unknown noise layer 'sharpen'"),
                                  ("val_noise", {"crop": {"fraction": 2}}, r"kept area fraction must be in \(0, 1\], got 2"),
                                  ("noise", ["identity", {"resize": {"scale": 0}}], "resize")):
        bad = yaml.safe_load(spec.read_text())
        (bad["train"] if field == "val_noise" else bad)[field] = value
        with pytest.raises(SpecError, match=message):
            load_spec(write_spec(tmp_path, "bad.yaml", yaml.safe_dump(bad)))
    outcome = run_local(load_spec(spec))
    client = MlflowClient(outcome.tracking_uri)
    ber = [m.value for m in sorted(client.get_metric_history(outcome.run_id, "val/ber"), key=lambda m: m.step)]
    assert len(ber) == 2 and ber[-1] < 0.1  # chance is 0.5
    metrics = client.get_run(outcome.run_id).data.metrics
    assert "val/ber_jpeg50" in metrics
    # with val_noise, checkpoints rank by the bits read through it (32 images x 16 bits), then PSNR
    assert metrics["val/rank"] == pytest.approx(round(metrics["val/bit_accuracy_noise"] * 32 * 16)
                                                + min(metrics["val/psnr"], 99.0) / 100)
    method = build_method("mbrs", checkpoint=outcome.summary["method_checkpoint"])
    from vision.forensics.synthetic import photographs, real_video

    image = (real_video(np.random.default_rng(5), photographs(), 32, 1)[0].transpose(1, 2, 0) * 255).astype(np.uint8)
    bits = np.random.default_rng(6).integers(0, 2, 16)
    assert np.mean(method.extract(method.embed(image, bits)) == bits) >= 0.8
