"""Test helpers: real Ray heads and MLflow servers as subprocesses, the CLI, tiny specs.

Everything a test starts it stops itself, by process session, never by name.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "pipelines" / "configs"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for subprocesses: this venv first on PATH, quiet Ray/MLflow."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra)
    return env


def raysmith(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the installed ``raysmith`` command and capture its output."""
    return subprocess.run(
        [str(BIN / "raysmith"), *args], cwd=cwd, env=env or subprocess_env(),
        capture_output=True, text=True, timeout=timeout,
    )


def _session_members(session_id: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session_id:  # field 6 of /proc/PID/stat: session id
            members.append(int(entry.name))
    return members


def stop_session(process: subprocess.Popen, grace_s: float = 3.0) -> None:
    """Stop a process started with ``start_new_session=True`` and everything in its session."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    for pid in _session_members(process.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        pass


def wait_for_port(port: int, process: subprocess.Popen, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"nothing listened on {port} within {timeout_s}s:\n{log.read_text()[-3000:]}")


class ServiceProcess:
    """A server started in its own process session; a context manager that stops it all."""

    ready_port: int
    startup_s: float = 90

    def launch(self, command: list[str], log: Path, cwd: Path | None = None) -> None:
        self.log = log
        self.process = subprocess.Popen(
            command, cwd=cwd, env=subprocess_env(), stdout=log.open("w"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def __enter__(self):
        try:
            wait_for_port(self.ready_port, self.process, self.startup_s, self.log)
        except Exception:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        stop_session(self.process)

    def __exit__(self, *exc) -> None:
        self.stop()


class RayHead(ServiceProcess):
    """A real Ray head (``ray start --head --block``) on free ports, bound to 127.0.0.1."""

    def __init__(self, num_cpus: int = 2):
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rsh-", dir="/tmp"))  # short: unix socket paths
        self.gcs_port = free_port()
        self.dashboard_port = self.ready_port = free_port()
        ports = {
            "--port": self.gcs_port,
            "--dashboard-port": self.dashboard_port,
            "--ray-client-server-port": free_port(),
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--runtime-env-agent-port": free_port(),
            "--metrics-export-port": free_port(),
            "--node-manager-port": free_port(),
            "--object-manager-port": free_port(),
        }
        command = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", str(num_cpus),
                   "--dashboard-host", "127.0.0.1", "--node-ip-address", "127.0.0.1",
                   "--include-dashboard", "true", "--temp-dir", str(self.temp_dir)]
        for flag, port in ports.items():
            command += [flag, str(port)]
        self.launch(command, self.temp_dir / "head.log")

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"


class MlflowServer(ServiceProcess):
    """A real ``mlflow server``: SQLite backend, local artifact store, 127.0.0.1, free port."""

    startup_s = 120

    def __init__(self, directory: Path):
        self.port = self.ready_port = free_port()
        command = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
                   "--backend-store-uri", f"sqlite:///{directory / 'server.db'}",
                   "--artifacts-destination", str(directory / "server-artifacts"), "--workers", "1"]
        self.launch(command, directory / "mlflow-server.log", cwd=directory)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def write_spec(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


TINY_RL_HEADER = """\
kind: rl
name: {name}
seed: 0
ray:
  num_cpus: 2
  dashboard: false
"""

TINY_PPO = TINY_RL_HEADER + """\
algorithm: PPO
env: CartPole-v1
env_runners:
  num_env_runners: 0
training:
  lr: 0.001
  train_batch_size_per_learner: 500
  minibatch_size: 100
  num_epochs: 4
model:
  fcnet_hiddens: [32, 32]
stop:
  env_steps: {env_steps}
evaluation:
  every_env_steps: 1000
  episodes: 3
checkpoint:
  every_iterations: 2
"""
"""A PPO spec that runs in seconds on 2 CPUs."""


def tiny_ppo(name: str = "tiny", env_steps: int = 1500) -> str:
    return TINY_PPO.format(name=name, env_steps=env_steps)


TINY_RUD = TINY_RL_HEADER + """\
algorithm: RUD
env: Pendulum-v1
training:
  update_interval: 200
  learning_starts: 200
  train_batch_size_per_learner: 64
  actor_lr: 0.001
  critic_lr: 0.001
model:
  actor_hidden: [32, 32]
  critic_hidden: [32, 32]
stop:
  env_steps: {env_steps}
evaluation:
  every_env_steps: 400
  episodes: 2
checkpoint:
  every_iterations: 2
"""
"""A RUD spec (blocks of 200 steps on Pendulum) that runs in seconds on 2 CPUs."""


def tiny_rud(name: str = "tiny-rud", env_steps: int = 2000) -> str:
    return TINY_RUD.format(name=name, env_steps=env_steps)


def descendants(root: int) -> list[int]:
    """Every process below ``root`` (children, their children, ...), from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError):
                pass
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        children = [child for child, parent in parents.items() if parent == pid]
        found += children
        frontier += children
    return found


def command_line(pid: int) -> str:
    """The command line of ``pid`` (empty if it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def record_explore_flags(monkeypatch, module_class) -> list[bool]:
    """Spy on ``module_class.act(obs, t, explore)``: the returned list gets every call's
    ``explore`` flag, in order (the method still runs)."""
    calls: list[bool] = []
    act = module_class.act

    def spy(module, obs, t, explore):
        calls.append(explore)
        return act(module, obs, t, explore)

    monkeypatch.setattr(module_class, "act", spy)
    return calls
