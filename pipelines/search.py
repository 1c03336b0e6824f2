"""``raysmith tune``: a spec's ``search:`` section run with Ray Tune.

Each trial merges its sampled values into the spec (dotted paths of ``search.space``),
validates the result and runs the pipeline with a :class:`~pipelines.session.TuneSession`.
The driver records the search as one MLflow run and every trial as a run nested under it.
An interrupted search resumes with ``--resume`` (``Tuner.restore``): finished trials are
kept, unfinished and errored ones continue from their last checkpoint.

``search.storage_path`` is a local folder or a URI pyarrow understands (``s3://``,
``gs://``, ``file://``); trials on a multi-node cluster need storage every node reaches.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pipelines.cluster import ray_session, resolve_address
from pipelines.errors import BadInput, Problem, RunFailed, SpecError
from pipelines.pipeline import Pipeline
from pipelines.progress import format_value
from pipelines.runner import start_tracker
from pipelines.session import TuneSession
from pipelines.spec import (
    AshaScheduler,
    Distribution,
    LoadedSpec,
    Pb2Scheduler,
    PbtScheduler,
    SearchSettings,
    flatten,
    nest,
    validate_data,
)
from pipelines.tracking.mlflow_run import RunTracker, finite_number
from pipelines.tracking.tune_callback import trial_runs

STATE_FILE = "raysmith_search.json"
SEED_RANGE = 2**31 - 1


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


def search_dimensions(search: SearchSettings) -> dict[str, Any]:
    """The searched values as Tune domains, nested like the spec."""
    grid = search.searcher == "grid"
    return nest({path: to_tune_domain(dist, as_grid=grid) for path, dist in search.space.items()})


def param_space(search: SearchSettings) -> dict[str, Any]:
    """What Tune samples per trial: the search dimensions, plus a seed of its own per trial.

    Repeats of one configuration (``num_samples``, grid points) would otherwise be the
    same run repeated. The seeds come from the searcher's random state, itself seeded by the
    spec's seed, so a search is reproducible. Optuna models every dimension it is given, so
    it gets no seed dimension; neither does a space that searches ``seed`` itself.
    """
    from ray import tune

    space = search_dimensions(search)
    if search.seed_per_trial and search.searcher != "optuna" and "seed" not in search.space:
        space["seed"] = tune.randint(0, SEED_RANGE)
    return space


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
    if isinstance(scheduler, Pb2Scheduler):
        try:
            from ray.tune.schedulers.pb2 import PB2

            import GPy  # noqa: F401  (PB2's Gaussian process)
        except ImportError as err:
            raise RuntimeError("scheduler 'pb2' needs GPy: pip install 'raysmith[pb2]' (or pip install GPy)") from err
        return PB2(
            time_attr=scheduler.time_attr or pipeline.time_attr,
            perturbation_interval=scheduler.perturbation_interval,
            hyperparam_bounds=nest({path: list(dist.args[:2]) for path, dist in search.space.items()}),
            quantile_fraction=scheduler.quantile_fraction,
            synch=scheduler.synch,
        )
    if isinstance(scheduler, PbtScheduler):
        return PopulationBasedTraining(
            time_attr=scheduler.time_attr or pipeline.time_attr,
            perturbation_interval=scheduler.perturbation_interval,
            hyperparam_mutations=search_dimensions(search),
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


REUSE_STOP_TIMEOUT_S = 120
"""How long a reused trial process may take to stop its previous trial's pipeline."""


def trial(config: dict[str, Any], *, base_data: dict[str, Any], source: str, required: list[str],
          checkpoint_every: tuple[str, float] | None) -> None:
    """Body of one Tune trial (runs in a Ray worker)."""
    from ray import tune

    from pipelines.registry import get_pipeline
    from pipelines.spec import deep_merge

    spec = validate_data(deep_merge(base_data, config), f"{source} (trial config {flatten(config)})")
    pipeline = get_pipeline(spec.kind)
    # Where trial processes are reused (Pipeline.reuse_trial_processes), handing this process to
    # another trial or a PBT exploit first ends this function (its `finally` stops the
    # algorithm); Tune waits 2 s for that by default and fails the trial when it takes longer.
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", str(REUSE_STOP_TIMEOUT_S))
    checkpoint = tune.get_checkpoint()
    # a local checkpoint is read in place; a remote one is downloaded and removed afterwards
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as restore_from:
        session = TuneSession(required, pipeline.step_metric, restore_from, checkpoint_every)
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


class ExperimentStore:
    """The search's folder under ``storage_path``, local or a pyarrow URI."""

    def __init__(self, storage_path: str, name: str):
        import pyarrow.fs

        if "://" in storage_path:
            self.location = f"{storage_path.rstrip('/')}/{name}"
            self.fs, self.path = pyarrow.fs.FileSystem.from_uri(self.location)
        else:
            self.location = str(Path(storage_path).resolve() / name)
            self.fs, self.path = pyarrow.fs.LocalFileSystem(), self.location
        self.storage_path = self.location.rsplit("/", 1)[0]
        self.is_local = isinstance(self.fs, pyarrow.fs.LocalFileSystem)

    def exists(self) -> bool:
        import pyarrow.fs

        return self.fs.get_file_info(self.path).type != pyarrow.fs.FileType.NotFound

    def delete(self) -> None:
        self.fs.delete_dir(self.path)

    def read_state(self) -> dict[str, Any] | None:
        import pyarrow.fs

        file = f"{self.path}/{STATE_FILE}"
        if self.fs.get_file_info(file).type != pyarrow.fs.FileType.File:
            return None
        with self.fs.open_input_stream(file) as stream:
            return json.loads(stream.read().decode())

    def write_state(self, state: dict[str, Any]) -> None:
        self.fs.create_dir(self.path, recursive=True)
        with self.fs.open_output_stream(f"{self.path}/{STATE_FILE}") as stream:
            stream.write(json.dumps(state, indent=2).encode())


def experiment_store(loaded: LoadedSpec) -> ExperimentStore:
    return ExperimentStore(loaded.spec.search.storage_path, loaded.spec.name)


def _require_search(loaded: LoadedSpec) -> SearchSettings:
    if loaded.spec.search is None:
        raise SpecError(loaded.source, [Problem("search", "`raysmith tune` needs a search: section "
                                                "(metric, mode, num_samples, space, scheduler)")])
    return loaded.spec.search


def _prepare(store: ExperimentStore, loaded: LoadedSpec, resume: bool, restart: bool) -> dict[str, Any] | None:
    from ray import tune

    state = store.read_state()
    if resume:
        if state is None or not tune.Tuner.can_restore(store.location):
            raise BadInput(f"nothing to resume at {store.location}; run `raysmith tune {loaded.source}` without --resume")
        if state.get("spec_hash") != loaded.spec_hash():
            raise BadInput(f"{loaded.source} changed since the search at {store.location} started "
                           f"(spec hash {state.get('spec_hash')} -> {loaded.spec_hash()}); "
                           "resume with the same spec and --set values, or use --restart")
        return state
    if store.exists():
        if not restart:
            raise BadInput(f"a search named '{loaded.spec.name}' already exists at {store.location}; "
                           "continue it with --resume, or replace it with --restart")
        store.delete()
    return None


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
    store = experiment_store(loaded)
    state = _prepare(store, loaded, resume, restart)
    bundles = pipeline.trial_resources(spec)
    if store.is_local and resolve_address(address, spec.ray):
        console.print(f"[yellow]note[/]: trials checkpoint to {store.location} on this machine's disk; on a "
                      "multi-node cluster set search.storage_path to storage every node reaches (s3://, NFS)")

    with ray_session(spec.ray, address) as where:
        console.print(f"[bold]search[/] '{spec.name}': {search.num_samples} sample(s) on {where}; state in {store.location}")
        if state is None:
            parent = start_tracker(loaded, "tune")
            parent.log_params({f"search.{k}": v for k, v in flatten(search.model_dump(mode="json")).items()})
            state = {"parent_run_id": parent.run_id, "tracking_uri": parent.uri, "spec_hash": loaded.spec_hash()}
            store.write_state(state)
        else:
            parent = RunTracker.reopen(state["tracking_uri"], state["parent_run_id"])
        console.print(f"MLflow parent {parent.describe()}", markup=False)

        checkpoint_every = None
        if isinstance(search.scheduler, PbtScheduler):
            checkpoint_every = (search.scheduler.time_attr or pipeline.time_attr, search.scheduler.perturbation_interval)
        trainable = tune.with_resources(
            tune.with_parameters(
                trial, base_data=loaded.data, source=loaded.source,
                required=[search.metric], checkpoint_every=checkpoint_every,
            ),
            tune.PlacementGroupFactory(bundles),
        )
        try:
            if resume:
                tuner = tune.Tuner.restore(store.location, trainable, resume_unfinished=True, resume_errored=True)
            else:
                callback = MlflowTrialCallback(
                    uri=parent.uri, parent_run_id=parent.run_id, run_name=spec.name,
                    base_data=spec.model_dump(mode="json", exclude={"search"}),
                    tags=trial_tags(parent), spec_text=loaded.text, spec_file=Path(loaded.source).name,
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
                        # a trial that ends, or that PBT makes exploit, hands its process to the
                        # next one: no new worker importing torch and RLlib for every trial
                        reuse_actors=pipeline.reuse_trial_processes,
                    ),
                    run_config=RunConfig(
                        name=spec.name,
                        storage_path=store.storage_path,
                        failure_config=FailureConfig(max_failures=search.max_failures),
                        checkpoint_config=CheckpointConfig(num_to_keep=checkpoints_to_keep(search)),
                        callbacks=[callback],
                        verbose=1,
                    ),
                )
            results = tuner.fit()
            return _summarise(results, search, parent, store, pipeline)
        except KeyboardInterrupt:
            parent.finish("KILLED")
            raise
        except Exception as err:
            parent.finish("FAILED")
            raise RunFailed(f"the search failed: {type(err).__name__}: {err} (Tune's state and logs: {store.location})") from err


def unfinished_trials(location: str) -> list[str]:
    """Trials the saved experiment state says are not done (an interrupted search).

    After Ctrl-C, Tune ends the running trials but saves them as unfinished; the state in
    storage, not the in-memory result grid, tells what a resume would continue.
    """
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(location)
    return [t.trial_id for t in analysis.trials if t.status not in ("TERMINATED", "ERROR")]


def _summarise(results, search: SearchSettings, parent: RunTracker, store: ExperimentStore,
               pipeline: Pipeline) -> SearchOutcome:
    outcome = SearchOutcome(parent.run_id, parent.uri, store.location)
    outcome.errors = results.num_errors
    unfinished = unfinished_trials(store.location)
    outcome.unfinished = len(unfinished)
    for trial_id in unfinished:
        for run in trial_runs(parent.client, parent.experiment_id, parent.run_id, trial_id):
            parent.client.set_terminated(run.info.run_id, status="KILLED")
    for result in results:
        metrics = result.metrics or {}
        row: dict[str, Any] = {"trial": metrics.get("trial_id", Path(result.path).name if result.path else "?")}
        row.update(flatten(result.config or {}))
        for key in dict.fromkeys((search.metric, *pipeline.key_metrics)):
            row[key] = finite_number(metrics.get(key))
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
    table = io.StringIO()
    if outcome.rows:
        writer = csv.DictWriter(table, fieldnames=list(outcome.rows[0]), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(outcome.rows)
    parent.log_text(table.getvalue(), "trials.csv")
    parent.set_tags({"raysmith.trials": len(outcome.rows), "raysmith.trial_errors": outcome.errors,
                     "raysmith.experiment_dir": store.location})
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
