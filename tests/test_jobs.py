"""`raysmith submit` and `raysmith jobs` against a real Ray head started for this module."""

from __future__ import annotations

import time

import pytest
from helpers import RayHead, raysmith, subprocess_env, tiny_ppo, write_spec
from mlflow.tracking import MlflowClient

from pipelines.errors import BadInput
from pipelines.jobs import build_submission
from pipelines.spec import load_spec


@pytest.fixture(scope="module")
def head():
    with RayHead(num_cpus=2) as started:
        yield started


@pytest.fixture
def project(tmp_path):
    """A user's experiment folder: the job uploads it as its working_dir."""
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'my-experiments'\nversion = '0'\n")
    write_spec(tmp_path, "tiny.yaml", tiny_ppo(name="jobbed", env_steps=1000))
    return tmp_path


def submit_env(project):
    """The user points jobs at an MLflow store the test can read (the head is this machine)."""
    return subprocess_env(MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}")


def job_runs(project):
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("jobbed")
    return client, (client.search_runs([experiment.experiment_id]) if experiment else [])


def wait_for_status(head, submission_id, wanted, timeout_s=120):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = raysmith("jobs", "status", submission_id, "--address", head.dashboard_url, cwd=head.temp_dir)
        if any(f": {status}" in result.stdout for status in wanted):
            return result.stdout
        time.sleep(1)
    raise AssertionError(f"job {submission_id} never reached {wanted}")


def test_submit_follow_runs_the_spec_and_records_it(head, project):
    result = raysmith("submit", "tiny.yaml", "--address", head.dashboard_url, "--follow", cwd=project,
                      env=submit_env(project))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"the job records MLflow runs at sqlite:///{project / 'mlflow.db'}" in result.stderr
    submission_id = result.stdout.splitlines()[0].strip()
    assert submission_id.startswith("raysmith-jobbed-")
    assert "finished rl 'jobbed'" in result.stdout  # the job's own log, streamed
    assert f"job {submission_id}: SUCCEEDED" in result.stderr

    client, runs = job_runs(project)
    [run] = runs
    assert run.info.status == "FINISHED"
    assert run.data.tags["raysmith.submission_id"] == submission_id
    assert run.data.metrics["env_steps"] == 1000
    assert "evaluation/return_mean" in run.data.metrics

    listed = raysmith("jobs", "list", "--address", head.dashboard_url, cwd=project)
    assert listed.returncode == 0 and submission_id in listed.stdout and "SUCCEEDED" in listed.stdout
    status = raysmith("jobs", "status", submission_id, "--address", head.dashboard_url, cwd=project)
    assert status.stdout.startswith(f"{submission_id}: SUCCEEDED")
    logs = raysmith("jobs", "logs", submission_id, "--address", head.dashboard_url, cwd=project)
    assert "MLflow run" in logs.stdout and run.info.run_id in logs.stdout


def test_failed_job_exits_1_with_its_log_tail(head, project):
    # valid as a spec, but the network cannot be built on the cluster
    result = raysmith("submit", "tiny.yaml", "--address", head.dashboard_url, "--follow",
                      "--set", "model.fcnet_hiddens=[-3]", cwd=project, env=submit_env(project))
    assert result.returncode == 1
    assert "FAILED" in result.stderr
    assert "--- last" in result.stderr and "negative dimension" in result.stderr
    _, runs = job_runs(project)
    assert [r.info.status for r in runs] == ["FAILED"]


def test_bad_spec_is_refused_before_submission(head, project):
    result = raysmith("submit", "tiny.yaml", "--address", head.dashboard_url, "--set", "stop.env_steps=zero", cwd=project)
    assert result.returncode == 2 and "stop.env_steps" in result.stderr
    listed = raysmith("jobs", "list", "--address", head.dashboard_url, cwd=project)
    assert "zero" not in listed.stdout


def test_stop_ends_a_running_job_and_marks_its_run_killed(head, project):
    result = raysmith("submit", "tiny.yaml", "--address", head.dashboard_url, "--set", "stop.env_steps=10000000",
                      cwd=project, env=submit_env(project))
    assert result.returncode == 0, result.stderr
    submission_id = result.stdout.strip()
    assert "follow it with: raysmith jobs logs" in result.stderr
    # the job's driver, runtime env and EnvRunners start on a 2-core head that the other test worker also loads
    deadline = time.monotonic() + 300
    while not [r for r in job_runs(project)[1] if r.data.metrics.get("env_steps", 0) > 0]:
        if time.monotonic() > deadline:
            status = raysmith("jobs", "status", submission_id, "--address", head.dashboard_url, cwd=project)
            logs = raysmith("jobs", "logs", submission_id, "--address", head.dashboard_url, cwd=project)
            raise AssertionError(f"the job never started training: {status.stdout}{logs.stdout[-3000:]}")
        time.sleep(1)
    stopped = raysmith("jobs", "stop", submission_id, "--address", head.dashboard_url, cwd=project)
    assert stopped.returncode == 0 and "stop requested" in stopped.stdout
    wait_for_status(head, submission_id, ["STOPPED"])
    deadline = time.monotonic() + 30
    while job_runs(project)[1][0].info.status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert job_runs(project)[1][0].info.status == "KILLED"


def test_unknown_job_ids_are_bad_input(head, project):
    for command in (["status"], ["logs"], ["stop"]):
        result = raysmith("jobs", *command, "raysmith-no-such-job", "--address", head.dashboard_url, cwd=project)
        assert result.returncode == 2, result.stderr
        assert "no job 'raysmith-no-such-job'" in result.stderr


def test_submission_carries_the_tracking_choice(project, monkeypatch):
    loaded = load_spec(project / "tiny.yaml")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    request = build_submission(loaded)
    env_vars = request["runtime_env"]["env_vars"]
    # nothing chosen: the job uses ~/raysmith/mlflow.db on its own node, never a path of this machine
    assert "MLFLOW_TRACKING_URI" not in env_vars
    assert env_vars["RAYSMITH_SUBMISSION_ID"] == request["submission_id"]
    assert request["entrypoint"] == "python -m pipelines run tiny.yaml"
    assert request["runtime_env"]["working_dir"] == str(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert build_submission(loaded)["runtime_env"]["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow.internal:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///relative.db")
    with pytest.raises(BadInput, match="relative path"):
        build_submission(loaded)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    overridden = load_spec(project / "tiny.yaml", ["stop.env_steps=2000"])
    assert build_submission(overridden)["entrypoint"].endswith("--set stop.env_steps=2000")
