"""MLflow tracking: the default embedded store, and a real `mlflow server`."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import MlflowServer, raysmith, subprocess_env, tiny_ppo, write_spec
from mlflow.tracking import MlflowClient

from pipelines.tracking.mlflow_run import artifact_root_for, resolve_tracking_uri


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, cwd=tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(None, cwd=tmp_path) == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("http://tracking:5000", cwd=tmp_path) == "http://tracking:5000"
    # relative SQLite paths become absolute, so jobs and `mlflow ui` elsewhere find the file
    assert resolve_tracking_uri("sqlite:///runs/x.db", cwd=tmp_path) == f"sqlite:///{tmp_path.resolve() / 'runs' / 'x.db'}"
    assert artifact_root_for(f"sqlite:///{tmp_path / 'mlflow.db'}") == (tmp_path / "mlartifacts").as_uri()
    assert artifact_root_for("http://127.0.0.1:5000") is None


def test_submitted_jobs_default_to_a_folder_in_home(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RAYSMITH_SUBMISSION_ID", "raysmith-x-1")
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path / 'raysmith' / 'mlflow.db'}"
    from pipelines.runner import output_root

    assert output_root("raysmith_runs") == tmp_path / "raysmith" / "raysmith_runs"
    assert output_root("/abs/dir") == Path("/abs/dir")


def test_runs_carry_the_code_version_and_host(tmp_path, monkeypatch):
    import socket
    import subprocess

    from pipelines.tracking.mlflow_run import environment_tags

    monkeypatch.delenv("RAYSMITH_GIT_COMMIT", raising=False)
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    spec = write_spec(tmp_path, "s.yaml", tiny_ppo())
    git = ["git", "-C", str(tmp_path), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "add", "s.yaml"], check=True)
    subprocess.run([*git, "commit", "-qm", "spec"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    tags = environment_tags(str(spec))
    assert tags["mlflow.source.git.commit"] == head and tags["raysmith.git_dirty"] == "false"
    assert tags["raysmith.host"] == socket.gethostname()
    spec.write_text(tiny_ppo() + "# edited\n")
    assert environment_tags(str(spec))["raysmith.git_dirty"] == "true"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with MlflowServer(tmp_path_factory.mktemp("mlflow-server")) as started:
        yield started


def test_run_against_a_real_mlflow_server(server, tmp_path):
    spec = write_spec(tmp_path, "served.yaml", tiny_ppo(name="served", env_steps=1000))
    result = raysmith("run", str(spec), cwd=tmp_path, env=subprocess_env(MLFLOW_TRACKING_URI=server.uri))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"at {server.uri}" in result.stdout
    assert not (tmp_path / "mlflow.db").exists()  # nothing went to the embedded default

    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name("served")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.info.run_id in result.stdout
    assert run.data.params["env"] == "CartPole-v1"
    assert run.data.metrics["env_steps"] == 1000
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "evaluation/return_mean")]
    assert steps == [0, 1000]
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"learning_curve.png", "checkpoint", "spec", "summary.txt"} <= names
    curve = Path(client.download_artifacts(run.info.run_id, "learning_curve.png", str(tmp_path)))
    assert curve.read_bytes()[:4] == b"\x89PNG"


def test_spec_tracking_uri_wins_over_the_environment(server, tmp_path):
    spec = write_spec(tmp_path, "pinned.yaml", tiny_ppo(name="pinned", env_steps=500) + f"tracking:\n  uri: {server.uri}\n  experiment: pinned-exp\n")
    env = subprocess_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'elsewhere.db'}")
    result = raysmith("run", str(spec), "--set", "evaluation.enabled=false", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "elsewhere.db").exists()
    client = MlflowClient(server.uri)
    [run] = client.search_runs([client.get_experiment_by_name("pinned-exp").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["evaluation.enabled"] == "False"


def test_trial_metrics_pair_a_result_with_the_config_that_produced_it(tmp_path):
    """Tune asks PBT before the callbacks: by then an exploited trial already holds its next
    config. The values logged with a result must be those the trial ran with."""
    from types import SimpleNamespace

    from pipelines.tracking.mlflow_run import RunTracker
    from pipelines.tracking.tune_callback import MlflowTrialCallback

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = RunTracker.start(uri, "pbt", "search")
    callback = MlflowTrialCallback(
        uri, parent.run_id, "search", base_data={}, tags={}, spec_text="", spec_file="s.yaml",
        step_metric="env_steps", curve_metrics=["env_steps"], log_checkpoints=False,
    )
    trial = SimpleNamespace(trial_id="t0", experiment_tag="0", config={"training": {"lr": 0.003}}, checkpoint=None)
    callback.on_trial_start(0, [trial], trial)
    trial.config = {"training": {"lr": 0.0036}}  # PBT's exploit, decided on the result below
    result = {"env_steps": 500, "learner/lr": 0.003, "config": {"training": {"lr": 0.003}}}
    callback.on_trial_result(0, [trial], trial, result)
    client = MlflowClient(uri)
    run_id = callback._trackers["t0"].run_id
    history = client.get_metric_history(run_id, "config/training.lr")
    assert [(m.step, m.value) for m in history] == [(500, 0.003)]
    assert "config" not in client.get_run(run_id).data.metrics
