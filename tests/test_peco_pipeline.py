"""The PeCo chain on Ray Train: MoCo v3 -> tokenizer -> MIM -> linear probe and fine-tuning,
each a child MLflow run passing its artifact to the next; then one stage rerun alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from helpers import write_spec
from mlflow.tracking import MlflowClient
from PIL import Image

from pipelines.errors import SpecError
from pipelines.runner import run_local
from pipelines.spec import load_spec

pytestmark = pytest.mark.usefixtures("local_ray")


def chain_spec(tmp_path, folder, **overrides):
    quick = {"epochs": 1, "steps_per_epoch": 3, "batch_size": 8}
    classify_data = {"source": "digits", "image_size": 32, "fit": "resize", "train_subset": 64}
    spec = {
        "kind": "peco", "name": "peco-test", "seed": 0,
        "data": {"source": "folder", "path": str(folder), "image_size": 32, "val_images": 8},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
        "moco": {"model": {"backbone": "vit_nano_patch4_32", "dim": 16, "mlp_dim": 32}, "train": quick},
        "tokenizer": {"model": {"preset": "peco_tiny_32", "vocab_size": 32}, "perceptual": {"weight": 1.0},
                      "gan": {"channels": 8, "layers": 1}, "train": quick},
        "mim": {"model": {"backbone": "vit_nano_patch4_32"}, "masking": {"min_num_patches": 4}, "train": quick},
        "linear_probe": {"model": {"name": "vit_nano_patch4_32", "num_classes": 10}, "data": classify_data,
                         "train": {"epochs": 1, "batch_size": 16, "lr": 0.01}},
        "finetune": {"model": {"name": "vit_nano_patch4_32", "num_classes": 10}, "data": classify_data,
                     "train": {"epochs": 1, "batch_size": 16}},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"}, "output_dir": str(tmp_path / "runs"),
        **overrides,
    }
    return write_spec(tmp_path, "peco.yaml", yaml.safe_dump(spec))


@pytest.fixture
def folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(4):
        smooth = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((90, 70), Image.BILINEAR)
        smooth.save(folder / f"{index}.png")
    (folder / "broken.png").write_text("not an image")
    return folder


def test_bad_chains_are_refused_before_ray(tmp_path, folder):
    with pytest.raises(SpecError, match="stages run in the order moco, tokenizer, mim"):
        load_spec(chain_spec(tmp_path, folder, stages=["mim", "tokenizer"]))
    with pytest.raises(SpecError, match="stage tokenizer is not a valid peco-tokenizer spec: tokenizer.model.preset"):
        load_spec(chain_spec(tmp_path, folder, tokenizer={"model": {"preset": "dall_e"}, "train": {"epochs": 1}}))
    with pytest.raises(SpecError, match="tokenizer_model: stage mim needs the tokenizer stage's output: run tokenizer "
                                        "too, or set tokenizer_model"):
        load_spec(chain_spec(tmp_path, folder, stages=["mim", "linear_probe"]))
    with pytest.raises(SpecError, match="tokenizer_model: no such file"):
        load_spec(chain_spec(tmp_path, folder, stages=["mim"], tokenizer_model=str(tmp_path / "none.pt")))
    # an explicit null in a stage body still takes the upstream stage's output
    probe = {"model": {"name": "vit_nano_patch4_32", "num_classes": 10, "pretrained": None},
             "data": {"source": "digits"}, "train": {"epochs": 1}}
    chain = load_spec(chain_spec(tmp_path, folder, linear_probe=probe)).spec
    assert chain.stage_spec("linear_probe", {"mim": "runs:/abc/model/backbone.pt"}).model.pretrained == \
        "runs:/abc/model/backbone.pt"
    with pytest.raises(SpecError, match="mim.tokenizer is set, but the tokenizer stage runs in this chain"):
        load_spec(chain_spec(tmp_path, folder, mim={"tokenizer": "runs:/abc/model/tokenizer.pt", "train": {"epochs": 1}}))
    with pytest.raises(SpecError, match="'val/loss' cannot rank checkpoints.*higher is better: epoch, val/accuracy"):
        load_spec(chain_spec(tmp_path, folder, mim={"checkpoint": {"score": "val/loss"}, "train": {"epochs": 1}}))


def test_four_stage_chain_on_two_workers_then_a_stage_alone(tmp_path, folder):
    outcome = run_local(load_spec(chain_spec(tmp_path, folder)))
    client = MlflowClient(outcome.tracking_uri)
    children = client.search_runs([outcome.experiment_id], f"tags.`mlflow.parentRunId` = '{outcome.run_id}'")
    by_stage = {run.data.tags["raysmith.peco.stage"]: run for run in children}
    assert set(by_stage) == {"moco", "tokenizer", "mim", "linear_probe", "finetune"}
    assert all(run.info.status == "FINISHED" for run in children)
    # each stage read its predecessor's artifact through MLflow
    tokenizer_run, mim_run = by_stage["tokenizer"].info.run_id, by_stage["mim"].info.run_id
    assert by_stage["tokenizer"].data.params["perceptual.model"] == f"runs:/{by_stage['moco'].info.run_id}/model/backbone.pt"
    assert by_stage["mim"].data.params["tokenizer"] == f"runs:/{tokenizer_run}/model/tokenizer.pt"
    assert by_stage["linear_probe"].data.params["model.pretrained"] == f"runs:/{mim_run}/model/backbone.pt"
    assert by_stage["linear_probe"].data.params["model.linear_probe"] == "True"
    artifacts = {item.path for item in client.list_artifacts(tokenizer_run, "model")}
    assert artifacts == {"model/tokenizer.pt"}
    assert {item.path for item in client.list_artifacts(tokenizer_run, "images")} == {"images/reconstructions.png"}
    tokenizer_metrics = by_stage["tokenizer"].data.metrics
    assert tokenizer_metrics["codebook/used_codes"] >= 1 and tokenizer_metrics["val/perceptual"] > 0
    assert tokenizer_metrics["data/corrupt_images"] >= 1  # the broken file was drawn, counted, and replaced
    assert 0.0 <= by_stage["mim"].data.metrics["val/accuracy"] <= 1.0
    assert 0.3 <= by_stage["mim"].data.metrics["train/masked_fraction"] <= 0.41
    assert {"linear_probe/val/accuracy", "finetune/val/accuracy"} <= set(outcome.summary)
    # the MIM stage alone, from the tokenizer run's artifact, resumed from the chain's MIM
    # checkpoint (epoch 1) for a second epoch: any stage can be rerun, and resumes
    chain = load_spec(chain_spec(tmp_path, folder)).spec
    mim_spec = chain.stage_spec("mim", {"tokenizer": f"runs:/{tokenizer_run}/model/tokenizer.pt"}).model_dump(mode="json")
    mim_spec["train"]["epochs"] = 2
    mim_file = write_spec(tmp_path, "mim.yaml", yaml.safe_dump(mim_spec))
    assert by_stage["mim"].data.tags["raysmith.latest_checkpoint"] == by_stage["mim"].data.tags["raysmith.checkpoint"]
    again = run_local(load_spec(mim_file), restore=by_stage["mim"].data.tags["raysmith.latest_checkpoint"])
    [epoch] = client.get_metric_history(again.run_id, "epoch")
    assert epoch.value == 2 and epoch.step == 2  # epoch 1 came from the checkpoint
    [step] = client.get_metric_history(again.run_id, "step")
    assert step.value == 6  # 3 steps per epoch, counted on from the checkpoint's 3
    backbone = client.download_artifacts(again.run_id, "model/backbone.pt", str(tmp_path))
    state = torch.load(backbone, weights_only=True)
    assert state["factory"] == "vit_nano_patch4_32" and "mask_token" in state["backbone"]
