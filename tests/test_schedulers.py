"""Searchers and schedulers wired into `raysmith tune`: Optuna, ASHA and PBT on a real Ray."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from helpers import tiny_ppo, tiny_rud, write_spec
from mlflow.tracking import MlflowClient

from pipelines.search import run_search
from pipelines.spec import load_spec

pytestmark = pytest.mark.usefixtures("local_ray")


def trial_runs(outcome):
    client = MlflowClient(outcome.tracking_uri)
    parent = client.get_run(outcome.parent_run_id)
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'")
    return client, runs


def series(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))]


def test_optuna_samples_and_asha_stops_at_max_t(workdir):
    text = tiny_ppo(name="asha", env_steps=5000).replace("every_env_steps: 1000", "every_env_steps: 500") + """\
search:
  num_samples: 2
  max_concurrent_trials: 2
  searcher: optuna
  scheduler: {type: asha, max_t: 3, grace_period: 1, reduction_factor: 2}
  space:
    training.lr: {loguniform: [0.0001, 0.01]}
"""
    loaded = load_spec(write_spec(workdir, "asha.yaml", text))
    outcome = run_search(loaded)
    assert outcome.errors == 0 and outcome.unfinished == 0
    client, runs = trial_runs(outcome)
    assert len(runs) == 2
    rates = [float(r.data.params["training.lr"]) for r in runs]
    assert all(0.0001 <= lr <= 0.01 for lr in rates) and rates[0] != rates[1]
    for run in runs:
        # ASHA ends every trial at max_t = 3 iterations, long before the 5000-step budget
        assert series(client, run.info.run_id, "iteration")[-1][1] <= 3
        assert series(client, run.info.run_id, "env_steps")[-1][1] <= 1500
        # the learner trained with the rate Optuna sampled for this trial
        assert series(client, run.info.run_id, "learner/default_optimizer_learning_rate")[-1][1] == pytest.approx(
            float(run.data.params["training.lr"]), rel=1e-6)


def test_pbt_exploits_and_the_new_rate_reaches_the_learner(workdir):
    # evaluation every other iteration: in between, the search metric is carried forward
    text = tiny_ppo(name="pbt", env_steps=3000) + """\
search:
  num_samples: 2
  max_concurrent_trials: 2
  # synch: every perturbation waits for both trials, so the worse one always exploits
  scheduler: {type: pbt, perturbation_interval: 2, quantile_fraction: 0.5, resample_probability: 0.5, synch: true}
  space:
    training.lr: {choice: [0.0001, 0.0003, 0.001, 0.003]}
"""
    loaded = load_spec(write_spec(workdir, "pbt.yaml", text))
    outcome = run_search(loaded)
    assert outcome.errors == 0 and outcome.unfinished == 0
    experiment = Path(outcome.experiment_dir)
    policies = list(experiment.glob("pbt_policy_*.txt"))
    assert policies, "PBT never exploited"
    client, runs = trial_runs(outcome)
    assert len(runs) == 2
    for run in runs:
        # one report's metrics share a timestamp: pair the configured and the used rate per report
        def per_report(key):
            return {(m.step, m.timestamp): m.value for m in client.get_metric_history(run.info.run_id, key)}

        configured = per_report("config/training.lr")
        used = per_report("learner/default_optimizer_learning_rate")
        assert used and set(used) <= set(configured)  # no learner metrics at the step-0 evaluation
        # after every exploit the learner trains with the perturbed rate, not the clone's
        for report, lr in used.items():
            assert lr == pytest.approx(configured[report], rel=1e-6), (report, configured[report], lr)
        # every iteration was reported, exploits included, and the trial reached its budget
        steps = {step for step, _ in series(client, run.info.run_id, "env_steps")}
        assert steps >= set(range(500, 3001, 500))


def assert_rates_reached_the_learner(client, run, pairs):
    def per_report(key):
        return {(m.step, m.timestamp): m.value for m in client.get_metric_history(run.info.run_id, key)}

    for configured_key, used_key in pairs:
        configured, used = per_report(configured_key), per_report(used_key)
        assert used and set(used) <= set(configured)
        for report, lr in used.items():  # after every exploit: the perturbed rate, not the clone's
            assert lr == pytest.approx(configured[report], rel=1e-6), (used_key, report, configured[report], lr)


def trial_reports(trial_dir: Path) -> dict[int, tuple[int, int]]:
    """(iterations_since_restore, pid) of each training iteration Tune logged for a trial, from
    result.json and progress.csv together. When a trial restarts from a checkpoint, Tune copies
    both files back from the experiment folder over the driver's copies, and lines written
    since the folder's last sync can be lost: one CI run found a single line left in each
    trial's result.json while progress.csv held all twelve."""
    reports: dict[int, tuple[int, int]] = {}
    for line in (trial_dir / "result.json").read_text().splitlines():
        if line.strip():
            report = json.loads(line)
            reports[int(report["training_iteration"])] = (int(report["iterations_since_restore"]), int(report["pid"]))
    with open(trial_dir / "progress.csv", newline="") as rows:
        for row in csv.DictReader(rows):
            reports.setdefault(int(row["training_iteration"]), (int(row["iterations_since_restore"]), int(row["pid"])))
    return reports


def test_pbt_over_rud_puts_the_perturbed_rates_into_both_optimizers(workdir):
    text = tiny_rud(name="pbt-rud") + """\
search:
  num_samples: 2
  max_concurrent_trials: 2
  scheduler: {type: pbt, time_attr: env_steps, perturbation_interval: 400, quantile_fraction: 0.5,
              resample_probability: 0.5, synch: true}
  space:
    training.actor_lr: {choice: [0.0001, 0.0003, 0.001, 0.003]}
    training.critic_lr: {choice: [0.0001, 0.0003, 0.001, 0.003]}
"""
    outcome = run_search(load_spec(write_spec(workdir, "pbt-rud.yaml", text)))
    assert outcome.errors == 0 and outcome.unfinished == 0
    assert list(Path(outcome.experiment_dir).glob("pbt_policy_*.txt")), "PBT never exploited"
    # an exploit restores the clone's checkpoint into a trial process already running, not a
    # new worker importing torch and RLlib per (re)start as Tune's default gives. Once the
    # search has created its trials, Tune keeps no idle process while no trial waits to
    # start, which can happen while synch PBT holds a paused trial: two processes on an idle
    # machine, three for nine starts when another test module shared the cores. At most two
    # processes serve the trials' first starts, so the rest were started for restarts:
    # fewer than half of those.
    trials = sorted(path.parent for path in Path(outcome.experiment_dir).glob("*/progress.csv"))
    assert len(trials) == 2
    reports = {trial: trial_reports(trial) for trial in trials}
    restarts = sum(since_restore == 1 for logged in reports.values() for since_restore, _ in logged.values()) - len(trials)
    pids = {pid for logged in reports.values() for _, pid in logged.values()}
    missing = {trial.name: sorted(set(range(1, max(logged) + 1)) - set(logged)) for trial, logged in reports.items()}
    assert restarts > 0 and 2 * (len(pids) - 2) < restarts, (restarts, pids, "iterations logged by neither file:", missing)
    client, runs = trial_runs(outcome)
    assert len(runs) == 2
    for run in runs:
        assert_rates_reached_the_learner(client, run, [("config/training.actor_lr", "learner/actor_learning_rate"),
                                                       ("config/training.critic_lr", "learner/critic_learning_rate")])
        assert series(client, run.info.run_id, "env_steps")[-1][1] >= 2000


def test_pb2_explores_within_the_bounds_and_its_rates_reach_the_learner(workdir):
    text = tiny_ppo(name="pb2", env_steps=3000) + """\
search:
  num_samples: 2
  max_concurrent_trials: 2
  scheduler: {type: pb2, perturbation_interval: 2, quantile_fraction: 0.5, synch: true}
  space:
    training.lr: {loguniform: [0.0001, 0.003]}
"""
    outcome = run_search(load_spec(write_spec(workdir, "pb2.yaml", text)))
    assert outcome.errors == 0 and outcome.unfinished == 0
    assert list(Path(outcome.experiment_dir).glob("pbt_policy_*.txt")), "PB2 never exploited"
    client, runs = trial_runs(outcome)
    for run in runs:
        rates = [value for _, value in series(client, run.info.run_id, "config/training.lr")]
        assert all(0.0001 <= lr <= 0.003 for lr in rates)
        assert_rates_reached_the_learner(client, run, [("config/training.lr", "learner/default_optimizer_learning_rate")])
