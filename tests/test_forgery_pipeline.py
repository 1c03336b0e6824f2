"""The forgery-train (Ray Train, 2 workers) and forgery-eval (Ray Data actor pool) kinds on
generated data, with broken files in the evaluated manifest."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import yaml
from helpers import write_spec
from mlflow.tracking import MlflowClient

from pipelines.errors import SpecError
from pipelines.forgery import GeneratedData, ensure_generated, load_detector, read_frame
from pipelines.runner import run_local
from pipelines.spec import load_spec
from vision.forensics.manifest import read_parquet_manifest, write_parquet_manifest
from vision.forensics.training import fake_probability

SIZE = 32


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("forgery-data"))


def train_spec(tmp_path, data_dir, **overrides):
    spec = {
        "kind": "forgery-train", "name": "spsl-test", "seed": 0,
        "model": {"name": "spsl_tiny"},
        "data": {"source": "generated", "image_size": SIZE,
                 "generated": {"methods": ["transposed", "blend"], "videos_per_method": 60, "frames_per_video": 2,
                               "size": SIZE, "directory": data_dir}},
        "train_methods": ["transposed"], "val_methods": ["transposed"],
        "train": {"epochs": 3, "batch_size": 32, "lr": 0.001},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
        "checkpoint": {"keep": 1, "score": "val/auc"},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"},
        "output_dir": str(tmp_path / "runs"),
    }
    for key, value in overrides.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) and isinstance(spec.get(key), dict) else value
    return write_spec(tmp_path, "train.yaml", yaml.safe_dump(spec))


def test_bad_specs_are_refused_before_ray(tmp_path, data_dir):
    with pytest.raises(SpecError, match="unknown detector 'spsl_tiyn'.*did you mean 'spsl_tiny'"):
        load_spec(train_spec(tmp_path, data_dir, model={"name": "spsl_tiyn"}))
    with pytest.raises(SpecError, match="splits train, val and test, not 'validation'"):
        load_spec(train_spec(tmp_path, data_dir, val_split="validation"))
    with pytest.raises(SpecError, match=r"\['nearest'\] not among data.generated.methods"):
        load_spec(train_spec(tmp_path, data_dir, train_methods=["nearest"]))
    with pytest.raises(SpecError, match="needs data.path"):
        load_spec(train_spec(tmp_path, data_dir, data={"source": "parquet"}))
    with pytest.raises(SpecError, match="must be divisible by scaling.num_workers 2"):
        load_spec(train_spec(tmp_path, data_dir, train={"epochs": 1, "batch_size": 15}))
    evaluation = write_spec(tmp_path, "eval.yaml", yaml.safe_dump({
        "kind": "forgery-eval", "name": "e", "checkpoint": str(tmp_path / "nowhere")}))
    with pytest.raises(SpecError, match="no forgery-train checkpoint at"):
        load_spec(evaluation)


def history(client, run_id, key):
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


@pytest.mark.usefixtures("local_ray")
def test_train_on_two_workers_then_score_a_manifest_with_broken_files(tmp_path, data_dir, workdir):
    outcome = run_local(load_spec(train_spec(tmp_path, data_dir)))
    client = MlflowClient(outcome.tracking_uri)
    assert client.get_run(outcome.run_id).info.status == "FINISHED"
    aucs = history(client, outcome.run_id, "val/auc")
    losses = history(client, outcome.run_id, "train/ce")
    assert len(aucs) == 3 and all(0.0 <= value <= 1.0 for value in aucs)
    assert losses[-1] < losses[0]
    assert max(aucs) > 0.6  # chance is 0.5 (how far SPSL gets with more data: test_forensics)
    videos = history(client, outcome.run_id, "val/video_auc")
    assert len(videos) == 3
    checkpoint = outcome.summary["checkpoint"]
    state = torch.load(f"{checkpoint}/state.pt", weights_only=True)
    assert aucs[state["epoch"] - 1] == max(aucs)  # the best-AUC checkpoint is the one kept

    # a manifest of the test split plus two files that cannot be read
    rows = [row for row in read_parquet_manifest(ensure_generated(GeneratedData(
        methods=["transposed", "blend"], videos_per_method=60, frames_per_video=2, size=SIZE, directory=data_dir)))
        if row["split"] == "test"]
    broken = tmp_path / "broken.png"
    broken.write_text("not a picture")
    extra = [{"path": str(broken), "label": 1, "video_id": "broken_0", "method": "transposed", "split": "test"},
             {"path": str(tmp_path / "missing.png"), "label": 0, "video_id": "missing_0", "method": "real", "split": "test"}]
    manifest = write_parquet_manifest(rows + extra, tmp_path / "test.parquet")
    evaluation = write_spec(tmp_path, "eval.yaml", yaml.safe_dump({
        "kind": "forgery-eval", "name": "spsl-test-eval", "checkpoint": checkpoint,
        "data": {"source": "parquet", "path": str(manifest), "image_size": SIZE},
        "split": "test", "inference": {"actors": 2, "cpus_per_actor": 0.5, "batch_size": 16},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"}, "output_dir": str(tmp_path / "runs")}))
    scored = run_local(load_spec(evaluation))
    metrics = client.get_run(scored.run_id).data.metrics
    assert metrics["eval/errors"] == 2 and metrics["eval/frames"] == len(rows)
    assert metrics["eval/rows"] == len(rows) + 2  # every input row is accounted for
    for key in ("eval/frame_auc", "eval/video_auc", "eval/eer", "eval/ap", "eval/accuracy",
                "eval/transposed/frame_auc", "eval/blend/frame_auc"):
        assert key in metrics and math.isfinite(metrics[key])
    folder = client.download_artifacts(scored.run_id, "evaluation", str(tmp_path / "artifacts"))
    predictions = pd.read_parquet(f"{folder}/predictions.parquet")
    errors = pd.read_parquet(f"{folder}/errors.parquet")
    assert sorted(errors["path"]) == sorted(row["path"] for row in extra)
    assert set(errors["error"].str.split(":").str[0]) == {"not a decodable image", "unreadable"}
    assert len(predictions) == len(rows) and predictions["score"].between(0, 1).all()
    assert (tmp_path / "artifacts" / "evaluation" / "roc.png").stat().st_size > 1000

    # decoding in separate Ray Data tasks gives the same scores as decoding in the actors
    from pipelines.forgery import InferenceSettings, evaluate_rows

    staged = evaluate_rows(rows[:20] + extra, checkpoint, SIZE, InferenceSettings(
        actors=1, cpus_per_actor=0.5, batch_size=8, decode="tasks", decode_cpus=0.25))
    assert len(staged) == 22 and (staged["error"] != "").sum() == 2
    by_path = dict(zip(predictions["path"], predictions["score"]))
    for path, score in zip(staged["path"], staged["score"]):
        if path in by_path:
            assert score == pytest.approx(by_path[path], abs=1e-6)

    # the checkpoint restores the same outputs in this process as on the actors
    model, _ = load_detector(checkpoint)
    first = predictions.head(8)
    pixels = torch.stack([torch.from_numpy(read_frame(path, SIZE)[0]).permute(2, 0, 1) for path in first["path"]])
    expected = fake_probability(model, pixels.float() / 255.0)
    assert torch.allclose(expected.double(), torch.tensor(first["score"].to_numpy()), atol=1e-5)

    # resuming from the checkpoint continues at the next epoch
    resumed = run_local(load_spec(train_spec(tmp_path, data_dir, train={"epochs": state["epoch"] + 1, "batch_size": 32,
                                                                        "lr": 0.001})), restore=checkpoint)
    assert sorted(m.step for m in client.get_metric_history(resumed.run_id, "val/auc")) == [state["epoch"] + 1]


@pytest.mark.usefixtures("local_ray")
def test_mat_trains_on_two_workers(tmp_path, data_dir, workdir):
    outcome = run_local(load_spec(train_spec(tmp_path, data_dir, model={"name": "mat_tiny"}, train={
        "epochs": 1, "batch_size": 16, "lr": 0.001})))
    client = MlflowClient(outcome.tracking_uri)
    metrics = client.get_run(outcome.run_id).data.metrics
    assert math.isfinite(metrics["train/regional"]) and math.isfinite(metrics["train/agda_ce"])
    state = torch.load(f"{outcome.summary['checkpoint']}/state.pt", weights_only=True)
    assert bool(state["regional"]["initialised"]) and float(state["regional"]["centres"].norm()) > 0
    assert state["regional_momentum"] == pytest.approx(0.05 * 0.9)  # decayed once per epoch
