"""The ``rl`` pipeline kind: any RLlib algorithm (or one of raysmith's) on any gymnasium env.

The spec's ``env_runners``, ``training``, ``learners`` and ``model`` sections are passed
to the same-named :class:`~ray.rllib.algorithms.AlgorithmConfig` methods (``model`` is the
RLModule's ``model_config``), so every RLlib option is available under its RLlib name and
misspelled ones are refused before Ray starts.

Evaluation is deterministic (``explore: false``) on separate evaluation EnvRunners, at
env step 0 and then every ``evaluation.every_env_steps`` env steps, logged as
``evaluation/return_mean`` with env steps as the MLflow step.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import time
from typing import Any, Literal

from pydantic import Field, model_validator

from pipelines.errors import Problem
from pipelines.pipeline import Pipeline
from pipelines.registry import register
from pipelines.session import Session
from pipelines.spec import ExperimentSpec, SpecModel, did_you_mean
from pipelines.tracking.mlflow_run import finite_number

EVALUATE_ON_DEMAND = 2**31 - 1
"""RLlib only builds evaluation EnvRunners when an interval is set; this one never fires,
so evaluation runs exactly when this pipeline calls ``Algorithm.evaluate`` (by env steps)."""

CONFIG_SECTIONS = {"env_runners": "env_runners", "training": "training", "learners": "learners", "reporting": "reporting"}
"""Spec section -> AlgorithmConfig method it is passed to."""

DISCRETE_ONLY = {"DQN"}
"""RLlib algorithms that need a discrete action space."""


class _QuietNewStackNotice(logging.Filter):
    """RLlib logs a warning that the new API stack is the default for every config built."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "on the new API stack" not in record.getMessage()


logging.getLogger("ray.rllib.algorithms.algorithm_config").addFilter(_QuietNewStackNotice())


class StopConditions(SpecModel):
    """The run ends at the first condition met; at least one budget is required."""

    env_steps: int | None = Field(None, ge=1)
    """Environment steps sampled for training."""
    time_s: float | None = Field(None, gt=0)
    """Wall-clock seconds of training in this process."""
    iterations: int | None = Field(None, ge=1)
    """``Algorithm.train()`` calls."""
    target_return: float | None = None
    """Stop once the evaluation return mean (the training return mean when evaluation is
    off) reaches this."""

    @model_validator(mode="after")
    def _has_budget(self) -> "StopConditions":
        if self.env_steps is None and self.time_s is None and self.iterations is None:
            raise ValueError("give a budget: env_steps, time_s or iterations (target_return alone may never end)")
        return self


class EvaluationSettings(SpecModel):
    enabled: bool = True
    every_env_steps: int = Field(10_000, ge=1)
    episodes: int = Field(10, ge=1)
    """Episodes per evaluation."""
    num_env_runners: int = Field(0, ge=0)
    """Remote evaluation EnvRunners; 0 evaluates on one EnvRunner in the algorithm's process."""
    at_start: bool = True
    """Evaluate the untrained policy at env step 0 (curves start at 0)."""
    explore: bool = False


class CheckpointSettings(SpecModel):
    every_iterations: int = Field(10, ge=1)
    keep: int = Field(2, ge=1)
    """Checkpoints kept on disk by a local run."""
    at_end: bool = True


class RLSpec(ExperimentSpec):
    kind: Literal["rl"] = "rl"
    algorithm: str
    """An RLlib algorithm (PPO, DQN, SAC, APPO, IMPALA, ...) or one of raysmith's agents."""
    env: str
    """A gymnasium environment id, e.g. ``CartPole-v1``, ``HalfCheetah-v5``."""
    env_config: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of ``gymnasium.make``."""
    env_runners: dict[str, Any] = Field(default_factory=dict)
    """Arguments of ``AlgorithmConfig.env_runners`` (num_env_runners, num_envs_per_env_runner, ...)."""
    training: dict[str, Any] = Field(default_factory=dict)
    """Arguments of the algorithm's ``training`` (lr, gamma, train_batch_size_per_learner, ...)."""
    learners: dict[str, Any] = Field(default_factory=dict)
    """Arguments of ``AlgorithmConfig.learners`` (num_learners, num_gpus_per_learner, ...)."""
    model: dict[str, Any] = Field(default_factory=dict)
    """The RLModule's ``model_config`` (fcnet_hiddens, fcnet_activation, ...)."""
    reporting: dict[str, Any] = Field(default_factory=dict)
    """Arguments of ``AlgorithmConfig.reporting`` (min_sample_timesteps_per_iteration: the env
    steps one iteration covers, i.e. how often metrics are reported and stop conditions checked)."""
    stop: StopConditions
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)
    checkpoint: CheckpointSettings = Field(default_factory=CheckpointSettings)


def algorithm_names() -> list[str]:
    from ray.rllib.algorithms.registry import ALGORITHMS as RLLIB_ALGORITHMS

    from agents import ALGORITHMS

    return sorted(set(RLLIB_ALGORITHMS) | set(ALGORITHMS))


def resolve_algorithm(name: str) -> type:
    """The Algorithm class for ``name``: raysmith's agents first, then RLlib's registry."""
    from ray.rllib.algorithms.registry import ALGORITHMS as RLLIB_ALGORITHMS

    from agents import ALGORITHMS

    if name in ALGORITHMS:
        module, _, attribute = ALGORITHMS[name].partition(":")
        return getattr(importlib.import_module(module), attribute)
    return RLLIB_ALGORITHMS[name]()[0]


def env_ids() -> list[str]:
    import gymnasium as gym

    import agents  # noqa: F401  (registers raysmith's environments)

    return sorted(gym.envs.registry)


def _allowed_arguments(config: Any, method: str) -> list[str]:
    names: set[str] = set()
    for cls in type(config).__mro__:
        function = cls.__dict__.get(method)
        if function is None:
            continue
        for parameter in inspect.signature(function).parameters.values():
            if parameter.kind is inspect.Parameter.KEYWORD_ONLY or (
                parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and parameter.name != "self"
            ):
                names.add(parameter.name)
    return sorted(names)


def _apply_section(config: Any, section: str, values: dict[str, Any]) -> None:
    """``config.<method>(**values)``, turning refused arguments into a spec problem."""
    method = CONFIG_SECTIONS[section]
    allowed = _allowed_arguments(config, method)
    unknown = [key for key in values if key not in allowed]
    if unknown:
        key = unknown[0]
        raise _SectionError(
            Problem(f"{section}.{key}", f"unknown {type(config).__name__}.{method}() argument '{key}'"
                    f"{did_you_mean(key, allowed)}; allowed: {', '.join(allowed)}")
        )
    try:
        getattr(config, method)(**values)
    except (TypeError, ValueError) as err:
        raise _SectionError(Problem(section, str(err))) from None


class _SectionError(Exception):
    def __init__(self, problem: Problem):
        super().__init__(problem.message)
        self.problem = problem


def model_config_keys(algorithm: str, config: Any) -> set[str]:
    """Settings the algorithm's RLModule reads from ``model_config``.

    raysmith's algorithms list theirs (``model_config_keys``); RLlib's default modules read
    ``DefaultModelConfig`` plus what the algorithm adds to every model config.
    """
    import dataclasses

    from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig

    own = getattr(resolve_algorithm(algorithm), "model_config_keys", None)
    if own is not None:
        return set(own)
    return {f.name for f in dataclasses.fields(DefaultModelConfig)} | set(config._model_config_auto_includes)


def build_algorithm_config(spec: RLSpec):
    """The AlgorithmConfig a spec describes. Pure: needs no Ray."""
    from ray.rllib.algorithms.algorithm_config import AlgorithmConfig

    algorithm = resolve_algorithm(spec.algorithm)
    config = algorithm.get_default_config()
    config.environment(spec.env, env_config=dict(spec.env_config))
    for section in CONFIG_SECTIONS:
        _apply_section(config, section, getattr(spec, section))
    if spec.model:
        config.rl_module(model_config=dict(spec.model))
    config.debugging(seed=spec.seed)
    config.fault_tolerance(restart_failed_env_runners=True)
    if spec.evaluation.enabled:
        config.evaluation(
            evaluation_interval=EVALUATE_ON_DEMAND,
            evaluation_num_env_runners=spec.evaluation.num_env_runners,
            evaluation_duration=spec.evaluation.episodes,
            evaluation_duration_unit="episodes",
            evaluation_config=AlgorithmConfig.overrides(explore=spec.evaluation.explore),
        )
    return config


def _check_env(spec: RLSpec) -> list[Problem]:
    import gymnasium as gym

    ids = env_ids()
    if spec.env not in ids:
        return [Problem("env", f"unknown gymnasium environment '{spec.env}'{did_you_mean(spec.env, ids)}")]
    try:
        env = gym.make(spec.env, **spec.env_config)
    except TypeError as err:
        return [Problem("env_config", f"{spec.env} refused these arguments: {err}")]
    except Exception as err:  # a missing optional dependency, a bad value...
        return [Problem("env", f"could not create {spec.env}: {type(err).__name__}: {err}")]
    try:
        observation_space, action_space = env.observation_space, env.action_space
    finally:
        env.close()
    if spec.algorithm in DISCRETE_ONLY and not isinstance(action_space, gym.spaces.Discrete):
        return [Problem("env", f"{spec.algorithm} needs a discrete action space; {spec.env} has {action_space}")]
    check_spaces = getattr(resolve_algorithm(spec.algorithm), "check_spaces", None)
    reason = check_spaces(observation_space, action_space) if check_spaces else None
    return [Problem("env", f"{spec.algorithm} cannot run on {spec.env}: {reason}")] if reason else []


EPISODE_STATS = {
    "return_mean": "episode_return_mean",
    "return_min": "episode_return_min",
    "return_max": "episode_return_max",
    "episode_len_mean": "episode_len_mean",
}
"""Our name -> RLlib's name of the episode statistics reported for training and evaluation."""


def _episode_stats(env_runner_metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    out = {}
    for name, source in EPISODE_STATS.items():
        value = finite_number(env_runner_metrics.get(source))
        if value is not None:
            out[f"{prefix}/{name}"] = value
    return out


_LEARNER_BOOKKEEPING = ("throughput", "timer", "weights_seq_no", "module_steps", "trainable_parameters",
                        "diff_num_grad_updates")
"""RLlib learner statistics that are counters or timings, not learning signals."""


def extract_metrics(result: dict[str, Any]) -> dict[str, float]:
    """Flat, stable metric names from an RLlib result dict."""
    runners = result.get("env_runners", {})
    env_steps = runners.get("num_env_steps_sampled_lifetime", result.get("num_env_steps_sampled_lifetime", 0))
    metrics: dict[str, float] = {
        "iteration": float(result.get("training_iteration", 0)),
        "env_steps": float(env_steps or 0),
        "time/total_s": float(result.get("time_total_s", 0.0)),
        "time/iteration_s": float(result.get("time_this_iter_s", 0.0)),
    }
    sampled = finite_number(runners.get("num_env_steps_sampled"))
    if sampled is not None and metrics["time/iteration_s"] > 0:
        metrics["throughput/env_steps_per_s"] = sampled / metrics["time/iteration_s"]
    metrics.update(_episode_stats(runners, "train"))
    for key, value in result.get("population", {}).items():  # ERL and RIM: one generation per iteration
        number = finite_number(value)
        if number is not None:
            metrics[f"population/{key}"] = number
    learners = {k: v for k, v in result.get("learners", {}).items() if k != "__all_modules__"}
    for module_id, stats in learners.items():
        prefix = "learner" if len(learners) == 1 else f"learner/{module_id}"
        for key, value in stats.items():
            if any(part in key for part in _LEARNER_BOOKKEEPING):
                continue
            number = finite_number(value)
            if number is not None:
                metrics[f"{prefix}/{key}"] = number
    return metrics


def evaluation_metrics(result: dict[str, Any]) -> dict[str, float]:
    evaluation = result.get("evaluation", result)
    return _episode_stats(evaluation.get("env_runners", {}), "evaluation")


def lifetime_env_steps(algo) -> int:
    return int(algo.metrics.peek(("env_runners", "num_env_steps_sampled_lifetime"), default=0) or 0)


def restore_with_configured_learning_rates(algo, path: str) -> None:
    """``algo.restore_from_path`` whose Learners then use the config's learning rates.

    PBT restores a checkpoint into a config with perturbed hyperparameters; without this the
    first update after the restore trains with the checkpoint's rates.
    """
    from agents.common.learning_rates import apply_learning_rate_schedules

    algo.restore_from_path(path)
    steps = lifetime_env_steps(algo)
    algo.learner_group.foreach_learner(lambda learner: apply_learning_rate_schedules(learner, steps))


@register
class RLPipeline(Pipeline):
    kind = "rl"
    spec_model = RLSpec
    summary = "any RLlib (or raysmith) algorithm on a gymnasium environment"
    # `run` stops its algorithm (EnvRunners, Learners) in a `finally`, even when Tune ends it
    reuse_trial_processes = True
    step_metric = "env_steps"
    key_metrics = ("evaluation/return_mean", "train/return_mean", "env_steps")
    curve_metrics = ("train/return_mean", "evaluation/return_mean", "population/champion_fitness",
                     "population/mean_fitness", "population/worst_fitness")
    """(The population's fitness appears for ERL and RIM only.)"""

    def check(self, spec: RLSpec) -> list[Problem]:
        names = algorithm_names()
        if spec.algorithm not in names:
            return [Problem("algorithm", f"unknown algorithm '{spec.algorithm}'{did_you_mean(spec.algorithm, names)}; "
                                         f"available: {', '.join(names)}")]
        problems = _check_env(spec)
        if problems:
            return problems
        lr = spec.training.get("lr")
        if isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr <= 0:
            # RLlib passes any number to the optimizer; a negative rate would ascend the loss
            return [Problem("training.lr", f"must be positive; got {lr!r}")]
        try:
            config = build_algorithm_config(spec)
        except _SectionError as err:
            return [err.problem]
        allowed_model = model_config_keys(spec.algorithm, config)
        unknown = [key for key in spec.model if key not in allowed_model]
        if unknown:
            key = unknown[0]
            return [Problem(f"model.{key}", f"unknown {spec.algorithm} model setting '{key}'"
                                            f"{did_you_mean(key, allowed_model)}; allowed: {', '.join(sorted(allowed_model))}")]
        model_problems = getattr(resolve_algorithm(spec.algorithm), "model_config_problems", None)
        if model_problems is not None:
            found = model_problems(spec.model)
            if found:
                return [Problem(f"model.{key}", message) for key, message in found]
        try:
            config.validate()
        except Exception as err:
            message = str(err).split("\nTo suppress")[0]
            return [Problem("training", f"{spec.algorithm} refused this configuration: {message}")]
        return []

    def reported_metrics(self, spec: RLSpec) -> tuple[set[str], tuple[str, ...]]:
        names = {"iteration", "env_steps", "time/total_s", "time/iteration_s", "throughput/env_steps_per_s"}
        names |= {f"train/{name}" for name in EPISODE_STATS}
        if spec.evaluation.enabled:
            names |= {f"evaluation/{name}" for name in EPISODE_STATS}
        return names, ("learner/",)

    def trial_resources(self, spec: RLSpec) -> list[dict[str, float]]:
        config = build_algorithm_config(spec)
        request = resolve_algorithm(spec.algorithm).default_resource_request(config)
        bundles = getattr(request, "bundles", None)
        return [dict(b) for b in bundles] if bundles else [{"CPU": 1.0}]

    def checkpoints_to_keep(self, spec: RLSpec) -> int:
        return spec.checkpoint.keep

    def progress_total(self, spec: RLSpec) -> int | None:
        return spec.stop.env_steps

    def run(self, spec: RLSpec, session: Session) -> dict[str, Any]:
        algo = build_algorithm_config(spec).build_algo()
        try:
            return self._train(algo, spec, session)
        finally:
            algo.stop()

    def _train(self, algo, spec: RLSpec, session: Session) -> dict[str, Any]:
        if session.restore_from:
            restore_with_configured_learning_rates(algo, session.restore_from)
        evaluation = spec.evaluation
        stop = spec.stop
        started = time.monotonic()
        env_steps = lifetime_env_steps(algo)
        best_eval: float | None = None
        last_eval_step: int | None = None
        metrics: dict[str, float] = {}

        def run_evaluation() -> dict[str, float]:
            nonlocal best_eval, last_eval_step
            result = evaluation_metrics(algo.evaluate())
            last_eval_step = env_steps
            value = result.get("evaluation/return_mean")
            if value is not None:
                best_eval = value if best_eval is None else max(best_eval, value)
            return result

        if evaluation.enabled and evaluation.at_start and env_steps == 0:
            session.report({**run_evaluation(), "env_steps": 0.0, "iteration": 0.0}, step=0)
        next_eval = (env_steps // evaluation.every_env_steps + 1) * evaluation.every_env_steps
        iteration = int(algo.iteration)
        # a checkpoint restored at its budget (a PBT clone of a finished trial) trains no further
        done = self._stop_reason(stop, env_steps, iteration, 0.0, {}, evaluation.enabled)
        if done:
            metrics = {"env_steps": float(env_steps), "iteration": float(iteration)}
            if evaluation.enabled:
                metrics.update(run_evaluation())
            session.report(metrics, step=env_steps)

        while not done:
            result = algo.train()
            metrics = extract_metrics(result)
            env_steps = int(metrics["env_steps"])
            iteration = int(metrics["iteration"])
            elapsed = time.monotonic() - started
            if evaluation.enabled and env_steps >= next_eval:
                metrics.update(run_evaluation())
                next_eval = (env_steps // evaluation.every_env_steps + 1) * evaluation.every_env_steps
            done = self._stop_reason(stop, env_steps, iteration, elapsed, metrics, evaluation.enabled)
            if done and evaluation.enabled and last_eval_step != env_steps:
                metrics.update(run_evaluation())
            checkpoint = None
            if session.checkpoint_due(iteration, spec.checkpoint.every_iterations, metrics) or (done and spec.checkpoint.at_end):
                checkpoint = session.new_checkpoint_dir()
                algo.save_to_path(str(checkpoint))
            session.report(metrics, step=env_steps, checkpoint=checkpoint)
        summary: dict[str, Any] = {
            "stop_reason": done,
            "iterations": iteration,
            "env_steps": env_steps,
            "time_s": round(time.monotonic() - started, 1),
        }
        for key in self.key_metrics:
            if key in metrics and key not in summary:
                summary[key] = metrics[key]
        if best_eval is not None:
            summary["best/evaluation/return_mean"] = best_eval
        return summary

    @staticmethod
    def _stop_reason(
        stop: StopConditions, env_steps: int, iteration: int, elapsed: float, metrics: dict[str, float], evaluating: bool
    ) -> str | None:
        if stop.target_return is not None:
            key = "evaluation/return_mean" if evaluating else "train/return_mean"
            value = metrics.get(key)
            if value is not None and value >= stop.target_return:
                return f"{key} {value:.4g} >= target {stop.target_return:g}"
        if stop.env_steps is not None and env_steps >= stop.env_steps:
            return f"env_steps {env_steps} >= {stop.env_steps}"
        if stop.iterations is not None and iteration >= stop.iterations:
            return f"iterations {iteration} >= {stop.iterations}"
        if stop.time_s is not None and elapsed >= stop.time_s:
            return f"time {elapsed:.0f}s >= {stop.time_s:g}s"
        return None
