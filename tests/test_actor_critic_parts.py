"""The actor-critic building blocks, without Ray: fused critics, targets, replay, normaliser."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.core.columns import Columns

from agents.common.networks import DeterministicActor, FusedCritics, RunningNorm
from agents.common.replay import TransitionBuffer, episodes_to_transitions
from agents.rud.rud_rl_module import NEXT_OBS, Q_TARGET, Q_VALUES, SMOOTHING_NOISE, RUDTorchRLModule

OBS, ACT = 5, 3


def test_fused_critics_match_independent_linear_stacks():
    torch.manual_seed(0)
    critics = FusedCritics(OBS, ACT, hidden=(32, 16, 8), num_critics=3)
    obs, act = torch.randn(64, OBS), torch.rand(64, ACT) * 2 - 1
    fused = critics(obs, act)
    assert fused.shape == (3, 64)
    for index in range(3):
        separate = critics.single(index)(torch.cat([obs, act], -1)).squeeze(-1)
        torch.testing.assert_close(fused[index], separate, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(critics(obs, act, first_only=True)[0], fused[0])


def test_fused_critics_are_initialised_independently():
    torch.manual_seed(0)
    critics = FusedCritics(OBS, ACT, hidden=(64, 64), num_critics=2)
    obs, act = torch.randn(128, OBS), torch.zeros(128, ACT)
    q = critics(obs, act)
    assert not torch.allclose(q[0], q[1])
    bound = 1 / np.sqrt(OBS + ACT)
    assert critics.first_weight.abs().max() <= bound


def test_detached_critic_passes_gradient_to_actions_only():
    critics = FusedCritics(OBS, ACT, hidden=(16, 16))
    act = torch.rand(8, ACT, requires_grad=True)
    critics(torch.randn(8, OBS), act, first_only=True, detach_parameters=True).sum().backward()
    assert act.grad is not None and act.grad.abs().sum() > 0
    assert all(p.grad is None for p in critics.parameters())


def make_module(twin_q=True, normalize=False, inference_only=False) -> RUDTorchRLModule:
    module = RUDTorchRLModule(
        observation_space=gym.spaces.Box(-np.inf, np.inf, (OBS,), np.float32),
        action_space=gym.spaces.Box(-2.0, 2.0, (ACT,), np.float32),
        inference_only=inference_only,
        model_config={"actor_hidden": [32, 32], "critic_hidden": [32, 32], "twin_q": twin_q,
                      "normalize_observations": normalize, "learning_starts": 100, "exploration_noise": 0.1},
    )
    if not inference_only:
        module.make_target_networks()
    return module


def test_clipped_double_q_target_with_smoothing():
    torch.manual_seed(1)
    module = make_module()
    # make the targets differ from the online networks
    with torch.no_grad():
        for p in module.target_critic.parameters():
            p.add_(0.1 * torch.randn_like(p))
    next_obs = torch.randn(16, OBS)
    noise = torch.full((16, ACT), 0.3)
    target = module.forward_target({NEXT_OBS: next_obs, SMOOTHING_NOISE: noise})[Q_TARGET]

    smoothed = (module.target_actor(next_obs) + noise).clamp(-1, 1)
    q1 = module.target_critic.single(0)(torch.cat([next_obs, smoothed], -1)).squeeze(-1)
    q2 = module.target_critic.single(1)(torch.cat([next_obs, smoothed], -1)).squeeze(-1)
    torch.testing.assert_close(target, torch.minimum(q1, q2), rtol=1e-5, atol=1e-5)
    # the smoothed action stays inside the normalised action box
    big = module.forward_target({NEXT_OBS: next_obs, SMOOTHING_NOISE: torch.full((16, ACT), 5.0)})[Q_TARGET]
    ones = torch.ones(16, ACT)
    edge = module.target_critic(next_obs, ones).min(0).values
    torch.testing.assert_close(big, edge)


def test_single_critic_target_is_plain_ddpg():
    module = make_module(twin_q=False)
    next_obs = torch.randn(4, OBS)
    target = module.forward_target({NEXT_OBS: next_obs})[Q_TARGET]
    expected = module.target_critic.single(0)(torch.cat([next_obs, module.target_actor(next_obs)], -1)).squeeze(-1)
    torch.testing.assert_close(target, expected, rtol=1e-5, atol=1e-5)


def test_exploration_is_random_then_noisy_policy():
    torch.manual_seed(0)
    module = make_module()
    obs = torch.randn(2000, OBS)
    early = module._forward_exploration({Columns.OBS: obs}, t=0)[Columns.ACTIONS]
    assert early.min() >= -1 and early.max() <= 1 and early.std() > 0.5  # uniform on [-1, 1]: std 0.577
    late = module._forward_exploration({Columns.OBS: obs}, t=1000)[Columns.ACTIONS]
    deterministic = module._forward_inference({Columns.OBS: obs})[Columns.ACTIONS]
    unclipped = (late - deterministic)[(deterministic.abs() < 0.5)]
    assert abs(unclipped.std().item() - 0.1) < 0.01


def test_inference_only_module_has_no_critics():
    module = make_module(normalize=True, inference_only=True)
    assert not hasattr(module, "critic") and not hasattr(module, "target_actor")
    full = make_module(normalize=True)
    full.obs_norm.update(torch.randn(100, OBS) * 5 + 3)
    module.set_state(full.get_state(inference_only=True))
    obs = torch.randn(3, OBS)
    torch.testing.assert_close(module._forward_inference({Columns.OBS: obs})[Columns.ACTIONS],
                               full._forward_inference({Columns.OBS: obs})[Columns.ACTIONS])


def test_running_norm_matches_numpy_over_many_batches():
    rng = np.random.default_rng(0)
    data = rng.normal(loc=[1, -2, 30], scale=[0.5, 3, 10], size=(5000, 3))
    norm = RunningNorm(3)
    for chunk in np.array_split(data, 17):
        norm.update(torch.as_tensor(chunk))
    np.testing.assert_allclose(norm.mean.numpy(), data.mean(0), rtol=1e-9)
    np.testing.assert_allclose(norm.var.numpy(), data.var(0), rtol=1e-9)
    normalized = norm(torch.as_tensor(data, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(normalized.mean(0), 0, atol=1e-3)
    np.testing.assert_allclose(normalized.std(0), 1, atol=1e-3)


def test_replay_buffer_wraps_around_and_keeps_the_newest():
    buffer = TransitionBuffer(capacity=5, obs_dim=2, act_dim=1)
    def block(start, n):
        ids = np.arange(start, start + n, dtype=np.float32)
        return {"obs": np.stack([ids, ids], 1), "actions": ids[:, None], "rewards": ids,
                "next_obs": np.stack([ids + 1, ids + 1], 1), "terminateds": np.zeros(n, np.float32)}
    buffer.add(block(0, 3))
    buffer.add(block(3, 4))
    assert len(buffer) == 5 and buffer.added == 7
    assert sorted(buffer.storage["rewards"].tolist()) == [2, 3, 4, 5, 6]
    got = buffer.gather(torch.tensor([0, 1]))
    assert got["obs"][:, 0].tolist() == got["rewards"].tolist()
    assert (got["next_obs"][:, 0] == got["rewards"] + 1).all()
    state = buffer.get_state()
    assert state["transitions"]["rewards"].tolist() == [2, 3, 4, 5, 6]  # oldest first
    restored = TransitionBuffer(capacity=5, obs_dim=2, act_dim=1)
    restored.set_state(state)
    assert restored.added == 7 and sorted(restored.storage["rewards"].tolist()) == [2, 3, 4, 5, 6]
    buffer.add(block(100, 12))  # larger than the capacity: the newest 5 remain
    assert sorted(buffer.storage["rewards"].tolist()) == [107, 108, 109, 110, 111]


def test_episodes_become_transitions_with_true_terminations_only():
    from ray.rllib.env.single_agent_episode import SingleAgentEpisode

    def episode(length, terminated):
        ep = SingleAgentEpisode()
        ep.add_env_reset(observation=np.zeros(2, np.float32))
        for t in range(1, length + 1):
            ep.add_env_step(observation=np.full(2, t, np.float32), action=np.array([t], np.float32), reward=float(t),
                            terminated=terminated and t == length, truncated=(not terminated) and t == length)
        return ep.to_numpy()

    transitions = episodes_to_transitions([episode(3, terminated=True), episode(2, terminated=False)])
    assert transitions["rewards"].tolist() == [1, 2, 3, 1, 2]
    assert transitions["terminateds"].tolist() == [0, 0, 1, 0, 0]  # truncation still bootstraps
    assert transitions["obs"][:, 0].tolist() == [0, 1, 2, 0, 1]
    assert transitions["next_obs"][:, 0].tolist() == [1, 2, 3, 1, 2]
    assert episodes_to_transitions([]) == {}


@pytest.mark.parametrize("hidden", [(17,), (8, 8, 8)])
def test_actor_output_is_bounded(hidden):
    actor = DeterministicActor(OBS, ACT, hidden)
    out = actor(torch.randn(100, OBS) * 100)
    assert out.shape == (100, ACT) and out.abs().max() <= 1
