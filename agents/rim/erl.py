"""ERL: Evolutionary Reinforcement Learning (Khadka & Tumer, NeurIPS 2018), on RLlib.

One ``train()`` call is one generation:

1. every member of the population plays ``episodes_per_eval`` deterministic episodes on the
   rollout workers (Ray actors, :class:`~agents.rim.population.PopulationEvaluator`); the
   mean return is its fitness and every transition goes into the shared replay buffer;
2. the genetic step (:func:`~agents.rim.population.evolve`) builds the next population;
3. the RL agent (DDPG, the learner of :mod:`agents.rud` with ``twin_q=False``,
   ``policy_delay=1``, ``target_noise=0``) plays ``rl_episodes_per_generation`` noisy
   episodes on the EnvRunners, then runs as many updates as the generation took env steps
   (times ``updates_per_step``);
4. every ``sync_period`` generations its actor is copied over the slot of the member that
   was worst in step 1 (ERL's rule), or the next worst if that slot now holds an elite.

Defaults are ERL's published settings where they exist (population 10, elite fraction 0.1,
mutation probability 0.9, no crossover between selected parents, tau 0.001, batch 128,
learning once the buffer holds 5 batches); the per-environment values of the paper
(Hopper: elite 0.3, 5 episodes per evaluation, sync every generation) are in the shipped
specs. Two differences, stated: the RL agent explores with Gaussian noise (0.1) instead of
Ornstein-Uhlenbeck noise, and actors are raysmith's plain MLPs (no layer norm).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
from ray.rllib.algorithms.algorithm_config import NotProvided
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.utils.metrics import (
    ENV_RUNNER_RESULTS,
    ENV_RUNNER_SAMPLING_TIMER,
    LEARNER_RESULTS,
    LEARNER_UPDATE_TIMER,
    NUM_ENV_STEPS_SAMPLED,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
    TIMERS,
)
from ray.rllib.utils.metrics.metrics_logger import MetricsLogger

from agents.common.off_policy import set_provided
from agents.common.replay import FIELDS, episodes_to_transitions
from agents.rim.population import (
    ActorSpec,
    GenomeLayout,
    MutationSettings,
    PopulationEvaluator,
    evolve,
    genome_of,
)
from agents.rud.rud import RUD, DDPGConfig
from agents.rud.rud_rl_module import DEFAULT_MODEL_CONFIG

POPULATION = "population"


class ERLConfig(DDPGConfig):
    """ERL hyperparameters: the population's, and DDPG's for the RL agent.

    Example::

        algo = ERLConfig().environment("Hopper-v5").build_algo()
        algo.train()   # one generation
    """

    def __init__(self, algo_class: type | None = None):
        super().__init__(algo_class=algo_class or ERL)
        # the RL agent samples whole episodes through RLlib's own EnvRunner (connectors apply)
        self.env_runner_cls = None
        self.population_size: int = 10
        self.elite_fraction: float = 0.1
        """Share of the population kept unchanged (at least one member)."""
        self.episodes_per_eval: int = 1
        """Episodes whose mean return is a member's fitness."""
        self.mutation_prob: float = 0.9
        self.crossover_prob: float = 0.0
        """Crossover between two selected parents (the unselected are always rebuilt by crossover)."""
        self.mutation_strength: float = 0.1
        self.mutation_fraction: float = 0.1
        self.super_mutation_strength: float = 10.0
        self.super_mutation_prob: float = 0.05
        self.reset_prob: float = 0.05
        self.tournament_size: int = 3
        self.sync_period: int = 10
        """Generations between copies of the RL actor into the population (0: never)."""
        self.rl_episodes_per_generation: int = 1
        self.champion_test_episodes: int = 5
        """Fresh episodes of the generation's champion, reported as its test return (ERL's
        "test score"); their steps are neither stored nor counted as training steps."""
        self.num_population_workers: int = 2
        """Ray actors that play the members' episodes (0: in the driver)."""
        self.cpus_per_population_worker: float = 1.0
        # ERL's DDPG
        self.tau = 0.001
        self.train_batch_size_per_learner = 128
        self.learning_starts = 5 * 128
        self.min_sample_timesteps_per_iteration = 0  # one generation per train() call

    def training(
        self,
        *,
        population_size: int | None = NotProvided,
        elite_fraction: float | None = NotProvided,
        episodes_per_eval: int | None = NotProvided,
        mutation_prob: float | None = NotProvided,
        crossover_prob: float | None = NotProvided,
        mutation_strength: float | None = NotProvided,
        mutation_fraction: float | None = NotProvided,
        super_mutation_strength: float | None = NotProvided,
        super_mutation_prob: float | None = NotProvided,
        reset_prob: float | None = NotProvided,
        tournament_size: int | None = NotProvided,
        sync_period: int | None = NotProvided,
        rl_episodes_per_generation: int | None = NotProvided,
        champion_test_episodes: int | None = NotProvided,
        num_population_workers: int | None = NotProvided,
        cpus_per_population_worker: float | None = NotProvided,
        **kwargs: Any,
    ) -> "ERLConfig":
        super().training(**kwargs)
        return set_provided(self, locals())

    @property
    def num_elites(self) -> int:
        return max(1, int(self.elite_fraction * self.population_size))

    def validate(self) -> None:
        super().validate()
        errors = []
        if self.population_size < 2:
            errors.append(f"population_size must be >= 2, got {self.population_size}")
        elif self.num_elites >= self.population_size:
            errors.append(f"elite_fraction {self.elite_fraction} keeps the whole population of {self.population_size}")
        for name in ("mutation_prob", "crossover_prob", "elite_fraction", "super_mutation_prob", "reset_prob"):
            if not 0 <= getattr(self, name) <= 1:
                errors.append(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("episodes_per_eval", "tournament_size"):
            if int(getattr(self, name)) < 1:
                errors.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.population_size >= 2 and self.num_elites > self.population_size // 2:
            errors.append(f"elite_fraction {self.elite_fraction} keeps {self.num_elites} of {self.population_size} "
                          f"members: at most half the population can be elites")
        if self.normalize_observations:
            errors.append("normalize_observations is not supported: population members act on raw observations "
                          "and exchange weights with the agent's actors")
        if self.num_learners != 0:
            errors.append(f"ERL and RIM keep their Learner in the driver: num_learners must be 0, "
                          f"got {self.num_learners}")
        for name in ("sync_period", "rl_episodes_per_generation", "num_population_workers", "champion_test_episodes"):
            if int(getattr(self, name)) < 0:
                errors.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if errors:
            raise ValueError("; ".join(errors))

    def mutation_settings(self) -> MutationSettings:
        return MutationSettings(strength=self.mutation_strength, fraction=self.mutation_fraction,
                                super_strength=self.super_mutation_strength, super_prob=self.super_mutation_prob,
                                reset_prob=self.reset_prob)


class ERL(RUD):
    """A population evolved by a genetic algorithm beside a DDPG agent that learns from all
    of its experience. One ``train()`` call is one generation."""

    @classmethod
    def get_default_config(cls) -> ERLConfig:
        return ERLConfig()

    def setup(self, config: ERLConfig) -> None:
        super().setup(config)
        learner_module = self._learner_module()
        model = {**DEFAULT_MODEL_CONFIG, **(config.model_config or {})}
        self._actor_spec = ActorSpec(learner_module.obs_dim, learner_module.act_dim, tuple(model["actor_hidden"]),
                                     model["activation"])
        self._layout = GenomeLayout.of(learner_module.actor)
        # every member starts as a freshly initialised actor, as in ERL
        from agents.common.networks import DeterministicActor

        spec = self._actor_spec
        # no seed: a random base seed (kept in checkpoints), so unseeded runs are independent
        self.base_seed = int(config.seed) if config.seed is not None else int.from_bytes(os.urandom(4), "little")
        with torch.random.fork_rng():
            torch.manual_seed(self.base_seed + 12345)
            self.population = torch.stack([
                genome_of(DeterministicActor(spec.obs_dim, spec.act_dim, spec.hidden, spec.activation))
                for _ in range(config.population_size)
            ])
        self.generation = 0
        self.fitness: list[float] = []
        self.env_steps_total = 0
        self._ga_generator = torch.Generator().manual_seed(self.base_seed + 424242)
        self._rl_member: int | None = None
        self._rl_outcomes = {"elite": 0, "selected": 0, "discarded": 0}
        self.evaluator = PopulationEvaluator(config.env, dict(config.env_config), self._actor_spec,
                                             int(config.num_population_workers), seed=self.base_seed,
                                             cpus_per_worker=config.cpus_per_population_worker)

    def _learner_module(self):
        if self.learner_group.is_local:
            return self.learner_group._learner.module[DEFAULT_MODULE_ID]
        raise ValueError("ERL and RIM keep their Learner in the driver (num_learners=0)")

    def learner_actor_genome(self) -> torch.Tensor:
        return genome_of(self._learner_module().actor)

    # ---------------------------------------------------------------- one generation

    def training_step(self) -> None:
        config: ERLConfig = self.config
        metrics = self.metrics
        with metrics.log_time((TIMERS, "population_eval_timer")):
            results = self.evaluator.evaluate(self.population, int(config.episodes_per_eval),
                                              seed=self.base_seed * 7_919 + self.generation * 104_729)
        fitness = [result["fitness"] for result in results]
        population_steps = sum(result["steps"] for result in results)
        best = int(np.argmax(fitness))
        champion_test = None
        if config.champion_test_episodes:
            champion_test = self.evaluator.evaluate(self.population[best : best + 1],
                                                    int(config.champion_test_episodes),
                                                    seed=10**9 + self.base_seed + self.generation * 1_009)[0]["fitness"]
        self.population, report = evolve(self.population, fitness, self._layout, config.num_elites,
                                         config.mutation_prob, config.crossover_prob, config.mutation_settings(),
                                         self._ga_generator, config.tournament_size)
        self.last_report = report
        self._note_rl_member_fate(report)
        champion_genome = self.population[report.elites[0]].clone()
        self.after_evolution(fitness, report, champion_genome)

        # every env step so far, this generation's population rollouts included
        lifetime = int(metrics.peek((ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME), default=0)) + population_steps
        with metrics.log_time((TIMERS, ENV_RUNNER_SAMPLING_TIMER)):
            episodes = self._sample_episodes(int(config.rl_episodes_per_generation), lifetime)
        rl_steps = sum(len(episode) for episode in episodes)
        rl_returns = [float(episode.get_return()) for episode in episodes if episode.is_done]
        parts = [result["transitions"] for result in results]
        agent_transitions = episodes_to_transitions(episodes)
        self.before_learning(agent_transitions)
        if agent_transitions:
            parts.append(agent_transitions)
        transitions = {name: np.concatenate([part[name] for part in parts]) for name in FIELDS} if parts else {}
        steps = population_steps + rl_steps
        self.env_steps_total += steps
        self._update_credit += steps * config.updates_per_step
        num_updates = int(self._update_credit)
        self._update_credit -= num_updates
        timesteps = {NUM_ENV_STEPS_SAMPLED_LIFETIME: lifetime + rl_steps}
        with metrics.log_time((TIMERS, LEARNER_UPDATE_TIMER)):
            [done] = [r.get() for r in self.learner_group.foreach_learner(
                lambda learner: learner.learn_block(transitions, num_updates, timesteps))]
        self.after_learning(done)
        self.env_runner_group.sync_weights(from_worker_or_learner_group=self.learner_group, inference_only=True)
        self.generation += 1
        synced = False
        if config.sync_period and done and self.generation % config.sync_period == 0:
            # ERL copies the agent over its worst member; never over an elite's copy
            slot = min((s for s in range(len(fitness)) if s not in report.elites), key=lambda s: fitness[s])
            self.population[slot] = self.learner_actor_genome()
            self._rl_member = slot
            synced = True
        self.fitness = fitness

        log = metrics.log_value
        log((POPULATION, "generation"), self.generation, window=1)
        log((POPULATION, "champion_fitness"), max(fitness), window=1)
        if champion_test is not None:
            log((POPULATION, "champion_test_return"), champion_test, window=1)
        log((POPULATION, "mean_fitness"), float(np.mean(fitness)), window=1)
        log((POPULATION, "worst_fitness"), min(fitness), window=1)
        log((POPULATION, "env_steps"), population_steps, window=1)
        log((POPULATION, "env_steps_total"), self.env_steps_total, window=1)
        log((POPULATION, "rl_synced"), float(synced), window=1)
        log((POPULATION, "worker_restarts"), self.evaluator.restarts, window=1)
        if rl_returns:
            log((POPULATION, "rl_episode_return"), float(np.mean(rl_returns)), window=1)
        for outcome, count in self._rl_outcomes.items():
            log((POPULATION, f"rl_member_{outcome}"), count, window=1)
        # the population's steps count as sampled env steps too (budgets, stop conditions, plots),
        # reported as one more EnvRunner would report them
        population_runner = MetricsLogger()
        population_runner.log_value(NUM_ENV_STEPS_SAMPLED, population_steps, reduce="sum")
        population_runner.log_value(NUM_ENV_STEPS_SAMPLED_LIFETIME, population_steps, reduce="lifetime_sum",
                                    with_throughput=True)
        metrics.aggregate(self._runner_metrics() + [population_runner.reduce()], key=ENV_RUNNER_RESULTS)
        learner_metrics = self.learner_group.foreach_learner(lambda learner: learner.reduce_metrics())
        metrics.aggregate([result.get() for result in learner_metrics], key=LEARNER_RESULTS)

    # hooks for RIM
    def after_evolution(self, fitness: list[float], report, champion_genome: torch.Tensor) -> None:
        pass

    def before_learning(self, agent_transitions: dict[str, np.ndarray]) -> None:
        pass

    def after_learning(self, updates_done: int) -> None:
        pass

    def _note_rl_member_fate(self, report) -> None:
        """ERL's statistic: did the member that received the RL actor become an elite, win a
        tournament (selected as a parent), or neither (discarded)?"""
        if self._rl_member is None:
            return
        if self._rl_member in report.elite_sources:
            self._rl_outcomes["elite"] += 1
        elif self._rl_member in report.winners:
            self._rl_outcomes["selected"] += 1
        else:
            self._rl_outcomes["discarded"] += 1
        self._rl_member = None

    def _sample_episodes(self, count: int, lifetime: int) -> list:
        """``count`` whole episodes of the RL agent (with exploration) from the EnvRunners."""
        if not count:
            return []
        group = self.env_runner_group

        def sample(runner, share: int) -> list:
            runner.num_env_steps_sampled_lifetime = lifetime  # where the random warm-up stands
            return runner.sample(num_episodes=share)

        if group.num_remote_env_runners() == 0:
            return sample(group.local_env_runner, count)
        per_runner = math.ceil(count / max(1, group.num_healthy_remote_workers()))
        results = group.foreach_env_runner(lambda runner: sample(runner, per_runner), local_env_runner=False,
                                           timeout_seconds=self.config.sample_timeout_s)
        return [episode for sampled in results for episode in sampled]

    @classmethod
    def default_resource_request(cls, config):
        """RLlib's request (driver, Learner, EnvRunners) plus one bundle per population worker."""
        from ray.tune.execution.placement_groups import PlacementGroupFactory

        request = super().default_resource_request(config)
        config = config if isinstance(config, ERLConfig) else cls.get_default_config().update_from_dict(config)
        workers = int(config.num_population_workers)
        if workers == 0:
            return request
        extra = [{"CPU": float(config.cpus_per_population_worker)} for _ in range(workers)]
        return PlacementGroupFactory(bundles=[dict(b) for b in request.bundles] + extra, strategy=request.strategy)

    # ---------------------------------------------------------------- checkpoints

    def get_state(self, *args, **kwargs) -> dict[str, Any]:
        state = super().get_state(*args, **kwargs)
        state[POPULATION] = {
            "genomes": self.population.clone(), "generation": self.generation, "fitness": list(self.fitness),
            "env_steps_total": self.env_steps_total, "generator": self._ga_generator.get_state(),
            "rl_member": self._rl_member, "rl_outcomes": dict(self._rl_outcomes), "base_seed": self.base_seed,
            "worker_restarts": self.evaluator.restarts,
        }
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        saved = state.get(POPULATION)
        if saved:
            self.population = torch.as_tensor(saved["genomes"]).clone()
            self.generation = int(saved["generation"])
            self.fitness = list(saved["fitness"])
            self.env_steps_total = int(saved["env_steps_total"])
            self._ga_generator.set_state(saved["generator"])
            self._rl_member = saved["rl_member"]
            self._rl_outcomes = dict(saved["rl_outcomes"])
            self.base_seed = int(saved.get("base_seed", self.base_seed))
            self.evaluator.restarts = int(saved.get("worker_restarts", 0))

    def cleanup(self) -> None:
        evaluator = getattr(self, "evaluator", None)
        if evaluator is not None:
            evaluator.stop()
        super().cleanup()
