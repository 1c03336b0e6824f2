"""Ray connections and cluster-launcher files.

:func:`ray_session` starts a local Ray sized from the spec (dashboard on 127.0.0.1) or
joins a running cluster, after checking within seconds that the address answers.
:func:`validate_cluster_file` checks a cluster-launcher YAML offline against Ray's own
schema (``ray/autoscaler/ray-schema.json``) plus the cross-field rules the schema cannot
express, reporting every problem by field path and line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

from pipelines.errors import BadInput, Problem, RunFailed, SpecError
from pipelines.spec import RaySettings, _line_for, _line_map, read_yaml_file

REACH_TIMEOUT_S = 5.0
DEFAULT_GCS_PORT = 6379
DEFAULT_DASHBOARD_PORT = 8265
DEFAULT_CLIENT_PORT = 10001


def resolve_address(override: str | None, settings: RaySettings | None = None) -> str | None:
    """``--address``, else ``RAY_ADDRESS`` (set inside Ray Jobs), else the spec's."""
    return override or os.environ.get("RAY_ADDRESS") or (settings.address if settings else None)


def _host_port(address: str, default_port: int) -> tuple[str, int]:
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if not parsed.hostname:
        raise BadInput(f"cannot read a host from address {address!r}; expected HOST:PORT, ray://HOST:PORT or http://HOST:PORT")
    try:
        port = parsed.port or default_port
    except ValueError:
        raise BadInput(f"address {address!r} has an invalid port") from None
    return parsed.hostname, port


def check_reachable(address: str, *, default_port: int = DEFAULT_GCS_PORT, timeout: float = REACH_TIMEOUT_S) -> None:
    """Fail fast with a clear message when nothing listens at ``address``."""
    if address == "auto":
        return
    if address.startswith("ray://"):
        default_port = DEFAULT_CLIENT_PORT
    host, port = _host_port(address, default_port)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except socket.timeout:
        reason = f"no answer within {timeout:.0f}s"
    except OSError as err:
        reason = err.strerror or str(err)
    raise BadInput(
        f"cannot reach Ray at {address} ({host}:{port}: {reason}). "
        "Is the cluster up? Start one with `raysmith cluster up cluster.yaml` or `ray start --head`, "
        "or leave --address out to run on a local Ray."
    )


@contextlib.contextmanager
def ray_session(settings: RaySettings, address: str | None = None) -> Iterator[str]:
    """Join the cluster at ``address`` or start a local Ray; yields a description.

    Leaves Ray running when it was already initialised by the caller (tests, notebooks);
    shuts down only what it started.
    """
    import ray

    if ray.is_initialized():
        yield "the Ray already running in this process"
        return
    address = resolve_address(address, settings)
    if address:
        check_reachable(address)
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except ConnectionError as err:
            raise BadInput(f"cannot join Ray at {address}: {err}") from None
        where = f"the Ray cluster at {address}"
    else:
        ray.init(
            num_cpus=settings.num_cpus or os.cpu_count(),
            num_gpus=settings.num_gpus,
            include_dashboard=settings.dashboard,
            dashboard_host="127.0.0.1",
            logging_level=logging.WARNING,
        )
        cpus = int(ray.cluster_resources().get("CPU", 0))
        where = f"a local Ray with {cpus} CPUs"
    try:
        yield where
    finally:
        ray.shutdown()


# ----------------------------------------------------------------------------------------
# cluster-launcher files


def ray_schema() -> dict[str, Any]:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _schema_problems(config: dict[str, Any], lines: dict[tuple, int]) -> list[Problem]:
    import jsonschema

    validator = jsonschema.Draft7Validator(ray_schema())
    problems = []
    for error in sorted(validator.iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path]):
        parts = list(error.absolute_path)
        message = error.message
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            allowed = sorted(error.schema.get("properties", {}))
            extras = [k for k in error.instance if k not in allowed]
            for key in extras:
                hint = f"; allowed keys here: {', '.join(allowed)}" if allowed else ""
                path = parts + [key]
                problems.append(Problem(".".join(map(str, path)), f"unknown key '{key}'{hint}", _line_for(lines, tuple(path))))
            continue
        if error.validator == "required":
            missing = message.split("'")[1] if "'" in message else message
            parts = parts + [missing]
            message = "required, but missing"
        problems.append(Problem(".".join(map(str, parts)), message, _line_for(lines, tuple(parts))))
    return problems


def _cross_field_problems(config: dict[str, Any], lines: dict[tuple, int]) -> list[Problem]:
    problems = []
    node_types = config.get("available_node_types")
    provider = config.get("provider") if isinstance(config.get("provider"), dict) else {}
    if isinstance(node_types, dict):
        head = config.get("head_node_type")
        if head is None:
            problems.append(Problem("head_node_type", "required when available_node_types is set; name one of: "
                                    + ", ".join(node_types), _line_for(lines, ("available_node_types",))))
        elif head not in node_types:
            problems.append(Problem("head_node_type", f"'{head}' is not among available_node_types ({', '.join(node_types)})",
                                    _line_for(lines, ("head_node_type",))))
        for name, node in node_types.items():
            if not isinstance(node, dict):
                continue
            low, high = node.get("min_workers"), node.get("max_workers")
            if isinstance(low, int) and isinstance(high, int) and low > high:
                path = ("available_node_types", name, "min_workers")
                problems.append(Problem(".".join(path), f"min_workers {low} exceeds max_workers {high}", _line_for(lines, path)))
    if provider.get("type") == "local" and not provider.get("coordinator_address"):
        for key in ("head_ip", "worker_ips"):
            if key not in provider:
                path = ("provider", key)
                problems.append(Problem(".".join(path), "required for provider type 'local' (or give coordinator_address)",
                                        _line_for(lines, ("provider",))))
    return problems


def validate_cluster_file(path: str | Path) -> dict[str, Any]:
    """The parsed cluster config; raises :class:`SpecError` listing every problem."""
    source = str(path)
    config, text = read_yaml_file(path, what="cluster config")
    if not isinstance(config, dict):
        raise SpecError(source, what="cluster config", problems=[Problem("", "a cluster config is a mapping of keys to values")])
    lines = _line_map(text)
    problems = _schema_problems(config, lines) + _cross_field_problems(config, lines)
    if problems:
        raise SpecError(source, what="cluster config", problems=problems)
    return config


def ray_cluster_command(action: str, path: str | Path, extra: list[str]) -> None:
    """Run ``ray up``/``ray down`` on a validated file; :class:`RunFailed` if it fails."""
    validate_cluster_file(path)
    ray_cli = Path(sys.executable).with_name("ray")
    command = [str(ray_cli) if ray_cli.exists() else "ray", action, str(path), *extra]
    code = subprocess.call(command)
    if code:
        raise RunFailed(f"ray {action} exited with {code}")
