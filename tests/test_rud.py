"""RUD, TD3 and DDPG on a real Ray: the block schedule, checkpoints, EnvRunners, learning."""

from __future__ import annotations

import time
import warnings

import gymnasium as gym
import numpy as np
import pytest
import ray
import torch
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns

from helpers import record_explore_flags
from agents.common.replay import FIELDS, episodes_to_transitions
from agents.rud import DDPGConfig, RUD, RUDConfig, TD3Config
from agents.rud.rud_rl_module import DEFAULT_MODEL_CONFIG, RUDTorchRLModule

pytestmark = pytest.mark.usefixtures("local_ray")

TINY_MODEL = {"actor_hidden": [32, 32], "critic_hidden": [32, 32]}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs on the device machine)")


def tiny(config_class=RUDConfig, **training):
    settings = {"update_interval": 100, "learning_starts": 150, "train_batch_size_per_learner": 32, **training}
    return (
        config_class()
        .environment("Pendulum-v1")
        .training(**settings)
        .rl_module(model_config=TINY_MODEL)
        .debugging(seed=0)
    )


def learner_of(algo):
    [learner] = [r.get() for r in algo.learner_group.foreach_learner(lambda learner: learner)]
    return learner


def actions_of(module, obs):
    """Deterministic actions of ``module`` wherever it lives, as a numpy array."""
    device = next(module.parameters()).device
    with torch.no_grad():
        out = module._forward_inference({Columns.OBS: torch.as_tensor(obs, dtype=torch.float32, device=device)})
    return out[Columns.ACTIONS].cpu().numpy()


def greedy(algo, obs):
    return actions_of(learner_of(algo).module[DEFAULT_MODULE_ID], obs)


def test_each_block_runs_interval_times_updates_per_step_updates():
    algo = tiny(updates_per_step=2.0).build_algo()
    try:
        learner = learner_of(algo)
        counts = []
        for _ in range(4):
            result = algo.train()
            counts.append(result["learners"][DEFAULT_MODULE_ID]["num_updates"])
        # blocks of 100 steps; the first 150 steps are warm-up; then 2 updates per step
        assert counts == [0, 100, 200, 200]
        assert learner.critic_updates == 500
        assert learner.actor_updates == 250  # policy_delay 2
        assert result["env_runners"]["num_env_steps_sampled_lifetime"] == 400
        assert len(learner.replay) == 400
    finally:
        algo.stop()


def test_fractional_updates_per_step_are_carried_between_blocks():
    algo = tiny(update_interval=50, learning_starts=0, updates_per_step=0.15).build_algo()
    try:
        counts = [algo.train()["learners"][DEFAULT_MODULE_ID]["num_updates"] for _ in range(4)]
        assert counts == [7, 8, 7, 8]  # 7.5 per block on average, none lost
    finally:
        algo.stop()


def test_actor_step_moves_targets_by_polyak_average():
    algo = tiny(learning_starts=0, update_interval=64, tau=0.25).build_algo()
    try:
        algo.train()  # fill the buffer and learn once
        learner = learner_of(algo)
        module = learner.module[DEFAULT_MODULE_ID]
        target_before = [p.clone() for p in module.target_critic.parameters()]
        transitions = {k: v[:0].cpu().numpy() for k, v in learner.replay.storage.items()}
        assert learner.learn_block(transitions, 2, {}) == 2  # 2 critic updates -> 1 actor and target update
        for before, online, after in zip(target_before, module.critic.parameters(), module.target_critic.parameters()):
            torch.testing.assert_close(after, 0.75 * before + 0.25 * online)
        # the targets stay outside autograd (a graph through them would grow with every update)
        for target in [*module.target_critic.parameters(), *module.target_actor.parameters()]:
            assert not target.requires_grad and target.grad_fn is None
    finally:
        algo.stop()


def test_td3_and_ddpg_presets():
    td3 = TD3Config()
    assert (td3.update_interval, td3.twin_q, td3.policy_delay, td3.target_noise) == (1, True, 2, 0.2)
    ddpg = DDPGConfig()
    assert (ddpg.update_interval, ddpg.twin_q, ddpg.policy_delay, ddpg.target_noise) == (1, False, 1, 0.0)
    algo = tiny(DDPGConfig, update_interval=1, learning_starts=40).reporting(min_sample_timesteps_per_iteration=80).build_algo()
    try:
        result = algo.train()
        learner = learner_of(algo)
        assert result["env_runners"]["num_env_steps_sampled_lifetime"] == 80  # 80 one-step blocks
        assert learner.critic_updates == 40 and learner.actor_updates == 40  # no delay
        assert learner.module[DEFAULT_MODULE_ID].critic.num_critics == 1
    finally:
        algo.stop()


def test_defaults_are_the_td3_papers_and_rud_blocks_are_one_episode():
    config = RUDConfig()
    assert (config.update_interval, config.updates_per_step, config.learning_starts) == (1000, 1.0, 25_000)
    assert (config.actor_lr, config.critic_lr, config.train_batch_size_per_learner, config.gamma, config.tau) == (
        3e-4, 3e-4, 256, 0.99, 0.005)
    assert (config.twin_q, config.policy_delay, config.target_noise, config.target_noise_clip,
            config.exploration_noise) == (True, 2, 0.2, 0.5, 0.1)
    assert DEFAULT_MODEL_CONFIG["actor_hidden"] == DEFAULT_MODEL_CONFIG["critic_hidden"] == [256, 256]


def test_a_negative_smoothing_clip_is_refused_and_idle_envs_are_warned_about():
    with pytest.raises(ValueError, match=r"target_noise_clip must be >= 0 .*got -0.5"):
        RUDConfig().training(target_noise_clip=-0.5).validate()
    # one-step blocks move one environment: the other seven would never step
    with pytest.warns(UserWarning, match=r"TD3: update_interval=1 is smaller than the 8 environments .*"
                                         r"update_interval >= 8"):
        TD3Config().environment("Pendulum-v1").env_runners(num_env_runners=2, num_envs_per_env_runner=4).validate()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        RUDConfig().environment("Pendulum-v1").env_runners(num_env_runners=2, num_envs_per_env_runner=4).validate()
    assert not [w for w in caught if "environments" in str(w.message)]  # 1000-step blocks use all eight
    # evaluation EnvRunners play episodes, not blocks: RLlib's check of the evaluation config is quiet
    td3 = TD3Config().environment("Pendulum-v1").evaluation(evaluation_num_env_runners=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        td3.validate()
        td3.get_evaluation_config_object().validate()
    assert not [w for w in caught if "environments" in str(w.message)]


class DiscreteProbe(gym.Env):
    """Two discrete actions, spaces set in ``__init__`` from the env config."""

    def __init__(self, config=None):
        super().__init__()
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
        self.action_space = gym.spaces.Discrete((config or {}).get("actions", 2))

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 0.0, False, False, {}


def test_envs_it_cannot_learn_on_are_refused_before_anything_starts():
    with pytest.raises(ValueError, match=r"TD3 cannot run on CartPole-v1: .*need continuous actions"):
        TD3Config().environment("CartPole-v1").build_algo()
    with pytest.raises(ValueError, match=r"unknown gymnasium environment 'HalfCheetah-v9'; did you mean 'HalfCheetah-v5'"):
        RUDConfig().environment("HalfCheetah-v9").build_algo()
    # env classes and names registered with Tune are checked too, with their env config
    with pytest.raises(ValueError, match=r"RUD cannot run on DiscreteProbe: .*continuous actions .*Discrete\(5\)"):
        RUDConfig().environment(DiscreteProbe, env_config={"actions": 5}).build_algo()
    from ray import tune

    tune.register_env("discrete-probe", lambda config: DiscreteProbe(config))
    with pytest.raises(ValueError, match=r"DDPG cannot run on discrete-probe: .*Discrete\(2\)"):
        DDPGConfig().environment("discrete-probe").build_algo()


def test_model_config_may_not_contradict_the_training_settings():
    with pytest.raises(ValueError, match=r"model_config sets learning_starts=5 but the training setting is 150"):
        tiny().rl_module(model_config={**TINY_MODEL, "learning_starts": 5}).validate()
    tiny().rl_module(model_config={**TINY_MODEL, "learning_starts": 150}).validate()  # agreeing is fine


def test_rllib_settings_it_would_not_apply_are_refused():
    """RLlib's AlgorithmConfig takes these; RUD, TD3 and DDPG would train without them."""
    with pytest.raises(ValueError, match=r"lr is not a TD3 setting .*set actor_lr and critic_lr instead \(now 0.0003"):
        TD3Config().environment("Pendulum-v1").training(lr=1e-3).validate()
    with pytest.raises(ValueError, match=r"train_batch_size is not used by RUD; .*train_batch_size_per_learner \(now 32\)"):
        tiny(train_batch_size=512).validate()
    with pytest.raises(ValueError, match=r"normalize_actions must stay True: DDPG's actor acts in \[-1, 1\]"):
        DDPGConfig().environment("Pendulum-v1", normalize_actions=False).validate()
    with pytest.raises(ValueError, match=r"activation must be one of relu, tanh, elu; got 'gelu'"):
        tiny().rl_module(model_config={**TINY_MODEL, "activation": "gelu"}).validate()
    with pytest.raises(ValueError, match=r"critic_hidden must be a list of positive layer widths, at least one"):
        tiny().rl_module(model_config={"critic_hidden": []}).validate()
    with pytest.raises(ValueError, match=r"actor_hidden must be .*got \[64, 0\]"):
        tiny().rl_module(model_config={"actor_hidden": [64, 0]}).validate()
    tiny().rl_module(model_config={"actor_hidden": [], "activation": "elu"}).validate()  # a linear actor is fine


def test_td_targets_discount_only_the_transitions_that_did_not_terminate(monkeypatch):
    """The targets the Learner trains on, against y = r + gamma (1 - terminated) min_i
    Q'_i(s', clip(mu'(s') + noise, -1, 1)) computed here from the target networks' own forward."""
    from agents.rud.fused_update import FusedTD3Update

    learner = tiny(train_batch_size_per_learner=64, gamma=0.9).build_learner(env=gym.make("Pendulum-v1"))
    module = learner.module[DEFAULT_MODULE_ID]
    count, rng = 300, np.random.default_rng(0)
    terminated = (np.arange(count) % 3 == 0).astype(np.float32)[:, None]
    learner.replay.add({
        "obs": rng.normal(size=(count, 3)).astype(np.float32),
        "actions": rng.uniform(-1, 1, (count, 1)).astype(np.float32),
        "rewards": np.arange(count, dtype=np.float32)[:, None],  # a reward names its transition
        "next_obs": rng.normal(size=(count, 3)).astype(np.float32),
        "terminateds": terminated,
    })
    original, checked = FusedTD3Update.target, []

    def checking_target(self, next_obs, rewards, discounts, noise, updates):
        y = original(self, next_obs, rewards, discounts, noise, updates)
        with torch.no_grad():
            action = (module.target_actor(next_obs) + noise).clamp(-1.0, 1.0)
            smallest = module.target_critic(next_obs, action).amin(0).view(-1, 1)
            done = torch.as_tensor(terminated)[rewards.view(-1).long()]
        torch.testing.assert_close(y, rewards + 0.9 * (1.0 - done) * smallest, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(y[done.bool()], rewards[done.bool()], rtol=0, atol=0)  # y = r at the end
        checked.append(int(done.sum()))
        return y

    monkeypatch.setattr(FusedTD3Update, "target", checking_target)
    learner._updates(module, 8)  # targets in pairs (policy_delay 2), the target networks moving between them
    assert len(checked) == 4 and 0 < sum(checked) < 4 * 128


@pytest.mark.parametrize("std, clip, clipped", [(0.2, 0.5, (0.0, 0.03)), (1.0, 0.5, (0.55, 0.68))])
def test_target_smoothing_noise_has_its_std_and_is_clipped(std, clip, clipped, monkeypatch):
    config = (RUDConfig().environment("Pendulum-v1")
              .training(train_batch_size_per_learner=256, target_noise=std, target_noise_clip=clip)
              .rl_module(model_config=TINY_MODEL).debugging(seed=0))
    learner = config.build_learner(env=gym.make("Pendulum-v1"))
    learner.replay.add({name: np.zeros((300, width), np.float32) for name, width in
                        (("obs", 3), ("actions", 1), ("rewards", 1), ("next_obs", 3), ("terminateds", 1))})
    drawn = []
    monkeypatch.setattr(learner, "_fused_updates", lambda module, indices, noise: drawn.append(noise))
    learner._updates(learner.module[DEFAULT_MODULE_ID], 20)
    [noise] = drawn
    assert noise.shape == (20, 256, 1)
    assert noise.abs().max() <= clip
    # P(|N(0, std)| > clip): 1.2 % for std 0.2, 62 % for std 1.0
    at_clip = (noise.abs() == clip).float().mean().item()
    assert clipped[0] <= at_clip <= clipped[1]
    if std < clip:
        assert abs(noise.std().item() - std) < 0.02


def paired_learners(config_class=RUDConfig, model=None, device="cpu", **training):
    """Two Learners with the same weights and minibatch stream, one per update path."""
    learners = []
    for fused in (False, True):
        config = (config_class().environment("Pendulum-v1")
                  .training(train_batch_size_per_learner=64, fused_updates=fused, **training)
                  .rl_module(model_config={**TINY_MODEL, **(model or {})}).debugging(seed=3)
                  .learners(num_gpus_per_learner=1 if device == "cuda" else 0))
        learners.append(config.build_learner(env=gym.make("Pendulum-v1")))
    reference, fused = learners
    fused.module[DEFAULT_MODULE_ID].load_state_dict(reference.module[DEFAULT_MODULE_ID].state_dict())
    rng = np.random.default_rng(0)
    transitions = {"obs": rng.normal(size=(500, 3)), "actions": rng.uniform(-1, 1, (500, 1)),
                   "rewards": rng.normal(size=500), "next_obs": rng.normal(size=(500, 3)),
                   "terminateds": (rng.uniform(size=500) < 0.05)}
    transitions = {name: values.astype(np.float32) for name, values in transitions.items()}
    for learner in learners:
        learner.replay.add(transitions)
        if learner.module[DEFAULT_MODULE_ID].normalize_observations:
            learner.module[DEFAULT_MODULE_ID].obs_norm.update(torch.as_tensor(transitions["obs"], device=device))
    assert all(parameter.device.type == device for learner in learners
               for parameter in learner.module[DEFAULT_MODULE_ID].parameters())
    assert all(values.device.type == device for learner in learners for values in learner.replay.storage.values())
    return reference, fused


@pytest.mark.parametrize("preset, model, training, device", [
    (TD3Config, None, {}, "cpu"),
    (DDPGConfig, None, {}, "cpu"),
    (TD3Config, {"activation": "tanh", "critic_hidden": [32, 16, 8], "actor_hidden": [16]}, {}, "cpu"),
    (TD3Config, {"activation": "elu"}, {"normalize_observations": True, "policy_delay": 3}, "cpu"),
    pytest.param(TD3Config, None, {}, "cuda", marks=CUDA),
    pytest.param(TD3Config, {"activation": "elu"}, {"normalize_observations": True, "policy_delay": 3}, "cuda",
                 marks=CUDA),
])
def test_fused_updates_equal_autograd_updates(preset, model, training, device, monkeypatch):
    """The hand-written gradients (fused_update.py) and autograd give the same networks,
    targets, Adam moments and metrics after updates that moved the weights, across
    minibatch-gathering chunks and a change of learning rates between blocks; on the CPU
    and with the Learner on a GPU (fused Adam's CUDA kernel, the buffer in GPU memory)."""
    from agents.rud.rud_learner import RUDTorchLearner

    monkeypatch.setattr(RUDTorchLearner, "GATHER_ROWS", 5 * 64)  # chunks of 5 updates
    reference, fused = paired_learners(preset, model, device, **training)
    assert fused._build_fused(fused.module[DEFAULT_MODULE_ID]) is not None
    assert reference._build_fused(reference.module[DEFAULT_MODULE_ID]) is None
    before = {k: v.clone() for k, v in reference.module[DEFAULT_MODULE_ID].state_dict().items()}
    for learner in (reference, fused):
        learner._updates(learner.module[DEFAULT_MODULE_ID], 7)
        for optimizer in learner._named_optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = 1e-3  # as a schedule or PBT would set it
        learner._updates(learner.module[DEFAULT_MODULE_ID], 8)
    after = reference.module[DEFAULT_MODULE_ID].state_dict()
    moved = max((after[name] - before[name]).abs().max().item() for name in after)
    assert moved > 1e-3
    for name, value in fused.module[DEFAULT_MODULE_ID].state_dict().items():
        torch.testing.assert_close(value, after[name], rtol=1e-5, atol=1e-6, msg=name)
    for name in ("critic", "actor"):
        reference_state = reference.get_optimizer(DEFAULT_MODULE_ID, name).state_dict()["state"]
        fused_state = fused.get_optimizer(DEFAULT_MODULE_ID, name).state_dict()["state"]
        assert reference_state.keys() == fused_state.keys()
        for key in reference_state:
            for field in ("step", "exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(fused_state[key][field], reference_state[key][field], rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(fused._totals, reference._totals, rtol=1e-5, atol=1e-5)
    assert (fused.critic_updates, fused.actor_updates) == (reference.critic_updates, reference.actor_updates)


BF16 = pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                          reason="oneDNN has no bfloat16 path on this CPU")


def precision_learners(width=256, depth=2):
    """Two Learners with the same weights and minibatch stream, float32 and bfloat16 hidden products."""
    learners = []
    for precision in ("float32", "bfloat16"):
        config = (TD3Config().environment("Pendulum-v1")
                  .training(train_batch_size_per_learner=64, hidden_matmul_precision=precision)
                  .rl_module(model_config={"actor_hidden": [width] * depth, "critic_hidden": [width] * depth})
                  .debugging(seed=3))
        learners.append(config.build_learner(env=gym.make("Pendulum-v1")))
    learners[1].module[DEFAULT_MODULE_ID].load_state_dict(learners[0].module[DEFAULT_MODULE_ID].state_dict())
    rng = np.random.default_rng(0)
    transitions = {"obs": rng.normal(size=(500, 3)), "actions": rng.uniform(-1, 1, (500, 1)),
                   "rewards": rng.normal(size=500), "next_obs": rng.normal(size=(500, 3)),
                   "terminateds": (rng.uniform(size=500) < 0.05)}
    for learner in learners:
        learner.replay.add({name: values.astype(np.float32) for name, values in transitions.items()})
    return learners


@BF16
def test_bfloat16_hidden_products_stay_a_rounding_of_float32():
    """hidden_matmul_precision='bfloat16' takes effect and stays a rounding: after 16 updates
    from the same weights on the same minibatches, hidden, first-layer and head weights
    differ from the float32 Learner's, by less than a quarter of how far the updates moved
    them (about a tenth here); the losses and Q means agree within 2 %; and oneDNN's
    process-wide setting is what it was before."""
    single, reduced = precision_learners()
    before = {k: v.clone() for k, v in single.module[DEFAULT_MODULE_ID].state_dict().items()}
    outer = torch.backends.mkldnn.matmul.fp32_precision
    for learner in (single, reduced):
        learner._updates(learner.module[DEFAULT_MODULE_ID], 16)
    assert torch.backends.mkldnn.matmul.fp32_precision == outer
    exact, rounded = single.module[DEFAULT_MODULE_ID].state_dict(), reduced.module[DEFAULT_MODULE_ID].state_dict()
    for name in ("critic.hidden_weights.0", "critic.first_weight", "actor.net.2.weight", "critic.head_weight"):
        moved = (exact[name] - before[name]).norm()
        apart = (rounded[name] - exact[name]).norm()
        assert 0 < apart < 0.25 * moved, (name, apart.item(), moved.item())
    torch.testing.assert_close(reduced._totals, single._totals, rtol=2e-2, atol=1e-2)


@BF16
def test_networks_without_hidden_to_hidden_products_are_untouched_by_bfloat16():
    """With one hidden layer there is no product between hidden layers: every product is a
    first-layer, head or first-layer-gradient one, which stays float32, so the bfloat16
    Learner must end bit for bit where the float32 one does."""
    single, reduced = precision_learners(width=64, depth=1)
    for learner in (single, reduced):
        learner._updates(learner.module[DEFAULT_MODULE_ID], 6)
    exact, rounded = single.module[DEFAULT_MODULE_ID].state_dict(), reduced.module[DEFAULT_MODULE_ID].state_dict()
    for name, value in exact.items():
        assert torch.equal(rounded[name], value), name


@pytest.mark.parametrize("fail_at, inside", [(1, False), (2, True)])
def test_hidden_precision_is_restored_when_an_update_fails(fail_at, inside, monkeypatch):
    """oneDNN's setting is process-wide: an update that fails inside a hidden product must not
    leave the rest of the process computing in bfloat16. The critic step's first activation
    gradient is the head's (outside the hidden products), its second a hidden layer's."""
    _, reduced = precision_learners(width=32)
    module = reduced.module[DEFAULT_MODULE_ID]
    reduced._updates(module, 1)  # builds the hand-written update
    outer = torch.backends.mkldnn.matmul.fp32_precision
    seen = []

    def failing_gradient(grad, output):
        seen.append(torch.backends.mkldnn.matmul.fp32_precision)
        if len(seen) == fail_at:
            raise RuntimeError("injected")
        return torch.ops.aten.threshold_backward(grad, output, 0.0)

    monkeypatch.setattr(reduced._fused, "critic_gradient", failing_gradient)
    with pytest.raises(RuntimeError, match="injected"):
        reduced._updates(module, 1)
    assert (seen[-1] == "bf16") == inside and (fail_at == 1 or seen[0] == outer)
    assert torch.backends.mkldnn.matmul.fp32_precision == outer


def test_hidden_precision_is_checked_before_anything_starts():
    with pytest.raises(ValueError, match=r"hidden_matmul_precision must be one of \['bfloat16', 'float32'\], got 'fp16'"):
        tiny(hidden_matmul_precision="fp16").validate()
    with pytest.raises(ValueError, match=r"hidden_matmul_precision='bfloat16' applies to the hand-written update; "
                                         r"it needs fused_updates=True"):
        tiny(hidden_matmul_precision="bfloat16", fused_updates=False).validate()
    with pytest.raises(ValueError, match=r"hidden_matmul_precision='bfloat16' applies to CPU Learners; "
                                         r"num_gpus_per_learner is 1"):
        tiny(hidden_matmul_precision="bfloat16").learners(num_gpus_per_learner=1).validate()
    tiny(hidden_matmul_precision="bfloat16").validate()


class ActionProbe(gym.Env):
    """Reports in ``info`` the action it received; asymmetric bounds [-3, 5]."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Box(np.array([-3.0, 0.0], np.float32), np.array([5.0, 1.0], np.float32))

    def __init__(self, config=None):
        super().__init__()

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 0.0, False, False, {"received": np.array(action, np.float32)}


def test_td3_warm_up_ends_exactly_at_learning_starts():
    algo = tiny(TD3Config, update_interval=1, learning_starts=50).reporting(min_sample_timesteps_per_iteration=100).build_algo()
    try:
        algo.train()  # one iteration of 100 one-step blocks
        actions = learner_of(algo).replay.storage["actions"][:100, 0]
        assert actions[:50].std() > 0.4  # uniform on [-1, 1]
        assert actions[50:].abs().max() < 0.9 and actions[50:].std() < 0.3  # the policy, plus noise 0.1
    finally:
        algo.stop()


def test_actions_are_rescaled_to_the_env_bounds():
    config = tiny(learning_starts=300, update_interval=200).environment(ActionProbe)
    algo = config.build_algo()
    try:
        algo.train()
        episodes = algo.env_runner_group.local_env_runner.sample(num_timesteps=300)
        low, high = ActionProbe.action_space.low, ActionProbe.action_space.high
        for episode in episodes:
            normalized = np.asarray(episode.get_actions())
            received = np.stack([info["received"] for info in episode.get_infos()[1:]])
            assert np.abs(normalized).max() <= 1.0  # the module and the replay work in [-1, 1]
            np.testing.assert_allclose(received, low + (normalized + 1) / 2 * (high - low), atol=1e-5)
        stored = learner_of(algo).replay.storage["actions"][:200]
        assert stored.abs().max() <= 1.0 and stored.abs().max() > 0.9  # random warm-up spans the box
    finally:
        algo.stop()


def test_collected_blocks_equal_rllib_sampling():
    """A block collected as plain transitions (TransitionEnvRunner.collect) is exactly what
    RLlib's sample() gives for the same seeds: warm-up actions, then the noisy policy."""
    runners = []
    for _ in range(2):
        algo = tiny(learning_starts=60).build_algo()
        runners.append((algo, algo.env_runner_group.local_env_runner))
    try:
        torch.manual_seed(5)
        collected = runners[0][1].collect(150, 0)  # Pendulum's episodes last 200 steps
        torch.manual_seed(5)
        runners[1][1].num_env_steps_sampled_lifetime = 0
        sampled = episodes_to_transitions(runners[1][1].sample(num_timesteps=150))
        for name in FIELDS:
            np.testing.assert_allclose(collected[name], sampled[name], rtol=1e-6, atol=1e-6, err_msg=name)
        assert collected["actions"][:60].std() > 0.4 and collected["actions"][60:].std() < 0.3
    finally:
        for algo, _ in runners:
            algo.stop()


def test_a_block_has_exactly_the_steps_asked_for_and_idle_sub_envs_continue():
    """7 steps on 3 sub-envs: two full rounds, then sub-env 0 alone; the next block goes on
    from where each sub-env stopped."""
    algo = tiny(learning_starts=30).env_runners(num_envs_per_env_runner=3).build_algo()
    try:
        runner = algo.env_runner_group.local_env_runner
        first = runner.collect(7, 0)
        second = runner.collect(3, 7)
    finally:
        algo.stop()
    assert len(first["rewards"]) == 7 and len(second["rewards"]) == 3
    # rows are round by round: sub-env 0's steps are rows 0, 3, 6; sub-env 1's 1, 4; sub-env 2's 2, 5
    np.testing.assert_array_equal(first["obs"][3:6], first["next_obs"][0:3])
    np.testing.assert_array_equal(first["obs"][6], first["next_obs"][3])
    np.testing.assert_array_equal(second["obs"], first["next_obs"][[6, 4, 5]])


def test_time_limit_ends_are_not_terminal_and_keep_their_last_observation():
    """At a time-limit end, collect() stores terminated 0 (the target bootstraps) and s' as the
    env's last observation: replaying Pendulum's dynamics from each stored (s, a) gives s',
    and the next row starts the new episode from its reset observation."""
    algo = tiny(learning_starts=30).environment("Pendulum-v1", env_config={"max_episode_steps": 20}).build_algo()
    try:
        block = algo.env_runner_group.local_env_runner.collect(60, 0)
    finally:
        algo.stop()
    assert not block["terminateds"].any()
    continues = np.isclose(block["next_obs"][:-1], block["obs"][1:]).all(axis=1)
    np.testing.assert_array_equal(np.flatnonzero(~continues), [19, 39])  # a reset after each 20-step episode
    pendulum = gym.make("Pendulum-v1").unwrapped
    pendulum.reset(seed=0)
    for obs, action, next_obs in zip(block["obs"], block["actions"], block["next_obs"]):
        pendulum.state = np.array([np.arctan2(obs[1], obs[0]), obs[2]])
        replayed, *_ = pendulum.step(2.0 * action)  # actions are stored in [-1, 1]; Pendulum's bounds are +-2
        np.testing.assert_allclose(next_obs, replayed, rtol=1e-5, atol=1e-5)


def test_rllib_connectors_are_refused_before_anything_starts():
    config = tiny().env_runners(env_to_module_connector=lambda env, spaces, device: [])
    with pytest.raises(ValueError, match="applies no env-to-module or module-to-env connectors"):
        config.validate()


class RecordingProbe(ActionProbe):
    received: list = []

    def step(self, action):
        RecordingProbe.received.append(np.array(action, np.float32))
        return super().step(action)


def test_collected_actions_are_rescaled_to_the_env_bounds():
    algo = tiny(learning_starts=30).environment(RecordingProbe).build_algo()
    try:
        RecordingProbe.received.clear()
        stored = algo.env_runner_group.local_env_runner.collect(60, 0)["actions"]
        low, high = RecordingProbe.action_space.low, RecordingProbe.action_space.high
        assert np.abs(stored).max() <= 1.0
        np.testing.assert_allclose(np.stack(RecordingProbe.received), low + (stored + 1) / 2 * (high - low), atol=1e-5)
    finally:
        algo.stop()


def test_checkpoint_restores_actions_counters_and_replay(tmp_path):
    config = tiny(learning_starts=100, checkpoint_replay_buffer=True, normalize_observations=True)
    algo = config.build_algo()
    obs = np.random.default_rng(0).normal(size=(16, 3))
    try:
        for _ in range(3):
            algo.train()
        algo.save_to_path(str(tmp_path / "ckpt"))
        before = greedy(algo, obs)
        learner = learner_of(algo)
        counters = (learner.critic_updates, learner.actor_updates, len(learner.replay))
        stats = learner.module[DEFAULT_MODULE_ID].obs_norm.mean.clone()
        saved = learner_tensors(learner)
        # the uninterrupted Learner goes on for 20 updates, for the restored one to match
        learner._updates(learner.module[DEFAULT_MODULE_ID], 20)
        continued = learner_tensors(learner)
        # restored into this same Learner, as Tune restores a reused trial: the update loop
        # must read the restored weights and Adam state, not what it held before
        algo.restore_from_path(str(tmp_path / "ckpt"))
        torch.testing.assert_close(learner_tensors(learner), saved, rtol=0, atol=0)
        learner._updates(learner.module[DEFAULT_MODULE_ID], 20)
        torch.testing.assert_close(learner_tensors(learner), continued, rtol=1e-5, atol=1e-6)
    finally:
        algo.stop()
    restored = RUD.from_checkpoint(str(tmp_path / "ckpt"))
    try:
        np.testing.assert_array_equal(greedy(restored, obs), before)
        learner = learner_of(restored)
        assert (learner.critic_updates, learner.actor_updates, len(learner.replay)) == counters
        torch.testing.assert_close(learner.module[DEFAULT_MODULE_ID].obs_norm.mean, stats)
        # the EnvRunner acts with the restored policy too
        np.testing.assert_array_equal(actions_of(restored.env_runner_group.local_env_runner.module, obs), before)
        # every weight (targets included), Adam moment and step count comes back exactly
        restored_tensors = learner_tensors(learner)
        assert restored_tensors.keys() == saved.keys()
        for key, value in saved.items():
            torch.testing.assert_close(restored_tensors[key], value, rtol=0, atol=0, msg=key)
        # and, with the replay buffer and the minibatch stream, the next updates are the same
        learner._updates(learner.module[DEFAULT_MODULE_ID], 20)
        for key, value in learner_tensors(learner).items():
            torch.testing.assert_close(value, continued[key], rtol=1e-5, atol=1e-6, msg=key)
        result = restored.train()  # and training continues where it stopped
        assert result["env_runners"]["num_env_steps_sampled_lifetime"] == 400
        assert learner.critic_updates == counters[0] + 20 + 100
    finally:
        restored.stop()


def learner_tensors(learner) -> dict[str, torch.Tensor]:
    """Copies of the module's state (weights, target networks, observation statistics) and
    of each optimizer's state (Adam's moments and step counts)."""
    tensors = {f"module.{key}": value.detach().clone()
               for key, value in learner.module[DEFAULT_MODULE_ID].state_dict().items()}
    for name, optimizer in learner._named_optimizers.items():
        for index, state in optimizer.state_dict()["state"].items():
            tensors.update({f"{name}.{index}.{key}": torch.as_tensor(value).clone() for key, value in state.items()})
    assert any(key.startswith("module.target_critic") for key in tensors)
    assert any(key.endswith("exp_avg_sq") for key in tensors)
    return tensors


def test_replay_is_left_out_of_checkpoints_by_default(tmp_path):
    algo = tiny().build_algo()
    try:
        algo.train()
        algo.save_to_path(str(tmp_path / "ckpt"))
    finally:
        algo.stop()
    restored = RUD.from_checkpoint(str(tmp_path / "ckpt"))
    try:
        assert len(learner_of(restored).replay) == 0
        # no learning on a near-empty buffer: refill learning_starts (150) transitions first
        counts = [restored.train()["learners"][DEFAULT_MODULE_ID]["num_updates"] for _ in range(2)]
        assert counts == [0, 100]
    finally:
        restored.stop()


def assert_runners_act_as_the_learner(algo):
    """Every remote EnvRunner holds exactly the Learner's actor and observation statistics
    (the float64 running mean, variance and count too, which RLlib's own ``set_state`` would
    round to float32)."""
    module = learner_of(algo).module[DEFAULT_MODULE_ID]
    learner_state = {**module.actor.state_dict(), **{f"norm.{k}": v for k, v in module.obs_norm.state_dict().items()}}
    assert module.obs_norm.count > 0
    runner_states = algo.env_runner_group.foreach_env_runner(
        lambda runner: {**runner.module.actor.state_dict(),
                        **{f"norm.{k}": v for k, v in runner.module.obs_norm.state_dict().items()}},
        local_env_runner=False)
    assert len(runner_states) == 2
    for state in runner_states:
        assert state.keys() == learner_state.keys()
        for key, value in learner_state.items():
            assert np.asarray(state[key]).dtype == value.numpy().dtype, key
            np.testing.assert_array_equal(np.asarray(state[key]), value.numpy(), err_msg=key)


def test_remote_env_runners_with_vector_envs_sample_one_block(tmp_path):
    # 121 steps on 2 runners of 2 sub-envs: 61 + 60, no rounding up to whole rounds
    config = (tiny(learning_starts=0, update_interval=121, normalize_observations=True)
              .env_runners(num_env_runners=2, num_envs_per_env_runner=2))
    algo = config.build_algo()
    try:
        result = algo.train()
        assert result["env_runners"]["num_env_steps_sampled_lifetime"] == 121
        assert result["learners"][DEFAULT_MODULE_ID]["num_updates"] == 121
        # the runners act with the Learner's updated actor and observation statistics
        assert_runners_act_as_the_learner(algo)
        algo.save_to_path(str(tmp_path / "ckpt"))
    finally:
        algo.stop()
    restored = RUD.from_checkpoint(str(tmp_path / "ckpt"))  # fresh EnvRunners get them from the checkpoint
    try:
        assert_runners_act_as_the_learner(restored)
        assert learner_of(restored).module[DEFAULT_MODULE_ID].obs_norm.count == 121
    finally:
        restored.stop()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_a_remote_learner_trains_and_feeds_the_env_runner(device):
    """num_learners=1: the Learner (and its replay buffer) is a Ray actor, e.g. on a GPU node."""
    gpus = 1 if device == "cuda" else 0
    algo = tiny(learning_starts=0, update_interval=100).learners(num_learners=1, num_gpus_per_learner=gpus).build_algo()
    try:
        where = algo.learner_group.foreach_learner(
            lambda learner: (torch.device(learner._device).type, learner.replay.storage["obs"].device.type))
        assert [r.get() for r in where] == [(device, device)]
        for _ in range(2):
            result = algo.train()
        assert result["learners"][DEFAULT_MODULE_ID]["num_updates"] == 100
        assert result["learners"][DEFAULT_MODULE_ID]["replay_size"] == 200
        weights = algo.learner_group.get_weights()[DEFAULT_MODULE_ID]
        runner_actor = algo.env_runner_group.local_env_runner.module.actor.state_dict()
        for key, value in runner_actor.items():
            np.testing.assert_allclose(value.numpy(), np.asarray(weights[f"actor.{key}"]))
    finally:
        algo.stop()


@CUDA
def test_a_learner_on_a_gpu_trains_checkpoints_and_feeds_the_cpu_env_runner(tmp_path):
    """The Learner, its target networks and its replay buffer on the GPU, the EnvRunner on
    the CPU: the runner acts with the Learner's weights, and a checkpoint restores them,
    the counters, the observation statistics and the buffer onto the GPU again."""
    config = (tiny(learning_starts=100, checkpoint_replay_buffer=True, normalize_observations=True)
              .learners(num_gpus_per_learner=1))
    algo = config.build_algo()
    obs = np.random.default_rng(0).normal(size=(16, 3))
    try:
        for _ in range(3):
            algo.train()
        learner = learner_of(algo)
        module = learner.module[DEFAULT_MODULE_ID]
        assert {p.device.type for p in module.parameters()} == {"cuda"}
        assert {v.device.type for v in learner.replay.storage.values()} == {"cuda"}
        assert learner.critic_updates >= 200 and len(learner.replay) == 300
        runner_module = algo.env_runner_group.local_env_runner.module
        assert {p.device.type for p in runner_module.parameters()} == {"cpu"}
        before = actions_of(module, obs)
        # the same weights on two devices: equal to float rounding
        np.testing.assert_allclose(actions_of(runner_module, obs), before, rtol=1e-5, atol=1e-6)
        algo.save_to_path(str(tmp_path / "ckpt"))
        counters = (learner.critic_updates, learner.actor_updates, len(learner.replay))
        stats = module.obs_norm.mean.cpu().clone()
    finally:
        algo.stop()
    restored = RUD.from_checkpoint(str(tmp_path / "ckpt"))
    try:
        learner = learner_of(restored)
        module = learner.module[DEFAULT_MODULE_ID]
        assert {p.device.type for p in module.parameters()} == {"cuda"}
        np.testing.assert_array_equal(actions_of(module, obs), before)
        assert (learner.critic_updates, learner.actor_updates, len(learner.replay)) == counters
        torch.testing.assert_close(module.obs_norm.mean.cpu(), stats)
        np.testing.assert_allclose(actions_of(restored.env_runner_group.local_env_runner.module, obs), before,
                                   rtol=1e-5, atol=1e-6)
        restored.train()
        assert learner.critic_updates == counters[0] + 100
    finally:
        restored.stop()


def test_a_killed_env_runner_is_replaced_and_training_continues():
    config = tiny(learning_starts=0, update_interval=100, normalize_observations=True).env_runners(num_env_runners=2)
    config.fault_tolerance(restart_failed_env_runners=True)
    algo = config.build_algo()
    try:
        algo.train()
        learner = learner_of(algo)
        updates = learner.critic_updates
        victim = algo.env_runner_group._worker_manager._actors[1]
        ray.kill(victim, no_restart=False)  # a crash: Ray restarts the actor process
        # RLlib probes unhealthy runners between iterations; a loaded machine restarts slowly
        restarts, deadline = 0, time.monotonic() + 240
        while time.monotonic() < deadline:
            result = algo.train()
            restarts = max(restarts, result["fault_tolerance"]["num_remote_worker_restarts"])
            if algo.env_runner_group.num_healthy_remote_workers() == 2:
                break
        assert restarts >= 1
        assert algo.env_runner_group.num_healthy_remote_workers() == 2
        assert learner.critic_updates > updates  # the Learner kept its state throughout
        result = algo.train()  # and both runners sample the next block
        assert result["env_runners"]["num_env_steps_sampled"] == 100
        # the replacement acts with the Learner's actor and statistics, not freshly built ones
        assert_runners_act_as_the_learner(algo)
    finally:
        algo.stop()


@pytest.fixture
def one_math_thread():
    """One torch thread for the test, restored after it even when the test fails. The suite
    runs two test processes on 2 cores, and with two threads each the Learner's small products
    wait on descheduled threads: next to two busy processes the Pendulum test below took 145 s
    with two threads and 52 s with one, and a CI run on a loaded machine timed it out at 900 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("device, precision", [("cpu", "float32"), pytest.param("cpu", "bfloat16", marks=BF16),
                                               pytest.param("cuda", "float32", marks=CUDA)])
def test_rud_learns_pendulum(device, precision, one_math_thread):
    config = (
        RUDConfig()
        .environment("Pendulum-v1")
        .training(update_interval=200, learning_starts=1000, hidden_matmul_precision=precision)
        .learners(num_gpus_per_learner=1 if device == "cuda" else 0)
        .debugging(seed=0)
        .evaluation(evaluation_interval=2**31 - 1, evaluation_duration=10, evaluation_duration_unit="episodes",
                    evaluation_config=RUDConfig.overrides(explore=False))
    )
    algo = config.build_algo()
    try:
        while algo.train()["env_runners"]["num_env_steps_sampled_lifetime"] < 6000:
            pass
        returns = algo.evaluate()["env_runners"]["episode_return_mean"]
        assert returns > -400, returns  # random policy: about -1200; solved: about -150
    finally:
        algo.stop()


def test_evaluate_without_evaluation_runners_is_deterministic(monkeypatch):
    """With no evaluation EnvRunners RLlib evaluates on the training EnvRunner, whose sample()
    would explore by the training config's default: before learning_starts, uniform noise.
    The evaluation must be the deterministic policy that evaluation_config asks for."""
    algo = tiny().evaluation(evaluation_duration=1, evaluation_duration_unit="episodes").build_algo()
    try:
        assert algo.eval_env_runner_group is None
        algo.train()
        calls = record_explore_flags(monkeypatch, RUDTorchRLModule)
        result = algo.evaluate()
        assert result["env_runners"]["num_episodes"] == 1
        assert calls and not any(calls)
        assert "sample" not in vars(algo.env_runner)  # the runner's own sample() again
        calls.clear()
        algo.train()  # and training still explores
        assert calls and all(calls)
    finally:
        algo.stop()


def test_a_generator_state_from_another_device_restores_a_repeatable_stream(caplog):
    """A CUDA Learner's checkpoint restored on a CPU Learner (or the reverse): the two kinds of
    generator keep different states, so the minibatch stream restarts from a seed derived from
    the saved state; on the same kind of device it continues exactly."""
    algo = tiny(learning_starts=0).build_algo()
    try:
        algo.train()
        learner = learner_of(algo)
        state = learner.get_state()
        assert state["generator_device"] == "cpu"

        def draws():
            return torch.randint(0, 10**6, (16,), generator=learner.generator)

        expected = draws()
        learner.set_state(state)
        assert torch.equal(draws(), expected)
        # a CUDA generator's state is its seed and offset, 16 bytes
        foreign = {**state, "generator": torch.arange(16, dtype=torch.uint8), "generator_device": "cuda"}
        learner.set_state(foreign)
        first = draws()
        assert "belongs to a Learner on cuda" in caplog.text
        learner.set_state(foreign)
        assert torch.equal(draws(), first)
        assert not torch.equal(first, expected)
        # a checkpoint written before the device was recorded
        learner.set_state({key: value for key, value in foreign.items() if key != "generator_device"})
        assert torch.equal(draws(), first)
        # states that arrive as numpy arrays restore the same way
        learner.set_state({**state, "generator": state["generator"].numpy()})
        assert torch.equal(draws(), expected)
    finally:
        algo.stop()


def test_a_restored_learner_trains_with_its_new_learning_rates(tmp_path):
    """PBT's exploit restores a checkpoint into a config with perturbed rates: the very
    first update must already use the new rates, not the checkpoint's."""
    algo = tiny(learning_starts=0, actor_lr=1e-3, critic_lr=1e-3).build_algo()
    try:
        algo.train()
        algo.save_to_path(str(tmp_path / "ckpt"))
    finally:
        algo.stop()
    perturbed = tiny(learning_starts=0, actor_lr=2e-4, critic_lr=5e-4).build_algo()
    try:
        perturbed.restore_from_path(str(tmp_path / "ckpt"))
        learner = learner_of(perturbed)
        seen = []
        original = learner._updates

        def spy(module, num_updates):
            seen.extend(group["lr"] for opt in learner._named_optimizers.values() for group in opt.param_groups)
            return original(module, num_updates)

        learner._updates = spy
        perturbed.train()
        assert sorted(seen) == [2e-4, 5e-4]
    finally:
        perturbed.stop()


def test_registered_for_tune_by_name(tmp_path):
    from ray import tune

    import agents.rud  # noqa: F401  (registers RUD, TD3 and DDPG with Tune)

    config = tiny(learning_starts=0, update_interval=50).to_dict()
    tuner = tune.Tuner(
        "RUD",
        param_space={**config, "tau": tune.grid_search([0.005, 0.01])},
        run_config=tune.RunConfig(storage_path=str(tmp_path), stop={"training_iteration": 2}, verbose=0),
    )
    results = tuner.fit()
    assert results.num_errors == 0 and len(results) == 2
    for result in results:
        assert result.metrics["env_runners"]["num_env_steps_sampled_lifetime"] == 100
        assert result.metrics["learners"][DEFAULT_MODULE_ID]["num_updates"] == 50
