"""Does raysmith's TD3 update compute what Stable-Baselines3's does? Same weights, same batch.

Both start from identical actor, critics and targets (raysmith's initial weights copied into
SB3's networks) and run the same updates on one fixed batch of Hopper-v5 transitions, some
of them terminal; target smoothing noise is off (it is drawn from different generators),
everything else is the spec's TD3 (Adam 3e-4, gamma 0.99, tau 0.005, 256-256 networks).
The script prints the largest difference between the two libraries' parameters after the
updates and exits non-zero if any exceeds the tolerance (float32 rounding over a few Adam
steps, and fused vs unfused Adam, stay far below it).

    python benchmarks/td3_parity.py                    # 4 updates, actor every 2nd
    python benchmarks/td3_parity.py --updates 10 --policy-delay 1
    python benchmarks/td3_parity.py --autograd         # raysmith's autograd path (fused_updates=False)

Needs stable-baselines3 (`pip install stable-baselines3`).
"""

from __future__ import annotations

import argparse
import sys

import gymnasium as gym
import torch
from rl_throughput import quiet, random_transitions  # the script's own folder is on sys.path

ENV = "Hopper-v5"
BATCH = 256


def linears(module: torch.nn.Module) -> list[torch.nn.Linear]:
    return [layer for layer in module.modules() if isinstance(layer, torch.nn.Linear)]


@torch.no_grad()
def copy_linears(source: torch.nn.Module, target: torch.nn.Module) -> None:
    for a, b in zip(linears(source), linears(target), strict=True):
        b.weight.copy_(a.weight)
        b.bias.copy_(a.bias)


def max_difference(ours: torch.nn.Module, theirs: torch.nn.Module) -> float:
    return max(
        max((a.weight - b.weight).abs().max().item(), (a.bias - b.bias).abs().max().item())
        for a, b in zip(linears(ours), linears(theirs), strict=True)
    )


def compare(module, model) -> dict[str, float]:
    """Largest parameter difference per network: raysmith's module against SB3's TD3."""
    pairs = {"actor": (module.actor, model.actor.mu), "target actor": (module.target_actor, model.actor_target.mu)}
    for i in range(2):
        pairs[f"critic {i + 1}"] = (module.critic.single(i), model.critic.q_networks[i])
        pairs[f"target critic {i + 1}"] = (module.target_critic.single(i), model.critic_target.q_networks[i])
    return {name: max_difference(ours, theirs) for name, (ours, theirs) in pairs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=4)
    parser.add_argument("--policy-delay", type=int, default=2)
    parser.add_argument("--tolerance", type=float, default=1e-5)
    parser.add_argument("--autograd", action="store_true",
                        help="raysmith's autograd update path instead of its hand-written gradients (the default)")
    args = parser.parse_args()

    from ray.rllib.core import DEFAULT_MODULE_ID
    from stable_baselines3 import TD3
    from stable_baselines3.common.type_aliases import ReplayBufferSamples

    from agents.rud import TD3Config

    torch.manual_seed(0)
    data = random_transitions(ENV, BATCH)  # Hopper falls often under random actions: some are terminal
    config = (TD3Config().environment(ENV)
              .training(train_batch_size_per_learner=BATCH, policy_delay=args.policy_delay, target_noise=0.0,
                        fused_updates=not args.autograd)
              .rl_module(model_config={"actor_hidden": [256, 256], "critic_hidden": [256, 256]}))
    learner = config.build_learner(env=gym.make(ENV))
    module = learner.module[DEFAULT_MODULE_ID]
    batch = {name: torch.as_tensor(values) for name, values in data.items()}
    learner.replay.add(data)
    # every update sees the whole fixed batch (the Learner gathers several updates' rows at once)
    learner.replay.gather = lambda indices: {
        name: values.repeat(len(indices) // BATCH, *([1] * (values.dim() - 1))) for name, values in batch.items()}

    model = TD3("MlpPolicy", gym.make(ENV), learning_rate=3e-4, batch_size=BATCH, tau=0.005, gamma=0.99,
                policy_delay=args.policy_delay, target_policy_noise=0.0, learning_starts=0,
                policy_kwargs={"net_arch": [256, 256]}, seed=0, device="cpu", verbose=0)
    quiet(model).learn(1)  # sets up SB3's progress; its one update is undone by the copies below
    model._n_updates = 0
    copy_linears(module.actor, model.actor.mu)
    copy_linears(module.target_actor, model.actor_target.mu)
    for index in range(2):
        copy_linears(module.critic.single(index), model.critic.q_networks[index])
        copy_linears(module.target_critic.single(index), model.critic_target.q_networks[index])
    for optimizer in (model.actor.optimizer, model.critic.optimizer):
        optimizer.state.clear()
    samples = ReplayBufferSamples(batch["obs"], batch["actions"], batch["next_obs"], batch["terminateds"][:, None],
                                  batch["rewards"][:, None], None)
    model.replay_buffer.sample = lambda *_, **__: samples

    print(f"{ENV}: {BATCH} transitions, {int(data['terminateds'].sum())} terminal; {args.updates} updates, "
          f"policy delay {args.policy_delay}, no target smoothing; raysmith's "
          f"{'autograd' if args.autograd else 'hand-written gradient'} path")
    before = max(compare(module, model).values())
    initial = {name: parameter.detach().clone() for name, parameter in module.named_parameters()}
    learner._updates(module, args.updates)
    model.train(gradient_steps=args.updates, batch_size=BATCH)
    moved = {name: (parameter - initial[name]).abs().max().item() for name, parameter in module.named_parameters()}
    differences = compare(module, model)
    for name, difference in differences.items():
        print(f"  {name:16s} largest |raysmith - SB3| = {difference:.2e}")
    print(f"before the updates the two differed by {before:.1e}; the updates moved raysmith's actor by up to "
          f"{max(v for k, v in moved.items() if k.startswith('actor.')):.1e} and its critics by up to "
          f"{max(v for k, v in moved.items() if k.startswith('critic.')):.1e}")
    worst = max(differences.values())
    print("same updates" if worst <= args.tolerance else f"DIFFERENT: {worst:.2e} > {args.tolerance:.0e}")
    sys.exit(0 if worst <= args.tolerance else 1)


if __name__ == "__main__":
    main()
