"""`raysmith tune` on a real Ray: trials as nested MLflow runs, and resuming an interrupted search."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time

import pytest
from helpers import BIN, command_line, descendants, raysmith, subprocess_env, tiny_ppo, write_spec
from mlflow.tracking import MlflowClient

SEARCH = """\
search:
  metric: evaluation/return_mean
  mode: max
  max_concurrent_trials: {concurrent}
  searcher: grid
  space:
{space}
"""


def search_spec(name: str, space: str, concurrent: int = 2, env_steps: int = 1500, extra: str = "") -> str:
    return tiny_ppo(name=name, env_steps=env_steps) + SEARCH.format(concurrent=concurrent, space=space) + extra


def nested_runs(client, parent_id):
    parent = client.get_run(parent_id)
    return client.search_runs([parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


def steps(client, run_id, key):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_two_trials_are_nested_under_the_search_run(tmp_path):
    storage = (tmp_path / "tune storage").as_uri()  # a URI, as for s3:// storage
    spec = write_spec(tmp_path, "search.yaml", search_spec("two", "    training.lr: {grid: [0.0003, 0.003]}",
                                                           extra=f"  storage_path: {storage}\n"))
    result = raysmith("tune", str(spec), cwd=tmp_path, env=subprocess_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "best trial: evaluation/return_mean" in result.stdout

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [parent] = client.search_runs(
        [client.get_experiment_by_name("two").experiment_id], filter_string="tags.`raysmith.command` = 'tune'"
    )
    assert parent.info.status == "FINISHED"
    assert parent.info.run_id in result.stdout
    assert parent.data.tags["raysmith.trials"] == "2"
    assert parent.data.params["search.searcher"] == "grid"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"trials.csv", "spec"}
    assert parent.data.tags["raysmith.experiment_dir"] == f"{storage}/two"
    assert (tmp_path / "tune storage" / "two" / "raysmith_search.json").is_file()

    trials = nested_runs(client, parent.info.run_id)
    assert len(trials) == 2
    assert sorted(float(t.data.params["training.lr"]) for t in trials) == [0.0003, 0.003]
    for trial in trials:
        assert trial.info.status == "FINISHED"
        assert trial.data.params["algorithm"] == "PPO"
        assert trial.data.tags["raysmith.spec_hash"] == parent.data.tags["raysmith.spec_hash"]
        # one value per evaluation, none repeated by the scheduler's carry-forward
        assert steps(client, trial.info.run_id, "evaluation/return_mean") == [0, 1000, 1500]
        assert {"learning_curve.png", "checkpoint", "spec"} <= {a.path for a in client.list_artifacts(trial.info.run_id)}
    seeds = {trial.data.params["seed"] for trial in trials}
    assert len(seeds) == 2  # each trial draws its own seed

    best = max(trials, key=lambda t: t.data.metrics["evaluation/return_mean"])
    assert parent.data.metrics["best/evaluation/return_mean"] == best.data.metrics["evaluation/return_mean"]
    assert float(parent.data.tags["raysmith.best.training.lr"]) == float(best.data.params["training.lr"])


def _trial_progress(db) -> tuple[int, int]:
    """(finished trial runs, trial runs past env step 1500, after their first checkpoint) in the MLflow store."""
    try:
        with sqlite3.connect(db) as connection:
            finished = connection.execute(
                "select count(*) from runs r join tags t on r.run_uuid = t.run_uuid "
                "where t.key = 'raysmith.trial_id' and r.status = 'FINISHED'").fetchone()[0]
            checkpointed = connection.execute(
                "select count(distinct m.run_uuid) from metrics m join tags t on m.run_uuid = t.run_uuid "
                "where t.key = 'raysmith.trial_id' and m.key = 'env_steps' and m.value >= 1500").fetchone()[0]
        return finished, checkpointed
    except sqlite3.Error:
        return 0, 0


def test_interrupted_search_resumes(tmp_path):
    space = "    stop.env_steps: {grid: [1000, 6000]}"
    spec = write_spec(tmp_path, "resumable.yaml", search_spec("resumable", space, concurrent=1))
    db = tmp_path / "mlflow.db"
    process = subprocess.Popen(
        [str(BIN / "raysmith"), "tune", str(spec)], cwd=tmp_path, env=subprocess_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 240
        # interrupt once the first trial is done and the second has checkpointed (every 2 x 500 steps)
        while _trial_progress(db) != (1, 1):
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the search never reached its second trial"
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1, err[-3000:]
    assert f"continue it with: raysmith tune {spec} --resume" in err

    client = MlflowClient(f"sqlite:///{db}")
    [parent] = client.search_runs([client.get_experiment_by_name("resumable").experiment_id],
                                  filter_string="tags.`raysmith.command` = 'tune'")
    assert parent.info.status == "KILLED"
    statuses = sorted(t.info.status for t in nested_runs(client, parent.info.run_id))
    assert statuses == ["FINISHED", "KILLED"]

    # a fresh start would silently discard it; a changed spec is not the same search
    again = raysmith("tune", str(spec), cwd=tmp_path)
    assert again.returncode == 2 and "--resume" in again.stderr
    changed = raysmith("tune", str(spec), "--resume", "--set", "training.lr=0.01", cwd=tmp_path)
    assert changed.returncode == 2 and "changed since the search" in changed.stderr
    elsewhere = raysmith("tune", str(spec), "--resume", "--set", "name=other", cwd=tmp_path)
    assert elsewhere.returncode == 2 and "nothing to resume" in elsewhere.stderr

    resumed = raysmith("tune", str(spec), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED"
    trials = sorted(nested_runs(client, parent.info.run_id), key=lambda t: float(t.data.params["stop.env_steps"]))
    assert [t.info.status for t in trials] == ["FINISHED", "FINISHED"]
    # max_concurrent_trials 1: the second trial started after the first ended
    assert trials[1].info.start_time >= trials[0].info.end_time
    # the finished trial was not run again; the interrupted one continued to its budget
    first_steps = steps(client, trials[0].info.run_id, "env_steps")
    assert first_steps == sorted(set(first_steps)) and first_steps[-1] == 1000
    second_steps = steps(client, trials[1].info.run_id, "env_steps")
    assert second_steps[-1] == 6000 and second_steps.count(0) == 1  # resumed, not started again


def test_a_failed_trial_is_retried_from_its_checkpoint(tmp_path):
    text = search_spec("retried", "    seed: {grid: [0]}", concurrent=1, env_steps=8000, extra="  max_failures: 1\n")
    spec = write_spec(tmp_path, "retry.yaml", text.replace("every_iterations: 2", "every_iterations: 2"))
    db = tmp_path / "mlflow.db"
    process = subprocess.Popen([str(BIN / "raysmith"), "tune", str(spec)], cwd=tmp_path, env=subprocess_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while True:  # wait for two checkpoints (every 2 iterations of 500 steps)
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the trial never got going"
            try:
                with sqlite3.connect(db) as connection:
                    reached = connection.execute(
                        "select max(step) from metrics where key = 'env_steps'").fetchone()[0] or 0
            except sqlite3.Error:
                reached = 0
            if reached >= 2500:
                break
            time.sleep(0.2)
        trial_workers = [pid for pid in descendants(process.pid) if "ImplicitFunc" in command_line(pid)]
        assert trial_workers, "no trial worker process found"
        for pid in trial_workers:
            os.kill(pid, signal.SIGKILL)  # the trial's process dies mid-run
        out, err = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err[-3000:]
    client = MlflowClient(f"sqlite:///{db}")
    [parent] = client.search_runs([client.get_experiment_by_name("retried").experiment_id],
                                  filter_string="tags.`raysmith.command` = 'tune'")
    [trial] = nested_runs(client, parent.info.run_id)
    assert trial.info.status == "FINISHED" and parent.info.status == "FINISHED"
    history = steps(client, trial.info.run_id, "env_steps")
    assert history[-1] == 8000
    assert history.count(0) == 1  # restarted from a checkpoint, not from scratch
    assert len(history) > len(set(history))  # iterations after that checkpoint ran twice
