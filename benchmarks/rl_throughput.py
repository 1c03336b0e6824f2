"""Env steps per second at one gradient update per env step: raysmith RUD and TD3 vs SB3 TD3.

Same task, network (256-256), batch (256) and update rule for all three, each measured in
its own process on this machine, after a warm-up that fills the replay buffer. Prints the
rates, their ratios to Stable-Baselines3's TD3, and the ceiling that this machine's matrix
multiply speed sets (one TD3 update is a fixed amount of arithmetic).

    python benchmarks/rl_throughput.py                      # HalfCheetah-v5, 5000 timed steps
    python benchmarks/rl_throughput.py --steps 2000 --only rud,sb3

Needs stable-baselines3 (`pip install stable-baselines3`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HIDDEN = 256
BATCH = 256


def update_flops(obs_dim: int, act_dim: int, hidden: int = HIDDEN, batch: int = BATCH, policy_delay: int = 2) -> float:
    """Floating-point operations of one TD3 update (2 per multiply-add; matmuls only).

    Target: actor forward + 2 critics forward. Critic step: 2 critics forward and backward
    (backward ~ 2x forward). Actor step, every ``policy_delay`` updates: actor forward and
    backward, critic 1 forward and its input gradient.
    """
    actor = obs_dim * hidden + hidden * hidden + hidden * act_dim
    critic = (obs_dim + act_dim) * hidden + hidden * hidden + hidden
    macs = (actor + 2 * critic) + 3 * (2 * critic) + (3 * actor + 2 * critic) / policy_delay
    return 2.0 * macs * batch


def sgemm_gflops(size: int = HIDDEN, seconds: float = 2.0) -> float:
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(20):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(50):
            a @ b
        count += 50
    return 2 * size**3 * count / (time.perf_counter() - start) / 1e9


def measure_raysmith(algorithm: str, env: str, warmup: int, steps: int) -> dict:
    import ray

    from agents.rud import RUDConfig, TD3Config

    ray.init(num_cpus=2, include_dashboard=False, logging_level="error")
    config_class = {"rud": RUDConfig, "td3": TD3Config}[algorithm]
    config = (
        config_class()
        .environment(env)
        .training(learning_starts=warmup, train_batch_size_per_learner=BATCH)
        .rl_module(model_config={"actor_hidden": [HIDDEN, HIDDEN], "critic_hidden": [HIDDEN, HIDDEN]})
        .debugging(seed=0)
    )
    algo = config.build_algo()

    def lifetime(result):
        return int(result["env_runners"]["num_env_steps_sampled_lifetime"])

    done = 0
    while done < warmup + 1000:  # fill the buffer, then one learning block untimed
        done = lifetime(algo.train())
    start_steps, start = done, time.perf_counter()
    while done < start_steps + steps:
        done = lifetime(algo.train())
    elapsed = time.perf_counter() - start
    updates = algo.learner_group.foreach_learner(lambda learner: learner.critic_updates)
    algo.stop()
    ray.shutdown()
    return {"steps_per_s": (done - start_steps) / elapsed, "env_steps": done - start_steps,
            "updates": [r.get() for r in updates][0]}


def measure_sb3(env: str, warmup: int, steps: int) -> dict:
    import gymnasium as gym
    import numpy as np
    from stable_baselines3 import TD3
    from stable_baselines3.common.noise import NormalActionNoise

    environment = gym.make(env)
    n = environment.action_space.shape[0]
    scale = environment.action_space.high
    model = TD3(
        "MlpPolicy", environment, learning_starts=warmup, batch_size=BATCH, train_freq=1, gradient_steps=1,
        policy_delay=2, target_policy_noise=0.2, target_noise_clip=0.5,
        action_noise=NormalActionNoise(np.zeros(n), 0.1 * scale),
        policy_kwargs={"net_arch": [HIDDEN, HIDDEN]}, seed=0, device="cpu", verbose=0,
    )
    model.learn(warmup + 1000)
    start = time.perf_counter()
    model.learn(steps, reset_num_timesteps=False)
    return {"steps_per_s": steps / (time.perf_counter() - start), "env_steps": steps}


def run_worker(name: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", name, "--env", args.env,
               "--warmup", str(args.warmup), "--steps", str(args.steps)]
    environment = dict(os.environ, PYTHONWARNINGS="ignore")
    output = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
    lines = [line for line in output.stdout.splitlines() if line.startswith("{")]
    if output.returncode != 0 or not lines:
        raise RuntimeError(f"{name} failed:\n{output.stderr[-3000:]}")
    return json.loads(lines[-1])


LABELS = {"rud": "raysmith RUD (update_interval 1000)", "td3": "raysmith TD3", "sb3": "Stable-Baselines3 TD3"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="HalfCheetah-v5")
    parser.add_argument("--warmup", type=int, default=2000, help="random-action steps before learning")
    parser.add_argument("--steps", type=int, default=5000, help="timed env steps (one update each)")
    parser.add_argument("--only", default="rud,td3,sb3")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        if args.worker == "sb3":
            result = measure_sb3(args.env, args.warmup, args.steps)
        else:
            result = measure_raysmith(args.worker, args.env, args.warmup, args.steps)
        print(json.dumps(result), flush=True)
        return

    import gymnasium as gym
    import torch

    environment = gym.make(args.env)
    obs_dim, act_dim = environment.observation_space.shape[0], environment.action_space.shape[0]
    flops = update_flops(obs_dim, act_dim)
    gflops = sgemm_gflops()
    ceiling = gflops * 1e9 / flops
    print(f"{args.env}: one update = {flops / 1e9:.3f} GFLOP; {torch.get_num_threads()} threads do "
          f"{gflops:.0f} GFLOP/s of {HIDDEN}x{HIDDEN} sgemm -> at most {ceiling:.0f} updates/s", flush=True)

    results = {}
    for name in args.only.split(","):
        results[name] = run_worker(name, args)
        print(f"  {LABELS[name]:40s} {results[name]['steps_per_s']:7.1f} env steps/s", flush=True)
    if "sb3" in results:
        base = results["sb3"]["steps_per_s"]
        print(f"ratios to SB3 TD3 (ceiling {ceiling / base:.2f}x):")
        for name, result in results.items():
            if name != "sb3":
                print(f"  {LABELS[name]:40s} {result['steps_per_s'] / base:5.2f}x")
    print(json.dumps({"env": args.env, "gflop_per_update": flops / 1e9, "sgemm_gflops": gflops,
                      "results": results}))


if __name__ == "__main__":
    main()
