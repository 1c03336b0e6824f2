"""An EnvRunner that hands out plain transitions: the sampling path of raysmith's replay
algorithms (RUD/TD3/DDPG, NROWAN-DQN/NoisyNet-DQN/DQN).

RLlib's ``SingleAgentEnvRunner.sample`` runs two connector pipelines, timers and episode
bookkeeping around every env step: on 2 cores 1.8 ms per HalfCheetah-v5 step against 0.44
ms here (``python benchmarks/rl_throughput.py --suite sampling``). Algorithms that only
need (s, a, r, s', terminated) for a replay buffer call :meth:`TransitionEnvRunner.collect`
instead, which steps the sub-environments itself and acts through the module's
``act(obs, t, explore)``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

RETURN_SO_FAR = "return_so_far"
"""Per transition: the episode's reward up to and including that step (NROWAN-DQN's R+)."""


def is_image_space(space: gym.Space) -> bool:
    """Observations that go through a convolutional torso: 3-D Boxes (channels first)."""
    return isinstance(space, gym.spaces.Box) and len(space.shape) == 3


def collect_from_runners(algo: Any, num_steps: int, lifetime: int) -> dict[str, np.ndarray]:
    """``num_steps`` transitions from ``algo``'s local EnvRunner, or split over its healthy
    remote ones (shares differ by at most one step), acting as after ``lifetime`` env steps."""
    group = algo.env_runner_group
    if group.num_remote_env_runners() == 0:
        return group.local_env_runner.collect(num_steps, lifetime)
    ids = group.healthy_env_runner_ids()
    if not ids:
        return {}
    base, extra = divmod(num_steps, len(ids))
    shares = {runner_id: base + (rank < extra) for rank, runner_id in enumerate(ids) if base + (rank < extra)}
    parts = group.foreach_env_runner(
        ["collect"] * len(shares), local_env_runner=False, remote_worker_ids=list(shares),
        kwargs=[{"num_steps": share, "lifetime": lifetime, "stride": len(ids)} for share in shares.values()],
        timeout_seconds=algo.config.sample_timeout_s)
    parts = [part for part in parts if part]
    if not parts:
        return {}
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


class TransitionEnvRunner(SingleAgentEnvRunner):
    """A SingleAgentEnvRunner that also hands out plain transitions, cheaply.

    :meth:`collect` steps the (synchronous) sub-environments itself and returns
    (s, a, r, s', terminated, R+) arrays, with no episode objects or connectors per step, and
    logs RLlib's usual episode and step metrics. Discrete actions go to the env as ints;
    continuous ones are stored as the module gives them (in [-1, 1]) and sent rescaled to
    the action bounds (``normalize_actions``, RLlib's default) or clipped to them
    (``clip_actions``), as RLlib's own module-to-env connector does. ``sample()`` is RLlib's own, used for
    evaluation; RLlib evaluates on the training EnvRunner when no evaluation EnvRunners
    exist, so both paths share the environments: a ``sample()`` call after ``collect()``
    starts its episodes from a reset, and the next ``collect()`` starts afresh too.
    Observations reach the module as flat float32 vectors, or whole and in their own dtype
    for image observations (``uint8[4, 84, 84]`` frame stacks stay uint8 into the replay buffer).
    """

    _collect_state: dict[str, Any] | None = None
    _seeded: bool = False
    _image_dtype: Any = None
    _unlogged: tuple[int, int] = (0, 0)
    """(env steps, episodes) collected since the last ``get_metrics()``: logged there, once,
    instead of eight metric calls per one-step ``collect()``."""

    def get_metrics(self):
        steps, episodes = self._unlogged
        if steps:
            self._increase_sampled_metrics(steps, episodes)
            self._unlogged = (0, 0)
        return super().get_metrics()

    def sample(self, **kwargs):
        if self._collect_state is not None:
            kwargs["force_reset"] = True  # collect() moved the envs on without RLlib's episodes
            self._collect_state = None  # and RLlib's episodes will move them on without ours
        return super().sample(**kwargs)

    def _sub_envs(self) -> list[gym.Env]:
        envs = getattr(self.env.unwrapped, "envs", None)
        if envs is None:
            raise ValueError("TransitionEnvRunner steps synchronous sub-environments; set "
                             "gym_env_vectorize_mode='SYNC' (the default)")
        return list(envs)

    def _observation(self, observation: Any) -> np.ndarray:
        if self._image_dtype is not None:
            return np.asarray(observation, dtype=self._image_dtype)
        return np.asarray(observation, dtype=np.float32).reshape(-1)

    def _start(self, envs: list[gym.Env]) -> dict[str, Any]:
        space = envs[0].observation_space
        self._image_dtype = (np.uint8 if space.dtype == np.uint8 else np.float32) if is_image_space(space) else None
        observations = []
        for index, env in enumerate(envs):
            # seed once; later restarts continue each env's random stream
            seed = None if self._seed is None or self._seeded else int(self._seed) + index
            observation, _ = env.reset(seed=seed)
            observations.append(self._observation(observation))
        self._seeded = True
        count = len(envs)
        return {"obs": np.stack(observations), "return": np.zeros(count), "length": np.zeros(count, dtype=np.int64),
                "started": [time.perf_counter()] * count}

    def _env_action_mapping(self, envs: list[gym.Env]):
        """How the module's actions become the env's: ``(store_dtype, act_shape, to_env)``."""
        space = envs[0].action_space
        if isinstance(space, gym.spaces.Discrete):
            return np.int64, (), int
        if not (isinstance(space, gym.spaces.Box) and np.issubdtype(space.dtype, np.floating)
                and np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high))):
            raise ValueError(f"collect() acts in Discrete spaces or float Boxes with finite bounds; got {space}")
        low, high = space.low.astype(np.float32), space.high.astype(np.float32)
        if self.config.normalize_actions:
            return np.float32, space.shape, lambda action: np.clip(low + (action + 1.0) * (high - low) / 2.0, low, high)
        if self.config.clip_actions:
            return np.float32, space.shape, lambda action: np.clip(action, low, high)
        return np.float32, space.shape, lambda action: action

    def collect(self, num_steps: int, lifetime: int, stride: int = 1) -> dict[str, np.ndarray]:
        """``num_steps`` transitions (at least one), acting with exploration as after
        ``lifetime + stride * k`` env steps at this runner's k-th step (``stride``: the number
        of runners sampling together). The sub-envs step in rounds; when ``num_steps`` is not
        a multiple of their number, the last round steps only the first ones, and the others
        continue their episodes in the next call."""
        envs = self._sub_envs()
        if self._collect_state is None:
            self._collect_state = self._start(envs)
        state = self._collect_state
        count = len(envs)
        size = max(1, int(num_steps))
        rounds = math.ceil(size / count)
        obs_shape, obs_dtype = state["obs"].shape[1:], state["obs"].dtype
        action_dtype, action_shape, to_env = self._env_action_mapping(envs)
        out = {
            "obs": np.empty((size, *obs_shape), obs_dtype), "next_obs": np.empty((size, *obs_shape), obs_dtype),
            "actions": np.empty((size, *action_shape), np.float32), "rewards": np.empty(size, np.float32),
            "terminateds": np.zeros(size, np.float32), RETURN_SO_FAR: np.empty(size, np.float32),
        }
        module = self.module
        episodes = 0
        row = 0
        for round_index in range(rounds):
            actions = module.act(torch.from_numpy(state["obs"]), lifetime + stride * row, explore=True).numpy()
            for index, env in enumerate(envs[:size - row]):
                action = actions[index].astype(action_dtype, copy=False)
                next_obs, reward, terminated, truncated, _ = env.step(to_env(action))
                next_obs = self._observation(next_obs)
                state["return"][index] += reward
                state["length"][index] += 1
                out["obs"][row] = state["obs"][index]
                out["next_obs"][row] = next_obs
                out["actions"][row] = action
                out["rewards"][row] = reward
                out["terminateds"][row] = float(terminated)
                out[RETURN_SO_FAR][row] = state["return"][index]
                row += 1
                if terminated or truncated:
                    episodes += 1
                    self._log_episode_metrics(int(state["length"][index]), float(state["return"][index]),
                                              time.perf_counter() - state["started"][index])
                    next_obs, _ = env.reset()
                    next_obs = self._observation(next_obs)
                    state["return"][index] = 0.0
                    state["length"][index] = 0
                    state["started"][index] = time.perf_counter()
                state["obs"][index] = next_obs
        self._unlogged = (self._unlogged[0] + size, self._unlogged[1] + episodes)
        return out
