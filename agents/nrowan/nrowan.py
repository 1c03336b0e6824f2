"""NROWAN-DQN: Noise Reduction and Online Weight Adjustment NoisyNet-DQN
(Han, Zhou, Liu, Lü; arXiv 2006.10980, Expert Systems with Applications).

NoisyNet-DQN (Fortunato et al., 2018) explores through learned weight noise in its last
layers. NROWAN-DQN adds the output layer's noise level D to the loss, weighted by k, which
grows with the reward the agent has collected so far in the episode: the further an
episode has gone well, the more the agent is pushed to act steadily. ``k_final = 0`` is
NoisyNet-DQN; ``noisy=False`` is DQN with epsilon-greedy exploration, on the same network.

Defaults are the paper's classic-control settings: replay 10,000, batch 32, Adam 1e-4,
hard target update every 1,000 updates, learning from 32 transitions on, one update per
env step, sigma_0 0.4, k_final 4.0, 128-128 network with the last two layers noisy.

Speed: at one update per env step, RLlib's sampling call per step costs more than the
update itself. With the EnvRunner and the Learner in the driver (``num_env_runners=0``,
``num_learners=0``, the default), one iteration is a plain loop that steps the env, adds
the transition and runs the update, with the Q-network shared between acting and learning
(:class:`TransitionEnvRunner`). With remote EnvRunners each ``update_interval`` block is
sampled in parallel and the weights are synced after its updates.
"""

from __future__ import annotations

import time
from typing import Any

import gymnasium as gym
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig, NotProvided
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.metrics import (
    ENV_RUNNER_RESULTS,
    ENV_RUNNER_SAMPLING_TIMER,
    LEARNER_RESULTS,
    LEARNER_UPDATE_TIMER,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
    TIMERS,
)

from agents.common.off_policy import (UpdateCreditMixin, replay_config_errors, set_provided,
                                      share_with_local_env_runner, warn_if_envs_idle)
from agents.common.transition_env_runner import TransitionEnvRunner, collect_from_runners, is_image_space

RETURN_BOUNDS: dict[str, tuple[float, float]] = {
    "CartPole-v0": (0.0, 200.0),
    "CartPole-v1": (0.0, 500.0),
    "Acrobot-v1": (-500.0, 0.0),
    "MountainCar-v0": (-200.0, 0.0),
    "raysmith/Pong-v5": (-21.0, 21.0),
}
"""(R_min, R_max): the lowest and highest episode return of each task with its time limit."""


class NROWANConfig(AlgorithmConfig):
    """NROWAN-DQN hyperparameters; defaults are the paper's classic-control preset.

    Example::

        algo = NROWANConfig().environment("CartPole-v0").build_algo()
        algo.train()   # 1000 env steps, one update after each
    """

    def __init__(self, algo_class: type | None = None):
        super().__init__(algo_class=algo_class or NROWAN)
        self.k_final: float = 4.0
        """Largest weight of the noise term D; 0 turns NROWAN-DQN into NoisyNet-DQN."""
        self.r_min: float | None = None
        """Lowest episode return of the task (None: from RETURN_BOUNDS for known tasks)."""
        self.r_max: float | None = None
        """Highest episode return of the task (None: from RETURN_BOUNDS for known tasks)."""
        self.noisy: bool = True
        """Noisy last layers and no epsilon-greedy (False: DQN with epsilon-greedy)."""
        self.sigma_0: float = 0.4
        """Initial noise scale of the noisy layers (sigma starts at sigma_0 / sqrt(fan_in))."""
        self.epsilon_start: float = 1.0
        """DQN only: exploration rate at the first step..."""
        self.epsilon_final: float = 0.01
        """...decaying exponentially to this rate..."""
        self.epsilon_decay: float = 500.0
        """...with this time constant in env steps."""
        self.evaluation_noise: bool = False
        """Evaluate as the agent acts in training (fresh noise; DQN at epsilon_final) instead
        of greedily on the mean weights."""
        self.target_update_interval: int = 1000
        """Gradient updates between hard copies of the Q-network into the target network."""
        self.learning_starts: int = 32
        """Transitions in the replay buffer before the first update."""
        self.replay_capacity: int = 10_000
        self.checkpoint_replay_buffer: bool = False
        """Store the replay buffer in checkpoints."""
        self.update_interval: int = 1
        """Env steps collected between rounds of updates (1: update after every step)."""
        self.updates_per_step: float = 1.0
        """Gradient updates per env step."""
        self.lr = 1e-4
        self.train_batch_size_per_learner = 32
        self.gamma = 0.99
        self.grad_clip = None
        self.num_env_runners = 0
        self.min_sample_timesteps_per_iteration = 1000
        self.env_runner_cls = TransitionEnvRunner
        # evaluations act as evaluation_noise says (the module's non-exploring path), not
        # with the training schedule of epsilon
        self.evaluation_config = AlgorithmConfig.overrides(explore=False)

    def training(
        self,
        *,
        k_final: float | None = NotProvided,
        r_min: float | None = NotProvided,
        r_max: float | None = NotProvided,
        noisy: bool | None = NotProvided,
        sigma_0: float | None = NotProvided,
        epsilon_start: float | None = NotProvided,
        epsilon_final: float | None = NotProvided,
        epsilon_decay: float | None = NotProvided,
        evaluation_noise: bool | None = NotProvided,
        target_update_interval: int | None = NotProvided,
        learning_starts: int | None = NotProvided,
        replay_capacity: int | None = NotProvided,
        checkpoint_replay_buffer: bool | None = NotProvided,
        update_interval: int | None = NotProvided,
        updates_per_step: float | None = NotProvided,
        **kwargs: Any,
    ) -> "NROWANConfig":
        super().training(**kwargs)
        return set_provided(self, locals())

    def return_bounds(self) -> tuple[float, float] | None:
        """(R_min, R_max): the configured ones, else the task's known bounds, else None."""
        known = RETURN_BOUNDS.get(self.env) if isinstance(self.env, str) else None
        r_min = self.r_min if self.r_min is not None else (known[0] if known else None)
        r_max = self.r_max if self.r_max is not None else (known[1] if known else None)
        return None if r_min is None or r_max is None else (float(r_min), float(r_max))

    def validate(self) -> None:
        super().validate()
        errors = replay_config_errors(self, "NROWAN-DQN")
        if self.k_final < 0:
            errors.append(f"k_final must be >= 0, got {self.k_final}")
        if self.sigma_0 < 0:
            errors.append(f"sigma_0 must be >= 0, got {self.sigma_0}")
        if self.noisy and self.k_final > 0:
            bounds = self.return_bounds()
            if bounds is None:
                errors.append(f"k_final > 0 needs the task's return bounds: set r_min and r_max (known for "
                              f"{', '.join(RETURN_BOUNDS)})")
            elif bounds[1] <= bounds[0]:
                errors.append(f"r_max must be above r_min, got r_min={bounds[0]}, r_max={bounds[1]}")
        if not 0 <= self.epsilon_final <= 1 or not 0 <= self.epsilon_start <= 1:
            errors.append("epsilon_start and epsilon_final must be in [0, 1]")
        if int(self.target_update_interval) < 1:
            errors.append(f"target_update_interval must be >= 1, got {self.target_update_interval}")
        if errors:
            raise ValueError("; ".join(errors))
        warn_if_envs_idle(self, type(self).__name__.removesuffix("Config"))

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        from agents.nrowan.nrowan_rl_module import NROWANTorchRLModule

        return RLModuleSpec(module_class=NROWANTorchRLModule)

    def get_default_learner_class(self) -> type:
        from agents.nrowan.nrowan_learner import NROWANTorchLearner

        return NROWANTorchLearner

    @property
    def _model_config_auto_includes(self) -> dict[str, Any]:
        return super()._model_config_auto_includes | {
            name: getattr(self, name)
            for name in ("noisy", "sigma_0", "epsilon_start", "epsilon_final", "epsilon_decay", "evaluation_noise")
        }


class NROWAN(UpdateCreditMixin, Algorithm):
    """Steps, transitions, updates. One ``train()`` call covers ``min_sample_timesteps_per_iteration`` env steps."""

    model_config_keys = ("hidden", "conv_filters", "activation", "noisy_layers", "bias_sigma_fan")
    """What ``rl_module(model_config=...)`` may set; noise and epsilon settings are in ``training``."""

    @staticmethod
    def check_spaces(observation_space: gym.Space, action_space: gym.Space) -> str | None:
        """Why NROWAN-DQN cannot learn on these spaces, or None if it can."""
        if not isinstance(action_space, gym.spaces.Discrete):
            return ("NROWAN-DQN, NoisyNet-DQN and DQN are discrete-action algorithms (one Q-value per action); "
                    f"this environment has {action_space}")
        if not isinstance(observation_space, gym.spaces.Box):
            return f"observations must be a Box (a vector of numbers); this environment has {observation_space}"
        shape = observation_space.shape
        if is_image_space(observation_space) and shape[-1] in (1, 3, 4) and shape[0] > 4:
            return (f"image observations must be channels first ([channels, height, width], e.g. the stacked "
                    f"frames of raysmith/Pong-v5); this environment's are shaped {shape}")
        return None

    @classmethod
    def get_default_config(cls) -> NROWANConfig:
        return NROWANConfig()

    def setup(self, config: NROWANConfig) -> None:
        super().setup(config)
        self._update_credit = 0.0
        # acting and learning share the Q-network when both run in the driver
        self._local = share_with_local_env_runner(self, ("q",))

    def training_step(self) -> None:
        config: NROWANConfig = self.config
        lifetime = int(self.metrics.peek((ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME), default=0))
        goal = max(1, int(config.min_sample_timesteps_per_iteration or 0))
        sampled = 0
        sample_time = learn_time = 0.0
        while sampled < goal:
            started = time.perf_counter()
            transitions = collect_from_runners(self, int(config.update_interval), lifetime + sampled)
            learning = time.perf_counter()
            steps = len(transitions["rewards"]) if transitions else 0  # {}: no runner answered
            sampled += steps
            self._update_credit += steps * config.updates_per_step
            num_updates = int(self._update_credit)
            self._update_credit -= num_updates
            timesteps = {NUM_ENV_STEPS_SAMPLED_LIFETIME: lifetime + sampled}
            if self._local is not None:
                self._local[1].learn_block(transitions, num_updates, timesteps)
            else:
                results = self.learner_group.foreach_learner(
                    lambda learner: learner.learn_block(transitions, num_updates, timesteps))
                if any(result.get() for result in results):
                    self.env_runner_group.sync_weights(from_worker_or_learner_group=self.learner_group,
                                                       inference_only=True)
            finished = time.perf_counter()
            sample_time += learning - started
            learn_time += finished - learning
            if steps == 0:
                break
        self.metrics.log_value((TIMERS, ENV_RUNNER_SAMPLING_TIMER), sample_time)
        self.metrics.log_value((TIMERS, LEARNER_UPDATE_TIMER), learn_time)
        self.metrics.aggregate(self._runner_metrics(), key=ENV_RUNNER_RESULTS)
        learner_metrics = self.learner_group.foreach_learner(lambda learner: learner.reduce_metrics())
        self.metrics.aggregate([result.get() for result in learner_metrics], key=LEARNER_RESULTS)


class NoisyNetDQNConfig(NROWANConfig):
    """NoisyNet-DQN (Fortunato et al., 2018): NROWAN-DQN without the noise term (k_final = 0)."""

    def __init__(self, algo_class: type | None = None):
        super().__init__(algo_class=algo_class or NoisyNetDQN)
        self.k_final = 0.0


class NoisyNetDQN(NROWAN):
    @classmethod
    def get_default_config(cls) -> NoisyNetDQNConfig:
        return NoisyNetDQNConfig()


class DQNConfig(NROWANConfig):
    """DQN (Mnih et al., 2015) on the same network, without noise: epsilon-greedy exploration."""

    def __init__(self, algo_class: type | None = None):
        super().__init__(algo_class=algo_class or EpsilonGreedyDQN)
        self.noisy = False
        self.k_final = 0.0


class EpsilonGreedyDQN(NROWAN):
    @classmethod
    def get_default_config(cls) -> DQNConfig:
        return DQNConfig()
