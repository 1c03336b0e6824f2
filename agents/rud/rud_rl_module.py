"""RLModule of the deterministic actor-critic family: actor, n critics, their targets.

Actions live in [-1, 1] (tanh) and are rescaled to the environment's bounds where they
reach it (``normalize_actions``, which these algorithms require: ``TransitionEnvRunner``
for training blocks, RLlib's module-to-env connector for evaluation), so replay, targets
and noise all work in the normalised space
(exploration noise 0.1 = 10 % of each action's half-range, as in TD3).

EnvRunners build the module with ``inference_only=True``: the actor and the observation
normaliser only. The Learner's full module also holds the critics and both target nets.
"""

from __future__ import annotations

import warnings
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.utils import make_target_network
from ray.rllib.core.rl_module.apis import InferenceOnlyAPI, TargetNetworkAPI
from ray.rllib.core.rl_module.torch import TorchRLModule
from torch import nn

from agents.common.networks import DeterministicActor, FusedCritics, RunningNorm, activation_problem

Q_VALUES = "q_values"
Q_TARGET = "q_target"
NEXT_OBS = "next_obs"
SMOOTHING_NOISE = "smoothing_noise"

DEFAULT_MODEL_CONFIG = {
    "actor_hidden": [256, 256],
    "critic_hidden": [256, 256],
    "activation": "relu",
    "twin_q": True,
    "normalize_observations": False,
    "exploration_noise": 0.1,
    "learning_starts": 25_000,
}


def model_config_problems(model_config: dict[str, Any]) -> list[tuple[str, str]]:
    """``(setting, what is wrong)`` for each bad network setting of ``rl_module(model_config=...)``:
    the hidden sizes (positive integers; the critics need at least one layer) and the activation."""
    problems = []
    for key, least in (("actor_hidden", 0), ("critic_hidden", 1)):
        sizes = model_config.get(key, DEFAULT_MODEL_CONFIG[key])
        if (not isinstance(sizes, (list, tuple)) or len(sizes) < least
                or not all(isinstance(size, int) and not isinstance(size, bool) and size > 0 for size in sizes)):
            wanted = "a list of positive layer widths" + (", at least one" if least else " (may be empty)")
            problems.append((key, f"{key} must be {wanted}, e.g. [256, 256]; got {sizes!r}"))
    problem = activation_problem(model_config.get("activation", DEFAULT_MODEL_CONFIG["activation"]))
    if problem:
        problems.append(("activation", problem))
    return problems


def spaces_problem(observation_space: gym.Space, action_space: gym.Space) -> str | None:
    """Why the deterministic actor-critic family cannot learn on these spaces, or None."""
    if not isinstance(action_space, gym.spaces.Box) or len(action_space.shape) != 1:
        return f"RUD, TD3 and DDPG need continuous actions (a 1-D Box); this environment has {action_space}"
    if not (np.all(np.isfinite(action_space.low)) and np.all(np.isfinite(action_space.high))):
        return f"the action bounds must be finite to rescale [-1, 1] actions to them; got {action_space}"
    if not isinstance(observation_space, gym.spaces.Box):
        return f"observations must be a Box (a vector of numbers); this environment has {observation_space}"
    return None


class RUDTorchRLModule(TorchRLModule, InferenceOnlyAPI, TargetNetworkAPI):
    """mu(s) and Q_1..Q_n(s, a) with target copies, for DDPG, TD3 and RUD."""

    def setup(self) -> None:
        config = {**DEFAULT_MODEL_CONFIG, **(self.model_config or {})}
        problem = spaces_problem(self.observation_space, self.action_space)
        if problem:
            raise ValueError(problem)
        self.obs_dim = int(np.prod(self.observation_space.shape))
        self.act_dim = int(self.action_space.shape[0])
        self.exploration_noise = float(config["exploration_noise"])
        self.learning_starts = int(config["learning_starts"])
        self.normalize_observations = bool(config["normalize_observations"])
        self.obs_norm = RunningNorm(self.obs_dim) if self.normalize_observations else nn.Identity()
        self.actor = DeterministicActor(self.obs_dim, self.act_dim, config["actor_hidden"], config["activation"])
        if not self.inference_only:
            self.critic = FusedCritics(
                self.obs_dim, self.act_dim, config["critic_hidden"],
                num_critics=2 if config["twin_q"] else 1, activation=config["activation"],
            )

    # ---------------------------------------------------------------- acting

    def _observations(self, batch: dict[str, Any], key: str = Columns.OBS) -> torch.Tensor:
        obs = batch[key]
        return self.obs_norm(obs.reshape(obs.shape[0], -1).float())

    @torch.no_grad()
    def act(self, obs: torch.Tensor, t: float, explore: bool) -> torch.Tensor:
        """Actions in [-1, 1], ``[batch, act_dim]``, for raw observations after ``t`` env steps.

        Exploring: uniform random actions before ``learning_starts`` env steps, then
        mu(s) + N(0, sigma) clipped to [-1, 1]; otherwise the deterministic mu(s).
        """
        obs = self.obs_norm(obs.reshape(obs.shape[0], -1).float())
        if not explore:
            return self.actor(obs)
        if t < self.learning_starts:
            return torch.rand(obs.shape[0], self.act_dim, device=obs.device) * 2 - 1
        action = self.actor(obs)
        noise = torch.randn_like(action) * self.exploration_noise
        return (action + noise).clamp(-1.0, 1.0)

    def _forward_inference(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        """The deterministic policy (evaluation)."""
        return {Columns.ACTIONS: self.act(batch[Columns.OBS], 0, explore=False)}

    def _forward_exploration(self, batch: dict[str, Any], t: int = 0, **kwargs) -> dict[str, Any]:
        return {Columns.ACTIONS: self.act(batch[Columns.OBS], t, explore=True)}

    # ---------------------------------------------------------------- learning

    def _forward_train(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        """Q_i(s, a) of every critic for the batch's transitions, shape ``[n, batch]``."""
        return {Q_VALUES: self.critic(self._observations(batch), batch[Columns.ACTIONS])}

    def forward_target(self, batch: dict[str, Any]) -> dict[str, Any]:
        """min_i Q'_i(s', clip(mu'(s') + noise)): the clipped double-Q target value (before r, gamma).

        With one critic this is plain Q'(s', mu'(s') + noise), DDPG's target.
        """
        next_obs = self._observations(batch, NEXT_OBS)
        next_action = self.target_actor(next_obs)
        noise = batch.get(SMOOTHING_NOISE)
        if noise is not None:
            next_action = (next_action + noise).clamp(-1.0, 1.0)
        return {Q_TARGET: self.target_critic(next_obs, next_action).min(0).values}

    def policy_value(self, obs: torch.Tensor) -> torch.Tensor:
        """Q_1(s, mu(s)) with gradients to the actor only (the critic's weights are detached)."""
        normalized = self.obs_norm(obs)
        return self.critic(normalized, self.actor(normalized), first_only=True, detach_parameters=True)[0]

    # ---------------------------------------------------------------- RLlib APIs

    def make_target_networks(self) -> None:
        self.target_actor = make_target_network(self.actor)
        self.target_critic = make_target_network(self.critic)

    def get_target_network_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.actor, self.target_actor), (self.critic, self.target_critic)]

    def get_non_inference_attributes(self) -> list[str]:
        return ["critic", "target_actor", "target_critic"]

    def get_state(self, *args, **kwargs) -> dict[str, Any]:
        """RLlib's state (numpy arrays), with the float64 buffers left in float64.

        RLlib's ``TorchRLModule`` converts float64 tensors to float32 both when it saves a
        state (``get_state``) and when it loads one (``set_state``), which would round the
        running observation statistics at every checkpoint and weight sync."""
        state = super().get_state(*args, **kwargs)
        tensors = self.state_dict()
        for key in state:
            if key in tensors and tensors[key].dtype == torch.float64:
                state[key] = tensors[key].detach().cpu().numpy().copy()  # not a view of the live buffer
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        """Load weights from a checkpoint or a weight sync, each array in its own dtype
        (see :meth:`get_state`). As in RLlib's, keys this module lacks are ignored (a full
        module's state loads into an EnvRunner's inference-only one), and an inference-only
        module missing any of its own keys is an error."""
        with warnings.catch_warnings():
            # weight syncs arrive as read-only arrays; load_state_dict only copies from them
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tensors = {key: torch.as_tensor(value) for key, value in state.items()}
        missing, _ = self.load_state_dict(tensors, strict=False)
        if self.inference_only and missing:
            raise ValueError(f"the state lacks weights this module needs: {sorted(missing)}; "
                             f"it holds {sorted(state)}")
