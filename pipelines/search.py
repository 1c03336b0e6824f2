"""``raysmith tune``: a spec's ``search:`` section run with Ray Tune.

Each trial merges its sampled values into the spec (dotted paths of ``search.space``),
validates the result and runs the pipeline with a :class:`~pipelines.session.TuneSession`.
The driver records the search as one MLflow run and every trial as a run nested under it.
An interrupted search resumes with ``--resume`` (``Tuner.restore``): finished trials are
kept, unfinished and errored ones continue from their last checkpoint.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pipelines.cluster import ray_session
from pipelines.errors import BadInput, Problem, RunFailed, SpecError
from pipelines.pipeline import Pipeline
from pipelines.progress import format_value
from pipelines.runner import start_tracker
from pipelines.session import TuneSession
from pipelines.spec import (
    AshaScheduler,
    Distribution,
    LoadedSpec,
    PbtScheduler,
    SearchSettings,
    flatten,
    nest,
    validate_data,
)
from pipelines.tracking.mlflow_run import RunTracker
from pipelines.tracking.tune_callback import trial_runs

STATE_FILE = "raysmith_search.json"


def to_tune_domain(dist: Distribution, as_grid: bool = False):
    from ray import tune

    args = dist.args
    if dist.name == "grid" or (as_grid and dist.name == "choice"):
        return tune.grid_search(list(args))
    if dist.name == "choice":
        return tune.choice(list(args))
    if dist.name == "uniform":
        return tune.uniform(*args)
    if dist.name == "loguniform":
        return tune.loguniform(*args)
    if dist.name == "quniform":
        return tune.quniform(*args)
    return tune.randint(*args)


def param_space(search: SearchSettings) -> dict[str, Any]:
    grid = search.searcher == "grid"
    return nest({path: to_tune_domain(dist, as_grid=grid) for path, dist in search.space.items()})


def _scheduler(search: SearchSettings, pipeline: Pipeline):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    scheduler = search.scheduler
    if isinstance(scheduler, AshaScheduler):
        return ASHAScheduler(
            time_attr=scheduler.time_attr or pipeline.time_attr,
            max_t=scheduler.max_t,
            grace_period=scheduler.grace_period,
            reduction_factor=scheduler.reduction_factor,
        )
    if isinstance(scheduler, PbtScheduler):
        return PopulationBasedTraining(
            time_attr=scheduler.time_attr or pipeline.time_attr,
            perturbation_interval=scheduler.perturbation_interval,
            hyperparam_mutations=param_space(search),
            quantile_fraction=scheduler.quantile_fraction,
            resample_probability=scheduler.resample_probability,
            synch=scheduler.synch,
        )
    return FIFOScheduler()


def _searcher(search: SearchSettings, seed: int):
    """Seeded by the spec's seed, so the same spec samples the same configurations."""
    if search.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=seed)
    from ray.tune.search import BasicVariantGenerator

    # Tune ignores TuneConfig.max_concurrent_trials for a generator; it takes its own limit
    return BasicVariantGenerator(random_state=seed, max_concurrent=search.max_concurrent_trials or 0)


def checkpoints_to_keep(search: SearchSettings) -> int | None:
    """PBT keeps every checkpoint (None).

    Its save requests make Tune register a function trial's last checkpoint a second
    time, and pruning then deletes checkpoints that other trials may still clone.
    """
    return None if isinstance(search.scheduler, PbtScheduler) else search.keep_checkpoints


def trial_tags(parent: RunTracker) -> dict[str, str]:
    """The search run's provenance tags (kind, spec hash, commit, host), for its trials."""
    tags = parent.client.get_run(parent.run_id).data.tags
    kept = {k: v for k, v in tags.items() if k.startswith(("raysmith.", "mlflow.source."))}
    return {**kept, "raysmith.command": "tune-trial"}


def trial(config: dict[str, Any], *, base_data: dict[str, Any], source: str, required: list[str],
           checkpoint_interval: int | None) -> None:
    """Body of one Tune trial (runs in a Ray worker)."""
    from pipelines.registry import get_pipeline
    from pipelines.spec import deep_merge

    spec = validate_data(deep_merge(base_data, config), f"{source} (trial config {flatten(config)})")
    pipeline = get_pipeline(spec.kind)
    session = TuneSession(required, pipeline.step_metric, checkpoint_interval)
    pipeline.run(spec, session)


@dataclass
class SearchOutcome:
    parent_run_id: str
    tracking_uri: str
    experiment_dir: str
    best_config: dict[str, Any] | None = None
    best_metric: float | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    errors: int = 0
    unfinished: int = 0


def experiment_dir(loaded: LoadedSpec) -> Path:
    search = loaded.spec.search
    return Path(search.storage_path).resolve() / loaded.spec.name


def _require_search(loaded: LoadedSpec) -> SearchSettings:
    if loaded.spec.search is None:
        raise SpecError(loaded.source, [Problem("search", "`raysmith tune` needs a search: section "
                                                "(metric, mode, num_samples, space, scheduler)")])
    return loaded.spec.search


def _prepare_directory(loaded: LoadedSpec, resume: bool, restart: bool) -> tuple[Path, dict[str, Any] | None]:
    from ray import tune

    directory = experiment_dir(loaded)
    state_file = directory / STATE_FILE
    state = json.loads(state_file.read_text()) if state_file.is_file() else None
    if resume:
        if not tune.Tuner.can_restore(str(directory)) or state is None:
            raise BadInput(f"nothing to resume at {directory}; run `raysmith tune {loaded.source}` without --resume")
        if state.get("spec_hash") != loaded.spec_hash():
            raise BadInput(f"{loaded.source} changed since the search at {directory} started "
                           f"(spec hash {state.get('spec_hash')} -> {loaded.spec_hash()}); "
                           "resume with the same spec and --set values, or use --restart")
        return directory, state
    if directory.exists():
        if not restart:
            raise BadInput(f"a search named '{loaded.spec.name}' already exists at {directory}; "
                           "continue it with --resume, or replace it with --restart")
        shutil.rmtree(directory)
    return directory, None


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def run_search(
    loaded: LoadedSpec,
    *,
    address: str | None = None,
    resume: bool = False,
    restart: bool = False,
    console: Console | None = None,
) -> SearchOutcome:
    from ray import tune
    from ray.tune import CheckpointConfig, FailureConfig, RunConfig, TuneConfig

    from pipelines.tracking.tune_callback import MlflowTrialCallback

    console = console or Console(stderr=True)
    spec = loaded.spec
    search = _require_search(loaded)
    pipeline = loaded.pipeline
    directory, state = _prepare_directory(loaded, resume, restart)
    bundles = pipeline.trial_resources(spec)

    with ray_session(spec.ray, address) as where:
        console.print(f"[bold]search[/] '{spec.name}': {search.num_samples} sample(s) on {where}; state in {directory}")
        if state is None:
            parent = start_tracker(loaded, "tune")
            parent.log_params({f"search.{k}": v for k, v in flatten(search.model_dump(mode="json")).items()})
            directory.mkdir(parents=True, exist_ok=True)
            state = {"parent_run_id": parent.run_id, "tracking_uri": parent.uri, "spec_hash": loaded.spec_hash()}
            (directory / STATE_FILE).write_text(json.dumps(state, indent=2))
        else:
            parent = RunTracker.reopen(state["tracking_uri"], state["parent_run_id"])
        console.print(f"MLflow parent {parent.describe()}")

        checkpoint_interval = (
            search.scheduler.perturbation_interval if isinstance(search.scheduler, PbtScheduler) else None
        )
        trainable = tune.with_resources(
            tune.with_parameters(
                trial, base_data=loaded.data, source=loaded.source,
                required=[search.metric], checkpoint_interval=checkpoint_interval,
            ),
            tune.PlacementGroupFactory(bundles),
        )
        try:
            if resume:
                tuner = tune.Tuner.restore(str(directory), trainable, resume_unfinished=True, resume_errored=True)
            else:
                callback = MlflowTrialCallback(
                    uri=parent.uri, parent_run_id=parent.run_id, run_name=spec.name,
                    base_data=loaded.spec.model_dump(mode="json", exclude={"search"}),
                    tags=trial_tags(parent),
                    step_metric=pipeline.step_metric, curve_metrics=pipeline.curve_metrics,
                    log_checkpoints=spec.tracking.log_checkpoints,
                )
                tuner = tune.Tuner(
                    trainable,
                    param_space=param_space(search),
                    tune_config=TuneConfig(
                        metric=search.metric,
                        mode=search.mode,
                        num_samples=search.num_samples,
                        max_concurrent_trials=search.max_concurrent_trials,
                        search_alg=_searcher(search, spec.seed),
                        scheduler=_scheduler(search, pipeline),
                    ),
                    run_config=RunConfig(
                        name=spec.name,
                        storage_path=str(directory.parent),
                        failure_config=FailureConfig(max_failures=search.max_failures),
                        checkpoint_config=CheckpointConfig(num_to_keep=checkpoints_to_keep(search)),
                        callbacks=[callback],
                        verbose=1,
                    ),
                )
            results = tuner.fit()
        except KeyboardInterrupt:
            parent.finish("KILLED")
            raise
        except Exception:
            parent.finish("FAILED")
            raise
        outcome = _summarise(results, search, pipeline, parent, directory)
    return outcome


def unfinished_trials(directory: Path) -> list[str]:
    """Trials the saved experiment state says are not done (an interrupted search).

    After Ctrl-C, Tune ends the running trials but saves them as unfinished; the state on
    disk, not the in-memory result grid, tells what a resume would continue.
    """
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(directory))
    return [t.trial_id for t in analysis.trials if t.status not in ("TERMINATED", "ERROR")]


def _summarise(results, search: SearchSettings, pipeline: Pipeline, parent: RunTracker, directory: Path) -> SearchOutcome:
    outcome = SearchOutcome(parent.run_id, parent.uri, str(directory))
    outcome.errors = results.num_errors
    unfinished = unfinished_trials(directory)
    outcome.unfinished = len(unfinished)
    for trial_id in unfinished:
        for run in trial_runs(parent.client, parent.experiment_id, parent.run_id, trial_id):
            parent.client.set_terminated(run.info.run_id, status="KILLED")
    for result in results:
        metrics = result.metrics or {}
        row: dict[str, Any] = {"trial": metrics.get("trial_id", Path(result.path).name if result.path else "?")}
        row.update(flatten(result.config or {}))
        for key in dict.fromkeys((search.metric, *pipeline.key_metrics)):
            row[key] = _number(metrics.get(key))
        row["status"] = "ERROR" if result.error else "OK"
        outcome.rows.append(row)
    scored = [r for r in outcome.rows if r["status"] == "OK" and r.get(search.metric) is not None]
    if scored:
        pick = max if search.mode == "max" else min
        best = pick(scored, key=lambda r: r[search.metric])
        outcome.best_metric = best[search.metric]
        outcome.best_config = {path: best.get(path) for path in search.space}
        parent.log_metrics({f"best/{search.metric}": outcome.best_metric}, step=0)
        # tags, not params: a resumed search may find a different best trial
        parent.set_tags({f"raysmith.best.{k}": v for k, v in outcome.best_config.items()})
    header = list(outcome.rows[0]) if outcome.rows else []
    csv_lines = [",".join(header)] + [",".join("" if r.get(h) is None else str(r.get(h)) for h in header) for r in outcome.rows]
    parent.log_text("\n".join(csv_lines) + "\n", "trials.csv")
    parent.set_tags({"raysmith.trials": len(outcome.rows), "raysmith.trial_errors": outcome.errors,
                     "raysmith.experiment_dir": str(directory)})
    if outcome.unfinished:
        parent.finish("KILLED")
    else:
        parent.finish("FAILED" if outcome.errors else "FINISHED")
    return outcome


def print_search(outcome: SearchOutcome, search: SearchSettings, console: Console) -> None:
    table = Table(title="trials", show_lines=False)
    columns = list(outcome.rows[0]) if outcome.rows else []
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in outcome.rows:
        table.add_row(*(format_value(row.get(c)) for c in columns))
    console.print(table)
    if outcome.best_config is not None:
        console.print(f"[bold]best trial[/]: {search.metric} = {format_value(outcome.best_metric)} with "
                      + ", ".join(f"{k}={v}" for k, v in outcome.best_config.items()))


def search_failed(outcome: SearchOutcome, loaded: LoadedSpec) -> RunFailed | None:
    if outcome.unfinished:
        return RunFailed(f"search interrupted with {outcome.unfinished} unfinished trial(s); "
                         f"continue it with: raysmith tune {loaded.source} --resume")
    if outcome.errors:
        return RunFailed(f"{outcome.errors} trial(s) failed; their tracebacks are in {outcome.experiment_dir} "
                         "and in each failed trial's MLflow run (artifact error/)")
    return None
