"""RUD: Regularly Updated Deterministic policy gradient (Han, Zhou, Lü, Yu; KBS 2021, arXiv 2007.00169).

RUD is TD3's actor-critic (twin critics with clipped double-Q targets, target policy
smoothing, delayed actor and target updates, Polyak averaging) run on a regular schedule:
collect a block of ``update_interval`` environment steps with the current policy, then do
``update_interval * updates_per_step`` gradient updates on the replay buffer, then collect
again. ``update_interval=1`` is TD3; ``twin_q=False, policy_delay=1, target_noise=0`` with
``update_interval=1`` is DDPG (the TD3 paper's re-tuned "our DDPG", RUD's ablation baseline).

The block is also the distributed design: EnvRunners collect a whole block in parallel
(:meth:`~agents.common.transition_env_runner.TransitionEnvRunner.collect`: plain
transitions, no per-step connectors), then the Learner runs the block's updates in one tight
loop (:class:`~agents.rud.rud_learner.RUDTorchLearner`), with no RLlib machinery per update.
"""

from __future__ import annotations

import difflib
from typing import Any

import gymnasium as gym
import numpy as np

from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig, NotProvided
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.metrics import (
    ENV_RUNNER_RESULTS,
    ENV_RUNNER_SAMPLING_TIMER,
    LEARNER_RESULTS,
    LEARNER_UPDATE_TIMER,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
    SYNCH_WORKER_WEIGHTS_TIMER,
    TIMERS,
)

from agents.common.off_policy import (UpdateCreditMixin, replay_config_errors, set_provided,
                                      share_with_local_env_runner, warn_if_envs_idle)
from agents.common.transition_env_runner import TransitionEnvRunner, collect_from_runners
from agents.rud.fused_update import HIDDEN_PRECISIONS


_RLLIB_TRAIN_BATCH_SIZE = AlgorithmConfig().train_batch_size  # RLlib's default, unused here


class RUDConfig(AlgorithmConfig):
    """RUD hyperparameters; defaults are the TD3 paper's and CleanRL's, plus RUD's block.

    Example::

        algo = RUDConfig().environment("HalfCheetah-v5").build_algo()
        algo.train()   # one block: 1000 env steps, then 1000 updates (none before learning_starts)
    """

    def __init__(self, algo_class: type | None = None):
        super().__init__(algo_class=algo_class or RUD)
        self.update_interval: int = 1000
        """Env steps collected per block (summed over EnvRunners, split as evenly as they
        go: 1000 on 3 EnvRunners is 334 + 333 + 333); one MuJoCo episode."""
        self.updates_per_step: float = 1.0
        """Gradient updates per env step; a block runs update_interval * updates_per_step."""
        self.learning_starts: int = 25_000
        """Env steps of uniformly random actions before the policy acts and learning starts."""
        self.actor_lr: float = 3e-4
        """Adam learning rate of the actor (a float, or a schedule as RLlib's ``lr`` takes)."""
        self.critic_lr: float = 3e-4
        """Adam learning rate of the critics (a float, or a schedule)."""
        self.tau: float = 0.005
        """Polyak coefficient of the target networks."""
        self.policy_delay: int = 2
        """Critic updates per actor (and target) update."""
        self.target_noise: float = 0.2
        """Std of the target policy smoothing noise, in normalised action units."""
        self.target_noise_clip: float = 0.5
        """The smoothing noise is clipped to [-target_noise_clip, target_noise_clip]."""
        self.exploration_noise: float = 0.1
        """Std of the Gaussian exploration noise, in normalised action units."""
        self.twin_q: bool = True
        """Two critics and clipped double-Q targets (False: one critic, as DDPG)."""
        self.replay_capacity: int = 1_000_000
        """Transitions the replay buffer holds; the oldest are overwritten first."""
        self.checkpoint_replay_buffer: bool = False
        """Store the replay buffer in checkpoints. Large: (2 obs_dim + act_dim + 2) x 4 bytes
        per transition, 168 MB per 1M steps on HalfCheetah-v5, 880 MB on Ant-v5."""
        self.normalize_observations: bool = False
        """Normalise observations with running statistics (kept in the module, checkpointed)."""
        self.fused_updates: bool = True
        """Run updates with hand-written gradients (agents/rud/fused_update.py) instead of
        autograd: the same maths to float rounding, ~2x faster on CPU. Applies to the stock
        networks; other modules always use autograd."""
        self.hidden_matmul_precision: str = "float32"
        """``"float32"`` or ``"bfloat16"``: the precision of the products between hidden layers
        (forward and backward) in the hand-written update on a CPU Learner. ``"bfloat16"``
        rounds their operands to bfloat16 and sums in float32 (oneDNN's AMX or AVX-512 BF16
        kernels): 1.2-1.45x the update loop on 2 cores with AMX (docs/RESULTS.md). Every
        tensor kept (weights, Adam state, activations, gradients) and every other product
        (first layers, heads) stays float32. Needs ``fused_updates`` and a CPU Learner."""
        self.train_batch_size_per_learner = 256
        self.gamma = 0.99
        self.lr = None  # actor_lr and critic_lr apply
        self.grad_clip = None
        self.num_env_runners = 0
        self.rollout_fragment_length = "auto"
        # evaluate the deterministic policy, as the TD3 paper does
        self.evaluation_config = AlgorithmConfig.overrides(explore=False)
        self.normalize_actions = True
        self.clip_actions = False
        # blocks are collected as plain transitions (TransitionEnvRunner.collect), evaluation
        # and ERL's episodes through RLlib's own sample()
        self.env_runner_cls = TransitionEnvRunner

    def training(
        self,
        *,
        update_interval: int | None = NotProvided,
        updates_per_step: float | None = NotProvided,
        learning_starts: int | None = NotProvided,
        actor_lr: float | None = NotProvided,
        critic_lr: float | None = NotProvided,
        tau: float | None = NotProvided,
        policy_delay: int | None = NotProvided,
        target_noise: float | None = NotProvided,
        target_noise_clip: float | None = NotProvided,
        exploration_noise: float | None = NotProvided,
        twin_q: bool | None = NotProvided,
        replay_capacity: int | None = NotProvided,
        checkpoint_replay_buffer: bool | None = NotProvided,
        normalize_observations: bool | None = NotProvided,
        fused_updates: bool | None = NotProvided,
        hidden_matmul_precision: str | None = NotProvided,
        **kwargs: Any,
    ) -> "RUDConfig":
        """Set RUD's settings (documented on the attributes above) and RLlib's own training ones."""
        super().training(**kwargs)
        return set_provided(self, locals())

    def validate(self) -> None:
        super().validate()
        errors = replay_config_errors(self, "RUD")
        if int(self.policy_delay) < 1:
            errors.append(f"policy_delay must be >= 1, got {self.policy_delay}")
        if not 0 < self.tau <= 1:
            errors.append(f"tau must be in (0, 1], got {self.tau}")
        if self.target_noise < 0 or self.exploration_noise < 0:
            errors.append("target_noise and exploration_noise must be >= 0")
        if self.target_noise_clip < 0:
            errors.append(f"target_noise_clip must be >= 0 (the smoothing noise is clipped to "
                          f"[-clip, clip]), got {self.target_noise_clip}")
        if self.hidden_matmul_precision not in HIDDEN_PRECISIONS:
            errors.append(f"hidden_matmul_precision must be one of {sorted(HIDDEN_PRECISIONS)}, "
                          f"got {self.hidden_matmul_precision!r}")
        elif self.hidden_matmul_precision != "float32":
            if not self.fused_updates:
                errors.append(f"hidden_matmul_precision={self.hidden_matmul_precision!r} applies to the "
                              "hand-written update; it needs fused_updates=True")
            if self.num_gpus_per_learner:
                errors.append(f"hidden_matmul_precision={self.hidden_matmul_precision!r} applies to CPU Learners; "
                              f"num_gpus_per_learner is {self.num_gpus_per_learner}")
        for name in ("actor_lr", "critic_lr"):
            value = getattr(self, name)
            if isinstance(value, (int, float)) and value <= 0:
                errors.append(f"{name} must be positive, got {value}")
        algorithm = type(self).__name__.removesuffix("Config")
        # RLlib settings these algorithms would otherwise take and silently not apply
        if self.lr is not None:
            errors.append(f"lr is not a {algorithm} setting (the actor and the critics have their own Adam "
                          f"optimizers); set actor_lr and critic_lr instead (now {self.actor_lr} and {self.critic_lr})")
        if self.train_batch_size != _RLLIB_TRAIN_BATCH_SIZE:
            errors.append(f"train_batch_size is not used by {algorithm}; its minibatch size is "
                          f"train_batch_size_per_learner (now {self.train_batch_size_per_learner})")
        if not self.normalize_actions:
            errors.append(f"normalize_actions must stay True: {algorithm}'s actor acts in [-1, 1] (tanh), and "
                          "normalize_actions is what rescales those actions to the environment's bounds")
        user_model = self._model_config if isinstance(self._model_config, dict) else {}
        errors.extend(message for _, message in RUD.model_config_problems(user_model))
        # training settings the module reads through its model config: RLlib lets a value in
        # rl_module(model_config=...) win, which would let the two disagree silently
        own = self._model_config_auto_includes
        user = self._model_config if isinstance(self._model_config, dict) else {}
        for key in sorted(own.keys() - AlgorithmConfig._model_config_auto_includes.fget(self).keys()):
            if key in user and user[key] != own[key]:
                errors.append(f"model_config sets {key}={user[key]!r} but the training setting is {own[key]!r}; "
                              f"set it with .training({key}=...) only")
        if errors:
            raise ValueError("; ".join(errors))
        warn_if_envs_idle(self, type(self).__name__.removesuffix("Config"))

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        from agents.rud.rud_rl_module import RUDTorchRLModule

        return RLModuleSpec(module_class=RUDTorchRLModule)

    def get_default_learner_class(self) -> type:
        from agents.rud.rud_learner import RUDTorchLearner

        return RUDTorchLearner

    @property
    def _model_config_auto_includes(self) -> dict[str, Any]:
        return super()._model_config_auto_includes | {
            "twin_q": self.twin_q,
            "exploration_noise": self.exploration_noise,
            "learning_starts": self.learning_starts,
            "normalize_observations": self.normalize_observations,
        }


class RUD(UpdateCreditMixin, Algorithm):
    """Collect a block, learn on it, repeat. One ``train()`` call is one block."""

    model_config_keys = ("actor_hidden", "critic_hidden", "activation")
    """What ``rl_module(model_config=...)`` may set: the networks. The module's other settings
    (``twin_q``, ``exploration_noise``, ``learning_starts``, ``normalize_observations``) come
    from ``training()``."""

    @staticmethod
    def model_config_problems(model_config: dict[str, Any]) -> list[tuple[str, str]]:
        """``(setting, what is wrong)`` for each bad value among the networks' settings; a
        spec's check reports them at ``model.<setting>``."""
        from agents.rud.rud_rl_module import model_config_problems

        return model_config_problems(model_config)

    @staticmethod
    def check_spaces(observation_space: gym.Space, action_space: gym.Space) -> str | None:
        """Why RUD cannot learn on these spaces, or None if it can."""
        from agents.rud.rud_rl_module import spaces_problem

        return spaces_problem(observation_space, action_space)

    @classmethod
    def get_default_config(cls) -> RUDConfig:
        return RUDConfig()

    @classmethod
    def _refuse_unusable_env(cls, config: RUDConfig) -> None:
        """Refuse a gymnasium id that does not exist (naming close ones) or an env RUD cannot
        learn on (:meth:`check_spaces`), before any EnvRunner or Learner starts. Every form
        RLlib accepts is checked: gymnasium ids, names registered with ``tune.register_env``,
        class paths and env classes; one instance is made in the driver, through RLlib's own
        env creator, to read its spaces."""
        env = config.env
        if env is None:
            return
        from ray.rllib.env.env_context import EnvContext
        from ray.tune.registry import ENV_CREATOR, _global_registry

        if (isinstance(env, str) and not _global_registry.contains(ENV_CREATOR, env)
                and ":" not in env and "." not in env and env not in gym.envs.registry):
            # "module:Id" is imported by gym.make and "package.Class" by RLlib
            close = difflib.get_close_matches(env, list(gym.envs.registry), n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(repr(name) for name in close)}?" if close else ""
            raise ValueError(f"unknown gymnasium environment '{env}'{hint}")
        _, creator = cls._get_env_id_and_creator(env, config)
        instance = creator(EnvContext(dict(config.env_config or {}), worker_index=0))
        try:
            reason = cls.check_spaces(instance.observation_space, instance.action_space)
        finally:
            instance.close()
        if reason:
            name = env if isinstance(env, str) else getattr(env, "__name__", repr(env))
            raise ValueError(f"{cls.__name__} cannot run on {name}: {reason}")

    def setup(self, config: RUDConfig) -> None:
        self._refuse_unusable_env(config)
        super().setup(config)
        self._update_credit = 0.0
        # the driver's EnvRunner acts with the Learner's actor and observation statistics
        self._shares_actor = share_with_local_env_runner(self, ("actor", "obs_norm")) is not None

    def training_step(self) -> None:
        """Blocks of ``update_interval`` env steps, each followed by its updates, until the
        iteration has ``min_sample_timesteps_per_iteration`` env steps (at least one block)."""
        config: RUDConfig = self.config
        lifetime = int(self.metrics.peek((ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME), default=0))
        sampled = 0
        while True:
            with self.metrics.log_time((TIMERS, ENV_RUNNER_SAMPLING_TIMER)):
                transitions = collect_from_runners(self, int(config.update_interval), lifetime)
            steps = len(transitions["rewards"]) if transitions else 0
            # learn only on steps after the random warm-up; carry fractions so that over a run
            # exactly updates_per_step updates happen per env step
            self._update_credit += max(0, lifetime + steps - max(lifetime, config.learning_starts)) * config.updates_per_step
            num_updates = int(self._update_credit)
            self._update_credit -= num_updates
            lifetime += steps
            sampled += steps
            timesteps = {NUM_ENV_STEPS_SAMPLED_LIFETIME: lifetime}
            with self.metrics.log_time((TIMERS, LEARNER_UPDATE_TIMER)):
                results = self.learner_group.foreach_learner(
                    lambda learner: learner.learn_block(transitions, num_updates, timesteps)
                )
                [done] = [result.get() for result in results]  # and raise a Learner's error here
            # the observation statistics change with every block, the actor with every update
            if (done or config.normalize_observations) and not self._shares_actor:
                with self.metrics.log_time((TIMERS, SYNCH_WORKER_WEIGHTS_TIMER)):
                    self.env_runner_group.sync_weights(from_worker_or_learner_group=self.learner_group, inference_only=True)
            if sampled >= (config.min_sample_timesteps_per_iteration or 0) or steps == 0:
                break
        self.metrics.aggregate(self._runner_metrics(), key=ENV_RUNNER_RESULTS)
        learner_metrics = self.learner_group.foreach_learner(lambda learner: learner.reduce_metrics())
        self.metrics.aggregate([result.get() for result in learner_metrics], key=LEARNER_RESULTS)


class TD3Config(RUDConfig):
    """TD3 (Fujimoto et al., 2018): RUD with one env step per block."""

    def __init__(self, algo_class: type | None = None):
        super().__init__(algo_class=algo_class or TD3)
        self.update_interval = 1
        # one train() call covers 1000 env steps, as for RUD, instead of one step
        self.min_sample_timesteps_per_iteration = 1000


class TD3(RUD):
    @classmethod
    def get_default_config(cls) -> TD3Config:
        return TD3Config()


class DDPGConfig(TD3Config):
    """DDPG as re-tuned in the TD3 paper: one critic, no target smoothing, no policy delay."""

    def __init__(self, algo_class: type | None = None):
        super().__init__(algo_class=algo_class or DDPG)
        self.twin_q = False
        self.policy_delay = 1
        self.target_noise = 0.0


class DDPG(RUD):
    @classmethod
    def get_default_config(cls) -> DDPGConfig:
        return DDPGConfig()
