"""NROWAN-DQN, NoisyNet-DQN and DQN: noisy layers, the noise term, its weight, and learning."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ray.rllib.core import DEFAULT_MODULE_ID
from torch import nn

import copy

from helpers import record_explore_flags
from agents.common.flat_parameters import FlatAdam, flatten_parameters
from agents.common.noisy import NoiseStream, NoisyLinear
from agents.common.replay import TransitionBuffer
from agents.nrowan import DQNConfig, NoisyNetDQNConfig, NROWAN, NROWANConfig
from agents.nrowan.nrowan_learner import RETURN_SO_FAR, noise_level, noise_weight
from agents.nrowan.nrowan_rl_module import ConvQNetwork, NROWANTorchRLModule, QNetwork, epsilon_at
from agents.nrowan.td_gradients import TDGradients


# ---------------------------------------------------------------- parts, without Ray

def test_noisy_linear_resamples_factorised_noise_and_is_deterministic_in_eval():
    torch.manual_seed(0)
    layer = NoisyLinear(5, 3, sigma_0=0.4)
    assert torch.allclose(layer.weight_sigma, torch.full((3, 5), 0.4 / math.sqrt(5)))
    assert torch.allclose(layer.bias_sigma, torch.full((3,), 0.4 / math.sqrt(5)))
    assert layer.weight_mu.abs().max() <= 1 / math.sqrt(5)
    # the RL-Adventure rule NROWAN-DQN's settings come with: bias sigma from the fan-out
    assert torch.allclose(NoisyLinear(5, 3, 0.4, bias_sigma_fan="out").bias_sigma, torch.full((3,), 0.4 / math.sqrt(3)))
    x = torch.randn(4, 5)
    layer.train()
    assert not torch.equal(layer(x), layer(x))  # fresh noise every forward pass
    eps_w, eps_b = layer.sample_noise()
    assert eps_w.shape == (3, 5) and eps_b.shape == (3,)
    # factorised: eps_w = f(eps_out) f(eps_in)^T is rank one, and its column-wise ratio is eps_b
    assert torch.linalg.matrix_rank(eps_w) == 1
    torch.testing.assert_close(eps_w[:, 0] / eps_w[0, 0], eps_b / eps_b[0])
    # one forward pass is the layer with w = mu + sigma * eps_w for one fresh draw
    layer.generator = torch.Generator().manual_seed(3)
    eps_w, eps_b = layer.sample_noise()
    layer.generator.manual_seed(3)
    expected = nn.functional.linear(x, layer.weight_mu + layer.weight_sigma * eps_w, layer.bias_mu + layer.bias_sigma * eps_b)
    torch.testing.assert_close(layer(x), expected)
    layer.eval()
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight_mu, layer.bias_mu))
    assert torch.equal(layer(x), layer(x))
    assert not torch.equal(layer(x, noisy=True), layer(x))  # forced on in eval mode


def test_only_the_last_layers_are_noisy():
    network = QNetwork(4, 2, hidden=(128, 128), noisy_layers=2)
    kinds = [type(layer) for layer in network.layers]
    assert kinds == [nn.Linear, NoisyLinear, NoisyLinear]
    assert [position for position, _ in network.noisy_layers] == [1, 2]
    assert network.output_layer.out_features == 2
    assert all(type(layer) is nn.Linear for layer in QNetwork(4, 2, noisy_layers=0).layers)
    with pytest.raises(ValueError, match="noisy_layers"):
        QNetwork(4, 2, hidden=(8,), noisy_layers=3)


def test_noise_level_d_of_a_known_layer():
    layer = NoisyLinear(3, 2)
    with torch.no_grad():
        layer.weight_sigma.copy_(torch.tensor([[0.1, -0.2, 0.3], [0.4, 0.5, -0.6]]))
        layer.bias_sigma.copy_(torch.tensor([0.7, -0.8]))
    # (sum |sigma_w| + sum |sigma_b|) / ((p* + 1) * N_a) = (2.1 + 1.5) / (4 * 2)
    assert noise_level(layer).item() == pytest.approx(3.6 / 8)
    assert layer.mean_abs_sigma().item() == pytest.approx(3.6 / 8)
    noise_level(layer).backward()
    torch.testing.assert_close(layer.weight_sigma.grad, torch.sign(layer.weight_sigma.detach()) / 8)


@pytest.mark.parametrize("activation", ["relu", "tanh", "elu"])
@pytest.mark.parametrize("noisy_layers", [0, 1, 2])
def test_hand_written_gradients_equal_autograds(activation, noisy_layers):
    torch.manual_seed(noisy_layers)
    network = QNetwork(4, 3, hidden=(16, 8), activation=activation, noisy_layers=noisy_layers)
    flat = flatten_parameters(network.parameters())
    obs, actions, targets = torch.randn(32, 4), torch.randint(0, 3, (32,)), torch.randn(32)
    k = torch.tensor(1.7)
    noise = network.sample_noise() if noisy_layers else None
    flat.grad.fill_(123.0)  # overwritten, not accumulated
    td_loss, q_taken, level = TDGradients(network)(obs, actions, targets, noise, k)
    by_hand = flat.grad.clone()
    flat.grad.zero_()
    q = network(obs, noisy=bool(noisy_layers), noise=noise).gather(1, actions[:, None]).squeeze(1)
    loss = (q - targets).pow(2).mean()
    if noisy_layers:
        loss = loss + k * noise_level(network.output_layer)
    loss.backward()
    torch.testing.assert_close(by_hand, flat.grad, rtol=1e-5, atol=1e-6)
    TDGradients(network)(obs, actions, targets, noise, 1.7)  # k as a number: the same gradient
    torch.testing.assert_close(flat.grad, by_hand, rtol=1e-6, atol=1e-7)
    flat.grad.copy_(by_hand)
    torch.testing.assert_close(td_loss, (q - targets).pow(2).mean().detach())
    torch.testing.assert_close(q_taken, q.detach())
    assert (level is None) == (noisy_layers == 0)
    if noisy_layers:  # the mean weights (noise off): sigma gets only the D term's gradient
        TDGradients(network)(obs, actions, targets, None, 0.0)
        assert network.output_layer.weight_sigma.grad.abs().sum() == 0
        assert network.output_layer.weight_mu.grad.abs().sum() > 0


def test_flat_parameters_train_like_separate_ones():
    torch.manual_seed(0)
    flat_net = QNetwork(4, 2, hidden=(8, 8), noisy_layers=2)
    plain_net = copy.deepcopy(flat_net)
    keys = list(flat_net.state_dict())
    flat = flatten_parameters(flat_net.parameters())
    assert list(flat_net.state_dict()) == keys and flat.numel() == sum(p.numel() for p in plain_net.parameters())
    flat_adam = FlatAdam(flat, lr=0.01)
    adam = torch.optim.Adam(plain_net.parameters(), lr=0.01)
    obs = torch.randn(16, 4)
    for _ in range(3):
        for network in (flat_net, plain_net):
            network(obs, noisy=False).pow(2).mean().backward()
        flat_adam.step_flat()
        adam.step()
        flat.grad.zero_()
        adam.zero_grad()
    for mine, reference in zip(flat_net.parameters(), plain_net.parameters()):
        torch.testing.assert_close(mine, reference)
    # a restored state is copied into the flat buffer, which the optimizer keeps training
    flat_net.load_state_dict(plain_net.state_dict())
    before = flat_net.output_layer.weight_mu.detach().clone()
    flat_net(obs, noisy=False).pow(2).mean().backward()
    flat_adam.step_flat()
    assert not torch.equal(flat_net.output_layer.weight_mu, before)
    assert flat_adam.state[flat]["step"].item() == 4


def test_noise_stream_draws_are_fresh_and_copies_draw_their_own():
    torch.manual_seed(0)
    stream = NoiseStream([(5, 3), (3, 2)], draws=4)
    draws = [stream() for _ in range(6)]  # past the first chunk
    assert [tuple(part.shape) for pair in draws[0] for part in pair] == [(5,), (3,), (3,), (2,)]
    rows = torch.stack([torch.cat([part for pair in draw for part in pair]) for draw in draws])
    assert len({tuple(row.tolist()) for row in rows}) == 6
    twin = copy.deepcopy(stream)
    assert not torch.equal(torch.cat([p for pair in twin() for p in pair]), torch.cat([p for pair in stream() for p in pair]))


def test_noise_weight_follows_the_reward_collected_so_far():
    returns = torch.tensor([-10.0, 0.0, 50.0, 100.0, 200.0, 250.0])
    k = noise_weight(returns, k_final=4.0, r_min=0.0, r_max=200.0)
    torch.testing.assert_close(k, torch.tensor([0.0, 0.0, 1.0, 2.0, 4.0, 4.0]))
    # negative-reward tasks (Acrobot: returns in [-500, 0]): k starts high and falls
    k = noise_weight(torch.tensor([-1.0, -250.0, -500.0]), k_final=4.0, r_min=-500.0, r_max=0.0)
    torch.testing.assert_close(k, torch.tensor([3.992, 2.0, 0.0]))


def test_epsilon_decays_from_start_to_final():
    assert epsilon_at(0, 1.0, 0.01, 500) == pytest.approx(1.0)
    assert epsilon_at(500, 1.0, 0.01, 500) == pytest.approx(0.01 + 0.99 / math.e)
    assert epsilon_at(30_000, 1.0, 0.01, 500) == pytest.approx(0.01)


def test_one_step_adds_wrap_around_like_block_adds():
    rng = np.random.default_rng(0)
    rows = {"obs": rng.normal(size=(7, 2)).astype(np.float32), "next_obs": rng.normal(size=(7, 2)).astype(np.float32),
            "actions": rng.integers(0, 2, 7).astype(np.float32), "rewards": rng.normal(size=7).astype(np.float32),
            "terminateds": np.zeros(7, np.float32), RETURN_SO_FAR: np.arange(7, dtype=np.float32)}
    one_by_one = TransitionBuffer(5, 2, 1, extra_fields=(RETURN_SO_FAR,))
    for index in range(7):
        one_by_one.add({name: values[index : index + 1] for name, values in rows.items()})
    as_block = TransitionBuffer(5, 2, 1, extra_fields=(RETURN_SO_FAR,))
    for part in (slice(0, 3), slice(3, 7)):  # the tensor path, the second block wrapping around
        as_block.add({name: torch.as_tensor(values[part]) for name, values in rows.items()})
    assert len(one_by_one) == len(as_block) == 5 and one_by_one.position == as_block.position == 2
    for name in rows:
        torch.testing.assert_close(one_by_one.storage[name], as_block.storage[name])
    assert one_by_one.storage[RETURN_SO_FAR].tolist() == [5, 6, 2, 3, 4]


def test_pong_comes_with_dqns_atari_preprocessing():
    import gymnasium as gym

    env = gym.make("raysmith/Pong-v5")
    try:
        assert env.observation_space.shape == (4, 84, 84) and env.observation_space.dtype == np.uint8
        obs, _ = env.reset(seed=0)
        ale = env.unwrapped.ale
        assert 1 <= ale.getEpisodeFrameNumber() <= 30  # the no-op start
        again, _ = env.reset(seed=0)
        assert np.array_equal(obs, again)  # seeded, no sticky actions
        frames, rewards = ale.getEpisodeFrameNumber(), set()
        for _ in range(300):
            previous = obs
            obs, reward, terminated, truncated, _ = env.step(env.action_space.sample())
            rewards.add(reward)
            assert np.array_equal(obs[:3], previous[1:])  # a stack of the last 4 frames, newest last
        assert ale.getEpisodeFrameNumber() - frames == 300 * 4  # each action repeated for 4 frames
        assert rewards <= {-1.0, 0.0, 1.0} and -1.0 in rewards  # the game's score: points lost at random play
        assert obs.dtype == np.uint8 and obs.min() < obs.max()
    finally:
        env.close()


def test_conv_q_network_reads_frames_with_a_noisy_head():
    torch.manual_seed(0)
    network = ConvQNetwork((4, 84, 84), 6, hidden=(512,), noisy_layers=2)
    assert network.noise_shapes == [(3136, 512), (512, 6)]  # DQN's torso leaves 64 x 7 x 7 features
    frames = torch.randint(0, 256, (2, 4, 84, 84), dtype=torch.uint8)
    network.eval()
    q = network(frames)
    assert q.shape == (2, 6)
    torch.testing.assert_close(q, network(frames.float() / 255.0))  # pixels are scaled to [0, 1]
    assert not torch.equal(network(frames, noisy=True), network(frames, noisy=True))
    assert NROWAN.check_spaces(gym_box((210, 160, 3)), gym_discrete(6)) is not None  # raw ALE frames: channels last
    assert NROWAN.check_spaces(gym_box((4, 84, 84)), gym_discrete(6)) is None


def gym_box(shape):
    import gymnasium as gym

    return gym.spaces.Box(0, 255, shape, np.uint8)


def gym_discrete(n):
    import gymnasium as gym

    return gym.spaces.Discrete(n)


def test_config_refuses_bad_settings_with_reasons():
    with pytest.raises(ValueError, match="set r_min and r_max"):
        NROWANConfig().environment("LunarLander-v3").validate()
    with pytest.raises(ValueError, match="k_final must be >= 0"):
        NROWANConfig().environment("CartPole-v0").training(k_final=-1.0).validate()
    # no noise term, no bounds needed
    NoisyNetDQNConfig().environment("LunarLander-v3").validate()
    assert NROWANConfig().environment("Acrobot-v1").return_bounds() == (-500.0, 0.0)
    assert NROWANConfig().environment("CartPole-v0").training(r_max=150).return_bounds() == (0.0, 150.0)


def test_paper_preset_defaults():
    config = NROWANConfig()
    assert (config.replay_capacity, config.train_batch_size_per_learner, config.lr) == (10_000, 32, 1e-4)
    assert (config.target_update_interval, config.learning_starts, config.k_final, config.sigma_0) == (1000, 32, 4.0, 0.4)
    assert (config.update_interval, config.updates_per_step, config.gamma) == (1, 1.0, 0.99)
    assert NoisyNetDQNConfig().k_final == 0.0
    assert DQNConfig().noisy is False


def test_a_continuous_action_env_is_refused_before_ray_starts(tmp_path):
    from pipelines.spec import SpecError, load_spec

    spec = tmp_path / "bad.yaml"
    spec.write_text("kind: rl\nname: bad\nalgorithm: NROWAN\nenv: Pendulum-v1\nstop: {env_steps: 1000}\n")
    with pytest.raises(SpecError, match="discrete-action"):
        load_spec(spec)


# ---------------------------------------------------------------- on a real Ray

@pytest.fixture(scope="module")
def ray_for_agents(local_ray):
    return local_ray


def cartpole(config_class=NROWANConfig, **training):
    return (config_class().environment("CartPole-v0").training(**training).debugging(seed=0)
            .evaluation(evaluation_interval=None, evaluation_duration=10, evaluation_duration_unit="episodes"))


def learner_of(algo):
    return algo.learner_group._learner


@pytest.mark.usefixtures("ray_for_agents")
def test_transitions_carry_the_return_so_far_reset_at_episode_ends():
    algo = cartpole().build_algo()
    try:
        runner = algo.env_runner_group.local_env_runner
        batch = runner.collect(400, lifetime=0)
        rewards, so_far, ends = batch["rewards"], batch[RETURN_SO_FAR], batch["terminateds"]
        assert len(rewards) == 400 and ends.sum() >= 2  # a random-ish CartPole policy falls often
        expected, running = [], 0.0
        for reward, end in zip(rewards, ends):
            running += reward
            expected.append(running)
            if end:
                running = 0.0
        np.testing.assert_allclose(so_far, expected)
        first_after_end = np.flatnonzero(ends)[0] + 1
        assert so_far[first_after_end] == 1.0  # reset at the episode boundary
        # consecutive transitions chain: s' of one is s of the next within an episode
        inside = np.flatnonzero(ends[:-1] == 0)
        np.testing.assert_array_equal(batch["next_obs"][inside], batch["obs"][inside + 1])
        metrics = runner.get_metrics()
        assert metrics["num_episodes"] == ends.sum()
        # without evaluation EnvRunners, RLlib evaluates on this runner: both share the envs
        [episode] = runner.sample(num_episodes=1, explore=False)
        assert episode.is_done and len(episode) >= 1
        after = runner.collect(300, lifetime=400)
        inside = np.flatnonzero(after["terminateds"][:-1] == 0)
        np.testing.assert_array_equal(after["next_obs"][inside], after["obs"][inside + 1])
        assert after[RETURN_SO_FAR][0] == 1.0  # a fresh episode, not the one sample() ended
    finally:
        algo.stop()


@pytest.mark.usefixtures("ray_for_agents")
def test_one_update_per_env_step_and_hard_target_copies():
    algo = cartpole(target_update_interval=300).build_algo()
    try:
        result = algo.train()
        learner = learner_of(algo)
        module = learner.module[DEFAULT_MODULE_ID]
        # updates start once the buffer holds learning_starts (32) transitions
        assert result["learners"][DEFAULT_MODULE_ID]["num_updates"] == 1000 - 31
        assert learner.num_updates == 969
        # the last hard copy was at update 900; 69 updates since then moved the online net away
        online = torch.cat([p.flatten() for p in module.q.parameters()])
        target = torch.cat([p.flatten() for p in module.target_q.parameters()])
        assert not torch.equal(online, target)
        learner._updates(module, 300 - 969 % 300)  # up to update 1200: a copy
        online = torch.cat([p.flatten() for p in module.q.parameters()])
        target = torch.cat([p.flatten() for p in module.target_q.parameters()])
        assert torch.equal(online, target)
    finally:
        algo.stop()


@pytest.mark.usefixtures("ray_for_agents")
def test_the_noise_term_reduces_the_output_layers_sigma():
    sigmas = {}
    for name, config_class in (("nrowan", NROWANConfig), ("noisynet", NoisyNetDQNConfig)):
        algo = cartpole(config_class).build_algo()
        try:
            for _ in range(3):
                result = algo.train()
            learner_metrics = result["learners"][DEFAULT_MODULE_ID]
            sigmas[name] = learner_metrics["sigma_mean_layer2"]
            assert learner_metrics["noise_D"] > 0 and np.isfinite(learner_metrics["td_loss"])
            if name == "nrowan":
                assert 0 < learner_metrics["noise_k"] <= 4.0
        finally:
            algo.stop()
    start = (128 * 2 * 0.4 / math.sqrt(128) + 2 * 0.4 / math.sqrt(2)) / (129 * 2)  # weights: fan-in; biases: fan-out
    # the noise term pulls sigma down on top of what the TD loss does
    assert sigmas["nrowan"] < 0.7 * sigmas["noisynet"] and sigmas["nrowan"] < 0.5 * start


@pytest.mark.usefixtures("ray_for_agents")
def test_checkpoint_restores_q_values_counters_and_training(tmp_path):
    algo = cartpole(checkpoint_replay_buffer=True).build_algo()
    obs = torch.as_tensor(np.random.default_rng(0).normal(size=(8, 4)), dtype=torch.float32)
    try:
        algo.train()
        algo.save_to_path(str(tmp_path / "ckpt"))
        module = learner_of(algo).module[DEFAULT_MODULE_ID]
        module.q.eval()
        before = module.q(obs).detach()
        counters = (learner_of(algo).num_updates, len(learner_of(algo).replay))
    finally:
        algo.stop()
    restored = NROWAN.from_checkpoint(str(tmp_path / "ckpt"))
    try:
        learner = learner_of(restored)
        module = learner.module[DEFAULT_MODULE_ID]
        module.q.eval()
        torch.testing.assert_close(module.q(obs).detach(), before)
        assert (learner.num_updates, len(learner.replay)) == counters
        assert learner.get_optimizer(DEFAULT_MODULE_ID, "q").state[learner.flat_parameters]["step"].item() == counters[0]
        # the EnvRunner acts with the restored network
        assert restored.env_runner_group.local_env_runner.module.q is module.q
        result = restored.train()
        assert result["env_runners"]["num_env_steps_sampled_lifetime"] == 2000
        assert learner.num_updates == counters[0] + 1000
        assert not torch.allclose(module.q(obs).detach(), before)  # the restored weights train on
    finally:
        restored.stop()


@pytest.mark.usefixtures("ray_for_agents")
def test_remote_env_runners_collect_blocks_and_receive_weights():
    config = cartpole(update_interval=50).env_runners(num_env_runners=2)
    algo = config.build_algo()
    try:
        result = algo.train()
        assert result["env_runners"]["num_env_steps_sampled_lifetime"] == 1000
        # 20 blocks of 50 (25 per runner); the first already holds learning_starts (32) transitions
        assert result["learners"][DEFAULT_MODULE_ID]["num_updates"] == 1000
        learner_state = learner_of(algo).module[DEFAULT_MODULE_ID].q.state_dict()
        for state in algo.env_runner_group.foreach_env_runner(lambda runner: runner.module.q.state_dict(),
                                                              local_env_runner=False):
            for key, value in learner_state.items():
                np.testing.assert_allclose(np.asarray(state[key]), value.numpy())
    finally:
        algo.stop()


@pytest.mark.usefixtures("ray_for_agents")
@pytest.mark.parametrize("evaluation_noise", [False, True])
def test_evaluate_acts_as_evaluation_noise_says(evaluation_noise, monkeypatch):
    """From Python as from a spec, an evaluation does not follow training's epsilon schedule:
    DQN evaluates greedily, or at epsilon_final with evaluation_noise (its documented meaning),
    also when RLlib evaluates on the training EnvRunner."""
    algo = cartpole(DQNConfig, evaluation_noise=evaluation_noise, epsilon_final=0.2,
                    epsilon_decay=10**9).build_algo()  # training's epsilon stays at 1.0
    try:
        algo.train()
        calls = record_explore_flags(monkeypatch, NROWANTorchRLModule)
        torch.manual_seed(0)
        algo.evaluate()
        assert calls and not any(calls)
        module = algo.env_runner.module
        obs = torch.randn(4000, 4)
        greedy = module.q(obs, noisy=False).argmax(-1)
        changed = (module.act(obs, 0.0, explore=False) != greedy).float().mean().item()
        # a random action differs from the greedy one half the time on CartPole's two actions
        assert changed == 0.0 if not evaluation_noise else 0.05 < changed < 0.15
    finally:
        algo.stop()


@pytest.mark.usefixtures("ray_for_agents")
@pytest.mark.parametrize("config_class", [NROWANConfig, DQNConfig])
def test_learns_cartpole(config_class):
    """The paper preset balances the pole for most of CartPole-v0's 200 steps within 15k env steps."""
    algo = cartpole(config_class).build_algo()
    try:
        best = -np.inf
        for iteration in range(15):
            algo.train()
            if iteration >= 5 and iteration % 3 == 2:
                best = max(best, algo.evaluate()["env_runners"]["episode_return_mean"])
                if best >= 150:
                    break
        assert best >= 150, best
    finally:
        algo.stop()


@pytest.mark.usefixtures("ray_for_agents")
def test_trains_on_pong_frames_with_a_uint8_replay_buffer():
    """The Atari path end to end, briefly: frames stay uint8 in the replay buffer, the conv
    Q-network trains through autograd, the noise term shrinks the output layer's sigma, and
    RLlib's own sampling path (evaluation) runs on the same module."""
    config = (
        NROWANConfig().environment("raysmith/Pong-v5")
        .training(replay_capacity=1000, learning_starts=64)
        .rl_module(model_config={"hidden": [512]})
        .reporting(min_sample_timesteps_per_iteration=150)
        .debugging(seed=0)
    )
    algo = config.build_algo()
    try:
        first = algo.train()["learners"][DEFAULT_MODULE_ID]
        second = algo.train()["learners"][DEFAULT_MODULE_ID]
        learner = learner_of(algo)
        replay = learner.replay.storage["obs"]
        assert replay.dtype == torch.uint8 and replay.shape == (1000, 4, 84, 84) and len(learner.replay) == 300
        assert learner.replay.storage["obs"][:300].float().std() > 0
        assert learner.td_gradients is None and learner.num_updates == 300 - 63
        assert np.isfinite(second["td_loss"]) and 0 < second["noise_k"] <= 4.0
        start = 0.4 / math.sqrt(512)  # the output layer's weight sigma at initialisation
        assert second["sigma_mean_layer1"] < first["sigma_mean_layer1"] < start
        episodes = algo.env_runner_group.local_env_runner.sample(num_timesteps=40, explore=False)
        assert sum(len(episode) for episode in episodes) >= 40
    finally:
        algo.stop()
