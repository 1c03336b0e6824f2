"""Environments raysmith registers with gymnasium: Atari games with DQN's preprocessing.

``raysmith/Pong-v5`` (and the other games in :data:`ATARI_GAMES`) is the Arcade Learning
Environment's game (``ale-py``, whose wheels ship the ROMs) as the DQN literature trains on
it (Mnih et al., 2015; NoisyNets and NROWAN-DQN follow it):

- no sticky actions (``repeat_action_probability=0``, the old ``NoFrameskip-v4`` games);
- up to 30 no-op actions after each reset, so episodes start in different states;
- each action repeated for 4 frames, rewards summed, the observation the pixel-wise
  maximum of the last two frames (Atari sprites flicker);
- greyscale, resized to 84 x 84 with box (area) filtering, as uint8;
- the last 4 observations stacked: observations are ``uint8[4, 84, 84]``, channels first.

Rewards are not clipped (Pong's are already -1, 0 or +1) and a lost life does not end the
episode, so episode returns are the game's score. Resizing uses Pillow (a Matplotlib
dependency) rather than OpenCV, which gymnasium's own ``AtariPreprocessing`` needs.

Registration happens on ``import agents``; creating one needs ``ale-py``.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

ATARI_GAMES = ("Pong", "Breakout")
"""Games registered as ``raysmith/<Game>-v5`` (any ALE game works with :func:`make_atari`)."""

FRAME_SIZE = 84
FRAME_SKIP = 4
FRAME_STACK = 4
NOOP_MAX = 30


class DQNAtariPreprocessing(gym.Wrapper):
    """No-op starts, 4-frame action repeat with max-pooling, greyscale 84 x 84 uint8 frames.

    Wraps an ALE environment created with ``frameskip=1`` and ``obs_type="grayscale"``.
    """

    def __init__(self, env: gym.Env, frame_skip: int = FRAME_SKIP, noop_max: int = NOOP_MAX,
                 size: int = FRAME_SIZE):
        super().__init__(env)
        if frame_skip < 1 or noop_max < 0:
            raise ValueError(f"frame_skip must be >= 1 and noop_max >= 0, got {frame_skip} and {noop_max}")
        meanings = env.unwrapped.get_action_meanings()
        if noop_max and meanings[0] != "NOOP":
            raise ValueError(f"no-op starts need action 0 to be NOOP; this game's actions are {meanings}")
        self.frame_skip, self.noop_max, self.size = frame_skip, noop_max, size
        self.observation_space = gym.spaces.Box(0, 255, (size, size), np.uint8)
        self._last_two = np.zeros((2, *env.observation_space.shape), np.uint8)

    def _frame(self) -> np.ndarray:
        from PIL import Image

        pooled = np.maximum(self._last_two[0], self._last_two[1])
        resized = Image.fromarray(pooled).resize((self.size, self.size), Image.Resampling.BOX)
        return np.asarray(resized, dtype=np.uint8)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        observation, info = self.env.reset(seed=seed, options=options)
        noops = int(self.np_random.integers(1, self.noop_max + 1)) if self.noop_max else 0
        for _ in range(noops):
            observation, _, terminated, truncated, info = self.env.step(0)
            if terminated or truncated:
                observation, info = self.env.reset()
        self._last_two[:] = observation
        return self._frame(), info

    def step(self, action: int):
        total, terminated, truncated, info = 0.0, False, False, {}
        for repeat in range(self.frame_skip):
            observation, reward, terminated, truncated, info = self.env.step(action)
            total += float(reward)
            if repeat >= self.frame_skip - 2:
                self._last_two[repeat - (self.frame_skip - 2)] = observation
            if terminated or truncated:
                self._last_two[:] = observation
                break
        return self._frame(), total, terminated, truncated, info


def make_atari(game: str, frame_stack: int = FRAME_STACK, **kwargs: Any) -> gym.Env:
    """The ALE game ``game`` (e.g. ``"Pong"``) with DQN's preprocessing (see the module docstring)."""
    try:
        import ale_py
    except ImportError as err:
        raise gym.error.DependencyNotInstalled(
            "Atari games need ale-py (its wheels include the ROMs): pip install ale-py") from err
    gym.register_envs(ale_py)
    options = {"frameskip": 1, "repeat_action_probability": 0.0, "obs_type": "grayscale", **kwargs}
    env = DQNAtariPreprocessing(gym.make(f"ALE/{game}-v5", **options))
    return gym.wrappers.FrameStackObservation(env, frame_stack)


def register_environments() -> None:
    """Register ``raysmith/<Game>-v5`` for each of :data:`ATARI_GAMES` (idempotent)."""
    for game in ATARI_GAMES:
        env_id = f"raysmith/{game}-v5"
        if env_id not in gym.envs.registry:
            gym.register(env_id, entry_point="agents.envs:make_atari", kwargs={"game": game})
