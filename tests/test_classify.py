"""The classify pipeline: its data and recipe pieces, and 2-worker Ray Train runs (DDP,
MLflow from rank 0, resuming after a killed worker)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import CONFIGS, command_line, descendants, write_spec
from mlflow.tracking import MlflowClient

from pipelines.errors import RunFailed, SpecError
from pipelines.runner import run_local
from pipelines.spec import load_spec
from vision.data import fit_size, load_builtin, mix, random_crop
from vision.training import ModelEMA, learning_rate, parameter_groups, soft_cross_entropy, soft_targets

# ---------------------------------------------------------------- parts, without Ray


def test_builtin_mnist_split_is_stratified_disjoint_and_seeded():
    (train_x, train_y), (test_x, test_y) = load_builtin("mnist", test_fraction=0.2, seed=0, image_size=32)
    assert train_x.shape == (4000, 1, 32, 32) and test_x.shape == (1000, 1, 32, 32)
    assert torch.bincount(test_y).tolist() == [100] * 10
    assert 0.0 <= float(train_x.min()) and float(train_x.max()) <= 1.0
    assert train_x[:, :, :2].abs().sum() == 0  # 28 x 28 padded to 32 with zeros
    rows = {tuple(image.flatten().tolist()) for image in test_x[:50]}
    assert not rows & {tuple(image.flatten().tolist()) for image in train_x}
    (again, _), _ = load_builtin("mnist", test_fraction=0.2, seed=0, image_size=32)
    assert torch.equal(again, train_x)
    (digits, _), _ = load_builtin("digits", image_size=16, fit="resize")
    assert digits.shape[1:] == (1, 16, 16) and digits[:, :, :2].abs().sum() > 0
    with pytest.raises(ValueError, match="available: mnist, digits"):
        load_builtin("imagenet")


def test_random_crop_translates_each_image_within_the_padding():
    images = torch.zeros(64, 1, 8, 8)
    images[:, :, 3, 4] = 1.0
    shifted = random_crop(images, padding=2, generator=torch.Generator().manual_seed(0))
    positions = shifted[:, 0].flatten(1).argmax(1)
    rows, cols = positions // 8, positions % 8
    assert shifted.sum(dim=(1, 2, 3)).eq(1).all()  # nothing lost: the pixel stays inside
    assert (rows - 3).abs().max() <= 2 and (cols - 4).abs().max() <= 2
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 10
    assert fit_size(torch.ones(1, 1, 40, 40), 32).shape == (1, 1, 32, 32)


def test_mixup_and_cutmix_targets_stay_distributions():
    torch.manual_seed(0)
    images, labels = torch.rand(8, 1, 16, 16), torch.randint(0, 10, (8,))
    targets = soft_targets(labels, 10, smoothing=0.1)
    assert torch.allclose(targets.sum(1), torch.ones(8)) and targets.max() == pytest.approx(0.91)
    for mixup, cutmix in ((0.8, 0.0), (0.0, 1.0)):
        mixed, mixed_targets = mix(images, targets, mixup, cutmix, torch.Generator().manual_seed(1))
        assert torch.allclose(mixed_targets.sum(1), torch.ones(8))
        if cutmix:  # a box pasted from the reversed batch: the kept share of pixels is lambda
            lam = (mixed[0] == images[0]).float().mean()
            assert 0.0 < lam < 1.0
        else:  # a blend with the reversed batch, in the same proportion as the targets
            lam = ((mixed[0] - images[7]) * (images[0] - images[7])).sum() / (images[0] - images[7]).pow(2).sum()
        torch.testing.assert_close(mixed_targets[0], lam * targets[0] + (1 - lam) * targets[7], atol=1e-5, rtol=0)


def test_recipe_pieces():
    # warm-up from 0 to the base rate, cosine down to min_lr at the end
    assert learning_rate(0, 100, 10, 1.0, 0.0) == pytest.approx(0.1)
    assert learning_rate(9, 100, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert learning_rate(55, 100, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert learning_rate(100, 100, 10, 1.0, 0.01) == pytest.approx(0.01)
    logits, labels = torch.randn(16, 10), torch.randint(0, 10, (16,))
    torch.testing.assert_close(soft_cross_entropy(logits, soft_targets(labels, 10, 0.1)),
                               F.cross_entropy(logits, labels, label_smoothing=0.1))
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decayed, plain = parameter_groups(model, 0.05)
    assert [p.shape for p in decayed["params"]] == [(4, 4)] and len(plain["params"]) == 3
    ema = ModelEMA(model, decay=0.9)
    before = ema.module[0].weight.clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.module[0].weight, before + 0.1)


def nano_mnist(tmp_path, **overrides):
    spec = {
        "kind": "classify", "name": "nano-mnist", "seed": 0,
        "model": {"name": "cswin_nano_32", "num_classes": 10, "in_chans": 1},
        "data": {"source": "mnist", "image_size": 32, "random_crop_padding": 2, "train_subset": 1024},
        "train": {"epochs": 3, "batch_size": 64, "lr": 0.002, "warmup_epochs": 0.5, "ema_decay": 0.9},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
        "checkpoint": {"keep": 2},
        "output_dir": str(tmp_path / "runs"),
    }
    for section, values in overrides.items():
        spec[section] = {**spec[section], **values} if isinstance(values, dict) else values
    return write_spec(tmp_path, "nano.yaml", yaml.safe_dump(spec))


def test_bad_specs_are_refused_before_ray(tmp_path):
    with pytest.raises(SpecError, match="divisible by scaling.num_workers"):
        load_spec(nano_mnist(tmp_path, train={"batch_size": 63}))
    with pytest.raises(SpecError, match="did you mean 'cswin_nano_32'"):
        load_spec(nano_mnist(tmp_path, model={"name": "cswin_nano32"}))
    with pytest.raises(SpecError, match="'val/acc' is not reported.*val/accuracy"):
        load_spec(nano_mnist(tmp_path, checkpoint={"score": "val/acc"}))
    with pytest.raises(SpecError, match="only with train.ema_decay"):
        load_spec(nano_mnist(tmp_path, checkpoint={"score": "val/accuracy_ema"}, train={"ema_decay": None}))
    with pytest.raises(SpecError, match="needs data.path and data.val_path"):
        load_spec(nano_mnist(tmp_path, data={"source": "folder"}))
    with pytest.raises(SpecError, match="unknown RandAugment setting 'x4'.*allowed: m<magnitude>"):
        load_spec(nano_mnist(tmp_path, data={"rand_augment": "rand-m9-x4"}))
    with pytest.raises(SpecError, match="data.mean and data.std go together"):
        load_spec(nano_mnist(tmp_path, data={"mean": [0.5]}))
    with pytest.raises(SpecError, match="data.mean has 3 values but model.in_chans is 1"):
        load_spec(nano_mnist(tmp_path, data={"mean": [0.5] * 3, "std": [0.2] * 3}))
    with pytest.raises(SpecError, match=r"data.crop_scale must be \(low, high\)"):
        load_spec(nano_mnist(tmp_path, data={"crop_scale": [0.5, 0.2]}))
    with pytest.raises(SpecError, match="photos is RGB: model.in_chans must be 3"):
        load_spec(nano_mnist(tmp_path, data={"source": "photos"}))


# ---------------------------------------------------------------- Ray Train runs


@pytest.fixture(scope="module")
def ray_for_train():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    yield ray
    ray.shutdown()


def epochs_logged(client, run_id):
    return sorted(m.step for m in client.get_metric_history(run_id, "val/accuracy"))


@pytest.mark.usefixtures("ray_for_train")
def test_two_workers_train_and_rank_zero_reports_to_mlflow(tmp_path, workdir):
    outcome = run_local(load_spec(nano_mnist(tmp_path)))
    client = MlflowClient(outcome.tracking_uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert epochs_logged(client, outcome.run_id) == [1, 2, 3]  # once per epoch: rank 0's report only
    accuracy = [m.value for m in sorted(client.get_metric_history(outcome.run_id, "val/accuracy"), key=lambda m: m.step)]
    assert accuracy[-1] > 0.6  # 10 classes: chance is 0.1
    losses = [m.value for m in sorted(client.get_metric_history(outcome.run_id, "train/loss"), key=lambda m: m.step)]
    assert losses[-1] < losses[0]
    history = client.get_metric_history(outcome.run_id, "data/test_images")
    assert history[-1].value == 1000  # both workers' test parts summed: the whole held-out set
    checkpoint = outcome.summary["checkpoint"]  # the best kept one by val/accuracy
    state = torch.load(os.path.join(checkpoint, "state.pt"), weights_only=True)
    assert accuracy[state["epoch"] - 1] == max(accuracy) and state["ema"] is not None


def train_worker_pids():
    """This test process's Ray Train worker processes (Ray runs them below the raylet it started)."""
    return [pid for pid in descendants(os.getpid()) if "RayTrainWorker" in command_line(pid)]


@pytest.mark.usefixtures("ray_for_train")
def test_a_killed_worker_is_replaced_and_training_resumes_from_the_checkpoint(tmp_path, workdir):
    spec_path = nano_mnist(tmp_path, train={"epochs": 6}, max_failures=2)
    storage = tmp_path / "runs"
    outcome: dict = {}

    def run():
        outcome["result"] = run_local(load_spec(spec_path))

    thread = threading.Thread(target=run)
    thread.start()
    killed = None
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and thread.is_alive():
        checkpoints = list(storage.rglob("state.pt"))
        pids = train_worker_pids()
        if checkpoints and len(pids) == 2:
            killed = pids[1]
            os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.5)
    thread.join(timeout=600)
    assert killed is not None, "no checkpoint and two workers seen to kill one"
    result = outcome["result"]
    client = MlflowClient(result.tracking_uri)
    assert client.get_run(result.run_id).info.status == "FINISHED"
    epochs = epochs_logged(client, result.run_id)
    # resumed from the checkpoint: every epoch reported, none trained twice from scratch
    assert epochs[-1] == 6 and epochs.count(1) == 1
    assert set(range(1, 7)) <= set(epochs)
    assert killed not in train_worker_pids()


def image_folder(root, per_class: int, corrupt: int, offset: int = 0):
    """An ImageNet-style folder of PNGs made from MNIST digits, with ``corrupt`` broken files."""
    from PIL import Image

    (images, labels), _ = load_builtin("mnist", test_fraction=0.2, seed=1)
    for digit in range(10):
        (root / f"class_{digit}").mkdir(parents=True)
        picks = (labels == digit).nonzero().flatten()[offset : offset + per_class]
        for number, index in enumerate(picks.tolist()):
            pixels = (images[index, 0] * 255).round().to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / f"class_{digit}" / f"{number}.png")
    for number in range(corrupt):
        (root / f"class_{number % 10}" / f"broken_{number}.png").write_bytes(b"\x89PNG not really" + bytes(number))
    return root


def test_the_decoder_counts_what_it_cannot_use():
    import io

    import numpy as np
    from PIL import Image

    from pipelines.classify import ImageDecoder

    buffer = io.BytesIO()
    Image.fromarray(np.full((10, 20, 3), 200, np.uint8)).save(buffer, format="PNG")
    good = buffer.getvalue()
    manifest = {"image": [good, b"garbage", good, good], "label": np.array([3, 1, 12, 0])}
    out = ImageDecoder(8, 1, [], num_classes=10, labels_from_folders=False)(manifest)
    assert out["image"].shape == (4, 8, 8, 1) and out["image"][0].min() > 150
    assert out["valid"].tolist() == [True, False, False, True]  # undecodable; label 12 of 10 classes
    named = ImageDecoder(8, 3, ["cat", "dog"], num_classes=2, labels_from_folders=False)(
        {"image": [good, good], "label": np.array(["dog", "cow"], dtype=object)})
    assert named["label"][0] == 1 and named["valid"].tolist() == [True, False]


@pytest.mark.usefixtures("ray_for_train")
def test_a_folder_with_corrupt_images_streams_through_ray_data(tmp_path, workdir):
    train = image_folder(tmp_path / "train", per_class=30, corrupt=3)
    val = image_folder(tmp_path / "val", per_class=10, corrupt=1, offset=30)
    data = {"source": "folder", "path": str(train), "val_path": str(val), "train_subset": None}
    # the workers must leave Ray Data a CPU: refused with the reason otherwise
    with pytest.raises(RunFailed, match="need at least one CPU beside the workers' 2"):
        run_local(load_spec(nano_mnist(tmp_path, data=data, train={"epochs": 2})))
    spec_path = nano_mnist(tmp_path, data=data, train={"epochs": 2},
                           scaling={"cpus_per_worker": 0.5, "torch_threads": 1})
    outcome = run_local(load_spec(spec_path))
    client = MlflowClient(outcome.tracking_uri)
    assert client.get_run(outcome.run_id).info.status == "FINISHED"
    assert epochs_logged(client, outcome.run_id) == [1, 2]

    def last(key):
        return sorted(client.get_metric_history(outcome.run_id, key), key=lambda m: m.step)[-1].value

    assert last("data/train_images") == 303 and last("data/test_images") == 101
    # every broken file the workers met is counted (the train count: those in full batches)
    assert 1 <= last("data/corrupt_images") <= 4
    assert last("val/accuracy") >= 0.0 and last("train/loss") > 0


@pytest.mark.usefixtures("ray_for_train")
def test_the_imagenet_augmentations_train_on_rgb_photo_crops(tmp_path, workdir):
    """Random-resized crops, flips, RandAugment, normalisation, random erasing, mixup/cutmix
    and label smoothing together, on two workers: a 6-class problem learnt above chance."""
    with open(CONFIGS / "cswin_nano_photos.yaml") as handle:
        recipe = yaml.safe_load(handle)
    recipe.update(train={**recipe["train"], "epochs": 4}, output_dir=str(tmp_path / "runs"))
    outcome = run_local(load_spec(write_spec(tmp_path, "photos.yaml", yaml.safe_dump(recipe))))
    client = MlflowClient(outcome.tracking_uri)
    assert client.get_run(outcome.run_id).info.status == "FINISHED"
    accuracy = [m.value for m in client.get_metric_history(outcome.run_id, "val/accuracy")]
    assert len(accuracy) == 4 and max(accuracy) > 0.3  # chance: 1/6
    assert client.get_metric_history(outcome.run_id, "data/test_images")[-1].value == 300
