"""The rl pipeline on a real Ray and a real MLflow store: what a run records and resumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import tiny_ppo, write_spec
from mlflow.tracking import MlflowClient

from pipelines.errors import RunFailed
from pipelines.runner import run_local
from pipelines.spec import load_spec

pytestmark = pytest.mark.usefixtures("local_ray")


def history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))]


def artifacts(client, run_id, path=""):
    found = []
    for item in client.list_artifacts(run_id, path):
        found += artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return found


def greedy_logits(checkpoint_dir, observations):
    from ray.rllib.core.rl_module.rl_module import RLModule

    module = RLModule.from_checkpoint(f"{checkpoint_dir}/learner_group/learner/rl_module/default_policy")
    with torch.no_grad():
        return module.forward_inference({"obs": torch.as_tensor(observations, dtype=torch.float32)})["action_dist_inputs"].numpy()


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One tiny PPO run shared by the tests that read what it recorded."""
    directory = tmp_path_factory.mktemp("first_run")
    spec_path = write_spec(directory, "tiny.yaml", tiny_ppo(env_steps=1500))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(directory)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        loaded = load_spec(spec_path)
        outcome = run_local(loaded)
    return directory, loaded, outcome


def test_run_records_params_tags_metrics_and_artifacts(first_run):
    directory, loaded, outcome = first_run
    assert outcome.tracking_uri == f"sqlite:///{directory / 'mlflow.db'}"
    client = MlflowClient(outcome.tracking_uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "tiny"
    params = run.data.params
    assert params["algorithm"] == "PPO" and params["env"] == "CartPole-v1"
    assert float(params["training.lr"]) == pytest.approx(0.001)
    tags = run.data.tags
    assert tags["raysmith.kind"] == "rl"
    assert tags["raysmith.spec_hash"] == loaded.spec_hash()
    assert tags["raysmith.ray_version"].startswith("2.")
    assert tags["mlflow.source.name"].endswith("tiny.yaml")

    # evaluation at env step 0, at the 1000-step mark, and a final one at the budget
    assert [step for step, _ in history(client, outcome.run_id, "evaluation/return_mean")] == [0, 1000, 1500]
    assert [step for step, _ in history(client, outcome.run_id, "env_steps")] == [0, 500, 1000, 1500]
    assert history(client, outcome.run_id, "train/return_mean")
    assert np.isfinite(history(client, outcome.run_id, "learner/total_loss")[-1][1])
    assert outcome.summary["env_steps"] == 1500 and outcome.summary["iterations"] == 3

    files = artifacts(client, outcome.run_id)
    assert {"learning_curve.png", "spec/resolved.yaml", "spec/tiny.yaml", "summary.txt",
            "checkpoint/rllib_checkpoint.json"} <= set(files)
    png = client.download_artifacts(outcome.run_id, "learning_curve.png", str(directory))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_local_checkpoints_are_pruned_to_keep(first_run):
    directory, loaded, outcome = first_run
    kept = sorted((directory / "raysmith_runs" / "tiny" / outcome.run_id / "checkpoints").iterdir())
    # every 2 iterations plus the end: iterations 2 and 3, both kept (keep: 2)
    assert [p.name for p in kept] == ["checkpoint_000001", "checkpoint_000002"]
    assert outcome.checkpoint == str(kept[-1])


def test_mlflow_checkpoint_is_the_final_policy(first_run, tmp_path):
    directory, loaded, outcome = first_run
    client = MlflowClient(outcome.tracking_uri)
    downloaded = client.download_artifacts(outcome.run_id, "checkpoint", str(tmp_path))
    observations = np.random.default_rng(0).normal(size=(16, 4))
    assert np.array_equal(greedy_logits(downloaded, observations), greedy_logits(outcome.checkpoint, observations))


def test_restore_continues_from_the_checkpoint(first_run):
    directory, loaded, outcome = first_run
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(directory)
        resumed = run_local(load_spec(loaded.source, ["stop.env_steps=2500"]), restore=outcome.checkpoint)
    client = MlflowClient(resumed.tracking_uri)
    steps = [step for step, _ in history(client, resumed.run_id, "env_steps")]
    assert steps == [2000, 2500]  # no fresh start at 0: counters come from the checkpoint
    assert [step for step, _ in history(client, resumed.run_id, "iteration")] == [2000, 2500]
    assert history(client, resumed.run_id, "iteration")[-1][1] == 5


def test_restoring_a_finished_run_trains_no_further(first_run):
    directory, loaded, outcome = first_run
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(directory)
        again = run_local(load_spec(loaded.source), restore=outcome.checkpoint)
    assert again.summary["iterations"] == 3 and again.summary["env_steps"] == 1500
    assert again.summary["stop_reason"] == "env_steps 1500 >= 1500"
    client = MlflowClient(again.tracking_uri)
    assert [step for step, _ in history(client, again.run_id, "evaluation/return_mean")] == [1500]


def test_target_return_stops_early(workdir):
    text = tiny_ppo(env_steps=20_000).replace("every_env_steps: 1000", "every_env_steps: 500")
    text = text.replace("  env_steps: 20000", "  env_steps: 20000\n  target_return: 5")
    outcome = run_local(load_spec(write_spec(workdir, "target.yaml", text)))
    assert outcome.summary["stop_reason"].startswith("evaluation/return_mean")
    assert outcome.summary["env_steps"] == 500


def test_training_return_drives_stop_without_evaluation(workdir):
    text = tiny_ppo(env_steps=20_000).replace("  env_steps: 20000", "  env_steps: 20000\n  target_return: 5")
    spec = load_spec(write_spec(workdir, "noeval.yaml", text), ["evaluation.enabled=false"])
    outcome = run_local(spec)
    client = MlflowClient(outcome.tracking_uri)
    assert outcome.summary["stop_reason"].startswith("train/return_mean")
    assert "evaluation/return_mean" not in client.get_run(outcome.run_id).data.metrics


def test_failed_run_is_marked_failed_with_its_traceback(workdir):
    # passes validation (nothing is built before Ray), fails when the RLModule is built
    spec = load_spec(write_spec(workdir, "bad.yaml", tiny_ppo()), ["model.fcnet_hiddens=[-3]"])
    with pytest.raises(RunFailed, match="negative dimension"):
        run_local(spec)
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.info.status == "FAILED"
    assert "negative dimension" in run.data.tags["raysmith.error"]
    traceback_file = client.download_artifacts(run.info.run_id, "error/traceback.txt", str(workdir))
    assert "Traceback" in open(traceback_file).read()


def test_runs_command_lists_recorded_runs(first_run):
    from typer.testing import CliRunner

    from pipelines.cli import app

    directory, loaded, outcome = first_run
    uri = outcome.tracking_uri
    result = CliRunner().invoke(app, ["runs", "--tracking-uri", uri, "--experiment", "tiny"])
    assert result.exit_code == 0, result.output
    assert outcome.run_id in result.output and "evaluation/return_mean" in result.output
    missing = CliRunner().invoke(app, ["runs", "--tracking-uri", uri, "--experiment", "nope"])
    assert missing.exit_code == 2 and "no MLflow experiment 'nope'" in missing.output


def test_restore_applies_the_configured_learning_rate_before_any_update(first_run):
    from pipelines.rl import build_algorithm_config, restore_with_configured_learning_rates

    directory, loaded, outcome = first_run
    perturbed = load_spec(loaded.source, ["training.lr=0.0002"]).spec
    algo = build_algorithm_config(perturbed).build_algo()
    try:
        restore_with_configured_learning_rates(algo, outcome.checkpoint)
        [rates] = [r.get() for r in algo.learner_group.foreach_learner(
            lambda learner: [g["lr"] for o in learner._named_optimizers.values() for g in o.param_groups])]
        assert rates == [pytest.approx(0.0002)]  # the checkpoint was trained with 0.001
    finally:
        algo.stop()


TINY_RUD = """\
kind: rl
name: tiny-rud
algorithm: {algorithm}
env: Pendulum-v1
training:
  update_interval: {interval}
  learning_starts: 200
  train_batch_size_per_learner: 32
model:
  actor_hidden: [32, 32]
  critic_hidden: [32, 32]
stop:
  env_steps: 600
evaluation:
  every_env_steps: 300
  episodes: 2
  num_env_runners: {eval_runners}
checkpoint:
  every_iterations: 100
reporting:
  min_sample_timesteps_per_iteration: 100
"""


# RUD evaluates on a remote EnvRunner of its own, TD3 and DDPG on one in the driver
@pytest.mark.parametrize("algorithm,interval,eval_runners", [("RUD", 100, 1), ("TD3", 1, 0), ("DDPG", 1, 0)])
def test_rud_family_runs_as_the_rl_kind(workdir, algorithm, interval, eval_runners):
    text = TINY_RUD.format(algorithm=algorithm, interval=interval, eval_runners=eval_runners)
    spec = load_spec(write_spec(workdir, "rud.yaml", text))
    outcome = run_local(spec)
    client = MlflowClient(outcome.tracking_uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED" and run.data.params["algorithm"] == algorithm
    metrics = run.data.metrics
    assert metrics["env_steps"] == 600
    assert metrics["learner/num_updates"] > 0 and np.isfinite(metrics["learner/critic_loss"])
    assert "learner/actor_loss" in metrics and "learner/q_mean" in metrics
    assert [step for step, _ in history(client, outcome.run_id, "evaluation/return_mean")] == [0, 300, 600]
    files = artifacts(client, outcome.run_id)
    assert "checkpoint/rllib_checkpoint.json" in files and "learning_curve.png" in files
