"""The evolutionary population of ERL and RIM: genomes, ERL's genetic operators, and
fitness rollouts on a pool of Ray actors.

A population is a ``[size, n]`` float32 tensor: row i holds member i's actor weights, flat,
in the order of :class:`~agents.common.networks.DeterministicActor`'s ``parameters()``
(:class:`GenomeLayout` maps rows to and from networks). The genetic step follows ERL
(Khadka & Tumer, NeurIPS 2018; its published operator settings are the defaults):

- rank by fitness; the ``elite`` best are kept unchanged;
- tournament selection (size 3) picks parents for the rest;
- members that were not selected are rebuilt by crossover of an elite and a selected
  parent (row swaps of each weight matrix and bias), selected pairs cross over with
  ``crossover_prob``;
- every non-elite member mutates with ``mutation_prob``: in each weight matrix (chosen with
  probability min(1, U(0, 2))), up to 10 % of the weights get Gaussian noise of 0.1 x their
  size, 5 % of those a "super mutation" of 10 x, 5 % a reset to N(0, 1); weights are held
  within +-1e6.

Fitness is the mean undiscounted return of ``episodes`` deterministic episodes.
:class:`PopulationEvaluator` spreads the members over ``num_workers`` Ray actors (each
with its own environment), passes every member's weights by object reference, and when a
worker dies re-runs that member's evaluation on a fresh worker, so the generation
completes. Transitions of every rollout come back for the shared replay buffer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class GenomeLayout:
    """Where each parameter of an actor lives in a flat genome."""

    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, network: nn.Module) -> "GenomeLayout":
        return cls(tuple(tuple(p.shape) for p in network.parameters()))

    @property
    def size(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes)

    def slices(self) -> list[tuple[slice, tuple[int, ...]]]:
        out, offset = [], 0
        for shape in self.shapes:
            count = math.prod(shape)
            out.append((slice(offset, offset + count), shape))
            offset += count
        return out


def genome_of(network: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float().cpu() for p in network.parameters()])


@torch.no_grad()
def load_genome(network: nn.Module, genome: torch.Tensor) -> nn.Module:
    layout = GenomeLayout.of(network)
    if genome.numel() != layout.size:
        raise ValueError(f"a genome of {genome.numel()} weights does not fit this network ({layout.size})")
    for parameter, (part, shape) in zip(network.parameters(), GenomeLayout.of(network).slices()):
        parameter.copy_(genome[part].view(shape).to(parameter))
    return network


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau: float) -> float:
    """theta_target <- (1 - tau) theta_target + tau theta_source (tau 1: a copy); returns the
    L2 length of the step taken."""
    squared = 0.0
    for mine, theirs in zip(target.parameters(), source.parameters()):
        step = (theirs.to(mine) - mine) * tau
        squared += float(step.pow(2).sum())
        if tau == 1.0:
            mine.copy_(theirs)  # exactly the source, not a + (b - a)
        else:
            mine.add_(step)
    return squared**0.5


@dataclass(frozen=True)
class MutationSettings:
    """ERL's mutation operator (its published constants are the defaults)."""

    strength: float = 0.1
    fraction: float = 0.1
    super_strength: float = 10.0
    super_prob: float = 0.05
    reset_prob: float = 0.05
    max_magnitude: float = 1e6


def mutate(genome: torch.Tensor, layout: GenomeLayout, settings: MutationSettings,
           generator: torch.Generator) -> torch.Tensor:
    """A mutated copy of ``genome``: weight matrices only (biases are left as they are)."""
    out = genome.clone()
    for part, shape in layout.slices():
        if len(shape) != 2:
            continue
        if float(torch.rand((), generator=generator)) >= 2 * float(torch.rand((), generator=generator)):
            continue  # this matrix is spared (probability max(0, 1 - U(0, 2)))
        weights = out[part]
        count = int(torch.randint(0, math.ceil(settings.fraction * weights.numel()), (), generator=generator))
        if count == 0:
            continue
        index = torch.randint(0, weights.numel(), (count,), generator=generator)
        kind = torch.rand(count, generator=generator)
        noise = torch.randn(count, generator=generator)
        reset = torch.randn(count, generator=generator)
        # the draws apply in order; a weight drawn k times is mutated k times (in k rounds)
        pending = torch.arange(count)
        while pending.numel():
            unique, inverse = torch.unique(index[pending], return_inverse=True)
            first = torch.full((unique.numel(),), count).scatter_reduce_(0, inverse, pending, "amin")
            current = weights[index[first]]
            scale = torch.where(kind[first] < settings.super_prob, settings.super_strength, settings.strength)
            value = torch.where((kind[first] >= settings.super_prob)
                                & (kind[first] < settings.super_prob + settings.reset_prob),
                                reset[first], current + noise[first] * scale * current)
            weights[index[first]] = value.clamp(-settings.max_magnitude, settings.max_magnitude)
            pending = pending[~torch.isin(pending, first)]
        out[part] = weights
    return out


def crossover(first: torch.Tensor, second: torch.Tensor, layout: GenomeLayout,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """ERL's crossover: for each weight matrix (bias), a random number of rows (entries) is
    copied from one parent to the other, each copy in a random direction."""
    a, b = first.clone(), second.clone()
    for part, shape in layout.slices():
        rows = shape[0]
        view_a, view_b = a[part].view(rows, -1), b[part].view(rows, -1)
        swaps = int(torch.randint(0, rows * (2 if len(shape) == 2 else 1), (), generator=generator))
        for _ in range(swaps):
            row = int(torch.randint(0, rows, (), generator=generator))
            if float(torch.rand((), generator=generator)) < 0.5:
                view_a[row] = view_b[row]
            else:
                view_b[row] = view_a[row]
    return a, b


def tournament(ranked: Sequence[int], count: int, size: int, generator: torch.Generator) -> list[int]:
    """``count`` tournaments of ``size`` random entrants of ``ranked`` (best first); the
    distinct winners, padded to an even number by repeating one of them."""
    winners = []
    for _ in range(count):
        entrants = torch.randint(0, len(ranked), (size,), generator=generator)
        winners.append(ranked[int(entrants.min())])
    distinct = list(dict.fromkeys(winners))
    if len(distinct) % 2:
        distinct.append(distinct[int(torch.randint(0, len(distinct), (), generator=generator))])
    return distinct


@dataclass
class GenerationReport:
    elites: list[int]
    """Where the previous generation's best members were copied to (the champion first)."""
    elite_sources: list[int]
    """Those best members' own slots (by the fitness just measured)."""
    winners: list[int]
    """Tournament winners: the selected parents."""
    selected: list[int]
    """Winners whose slots kept their (possibly mutated) genome."""
    rebuilt: list[int]
    mutated: list[int]


def evolve(population: torch.Tensor, fitness: Sequence[float], layout: GenomeLayout, num_elites: int,
           mutation_prob: float, crossover_prob: float, mutation: MutationSettings, generator: torch.Generator,
           tournament_size: int = 3) -> tuple[torch.Tensor, GenerationReport]:
    """ERL's generational step; returns the next population and who became what."""
    size = population.shape[0]
    if not 1 <= num_elites <= size // 2:
        raise ValueError(f"need 1 <= elites <= half the population, got {num_elites} of {size}")
    ranked = sorted(range(size), key=lambda index: -fitness[index])
    elite_sources = ranked[:num_elites]
    selected = tournament(ranked, size - num_elites, tournament_size, generator)
    winners = list(selected)
    unselected = [index for index in range(size) if index not in selected and index not in elite_sources]
    unselected = [unselected[int(i)] for i in torch.randperm(len(unselected), generator=generator)]
    new = population.clone()
    elites = []
    for source in elite_sources:  # the best members are copied into slots that were not selected
        slot = unselected.pop(0) if unselected else selected.pop(0)
        new[slot] = population[source]
        elites.append(slot)
    if len(unselected) % 2:
        unselected.append(unselected[int(torch.randint(0, len(unselected), (), generator=generator))])
    rebuilt = []
    for i, j in zip(unselected[0::2], unselected[1::2]):
        parent_i = elites[int(torch.randint(0, len(elites), (), generator=generator))]
        parent_j = selected[int(torch.randint(0, len(selected), (), generator=generator))]
        new[i], new[j] = crossover(new[parent_i], new[parent_j], layout, generator)
        rebuilt += [i, j]
    for i, j in zip(selected[0::2], selected[1::2]):
        if float(torch.rand((), generator=generator)) < crossover_prob:
            new[i], new[j] = crossover(new[i], new[j], layout, generator)
    mutated = []
    for index in range(size):
        if index not in elites and float(torch.rand((), generator=generator)) < mutation_prob:
            new[index] = mutate(new[index], layout, mutation, generator)
            mutated.append(index)
    return new, GenerationReport(elites=elites, elite_sources=elite_sources, winners=winners, selected=selected,
                                 rebuilt=sorted(set(rebuilt)), mutated=mutated)


# ---------------------------------------------------------------- rollouts on Ray


@dataclass(frozen=True)
class ActorSpec:
    """What a rollout worker needs to build the population's actor network."""

    obs_dim: int
    act_dim: int
    hidden: tuple[int, ...]
    activation: str


class RolloutWorker:
    """One environment and one actor network; plays members' episodes (a Ray actor)."""

    def __init__(self, env_id: str, env_config: dict[str, Any], spec: ActorSpec, seed: int, own_process: bool = True):
        import gymnasium as gym

        from agents.common.networks import DeterministicActor

        if own_process:  # one thread per worker; never set in the driver, whose Learner needs its threads
            torch.set_num_threads(1)
        self.env = gym.make(env_id, **(env_config or {}))
        self.low, self.high = self.env.action_space.low, self.env.action_space.high
        self.actor = DeterministicActor(spec.obs_dim, spec.act_dim, spec.hidden, spec.activation).eval()
        self.seed = seed
        self.episodes_played = 0

    def pid(self) -> int:
        import os

        return os.getpid()

    @torch.no_grad()
    def rollout(self, genome: torch.Tensor, episodes: int, noise: float = 0.0,
                seed: int | None = None) -> dict[str, Any]:
        """``episodes`` episodes with the member's actor (plus Gaussian noise of std ``noise``
        in normalised action units); the mean return and every transition."""
        load_genome(self.actor, genome)
        rng = np.random.default_rng(seed)
        returns, parts = [], {name: [] for name in ("obs", "actions", "rewards", "next_obs", "terminateds")}
        for episode in range(episodes):
            obs, _ = self.env.reset(seed=None if seed is None else seed + episode)
            total, done = 0.0, False
            while not done:
                action = self.actor(torch.as_tensor(obs, dtype=torch.float32).reshape(1, -1))[0].numpy()
                if noise > 0:
                    action = np.clip(action + rng.normal(0.0, noise, action.shape), -1.0, 1.0)
                scaled = self.low + (action + 1.0) * 0.5 * (self.high - self.low)
                next_obs, reward, terminated, truncated, _ = self.env.step(scaled)
                parts["obs"].append(np.asarray(obs, np.float32).reshape(-1))
                parts["actions"].append(np.asarray(action, np.float32))
                parts["rewards"].append(float(reward))
                parts["next_obs"].append(np.asarray(next_obs, np.float32).reshape(-1))
                parts["terminateds"].append(float(terminated))
                total += float(reward)
                obs, done = next_obs, terminated or truncated
            returns.append(total)
        self.episodes_played += episodes
        transitions = {name: np.asarray(values, np.float32) for name, values in parts.items()}
        return {"fitness": float(np.mean(returns)), "returns": returns, "transitions": transitions,
                "steps": len(parts["rewards"])}


class PopulationEvaluator:
    """Fitness of every member, in parallel on ``num_workers`` Ray actors (0: in this process).

    A worker that dies mid-generation is replaced and its member's evaluation re-run on the
    replacement (``max_retries`` times per member), so a generation always completes.
    """

    def __init__(self, env_id: str, env_config: dict[str, Any] | None, spec: ActorSpec, num_workers: int,
                 seed: int = 0, cpus_per_worker: float = 1.0, max_retries: int = 3):
        self.env_id, self.env_config, self.spec = env_id, dict(env_config or {}), spec
        self.num_workers, self.seed, self.cpus_per_worker = num_workers, seed, cpus_per_worker
        self.max_retries = max_retries
        self.restarts = 0
        self._created = 0
        if num_workers == 0:
            self.local = RolloutWorker(env_id, self.env_config, spec, seed, own_process=False)
            self.workers = []
        else:
            self.local = None
            self.workers = [self._new_worker() for _ in range(num_workers)]

    def _new_worker(self):
        import ray

        remote = ray.remote(num_cpus=self.cpus_per_worker, max_restarts=0)(RolloutWorker)
        self._created += 1
        return remote.remote(self.env_id, self.env_config, self.spec, self.seed + 1000 * self._created)

    def evaluate(self, population: torch.Tensor, episodes: int, seed: int | None = None) -> list[dict[str, Any]]:
        """One result per member (see :meth:`RolloutWorker.rollout`), in member order."""
        seeds = [None if seed is None else seed + 10_007 * member for member in range(population.shape[0])]
        if self.local is not None:
            return [self.local.rollout(population[m], episodes, 0.0, seeds[m]) for m in range(population.shape[0])]
        import ray
        from ray.exceptions import ObjectLostError, OwnerDiedError, RayActorError, RayTaskError, WorkerCrashedError

        lost_worker = (RayActorError, WorkerCrashedError, ObjectLostError, OwnerDiedError)
        genomes = [ray.put(population[m].clone()) for m in range(population.shape[0])]
        results: list[dict[str, Any] | None] = [None] * population.shape[0]
        attempts = [0] * population.shape[0]
        pending = list(range(population.shape[0]))[::-1]
        running: dict[Any, tuple[int, int]] = {}  # future -> (member, worker slot)
        free = list(range(len(self.workers)))
        try:
            while pending or running:
                while pending and free:
                    member, slot = pending.pop(), free.pop(0)
                    future = self.workers[slot].rollout.remote(genomes[member], episodes, 0.0, seeds[member])
                    running[future] = (member, slot)
                done, _ = ray.wait(list(running), num_returns=1)
                member, slot = running.pop(done[0])
                try:
                    results[member] = ray.get(done[0])
                except lost_worker:
                    attempts[member] += 1
                    if attempts[member] > self.max_retries:
                        raise
                    ray.kill(self.workers[slot])
                    self.workers[slot] = self._new_worker()  # a fresh worker takes the dead one's place
                    self.restarts += 1
                    pending.append(member)
                except RayTaskError as err:  # the environment or the actor raised: not worth retrying
                    raise RuntimeError(f"evaluating population member {member} failed: {err}") from err
                free.append(slot)
        finally:
            if running:  # a failed generation leaves no queued work behind: those workers are replaced
                for _, slot in running.values():
                    ray.kill(self.workers[slot])
                    self.workers[slot] = self._new_worker()
        return results  # type: ignore[return-value]

    def worker_pids(self) -> list[int]:
        import ray

        return ray.get([worker.pid.remote() for worker in self.workers]) if self.workers else []

    def stop(self) -> None:
        import ray

        for worker in self.workers:
            ray.kill(worker)
        self.workers = []
