"""Experiment specs: YAML files validated with pydantic before anything starts.

A spec has a ``kind`` that names a pipeline (see :mod:`pipelines.registry`); the kind's
model adds its own fields to the common ones below. Unknown keys are refused, and every
error names the file, the field path (and its line), the bad value and what is allowed.

The same file runs locally (``raysmith run``), as a search (``raysmith tune``, which reads
the ``search:`` section) and on a cluster (``raysmith submit``).
"""

from __future__ import annotations

import copy
import difflib
import math
import hashlib
import inspect
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from pipelines.errors import Problem, SpecError

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class SpecLoader(yaml.SafeLoader):
    """Safe YAML with two corrections for specs.

    YAML 1.1 reads ``1e-4`` (no dot) as a string; specs read it as the float users mean.
    A key given twice in one mapping is an error (plain YAML silently keeps the last).
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (first on line {seen[key]})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=SpecLoader)


def read_yaml_file(path: str | Path, what: str = "spec") -> tuple[Any, str]:
    """(parsed data, text) of a YAML file; :class:`SpecError` with the line if it is not valid."""
    source = str(path)
    file = Path(path)
    if not file.is_file():
        raise SpecError(source, [Problem("", "no such file")], what=what)
    text = file.read_text()
    try:
        return read_yaml(text), text
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark else None
        raise SpecError(source, [Problem("", f"not valid YAML: {getattr(err, 'problem', err)}", line)], what=what) from None


class SpecModel(BaseModel):
    """Base of every spec section: unknown keys are an error, not ignored."""

    model_config = ConfigDict(extra="forbid")


class RaySettings(SpecModel):
    """Where the work runs."""

    address: str | None = None
    """Ray cluster to join (``auto``, ``HOST:PORT`` or ``ray://HOST:10001``); unset starts a
    local Ray. ``--address`` and ``RAY_ADDRESS`` override it."""
    num_cpus: int | None = Field(None, ge=1)
    """CPUs of a local Ray; default: all of this machine's. Ignored when joining a cluster."""
    num_gpus: int | None = Field(None, ge=0)
    """GPUs of a local Ray; default: what Ray detects."""
    dashboard: bool = True
    """Start the dashboard of a local Ray (bound to 127.0.0.1)."""


class TrackingSettings(SpecModel):
    """Where MLflow records the run."""

    uri: str | None = None
    """MLflow tracking URI. Default: ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``
    in the working directory (embedded, no server)."""
    experiment: str | None = None
    """MLflow experiment name; default: the spec's ``name``."""
    log_checkpoints: bool = True
    """Copy the final checkpoint into the run's artifacts."""


class Distribution(SpecModel):
    """One search dimension; exactly one of the fields is set, e.g. ``{loguniform: [1e-4, 1e-2]}``."""

    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    quniform: tuple[float, float, float] | None = None
    randint: tuple[int, int] | None = None
    """Integers in [low, high)."""
    choice: list[Any] | None = None
    grid: list[Any] | None = None
    """Every value is tried (a grid search dimension)."""

    @model_validator(mode="after")
    def _exactly_one(self) -> "Distribution":
        chosen = [name for name in type(self).model_fields if getattr(self, name) is not None]
        if len(chosen) != 1:
            raise ValueError(
                f"give exactly one of {', '.join(type(self).model_fields)}; got {chosen or 'none'}"
            )
        name = chosen[0]
        value = getattr(self, name)
        if name in ("uniform", "loguniform", "quniform", "randint") and not value[0] < value[1]:
            raise ValueError(f"{name}: low must be below high, got {list(value)}")
        if name == "loguniform" and value[0] <= 0:
            raise ValueError(f"loguniform: bounds must be positive, got {list(value)}")
        if name in ("choice", "grid") and not value:
            raise ValueError(f"{name}: needs at least one value")
        return self

    @model_serializer
    def _only_the_set_field(self) -> dict[str, Any]:
        return {self.name: list(self.args)}

    @property
    def name(self) -> str:
        return next(n for n in type(self).model_fields if getattr(self, n) is not None)

    @property
    def args(self) -> Any:
        return getattr(self, self.name)

    def probe_values(self) -> list[Any]:
        """Values that must all be valid for the field this dimension sets.

        Continuous dimensions are probed inside the range too: their samples are not whole
        numbers, which an integer field refuses even when both bounds are integers.
        """
        if self.name in ("choice", "grid"):
            return list(self.args)
        if self.name == "randint":
            return [self.args[0], self.args[1] - 1]
        low, high = self.args[0], self.args[1]
        fraction = 0.37731  # an arbitrary point inside, not a round number
        if self.name == "loguniform":
            inside = math.exp(math.log(low) + fraction * (math.log(high) - math.log(low)))
        else:
            inside = low + fraction * (high - low)
        if self.name == "quniform":
            inside = round(inside / self.args[2]) * self.args[2]
        return [low, high, inside]


class FifoScheduler(SpecModel):
    """Run every trial to its own stop condition."""

    type: Literal["fifo"] = "fifo"


class AshaScheduler(SpecModel):
    """Asynchronous successive halving: stop trials that trail at each rung."""

    type: Literal["asha"] = "asha"
    time_attr: str | None = None
    """Result field that measures a trial's progress; default: the pipeline's iteration count."""
    max_t: int = Field(100, ge=1)
    """Longest a trial runs, in ``time_attr`` units."""
    grace_period: int = Field(1, ge=1)
    """No trial is stopped before this many ``time_attr`` units."""
    reduction_factor: float = Field(3.0, gt=1)


class PbtScheduler(SpecModel):
    """Population-based training: exploit the best trials' checkpoints, explore the space."""

    type: Literal["pbt"] = "pbt"
    time_attr: str | None = None
    """Result field that measures a trial's progress; default: the pipeline's iteration count."""
    perturbation_interval: int = Field(5, ge=1)
    """Exploit/explore every this many ``time_attr`` units (trials checkpoint on that beat)."""
    quantile_fraction: float = Field(0.25, gt=0, le=0.5)
    resample_probability: float = Field(0.25, ge=0, le=1)
    synch: bool = False


class Pb2Scheduler(PbtScheduler):
    """PB2 (Parker-Holder et al., 2020): PBT whose explore step picks new values with a
    Gaussian-process bandit over the bounds of the space's numeric dimensions instead of
    random perturbations (needs GPy: ``pip install 'raysmith[pb2]'``)."""

    type: Literal["pb2"] = "pb2"  # type: ignore[assignment]


Scheduler = Annotated[Union[FifoScheduler, AshaScheduler, PbtScheduler, Pb2Scheduler], Field(discriminator="type")]


class SearchSettings(SpecModel):
    """What ``raysmith tune`` searches; ``space`` keys are dotted paths into this spec."""

    metric: str = "evaluation/return_mean"
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(1, ge=1)
    """Trials to sample (each grid point is repeated this many times)."""
    max_concurrent_trials: int | None = Field(None, ge=1)
    searcher: Literal["random", "grid", "optuna"] = "random"
    scheduler: Scheduler = Field(default_factory=FifoScheduler)
    space: dict[str, Distribution] = Field(default_factory=dict)
    max_failures: int = Field(0, ge=-1)
    """Retries of a failed trial from its last checkpoint (-1: without limit)."""
    storage_path: str = "ray_results"
    """Where Tune keeps trial state and checkpoints (resume reads it)."""
    keep_checkpoints: int = Field(2, ge=1)
    """Checkpoints Tune keeps per trial (PBT keeps every one: other trials may clone them)."""
    seed_per_trial: bool = True
    """Give every trial its own seed, drawn reproducibly from the spec's seed (random and grid
    searchers, unless ``seed`` is searched): repeats of a configuration are then independent."""

    @field_validator("scheduler", mode="before")
    @classmethod
    def _scheduler_shorthand(cls, value: Any) -> Any:
        return {"type": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> "SearchSettings":
        kinds = {path: dist.name for path, dist in self.space.items()}
        if self.searcher == "grid":
            bad = [p for p, k in kinds.items() if k not in ("grid", "choice")]
            if bad:
                raise ValueError(f"searcher 'grid' takes only grid/choice dimensions; not {bad}")
        if self.searcher == "optuna" and "grid" in kinds.values():
            raise ValueError("searcher 'optuna' cannot take grid dimensions; use choice")
        if isinstance(self.scheduler, PbtScheduler):
            if not self.space:
                raise ValueError("scheduler 'pbt' needs a non-empty space to perturb")
            if "grid" in kinds.values():
                raise ValueError("scheduler 'pbt' cannot perturb grid dimensions; use choice")
            if self.searcher != "random":
                raise ValueError(f"scheduler '{self.scheduler.type}' samples and perturbs the space itself: use "
                                 f"searcher 'random', not '{self.searcher}'")
            if isinstance(self.scheduler, Pb2Scheduler):
                bad = [p for p, k in kinds.items() if k not in ("uniform", "loguniform", "quniform", "randint")]
                if bad:
                    raise ValueError(f"scheduler 'pb2' models numeric ranges (uniform, loguniform, quniform, randint); "
                                     f"not {bad}")
        return self


class ExperimentSpec(SpecModel):
    """Fields every pipeline kind shares."""

    kind: str
    name: str = Field(pattern=NAME_PATTERN, max_length=100)
    """Run name; default: the file name."""
    description: str = ""
    seed: int = 0
    ray: RaySettings = Field(default_factory=RaySettings)
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)
    search: SearchSettings | None = None
    output_dir: str = "raysmith_runs"
    """Local runs keep checkpoints under ``output_dir/name/``."""


@dataclass
class LoadedSpec:
    """A validated spec and what it was made from."""

    spec: ExperimentSpec
    data: dict[str, Any]
    """The input after ``--set``: what trials merge their sampled values into."""
    source: str
    text: str = ""
    overrides: tuple[str, ...] = ()
    lines: dict[tuple, int] = field(default_factory=dict, repr=False)

    @property
    def pipeline(self):
        from pipelines.registry import get_pipeline

        return get_pipeline(self.spec.kind)

    def resolved_yaml(self) -> str:
        return yaml.safe_dump(self.spec.model_dump(mode="json"), sort_keys=False)

    def spec_hash(self) -> str:
        return spec_hash(self.spec)

    def with_values(self, values: dict[str, Any], source: str | None = None) -> "LoadedSpec":
        """A copy with nested ``values`` merged in and validated again (one trial's config)."""
        data = deep_merge(self.data, values)
        spec = validate_data(data, source or self.source, lines=self.lines)
        return LoadedSpec(spec, data, source or self.source, self.text, self.overrides, self.lines)


def spec_hash(spec: ExperimentSpec) -> str:
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def close_matches(word: str, candidates: typing.Iterable[str], n: int = 5) -> list[str]:
    candidates = list(candidates)
    lowered = {c.lower(): c for c in candidates}
    hits = difflib.get_close_matches(word.lower(), list(lowered), n=n, cutoff=0.6)
    return [lowered[h] for h in hits]


def did_you_mean(word: str, candidates: typing.Iterable[str]) -> str:
    hits = close_matches(word, candidates)
    return f"; did you mean {' or '.join(repr(h) for h in hits)}?" if hits else ""


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists become JSON text."""
    out: dict[str, Any] = {}
    if isinstance(data, dict) and data:
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    elif prefix:
        out[prefix] = json.dumps(data) if isinstance(data, (list, tuple, dict)) else data
    return out


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def nest(dotted: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}``."""
    out: dict[str, Any] = {}
    for path, value in dotted.items():
        node = out
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> ``("a.b", parsed value)``; the value is read as YAML."""
    path, sep, raw = text.partition("=")
    path = path.strip()
    if not sep or not path or not re.fullmatch(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-/]+)*", path):
        raise SpecError(
            "--set", [Problem(text, "expected PATH=VALUE with a dotted path, e.g. stop.env_steps=20000")]
        )
    try:
        value = read_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise SpecError("--set", [Problem(path, f"value {raw!r} is not valid YAML: {err}")]) from None
    return path, value


def set_path(data: dict[str, Any], path: str, value: Any) -> None:
    node = data
    *parents, leaf = path.split(".")
    for depth, part in enumerate(parents):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parents[: depth + 1])
            raise SpecError("--set", [Problem(path, f"'{where}' holds {child!r}, not a section")])
        node = child
    node[leaf] = value


def _line_map(text: str) -> dict[tuple, int]:
    """Map field paths of a YAML document to their 1-based line numbers."""
    lines: dict[tuple, int] = {}
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines

    def walk(node: yaml.Node, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                child = path + (key_node.value,)
                lines[child] = key_node.start_mark.line + 1
                walk(value_node, child)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                lines[path + (index,)] = item.start_mark.line + 1
                walk(item, path + (index,))

    if root is not None:
        walk(root, ())
    return lines


def _unwrap(tp: Any) -> Any:
    """Drop Optional and Annotated around a type."""
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            members = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(members) == 1:
                tp = members[0]
            else:
                return tp
        else:
            return tp


def _union_models(tp: Any) -> dict[str, type[BaseModel]]:
    """Tag -> model for a discriminated union of models tagged by a ``type`` literal."""
    out = {}
    if typing.get_origin(tp) in (Union, types.UnionType):
        for member in typing.get_args(tp):
            if inspect.isclass(member) and issubclass(member, BaseModel) and "type" in member.model_fields:
                out[str(member.model_fields["type"].default)] = member
    return out


def _walk_loc(model: type[BaseModel], loc: tuple) -> tuple[list, type[BaseModel] | None]:
    """Turn a pydantic error location into a field path, dropping union tags.

    Also returns the model that owns the last element (to list the keys it allows).
    """
    tp: Any = model
    parts: list = []
    owner: type[BaseModel] | None = None
    for item in loc:
        tp = _unwrap(tp)
        if inspect.isclass(tp) and issubclass(tp, BaseModel):
            owner = tp
            parts.append(item)
            info = tp.model_fields.get(item) if isinstance(item, str) else None
            tp = info.annotation if info else None
            continue
        tagged = _union_models(tp)
        if tagged and item in tagged:
            tp = tagged[item]
            continue
        owner = None
        parts.append(item)
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin is dict and len(args) == 2:
            tp = args[1]
        elif origin in (list, tuple) and args:
            tp = args[0] if origin is list or len(args) == 1 else args[min(int(item), len(args) - 1)]
        else:
            tp = None
    return parts, owner


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def problems_from_validation(
    err: ValidationError,
    model: type[BaseModel],
    lines: dict[tuple, int] | None = None,
    overridden: typing.Collection[str] = (),
    prefix: tuple = (),
) -> list[Problem]:
    problems = []
    for item in err.errors(include_url=False):
        parts, owner = _walk_loc(model, tuple(item["loc"]))
        parts = list(prefix) + parts
        path = ".".join(str(p) for p in parts)
        kind = item["type"]
        if kind == "extra_forbidden":
            key = str(parts[-1])
            allowed = sorted(owner.model_fields) if owner else []
            message = f"unknown key '{key}'{did_you_mean(key, allowed)}"
            if allowed:
                message += f"; allowed keys here: {', '.join(allowed)}"
        elif kind == "missing":
            message = "required, but missing"
        else:
            detail = item["msg"].removeprefix("Value error, ")
            message = f"{detail}; got {_describe(item.get('input'))}"
        problems.append(_locate(Problem(path, message), lines or {}, overridden))
    return problems


def _locate(problem: Problem, lines: dict[tuple, int], overridden: typing.Collection[str]) -> Problem:
    """Add the YAML line, or mark a value that came from ``--set``."""
    path = problem.path
    if any(path == o or path.startswith(o + ".") for o in overridden):
        return Problem(path, problem.message + " (from --set)", None)
    return Problem(path, problem.message, problem.line or _line_for(lines, tuple(path.split("."))))


def _line_for(lines: dict[tuple, int], parts: tuple) -> int | None:
    while parts:
        if parts in lines:
            return lines[parts]
        parts = parts[:-1]
    return None


def validate_data(
    data: dict[str, Any],
    source: str,
    *,
    lines: dict[tuple, int] | None = None,
    overridden: typing.Collection[str] = (),
) -> ExperimentSpec:
    """Validate a spec dict against its kind's model and the kind's own checks."""
    from pipelines.registry import available_kinds, get_pipeline

    lines = lines or {}
    kind = data.get("kind")
    kinds = available_kinds()
    if kind is None:
        raise SpecError(source, [Problem("kind", f"required, but missing; allowed kinds: {', '.join(kinds)}")])
    if not isinstance(kind, str) or kind not in kinds:
        message = f"unknown pipeline kind {kind!r}{did_you_mean(str(kind), kinds)}; allowed kinds: {', '.join(kinds)}"
        raise SpecError(source, [Problem("kind", message, lines.get(("kind",)))])
    pipeline = get_pipeline(kind)
    try:
        spec = pipeline.spec_model.model_validate(data)
    except ValidationError as err:
        raise SpecError(source, problems_from_validation(err, pipeline.spec_model, lines, overridden)) from None
    problems = pipeline.check(spec)
    if problems:
        raise SpecError(source, [_locate(p, lines, overridden) for p in problems])
    return spec


TUNE_TIME_ATTRIBUTES = ("training_iteration", "time_total_s")
"""Progress counters Tune adds to every result itself."""


def _check_search(loaded: LoadedSpec) -> None:
    """The search's metric and time attribute must be reported by the pipeline; every search
    dimension must name a real field and every value it can take must fit it."""
    search = loaded.spec.search
    if search is None:
        return
    problems: list[Problem] = []
    names, prefixes = loaded.pipeline.reported_metrics(loaded.spec)

    def reported(name: str) -> bool:
        return name in names or name.startswith(prefixes) if prefixes else name in names

    allowed = ", ".join(sorted(names) + [f"{p}*" for p in prefixes])
    if not reported(search.metric):
        message = f"'{search.metric}' is not reported by this {loaded.spec.kind} spec{did_you_mean(search.metric, names)}; reported: {allowed}"
        problems.append(Problem("search.metric", message, _line_for(loaded.lines, ("search", "metric"))))
    time_attr = getattr(search.scheduler, "time_attr", None)
    if time_attr and isinstance(search.scheduler, PbtScheduler) and not reported(time_attr):
        message = (f"'{time_attr}' is not reported by this {loaded.spec.kind} spec; pbt needs a metric the pipeline "
                   f"reports (its checkpoints follow it): {allowed}")
        problems.append(Problem("search.scheduler.time_attr", message, _line_for(loaded.lines, ("search", "scheduler"))))
    elif time_attr and not (reported(time_attr) or time_attr in TUNE_TIME_ATTRIBUTES):
        message = f"'{time_attr}' is not reported{did_you_mean(time_attr, names)}; use one of: {allowed}, {', '.join(TUNE_TIME_ATTRIBUTES)}"
        problems.append(Problem("search.scheduler.time_attr", message, _line_for(loaded.lines, ("search", "scheduler"))))
    for path, dist in search.space.items():
        line = _line_for(loaded.lines, ("search", "space", path))
        for value in dist.probe_values():
            probe = copy.deepcopy(loaded.data)
            try:
                set_path(probe, path, value)
                validate_data(probe, loaded.source)
            except SpecError as err:
                for problem in err.problems:
                    message = f"value {value!r} is not valid for '{problem.path}': {problem.message}"
                    problems.append(Problem(f"search.space.{path}", message, line))
                break
    if problems:
        raise SpecError(loaded.source, problems)


def load_spec(path: str | Path, overrides: typing.Sequence[str] = ()) -> LoadedSpec:
    """Read, override and validate a spec file; raises :class:`SpecError` naming every problem."""
    source = str(path)
    file = Path(path)
    data, text = read_yaml_file(path)
    if not isinstance(data, dict):
        raise SpecError(source, [Problem("", f"a spec is a mapping of keys to values; got {_describe(data)}")])
    data.setdefault("name", re.sub(r"[^A-Za-z0-9_.-]", "-", file.stem).lstrip("-.") or "experiment")
    overridden = []
    for item in overrides:
        key, value = parse_override(item)
        set_path(data, key, value)
        overridden.append(key)
    lines = _line_map(text)
    spec = validate_data(data, source, lines=lines, overridden=overridden)
    loaded = LoadedSpec(spec, data, source, text, tuple(overrides), lines)
    _check_search(loaded)
    return loaded
