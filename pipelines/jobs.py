"""``raysmith submit`` and ``raysmith jobs``: specs as Ray Jobs on a running cluster.

A submitted job uploads the project (``working_dir``) and runs ``python -m pipelines run``
on the same spec, so a spec moves from a laptop to a cluster unchanged. The cluster
provides the Python environment (``cluster.yaml``'s ``setup_commands`` install raysmith's
dependencies); ``--pip`` adds packages per job through the runtime environment.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from rich.console import Console

from pipelines.cluster import DEFAULT_DASHBOARD_PORT, check_reachable
from pipelines.errors import BadInput, Problem, RunFailed, SpecError
from pipelines.spec import LoadedSpec
from pipelines.tracking.mlflow_run import JOB_HOME_NAME, git_commit, is_relative_sqlite

UPLOAD_EXCLUDES = [
    ".git", ".venv", "venv", "__pycache__", "*.pyc", ".pytest_cache", "*.egg-info",
    "mlflow.db", "mlartifacts", "mlruns", "raysmith_runs", "ray_results", "raysmith_data", "build", "dist",
]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
LOG_TAIL_LINES = 40


def dashboard_address(address: str | None) -> str:
    """``--address``, else ``RAY_API_SERVER_ADDRESS``, else an http ``RAY_ADDRESS``, else local."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS")
    if not address and os.environ.get("RAY_ADDRESS", "").startswith(("http://", "https://")):
        address = os.environ["RAY_ADDRESS"]
    address = address or f"http://127.0.0.1:{DEFAULT_DASHBOARD_PORT}"
    return address if "://" in address else f"http://{address}"


def _use_token_if_present() -> None:
    """Send this machine's Ray token (``~/.ray/auth_token``, ``RAY_AUTH_TOKEN``) to clusters.

    ``ray start`` turns token authentication on when a token exists, but the job client
    only sends one when ``RAY_AUTH_MODE=token``; without this, a cluster this machine
    started itself refuses the client.
    """
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def job_client(address: str | None):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = dashboard_address(address)
    check_reachable(url, default_port=DEFAULT_DASHBOARD_PORT)
    _use_token_if_present()
    try:
        return JobSubmissionClient(url)
    except AuthenticationError as err:
        raise BadInput(f"the Ray dashboard at {url} refused this machine's token: {str(err).splitlines()[0]}. "
                       "Copy the head's token (`ray get-auth-token` there) into RAY_AUTH_TOKEN") from None
    except (ConnectionError, RuntimeError) as err:
        raise BadInput(f"the Ray dashboard at {url} did not accept a job client: {err}") from None


def project_root(start: Path) -> Path:
    """Nearest folder at or above ``start`` holding pyproject.toml or .git."""
    start = start.resolve()
    for folder in (start, *start.parents):
        if (folder / "pyproject.toml").is_file() or (folder / ".git").exists():
            return folder
    return start


def build_submission(
    loaded: LoadedSpec,
    *,
    working_dir: Path | None = None,
    pip: list[str] | None = None,
    submission_id: str | None = None,
) -> dict[str, Any]:
    """Arguments of ``JobSubmissionClient.submit_job`` for ``loaded``."""
    spec_file = Path(loaded.source).resolve()
    root = (working_dir or project_root(spec_file.parent)).resolve()
    try:
        relative = spec_file.relative_to(root)
    except ValueError:
        raise SpecError(loaded.source, [Problem("", f"the spec must lie inside the uploaded working dir {root}; "
                                                    "move it there or pass --working-dir")]) from None
    submission_id = submission_id or f"raysmith-{loaded.spec.name}-{uuid.uuid4().hex[:8]}"
    entrypoint = " ".join(
        ["python", "-m", "pipelines", "run", shlex.quote(str(relative))]
        + [f"--set {shlex.quote(item)}" for item in loaded.overrides]
    )
    commit, dirty = git_commit(root)
    env_vars = {"RAYSMITH_SUBMISSION_ID": submission_id, "PYTHONUNBUFFERED": "1"}
    tracking = loaded.spec.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if tracking and is_relative_sqlite(tracking):
        raise BadInput(f"tracking URI {tracking} is a relative path: in a job it would resolve inside Ray's temporary "
                       "copy of the working dir. Give an absolute sqlite:////path on the head node or an MLflow "
                       "server URI (http://...), or leave it unset for ~/raysmith/mlflow.db on the head node")
    if tracking and not loaded.spec.tracking.uri:
        env_vars["MLFLOW_TRACKING_URI"] = tracking
    if commit:
        env_vars["RAYSMITH_GIT_COMMIT"] = commit
        env_vars["RAYSMITH_GIT_DIRTY"] = "1" if dirty else "0"
    runtime_env: dict[str, Any] = {"working_dir": str(root), "excludes": UPLOAD_EXCLUDES, "env_vars": env_vars}
    if pip:
        runtime_env["pip"] = list(pip)
    return {
        "entrypoint": entrypoint,
        "submission_id": submission_id,
        "runtime_env": runtime_env,
        "metadata": {"raysmith.spec": str(relative), "raysmith.kind": loaded.spec.kind, "raysmith.name": loaded.spec.name},
    }


def submit(
    loaded: LoadedSpec,
    *,
    address: str | None,
    working_dir: Path | None = None,
    pip: list[str] | None = None,
    console: Console | None = None,
) -> str:
    console = console or Console(stderr=True)
    request = build_submission(loaded, working_dir=working_dir, pip=pip)
    tracking = loaded.spec.tracking.uri or request["runtime_env"]["env_vars"].get("MLFLOW_TRACKING_URI")
    client = job_client(address)
    submission_id = client.submit_job(**request)
    where = tracking or f"sqlite:///~/{JOB_HOME_NAME}/mlflow.db on the node running the job (the head node)"
    console.print(f"the job records MLflow runs at {where}", markup=False)
    return submission_id


def wait(client, submission_id: str, timeout_s: float = 3600.0, poll_s: float = 1.0) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(submission_id).value)
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(poll_s)


def follow(client, submission_id: str, out=sys.stdout) -> str:
    """Stream the job's log until it ends; returns its final status."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())
    return wait(client, submission_id, timeout_s=60)


def job_call(address: str | None, submission_id: str, method: str, *args: Any) -> Any:
    """``client.<method>(submission_id, ...)``; an unknown id is bad input, not a crash."""
    client = job_client(address)
    try:
        return getattr(client, method)(submission_id, *args)
    except RuntimeError as err:
        if "does not exist" in str(err) or "not found" in str(err).lower():
            known = ", ".join(job.submission_id or job.job_id for job in client.list_jobs()[-5:]) or "none"
            raise BadInput(f"no job {submission_id!r} at {dashboard_address(address)}; recent jobs: {known}") from None
        raise


def failure_report(client, submission_id: str) -> str:
    info = client.get_job_info(submission_id)
    lines = client.get_job_logs(submission_id).rstrip().splitlines()[-LOG_TAIL_LINES:]
    message = f"job {submission_id} {info.status.value}"
    if info.message:
        message += f": {info.message.strip()}"
    return message + f"\n--- last {len(lines)} log lines ---\n" + "\n".join(lines)


def finish(client, submission_id: str, status: str) -> None:
    """Raise :class:`RunFailed` with the log tail unless the job succeeded."""
    if status != "SUCCEEDED":
        raise RunFailed(failure_report(client, submission_id))
