"""What raysmith's off-policy algorithms (RUD/TD3/DDPG, NROWAN-DQN/NoisyNet-DQN/DQN) share.

Both own their replay buffer in one Learner, collect ``update_interval`` env steps between
rounds of ``updates_per_step`` updates per step, and checkpoint the same extra state: the
Algorithm's fractional update credit, the Learner's counters, minibatch generator and,
optionally, replay buffer.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from typing import Any

logger = logging.getLogger(__name__)


def replay_config_errors(config: Any, name: str) -> list[str]:
    """Problems with the settings every replay-owning algorithm of raysmith reads."""
    errors = []
    if int(config.update_interval) < 1:
        errors.append(f"update_interval must be >= 1, got {config.update_interval}")
    if config.updates_per_step < 0:
        errors.append(f"updates_per_step must be >= 0, got {config.updates_per_step}")
    if config.replay_capacity < config.train_batch_size_per_learner:
        errors.append("replay_capacity must hold at least one minibatch (train_batch_size_per_learner)")
    if config.num_learners > 1:
        errors.append(f"{name} trains on one Learner that owns the replay buffer: num_learners must be 0 "
                      f"(in the driver) or 1 (a remote Learner, e.g. on a GPU); got {config.num_learners}")
    if config.grad_clip is not None:
        errors.append(f"grad_clip is not part of {name} and is not applied; leave it unset")
    if config.is_multi_agent:
        errors.append(f"{name} is single-agent")
    from agents.common.transition_env_runner import TransitionEnvRunner

    collects = isinstance(config.env_runner_cls, type) and issubclass(config.env_runner_cls, TransitionEnvRunner)
    if collects and (config._env_to_module_connector is not None or config._module_to_env_connector is not None):
        errors.append(f"{name} collects its env steps as plain transitions (TransitionEnvRunner.collect), which "
                      "applies no env-to-module or module-to-env connectors; remove them (observation "
                      "normalisation, where the algorithm has it, is a training setting)")
    return errors


def warn_if_envs_idle(config: Any, name: str) -> None:
    """Warn when a block is smaller than the environments that could step it.

    :func:`~agents.common.transition_env_runner.collect_from_runners` gives each block's steps
    to the EnvRunners and, within one, to its sub-environments in order, so a block of
    ``update_interval`` steps moves at most that many environments: with one-step blocks (TD3,
    DDPG, the DQNs) only the first EnvRunner's first sub-environment ever steps."""
    from agents.common.transition_env_runner import TransitionEnvRunner

    if getattr(config, "in_evaluation", False):
        return  # evaluation EnvRunners play whole episodes, not blocks
    if not (isinstance(config.env_runner_cls, type) and issubclass(config.env_runner_cls, TransitionEnvRunner)):
        return
    parallel = max(1, int(config.num_env_runners)) * max(1, int(config.num_envs_per_env_runner))
    if int(config.update_interval) < parallel:
        warnings.warn(
            f"{name}: update_interval={config.update_interval} is smaller than the {parallel} environments "
            f"(num_env_runners x num_envs_per_env_runner); each block steps only {config.update_interval} of them "
            f"and the others stay idle. Set update_interval >= {parallel} (blocks of that many steps, then their "
            f"updates) or use fewer environments.", UserWarning, stacklevel=3)


def set_provided(config: Any, arguments: dict[str, Any]) -> Any:
    """Set every keyword of an ``AlgorithmConfig.training(...)`` call that was given (not
    RLlib's ``NotProvided``) on ``config``; ``arguments`` is that method's ``locals()``."""
    from ray.rllib.algorithms.algorithm_config import NotProvided

    for name, value in arguments.items():
        if name not in ("self", "kwargs", "__class__") and value is not NotProvided:
            setattr(config, name, value)
    return config


def share_with_local_env_runner(algo: Any, attributes: tuple[str, ...]) -> tuple[Any, Any] | None:
    """Make the driver's EnvRunner act with the driver-side Learner's own networks.

    When sampling and learning both run in the driver on the same device, the EnvRunner's
    module ``attributes`` (e.g. the actor) become the Learner's, so no weights are copied
    after updates (with one-step blocks, RLlib's weight sync would cost as much as the
    update itself). Returns ``(runner, learner)``, or None when anything runs elsewhere:
    remote EnvRunners and the evaluation EnvRunners then receive weights through RLlib's sync.
    """
    from ray.rllib.core import DEFAULT_MODULE_ID

    group = algo.env_runner_group
    if group.num_remote_env_runners() > 0 or not algo.learner_group.is_local or group.local_env_runner is None:
        return None
    learner, runner = algo.learner_group._learner, group.local_env_runner
    learner_module = learner.module[DEFAULT_MODULE_ID]
    first = getattr(learner_module, attributes[0])
    if next(first.parameters()).device != next(getattr(runner.module, attributes[0]).parameters()).device:
        return None  # e.g. a driver-side Learner on a GPU
    for name in attributes:
        setattr(runner.module, name, getattr(learner_module, name))
    return runner, learner


class UpdateCreditMixin:
    """An Algorithm that carries fractional updates between blocks, through checkpoints too,
    and whose remote EnvRunners act with the restored weights after ``restore_from_path``."""

    _update_credit: float = 0.0

    def restore_from_path(self, path, *args, **kwargs):
        super().restore_from_path(path, *args, **kwargs)
        self.push_weights_to_remote_env_runners()

    def push_weights_to_remote_env_runners(self) -> None:
        """Set the Learner's inference-only weights on every healthy remote EnvRunner
        (training and evaluation) and wait until they hold them.

        RLlib's own sync after a restore is fire-and-forget and is dropped for a runner that
        still has an earlier ``set_state`` request in flight (``max_requests_in_flight_per_env_runner``
        is 1), which after ``from_checkpoint`` left the runners acting with their initial weights
        for the first block (``tests/test_rud.py`` checks this).
        """
        import ray
        from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_RL_MODULE
        from ray.rllib.utils.metrics import WEIGHTS_SEQ_NO

        groups = [group for group in (self.env_runner_group, getattr(self, "eval_env_runner_group", None))
                  if group is not None and group.num_healthy_remote_workers() > 0]
        if not groups:
            return
        state = self.learner_group.get_state(components=[f"{COMPONENT_LEARNER}/{COMPONENT_RL_MODULE}"],
                                             inference_only=True)[COMPONENT_LEARNER]
        state_ref = ray.put({key: value for key, value in state.items() if key in (COMPONENT_RL_MODULE, WEIGHTS_SEQ_NO)})
        for group in groups:
            group.foreach_env_runner("set_state", kwargs={"state": state_ref}, local_env_runner=False,
                                     timeout_seconds=self.config.sample_timeout_s)

    def _evaluate_on_local_env_runner(self, env_runner):
        """RLlib's evaluation on one local EnvRunner, acting as ``evaluation_config`` says.

        With no evaluation EnvRunners configured RLlib evaluates on the training EnvRunner, whose
        ``sample()`` explores by the training config's ``explore``; these algorithms never sample
        for training through ``sample()`` (their blocks come from ``collect()``), so its default
        would only ever make an evaluation explore (for RUD: uniform-random warm-up actions)."""
        explore = bool(self.evaluation_config.explore)
        own = env_runner.__dict__.get("sample")  # an instance's own sample(), if it has one
        sample = env_runner.sample
        env_runner.sample = lambda *args, **kwargs: sample(*args, **{"explore": explore, **kwargs})
        try:
            return super()._evaluate_on_local_env_runner(env_runner)
        finally:
            if own is None:
                del env_runner.sample  # the class's own method again
            else:
                env_runner.sample = own

    def _runner_metrics(self) -> list:
        group = self.env_runner_group
        if group.num_remote_env_runners() == 0:
            return [group.local_env_runner.get_metrics()]
        return group.foreach_env_runner(lambda runner: runner.get_metrics(), local_env_runner=False,
                                        timeout_seconds=self.config.sample_timeout_s)

    def get_state(self, *args, **kwargs) -> dict[str, Any]:
        state = super().get_state(*args, **kwargs)
        state["update_credit"] = self._update_credit
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        self._update_credit = float(state.get("update_credit", 0.0))


class ReplayLearnerStateMixin:
    """A Learner whose checkpoints hold its update counters, its minibatch generator and,
    with ``checkpoint_replay_buffer``, its replay buffer. Weight syncs ask for the module
    only and get none of these."""

    def _counters(self) -> dict[str, int]:
        raise NotImplementedError

    def _set_counters(self, counters: dict[str, int]) -> None:
        raise NotImplementedError

    def get_state(self, components=None, *, not_components=None, **kwargs) -> dict[str, Any]:
        state = super().get_state(components, not_components=not_components, **kwargs)
        if self._check_component("update_counters", components, not_components):
            state["update_counters"] = self._counters()
            state["generator"] = self.generator.get_state()
            state["generator_device"] = self.generator.device.type
        if self.config.checkpoint_replay_buffer and self._check_component("replay_buffer", components, not_components):
            state["replay_buffer"] = self.replay.get_state()
        return state

    def _set_generator_state(self, saved: Any, device_type: str | None) -> None:
        """Continue the saved minibatch stream, or, for a checkpoint written by a Learner on
        another kind of device (CPU and CUDA generators keep different states), start a stream
        seeded from the saved state, so the restore still works and stays repeatable."""
        import torch

        saved = torch.as_tensor(saved, dtype=torch.uint8).cpu()  # a tensor, or its numpy copy
        if device_type in (None, self.generator.device.type):
            try:
                self.generator.set_state(saved)
                return
            except RuntimeError:  # a checkpoint from before device types were recorded
                pass
        seed = int.from_bytes(hashlib.sha256(saved.numpy().tobytes()).digest()[:8], "little")
        self.generator.manual_seed(seed)
        logger.warning("The checkpoint's minibatch generator belongs to a Learner on %s, this one runs on %s: "
                       "minibatches continue from a new stream seeded from the saved state",
                       device_type or "another device", self.generator.device.type)

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        if state.get("update_counters"):
            self._set_counters(state["update_counters"])
        if "generator" in state:
            self._set_generator_state(state["generator"], state.get("generator_device"))
        if "replay_buffer" in state:
            self.replay.set_state(state["replay_buffer"])
