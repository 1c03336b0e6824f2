"""A uniform replay buffer of transitions, kept as preallocated tensors where the Learner runs.

Transitions come from RLlib episodes (:func:`episodes_to_transitions`), are written once
into circular storage, and minibatches are gathered with ``index_select``: no per-sample
Python objects and no copy between the buffer and the update.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np
import torch

FIELDS = ("obs", "actions", "rewards", "next_obs", "terminateds")


def episodes_to_transitions(episodes: Iterable[Any]) -> dict[str, np.ndarray]:
    """Flatten RLlib single-agent episode chunks into (s, a, r, s', terminated) arrays.

    A chunk of T steps holds T + 1 observations. Only the last step of a terminated
    episode is terminal; a truncated episode (time limit) still bootstraps from s'.
    """
    parts: dict[str, list[np.ndarray]] = {name: [] for name in FIELDS}
    for episode in episodes:
        steps = len(episode)
        if steps == 0:
            continue
        observations = np.asarray(episode.get_observations(), dtype=np.float32).reshape(steps + 1, -1)
        parts["obs"].append(observations[:-1])
        parts["next_obs"].append(observations[1:])
        parts["actions"].append(np.asarray(episode.get_actions(), dtype=np.float32).reshape(steps, -1))
        parts["rewards"].append(np.asarray(episode.get_rewards(), dtype=np.float32).reshape(steps))
        terminated = np.zeros(steps, dtype=np.float32)
        terminated[-1] = float(episode.is_terminated)
        parts["terminateds"].append(terminated)
    if not parts["obs"]:
        return {}
    return {name: np.concatenate(values) for name, values in parts.items()}


class TransitionBuffer:
    """Fixed-capacity FIFO of transitions; the oldest are overwritten when full.

    ``extra_fields`` names further per-transition scalars an algorithm stores beside
    (s, a, r, s', terminated), e.g. NROWAN-DQN's episode return so far. ``obs_dim`` is a
    size (flat observations) or a shape (e.g. ``(4, 84, 84)`` frame stacks), and
    ``obs_dtype`` the observations' dtype (``torch.uint8`` keeps Atari frames at a quarter
    of float32's memory: 100,000 transitions of s and s' take 5.6 GB instead of 22.6).
    """

    def __init__(self, capacity: int, obs_dim: int | tuple[int, ...], act_dim: int,
                 device: torch.device | str = "cpu", extra_fields: tuple[str, ...] = (),
                 obs_dtype: torch.dtype = torch.float32):
        if capacity < 1:
            raise ValueError(f"replay capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.device = torch.device(device)
        obs_shape = tuple(obs_dim) if isinstance(obs_dim, (tuple, list)) else (obs_dim,)
        shapes = {"obs": obs_shape, "actions": (act_dim,), "rewards": (), "next_obs": obs_shape, "terminateds": ()}
        shapes.update({name: () for name in extra_fields})
        dtypes = {"obs": obs_dtype, "next_obs": obs_dtype}
        self.fields = tuple(shapes)
        self.storage = {name: torch.zeros((capacity, *shape), device=self.device, dtype=dtypes.get(name, torch.float32))
                        for name, shape in shapes.items()}
        # on the CPU, writes go through numpy views of the same memory: a one-step add (DQN,
        # TD3) then costs microseconds instead of a tensor conversion per field
        self._views = {name: values.numpy() for name, values in self.storage.items()} if self.device.type == "cpu" else None
        self.position = 0
        self.size = 0
        self.added = 0
        """Transitions ever added (not capped by capacity)."""

    def __len__(self) -> int:
        return self.size

    def add(self, transitions: Mapping[str, np.ndarray | torch.Tensor]) -> None:
        count = len(transitions["rewards"]) if transitions else 0
        if count == 0:
            return
        if count > self.capacity:  # only the newest fit
            transitions = {name: values[-self.capacity :] for name, values in transitions.items()}
            count = self.capacity
        first = min(count, self.capacity - self.position)
        if self._views is not None and all(isinstance(transitions[name], np.ndarray) for name in self.fields):
            for name in self.fields:
                view = self._views[name]
                values = transitions[name].reshape(count, *view.shape[1:])
                view[self.position : self.position + first] = values[:first]
                if first < count:
                    view[: count - first] = values[first:]
            self._advance(count)
            return
        for name in self.fields:
            values = torch.as_tensor(transitions[name], dtype=self.storage[name].dtype, device=self.device)
            values = values.reshape(count, *self.storage[name].shape[1:])
            self.storage[name][self.position : self.position + first] = values[:first]
            if first < count:
                self.storage[name][: count - first] = values[first:]
        self._advance(count)

    def _advance(self, count: int) -> None:
        self.position = (self.position + count) % self.capacity
        self.size = min(self.size + count, self.capacity)
        self.added += count

    def gather(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: values.index_select(0, indices) for name, values in self.storage.items()}

    def get_state(self) -> dict[str, Any]:
        """The stored transitions in insertion order (oldest first), as numpy arrays."""
        if self.size < self.capacity:
            order = torch.arange(self.size)
        else:
            order = (torch.arange(self.capacity) + self.position) % self.capacity
        return {
            "transitions": {name: values[order.to(self.device)].cpu().numpy() for name, values in self.storage.items()},
            "added": self.added,
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.position = self.size = 0
        self.add(state["transitions"])
        self.added = int(state["added"])
