"""The ``raysmith`` command line.

Exit codes: 0 success, 2 bad input (refused before anything ran), 1 a run, search or job
that started and failed.
"""

from __future__ import annotations

import functools
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pipelines.errors import BadInput, RunFailed
from pipelines.progress import format_value

app = typer.Typer(
    help="raysmith: run, search and submit experiment specs on Ray, tracked in MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
jobs_app = typer.Typer(help="Inspect and control Ray Jobs on a cluster.", no_args_is_help=True)
cluster_app = typer.Typer(help="Validate and launch cluster-launcher files.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
app.add_typer(cluster_app, name="cluster")

# Wide tables when the output is a file or a pipe rather than a terminal.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 200)

SetOption = typer.Option(
    [], "--set", metavar="PATH=VALUE",
    help="Override a spec field, e.g. --set stop.env_steps=20000 (repeatable; type-checked).",
)
AddressOption = typer.Option(
    None, "--address",
    help="Ray cluster to join (HOST:PORT, ray://HOST:10001 or auto); default: a local Ray.",
)
DashboardOption = typer.Option(
    None, "--address",
    help="Ray dashboard of the cluster (http://HEAD:8265); default: RAY_API_SERVER_ADDRESS or http://127.0.0.1:8265.",
)


def exits(function: Callable) -> Callable:
    """Turn raysmith's errors into messages and exit codes (2 bad input, 1 failed run)."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except BadInput as error:
            err.print(f"[bold red]error[/]: {escape(str(error))}", highlight=False)
            raise typer.Exit(2) from None
        except RunFailed as error:
            err.print(f"[bold red]failed[/]: {escape(str(error))}", highlight=False)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(1) from None

    return wrapper


def _load(spec: Path, overrides: list[str]):
    from pipelines.spec import load_spec

    return load_spec(spec, overrides)


@app.command()
@exits
def run(
    spec: Path = typer.Argument(..., help="Experiment spec (YAML)."),
    set_: list[str] = SetOption,
    address: Optional[str] = AddressOption,
    restore: Optional[Path] = typer.Option(None, "--restore", help="Checkpoint directory to continue from."),
) -> None:
    """Run a spec once, on a local Ray or on a running cluster."""
    from pipelines.runner import run_local
    from pipelines.tracking.mlflow_run import ui_command

    loaded = _load(spec, set_)
    if restore is not None and not restore.is_dir():
        raise BadInput(f"--restore {restore}: no such checkpoint directory")
    outcome = run_local(loaded, address=address, restore=str(restore) if restore else None, console=err)
    out.print(f"[bold green]finished[/] {escape(loaded.spec.kind)} '{escape(loaded.spec.name)}'")
    for key, value in outcome.summary.items():
        out.print(f"  {key}: {format_value(value)}", highlight=False)
    out.print(f"MLflow run {outcome.run_id} (experiment {outcome.experiment_id}) at {outcome.tracking_uri}", highlight=False)
    out.print(f"  see it with: {ui_command(outcome.tracking_uri)}", highlight=False)


@app.command()
@exits
def tune(
    spec: Path = typer.Argument(..., help="Experiment spec with a search: section."),
    set_: list[str] = SetOption,
    address: Optional[str] = AddressOption,
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted search of the same spec."),
    restart: bool = typer.Option(False, "--restart", help="Delete an earlier search of this name and start again."),
) -> None:
    """Run the spec's search: section with Ray Tune (random, grid, Optuna; ASHA, PBT)."""
    from pipelines.search import print_search, run_search, search_failed
    from pipelines.tracking.mlflow_run import ui_command

    if resume and restart:
        raise BadInput("give --resume or --restart, not both")
    loaded = _load(spec, set_)
    outcome = run_search(loaded, address=address, resume=resume, restart=restart, console=err)
    print_search(outcome, loaded.spec.search, out)
    out.print(f"MLflow parent run {outcome.parent_run_id} at {outcome.tracking_uri}", highlight=False)
    out.print(f"  see it with: {ui_command(outcome.tracking_uri)}", highlight=False)
    failure = search_failed(outcome, loaded)
    if failure:
        raise failure


@app.command()
@exits
def submit(
    spec: Path = typer.Argument(..., help="Experiment spec (YAML) inside the project."),
    address: Optional[str] = DashboardOption,
    set_: list[str] = SetOption,
    follow: bool = typer.Option(False, "--follow", help="Stream the job's log and exit with its result."),
    working_dir: Optional[Path] = typer.Option(None, "--working-dir", help="Folder uploaded with the job; default: the spec's project."),
    pip: list[str] = typer.Option([], "--pip", help="Extra pip requirement installed for this job (repeatable)."),
) -> None:
    """Submit a spec as a Ray Job; prints the submission id."""
    from pipelines import jobs

    loaded = _load(spec, set_)
    submission_id = jobs.submit(loaded, address=address, working_dir=working_dir, pip=pip, console=err)
    out.print(submission_id, highlight=False)
    if not follow:
        err.print(f"follow it with: raysmith jobs logs {submission_id} --follow --address {jobs.dashboard_address(address)}",
                  markup=False)
        return
    client = jobs.job_client(address)
    try:
        status = jobs.follow(client, submission_id)
    except KeyboardInterrupt:
        err.print(f"stopped following; the job keeps running. Stop it with: raysmith jobs stop {submission_id}", markup=False)
        raise typer.Exit(1) from None
    err.print(f"job {submission_id}: {status}", markup=False)
    jobs.finish(client, submission_id, status)


@jobs_app.command("list")
@exits
def jobs_list(address: Optional[str] = DashboardOption) -> None:
    """Jobs on the cluster, newest first."""
    from pipelines import jobs

    details = jobs.job_client(address).list_jobs()
    table = Table()
    for column in ("submission id", "status", "started", "entrypoint"):
        table.add_column(column, overflow="fold")
    for job in sorted(details, key=lambda j: j.start_time or 0, reverse=True):
        started = datetime.fromtimestamp(job.start_time / 1000).strftime("%Y-%m-%d %H:%M:%S") if job.start_time else ""
        table.add_row(job.submission_id or job.job_id or "", job.status.value, started, job.entrypoint)
    out.print(table)


@jobs_app.command("status")
@exits
def jobs_status(submission_id: str, address: Optional[str] = DashboardOption) -> None:
    """Status of one job (and its message when it failed)."""
    from pipelines import jobs

    info = jobs.job_call(address, submission_id, "get_job_info")
    out.print(f"{submission_id}: {info.status.value}" + (f" - {info.message}" if info.message else ""),
              highlight=False, markup=False)


@jobs_app.command("logs")
@exits
def jobs_logs(
    submission_id: str,
    address: Optional[str] = DashboardOption,
    follow: bool = typer.Option(False, "--follow", help="Keep streaming until the job ends."),
) -> None:
    """Print a job's log."""
    from pipelines import jobs

    logs = jobs.job_call(address, submission_id, "get_job_logs")  # also checks that the job exists
    if follow:
        jobs.follow(jobs.job_client(address), submission_id)
    else:
        sys.stdout.write(logs)


@jobs_app.command("stop")
@exits
def jobs_stop(submission_id: str, address: Optional[str] = DashboardOption) -> None:
    """Ask a running job to stop."""
    from pipelines import jobs

    stopped = jobs.job_call(address, submission_id, "stop_job")
    out.print(f"{submission_id}: {'stop requested' if stopped else 'was not running'}", markup=False)


@cluster_app.command("validate")
@exits
def cluster_validate(file: Path = typer.Argument(Path("cluster.yaml"), help="Cluster-launcher YAML.")) -> None:
    """Check a cluster-launcher file offline against Ray's schema."""
    from pipelines.cluster import validate_cluster_file

    config = validate_cluster_file(file)
    types = config.get("available_node_types") or {}
    out.print(f"{file}: valid ({config['provider']['type']} provider, node types: {', '.join(types) or 'provider default'})",
              markup=False, highlight=False)


@cluster_app.command("up")
@exits
def cluster_up(file: Path = typer.Argument(Path("cluster.yaml")), yes: bool = typer.Option(False, "--yes", "-y")) -> None:
    """Validate, then `ray up` the cluster."""
    from pipelines.cluster import ray_cluster_command

    ray_cluster_command("up", file, ["--yes"] if yes else [])


@cluster_app.command("down")
@exits
def cluster_down(file: Path = typer.Argument(Path("cluster.yaml")), yes: bool = typer.Option(False, "--yes", "-y")) -> None:
    """Validate, then `ray down` the cluster."""
    from pipelines.cluster import ray_cluster_command

    ray_cluster_command("down", file, ["--yes"] if yes else [])


@app.command()
@exits
def runs(
    experiment: Optional[str] = typer.Option(None, "--experiment", "-e", help="Only this MLflow experiment."),
    limit: int = typer.Option(20, "--limit", "-n", min=1),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="Default: MLFLOW_TRACKING_URI or ./mlflow.db."),
) -> None:
    """Recent MLflow runs with their key metrics."""
    from pipelines.registry import available_kinds, get_pipeline
    from pipelines.tracking.mlflow_run import TAG_KIND, make_client, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        out.print(f"no runs yet: {uri[len('sqlite:///'):]} does not exist", highlight=False)
        return
    client = make_client(uri)
    if experiment:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            names = [e.name for e in client.search_experiments()]
            raise BadInput(f"no MLflow experiment '{experiment}' at {uri}; experiments: {', '.join(names) or 'none'}")
        experiments = [found]
    else:
        experiments = client.search_experiments()
    names = {e.experiment_id: e.name for e in experiments}
    found_runs = client.search_runs(list(names), order_by=["attributes.start_time DESC"], max_results=limit) if names else []
    kinds = set(available_kinds())
    metric_keys: list[str] = []
    for run_ in found_runs:
        kind = run_.data.tags.get(TAG_KIND)
        if kind in kinds:
            metric_keys += [k for k in get_pipeline(kind).key_metrics if k not in metric_keys]
    table = Table(title=f"runs at {uri}")
    for column in ("started", "experiment", "name", "status", "run id", *metric_keys):
        table.add_column(column, overflow="fold")
    for run_ in found_runs:
        started = datetime.fromtimestamp(run_.info.start_time / 1000).strftime("%m-%d %H:%M")
        metrics = [run_.data.metrics.get(k) for k in metric_keys]
        table.add_row(started, names[run_.info.experiment_id], run_.info.run_name or "", run_.info.status,
                      run_.info.run_id, *(format_value(m) for m in metrics))
    out.print(table)


@app.command()
@exits
def check(spec: Path = typer.Argument(..., help="Experiment spec (YAML)."), set_: list[str] = SetOption) -> None:
    """Validate a spec without running it; prints the resolved spec."""
    loaded = _load(spec, set_)
    out.print(loaded.resolved_yaml(), highlight=False)
    err.print(f"{spec}: valid {loaded.spec.kind} spec (hash {loaded.spec_hash()})")


@app.command()
def kinds() -> None:
    """Pipeline kinds a spec can name."""
    from pipelines.registry import available_kinds, get_pipeline

    for kind in available_kinds():
        out.print(f"{kind}: {get_pipeline(kind).summary}", highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
