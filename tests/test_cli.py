"""The command line as a user meets it: help, exit codes, bad input refused fast."""

from __future__ import annotations

import shutil
import time

import pytest
from helpers import ROOT, free_port, raysmith, subprocess_env, tiny_ppo, write_spec

# A refusal of an unreachable address must not wait on Ray: ray.init() against an address
# nothing listens on kept retrying for over 5 minutes here, while the CLI's probe is refused
# at once. The bound leaves room for the CLI's own start-up (its imports), which took
# 14-16 s on 2 cores shared with three benchmark processes (15 s was the bound before).
FAIL_FAST_S = 45

COMMANDS = [
    [], ["run"], ["tune"], ["submit"], ["runs"], ["check"], ["kinds"],
    ["jobs"], ["jobs", "list"], ["jobs", "status"], ["jobs", "logs"], ["jobs", "stop"],
    ["cluster"], ["cluster", "validate"], ["cluster", "up"], ["cluster", "down"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "raysmith")
def test_help_on_every_command(command):
    from typer.testing import CliRunner

    from pipelines.cli import app

    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_installed_console_script(tmp_path):
    result = raysmith("--help", cwd=tmp_path)
    assert result.returncode == 0 and "submit" in result.stdout


def test_kinds_lists_every_kind(tmp_path):
    result = raysmith("kinds", cwd=tmp_path)
    assert result.returncode == 0
    kinds = [line.split(":")[0] for line in result.stdout.splitlines()]
    assert kinds == ["classify", "forgery-eval", "forgery-train", "peco", "peco-mim", "peco-moco", "peco-tokenizer", "rl",
                     "watermark-eval", "watermark-train"]


def test_check_prints_resolved_spec(tmp_path):
    spec = write_spec(tmp_path, "tiny.yaml", tiny_ppo())
    result = raysmith("check", str(spec), "--set", "stop.env_steps=900", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "env_steps: 900" in result.stdout and "valid rl spec" in result.stderr


def test_bad_spec_exits_2_before_ray(tmp_path):
    spec = write_spec(tmp_path, "bad.yaml", tiny_ppo().replace("episodes: 3", "episodes: three"))
    ray_tmp = tmp_path / "raytmp"
    started = time.monotonic()
    result = raysmith("run", str(spec), cwd=tmp_path, env=subprocess_env(RAY_TMPDIR=str(ray_tmp)))
    assert result.returncode == 2
    assert f"invalid spec {spec}" in result.stderr
    assert "evaluation.episodes" in result.stderr and "'three'" in result.stderr
    assert not ray_tmp.exists()  # no Ray session was started
    assert time.monotonic() - started < 30
    assert not (tmp_path / "mlflow.db").exists()


def test_error_text_is_printed_verbatim(tmp_path):
    missing = tmp_path / "[brackets]" / "x.yaml"
    result = raysmith("check", str(missing), cwd=tmp_path)
    assert result.returncode == 2 and f"invalid spec {missing}" in result.stderr


def test_unknown_option_is_a_usage_error(tmp_path):
    result = raysmith("run", "x.yaml", "--no-such-flag", cwd=tmp_path)
    assert result.returncode == 2


@pytest.mark.parametrize("command", [["run"], ["tune"]])
def test_unreachable_address_fails_fast(command, tmp_path):
    spec = write_spec(tmp_path, "tiny.yaml", tiny_ppo() + "search:\n  space:\n    seed: {grid: [0]}\n")
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    result = raysmith(*command, str(spec), "--address", address, cwd=tmp_path, timeout=60)
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    assert f"cannot reach Ray at {address}" in result.stderr
    assert elapsed < FAIL_FAST_S, elapsed


def test_submit_to_unreachable_dashboard_fails_fast(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text("[project]\nname='x'\n")
    spec = write_spec(project, "tiny.yaml", tiny_ppo())
    address = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = raysmith("submit", str(spec), "--address", address, cwd=project, timeout=60)
    assert result.returncode == 2, result.stderr
    assert f"cannot reach Ray at {address}" in result.stderr
    assert time.monotonic() - started < FAIL_FAST_S


def test_jobs_list_unreachable(tmp_path):
    result = raysmith("jobs", "list", "--address", f"127.0.0.1:{free_port()}", cwd=tmp_path, timeout=60)
    assert result.returncode == 2 and "cannot reach Ray" in result.stderr


def test_tune_without_search_section(tmp_path):
    spec = write_spec(tmp_path, "tiny.yaml", tiny_ppo())
    result = raysmith("tune", str(spec), cwd=tmp_path)
    assert result.returncode == 2
    assert "search: `raysmith tune` needs a search: section" in result.stderr


def test_restore_needs_an_existing_checkpoint(tmp_path):
    spec = write_spec(tmp_path, "tiny.yaml", tiny_ppo())
    result = raysmith("run", str(spec), "--restore", str(tmp_path / "missing"), cwd=tmp_path)
    assert result.returncode == 2 and "no such checkpoint directory" in result.stderr


def test_runs_without_a_store_creates_nothing(tmp_path):
    result = raysmith("runs", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "no runs yet" in result.stdout
    assert not (tmp_path / "mlflow.db").exists()


# ------------------------------------------------------------------ cluster files

CLUSTER_FILES = [ROOT / "cluster.yaml", ROOT / "pipelines" / "configs" / "clusters" / "onprem.yaml"]


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_shipped_cluster_files_validate(path, tmp_path):
    result = raysmith("cluster", "validate", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout


def test_cluster_validate_defaults_to_cluster_yaml(tmp_path):
    shutil.copy(ROOT / "cluster.yaml", tmp_path / "cluster.yaml")
    result = raysmith("cluster", "validate", cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_broken_cluster_file_names_every_field(tmp_path):
    text = (ROOT / "cluster.yaml").read_text()
    text = text.replace("resources: {CPU: 8, GPU: 1}", "resources: {CPU: 8, GPU: one}")
    text = text.replace("head_node_type: head.cpu", "head_node_type: head.gpu")
    text = text.replace("idle_timeout_minutes: 10", "idle_timeout_minutes: 10\nmax_wrokers: 3")
    broken = write_spec(tmp_path, "broken.yaml", text)
    result = raysmith("cluster", "validate", str(broken), cwd=tmp_path)
    assert result.returncode == 2
    err = result.stderr
    assert f"invalid cluster config {broken}" in err
    assert "available_node_types.worker.gpu.resources.GPU: 'one' is not of type 'integer'" in err
    assert "head_node_type: 'head.gpu' is not among available_node_types" in err
    assert "max_wrokers: unknown key 'max_wrokers'" in err
    gpu_line = text.splitlines().index("    resources: {CPU: 8, GPU: one}") + 1
    assert f"line {gpu_line}: available_node_types.worker.gpu.resources.GPU" in err


def test_cluster_cross_field_rules(tmp_path):
    from pipelines.cluster import validate_cluster_file
    from pipelines.errors import SpecError

    text = (ROOT / "cluster.yaml").read_text().replace("    min_workers: 0\n    max_workers: 4", "    min_workers: 5\n    max_workers: 4")
    with pytest.raises(SpecError, match="min_workers 5 exceeds max_workers 4"):
        validate_cluster_file(write_spec(tmp_path, "a.yaml", text))
    local = "cluster_name: x\nprovider:\n  type: local\n"
    with pytest.raises(SpecError) as caught:
        validate_cluster_file(write_spec(tmp_path, "b.yaml", local))
    paths = [p.path for p in caught.value.problems]
    assert paths == ["provider.head_ip", "provider.worker_ips"]
    with pytest.raises(SpecError, match="cluster_name: required"):
        validate_cluster_file(write_spec(tmp_path, "c.yaml", "provider: {type: aws}\n"))


def test_cluster_up_refuses_an_invalid_file_before_ray(tmp_path):
    broken = write_spec(tmp_path, "broken.yaml", "cluster_name: x\nprovider: {type: aws}\nheadnode: 1\n")
    result = raysmith("cluster", "up", str(broken), "--yes", cwd=tmp_path)
    assert result.returncode == 2 and "headnode: unknown key" in result.stderr
