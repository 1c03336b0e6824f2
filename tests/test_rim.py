"""ERL and RIM (agents/rim): the genetic operators, recruitment, the critic's choice,
imitation, a population run on Pendulum, a worker dying mid-generation, checkpoints."""

from __future__ import annotations

import math
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

from agents.common.networks import DeterministicActor
from agents.rim.population import (
    GenomeLayout,
    MutationSettings,
    crossover,
    evolve,
    genome_of,
    load_genome,
    mutate,
    soft_update,
    tournament,
)


def actor(seed: int = 0) -> DeterministicActor:
    torch.manual_seed(seed)
    return DeterministicActor(3, 2, (16, 8))


def test_genomes_round_trip_and_the_layout():
    net, other = actor(0), actor(1)
    genome = genome_of(net)
    layout = GenomeLayout.of(net)
    assert genome.shape == (layout.size,) and layout.size == sum(p.numel() for p in net.parameters())
    x = torch.randn(5, 3)
    assert not torch.allclose(other(x), net(x))
    torch.testing.assert_close(load_genome(other, genome)(x), net(x))


def test_mutation_touches_at_most_a_tenth_of_each_weight_matrix_and_no_bias():
    net = actor()
    layout = GenomeLayout.of(net)
    genome = genome_of(net)
    changed_any = False
    for seed in range(30):
        mutated = mutate(genome, layout, MutationSettings(), torch.Generator().manual_seed(seed))
        for part, shape in layout.slices():
            changed = int((mutated[part] != genome[part]).sum())
            if len(shape) == 1:
                assert changed == 0  # biases are never mutated
            else:
                assert changed <= math.ceil(0.1 * math.prod(shape))
                changed_any |= changed > 0
    assert changed_any
    again = mutate(genome, layout, MutationSettings(), torch.Generator().manual_seed(3))
    torch.testing.assert_close(again, mutate(genome, layout, MutationSettings(), torch.Generator().manual_seed(3)))
    # every draw a reset: the drawn weights become N(0, 1) values, i.e. not scaled copies of themselves
    huge = mutate(genome * 0 + 1e-3, layout, MutationSettings(super_prob=0.0, reset_prob=1.0),
                  torch.Generator().manual_seed(0))
    assert huge.abs().max() > 0.1


def test_crossover_swaps_whole_rows_between_the_parents():
    a, b = genome_of(actor(0)), genome_of(actor(1))
    layout = GenomeLayout.of(actor())
    child_a, child_b = crossover(a, b, layout, torch.Generator().manual_seed(0))
    swapped = 0
    for part, shape in layout.slices():
        rows_a, rows_b = child_a[part].view(shape[0], -1), child_b[part].view(shape[0], -1)
        parent_a, parent_b = a[part].view(shape[0], -1), b[part].view(shape[0], -1)
        for row in range(shape[0]):
            for child in (rows_a[row], rows_b[row]):
                assert torch.equal(child, parent_a[row]) or torch.equal(child, parent_b[row])
            swapped += int(not torch.equal(rows_a[row], parent_a[row]))
    assert swapped > 0


def test_elitism_keeps_the_champion_and_selection_prefers_the_fit():
    layout = GenomeLayout.of(actor())
    population = torch.stack([genome_of(actor(seed)) for seed in range(10)])
    fitness = [float(seed) for seed in range(10)]  # member 9 is the best
    for seed in range(5):
        new, report = evolve(population, fitness, layout, num_elites=3, mutation_prob=0.9, crossover_prob=0.0,
                             mutation=MutationSettings(), generator=torch.Generator().manual_seed(seed))
        assert new.shape == population.shape
        for rank, slot in enumerate(report.elites):  # the three best, unchanged, the champion first
            assert torch.equal(new[slot], population[9 - rank])
        assert not set(report.elites) & set(report.mutated)
    winners = []
    for seed in range(200):
        winners += tournament(list(range(9, -1, -1)), 7, 3, torch.Generator().manual_seed(seed))
    assert np.mean(winners) > 6.0  # tournaments of 3 favour the fit (uniform would average 4.5)
    with pytest.raises(ValueError, match="elites"):
        evolve(population, fitness, layout, 10, 0.9, 0.0, MutationSettings(), torch.Generator())


def test_soft_recruitment_moves_tau_of_the_way():
    target, champion = actor(0), actor(1)
    before = genome_of(target)
    moved = soft_update(target, champion, 0.25)
    expected = 0.75 * before + 0.25 * genome_of(champion)
    torch.testing.assert_close(genome_of(target), expected)
    assert moved == pytest.approx(float((0.25 * (genome_of(champion) - before)).norm()), rel=1e-4)
    soft_update(target, champion, 1.0)  # hard recruitment: a copy
    torch.testing.assert_close(genome_of(target), genome_of(champion))


def test_settings_erl_cannot_honour_are_refused():
    from agents.rim import ERLConfig, RIMConfig

    for config, message in ((ERLConfig().training(population_size=4, elite_fraction=0.75), "at most half"),
                            (ERLConfig().training(normalize_observations=True), "normalize_observations"),
                            (RIMConfig().training(acting="both"), "acting must be one of"),
                            (RIMConfig().training(recruitment_tau=0.0), "recruitment_tau")):
        with pytest.raises(ValueError, match=message):
            config.environment("Pendulum-v1").validate()


def rim_module(acting: str = "critic"):
    import gymnasium as gym

    from agents.rim.rim import RIMTorchRLModule

    return RIMTorchRLModule(observation_space=gym.spaces.Box(-1, 1, (3,)), action_space=gym.spaces.Box(-2, 2, (1,)),
                            model_config={"actor_hidden": [8], "critic_hidden": [8], "twin_q": False,
                                          "acting": acting, "learning_starts": 0, "exploration_noise": 0.0})


def test_the_critic_chooses_the_actor_it_scores_higher():
    torch.manual_seed(0)
    module = rim_module()
    with torch.no_grad():
        for p in module.ea_actor.parameters():
            p.add_(torch.randn_like(p))
    obs = torch.randn(64, 3)
    action, use_pg = module.choose(obs)
    pg, ea = module.actor(obs), module.ea_actor(obs)
    q_pg = module.critic(obs, pg, first_only=True)[0]
    q_ea = module.critic(obs, ea, first_only=True)[0]
    torch.testing.assert_close(use_pg, q_pg >= q_ea)
    torch.testing.assert_close(action, torch.where((q_pg >= q_ea)[:, None], pg, ea))
    assert 0 < int(use_pg.sum()) < 64  # both actors get chosen somewhere
    only_ea = rim_module("ea")
    only_ea.load_state_dict(module.state_dict())
    torch.testing.assert_close(only_ea.choose(obs)[0], ea)
    assert module.get_non_inference_attributes() == ["target_actor", "target_critic"]


# ---------------------------------------------------------------- runs on Ray


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    yield ray
    ray.shutdown()


def tiny(config, workers: int = 0, **training):
    settings = dict(population_size=4, elite_fraction=0.25, num_population_workers=workers,
                    champion_test_episodes=1, cpus_per_population_worker=0.5, learning_starts=200,
                    train_batch_size_per_learner=64,
                    updates_per_step=0.25, replay_capacity=50_000)
    settings.update(training)
    return (config.environment("Pendulum-v1").training(**settings)
            .rl_module(model_config={"actor_hidden": [64, 64], "critic_hidden": [64, 64]})
            .debugging(seed=0))


def population_metric(result, name):
    return result["population"][name]


@pytest.mark.usefixtures("ray_session")
def test_rim_recruits_imitates_and_improves_its_champion_on_pendulum():
    from agents.rim import RIMConfig

    algo = tiny(RIMConfig(), updates_per_step=1.0, imitation_steps=100, recruitment_tau=0.5,
                imitation_fraction=0.5, actor_lr=1e-3, critic_lr=1e-3).build_algo()
    try:
        champions, befores, afters, shares = [], [], [], []
        for _ in range(20):
            result = algo.train()
            champions.append(population_metric(result, "champion_fitness"))
            if "imitation_loss_before" in result["population"]:
                befores.append(population_metric(result, "imitation_loss_before"))
                afters.append(population_metric(result, "imitation_loss_after"))
            if "rl_acted_with_pg" in result["population"]:
                shares.append(population_metric(result, "rl_acted_with_pg"))
        assert population_metric(result, "generation") == 20
        assert population_metric(result, "env_steps_total") == 20 * 5 * 200  # 4 members + the agent, 200 steps each
        assert result["env_runners"]["num_env_steps_sampled_lifetime"] == 20 * 5 * 200
        assert befores and all(after < before for before, after in zip(befores, afters))  # imitation learns
        assert shares and all(0.0 <= share <= 1.0 for share in shares)
        assert population_metric(result, "recruitment_step") > 0
        # the EnvRunner acts with the pi_ea just recruited
        runner_module = algo.env_runner_group.local_env_runner.module
        learner_module = algo.learner_group._learner.module["default_policy"]
        torch.testing.assert_close(genome_of(runner_module.ea_actor), genome_of(learner_module.ea_actor))
        # Pendulum returns run from about -1600 (random) to about -150 (upright); measured here:
        # about -1160 in the first generation, above -260 from the 17th on (25-generation run, commit 87b31cb)
        assert max(champions[-3:]) > champions[0] + 500, champions
    finally:
        algo.stop()


@pytest.mark.usefixtures("ray_session")
def test_erl_copies_its_actor_into_the_population_and_restores_from_a_checkpoint(tmp_path):
    from agents.rim import ERLConfig

    algo = tiny(ERLConfig(), sync_period=1).build_algo()
    try:
        algo.train()  # the buffer fills (learning starts at 200 transitions)
        result = algo.train()
        assert population_metric(result, "rl_synced") == 1.0
        learner_genome = algo.learner_actor_genome()
        assert torch.equal(algo.population[algo._rl_member], learner_genome)
        assert algo._rl_member not in algo.last_report.elites  # never over an elite's copy
    finally:
        algo.stop()
    # a restored run evolves exactly as the original: population, generation, GA random state
    algo = tiny(ERLConfig(), sync_period=0).build_algo()
    try:
        algo.train()
        algo.train()
        path = algo.save_to_path(str(tmp_path / "checkpoint"))
        learner_genome = algo.learner_actor_genome()
        algo.train()
        next_population = algo.population.clone()
    finally:
        algo.stop()
    restored = tiny(ERLConfig(), sync_period=0).build_algo()
    try:
        restored.restore_from_path(path)
        assert restored.generation == 2
        torch.testing.assert_close(restored.learner_actor_genome(), learner_genome)
        assert population_metric(restored.train(), "generation") == 3
        torch.testing.assert_close(restored.population, next_population)
    finally:
        restored.stop()


@pytest.mark.usefixtures("ray_session")
def test_a_population_worker_dying_mid_generation_is_replaced_and_the_generation_completes():
    from agents.rim import ERLConfig

    algo = tiny(ERLConfig(), workers=2, population_size=6, episodes_per_eval=20, updates_per_step=0.01).build_algo()
    try:
        algo.train()
        victim = algo.evaluator.worker_pids()[0]

        def kill_soon():
            time.sleep(0.5)
            os.kill(victim, signal.SIGKILL)  # a worker this test's Ray started

        threading.Thread(target=kill_soon, daemon=True).start()
        result = algo.train()
        assert population_metric(result, "generation") == 2
        assert algo.evaluator.restarts >= 1 and population_metric(result, "worker_restarts") >= 1
        assert len(algo.fitness) == 6 and all(math.isfinite(f) for f in algo.fitness)
        assert victim not in algo.evaluator.worker_pids()
    finally:
        algo.stop()


@pytest.mark.usefixtures("ray_session")
def test_rim_through_the_rl_pipeline_logs_population_metrics_and_the_fitness_plot(tmp_path, workdir):
    from helpers import TINY_RL_HEADER, write_spec
    from mlflow.tracking import MlflowClient

    from pipelines.runner import run_local
    from pipelines.spec import load_spec

    text = TINY_RL_HEADER.format(name="tiny-rim") + """\
algorithm: RIM
env: Pendulum-v1
training:
  population_size: 4
  elite_fraction: 0.25
  num_population_workers: 1
  cpus_per_population_worker: 0.5
  champion_test_episodes: 1
  learning_starts: 200
  train_batch_size_per_learner: 64
  updates_per_step: 0.1
model:
  actor_hidden: [32, 32]
  critic_hidden: [32, 32]
stop:
  env_steps: 3000
evaluation:
  enabled: false
checkpoint:
  every_iterations: 2
"""
    outcome = run_local(load_spec(write_spec(tmp_path, "rim.yaml", text)))
    client = MlflowClient(outcome.tracking_uri)
    assert client.get_run(outcome.run_id).info.status == "FINISHED"
    champion = client.get_metric_history(outcome.run_id, "population/champion_fitness")
    steps = sorted(m.step for m in champion)
    assert len(steps) == 3 and steps[-1] == 3000  # 1000 env steps a generation, population included
    artifacts = [entry.path for entry in client.list_artifacts(outcome.run_id)]
    assert "learning_curve.png" in artifacts
