"""Env steps per second at one gradient update per env step: raysmith vs Stable-Baselines3.

Two suites, each measured in one run on this machine, every algorithm in its own process,
after a warm-up that fills the replay buffer:

- ``td3`` (default): raysmith RUD and TD3 vs SB3 TD3 on HalfCheetah-v5: same network
  (256-256), batch (256) and update rule. ``rud-bf16`` is RUD with
  ``hidden_matmul_precision="bfloat16"`` (the hidden layers' products through oneDNN's
  bfloat16 kernels, everything else float32); ``--only td3-bf16`` adds TD3 so. Also prints the ceiling that this machine's matrix
  multiply speed sets (one TD3 update is a fixed amount of arithmetic), and for raysmith's
  rows where each env step's time went: sampling (``collect``), learning (the Learner's
  ``learn_block``, until the GPU has finished) and everything else in ``train()``.
- ``dqn``: raysmith NROWAN-DQN and DQN vs SB3 DQN at the NROWAN paper's settings on
  CartPole-v0: 128-128 network, batch 32, Adam 1e-4, replay 10,000, target copy every 1,000.
  SB3's DQN has no noisy layers: raysmith's DQN is the like-for-like row, NROWAN-DQN shows
  what the noise costs on top.

    python benchmarks/rl_throughput.py                      # HalfCheetah-v5, 5000 timed steps
    python benchmarks/rl_throughput.py --steps 2000 --only rud,sb3
    python benchmarks/rl_throughput.py --suite dqn --threads 1 --repeats 3
    python benchmarks/rl_throughput.py --suite updates --repeats 3
    python benchmarks/rl_throughput.py --suite sampling --repeats 3

- ``sampling``: env steps per second of sampling alone with RUD's exploring policy on the
  driver's EnvRunner: RLlib's ``sample()`` (connectors and episodes per step) against
  raysmith's ``TransitionEnvRunner.collect`` (what RUD, TD3 and DDPG use for their blocks).
- ``updates``: the gradient-update loops alone, no environment: raysmith's TD3/RUD Learner
  (``learn_block``'s loop, hand-written gradients as it learns by default), the same Learner
  through autograd (``fused_updates=False``), the Learner loop with bfloat16 hidden
  products (``rud-updates-bf16-hidden``), and SB3's ``TD3.train``, all on the same 5,000
  HalfCheetah-v5 transitions from random actions. ``--only rud-updates-bf16`` adds the
  autograd loop under bfloat16 autocast (matrix multiplies in bf16), which raysmith does not
  use for learning (its effect on learning is not measured). ``--only rud-updates-ray`` adds
  the Learner loop with a local Ray started in its process, as it is inside ``algo.train()``:
  what Ray's own processes and threads cost the loop on a small machine.

``--device cuda`` runs raysmith's Learner on the GPU (``num_gpus_per_learner=1``) and SB3
with ``device="cuda"``, for the ``td3`` and ``updates`` suites; sampling stays on the CPU
for both. The sgemm ceiling is a CPU figure and is left out then.

    python benchmarks/rl_throughput.py --suite updates --device cuda --repeats 2

Needs stable-baselines3 (`pip install stable-baselines3`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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


def measure_raysmith(algorithm: str, env: str, warmup: int, steps: int, device: str = "cpu") -> dict:
    """Env steps per second of one raysmith algorithm, after ``warmup`` untimed steps."""
    import ray

    from agents.nrowan import DQNConfig, NROWANConfig
    from agents.rud import RUDConfig, TD3Config

    ray.init(num_cpus=2, include_dashboard=False, logging_level="error")
    algorithm, bf16 = algorithm.removesuffix("-bf16"), algorithm.endswith("-bf16")
    if algorithm in ("rud", "td3"):
        config = (
            {"rud": RUDConfig, "td3": TD3Config}[algorithm]()
            .training(learning_starts=warmup, train_batch_size_per_learner=BATCH,
                      hidden_matmul_precision="bfloat16" if bf16 else "float32")
            .rl_module(model_config={"actor_hidden": [HIDDEN, HIDDEN], "critic_hidden": [HIDDEN, HIDDEN]})
            .learners(num_gpus_per_learner=1 if device == "cuda" else 0)
        )
        warmup += 1000  # fill the buffer with random actions, then one learning block untimed
    else:
        config = {"nrowan": NROWANConfig, "dqn": DQNConfig}[algorithm]()  # the paper preset
    algo = config.environment(env).debugging(seed=0).build_algo()
    spent = {"sampling": 0.0, "learning": 0.0}
    if algorithm in ("rud", "td3"):  # where the time goes: the blocks' sampling and Learner calls
        runner, learner = algo.env_runner_group.local_env_runner, algo.learner_group._learner
        runner.collect = timed(runner.collect, spent, "sampling")
        learner.learn_block = timed(learner.learn_block, spent, "learning", device)

    def lifetime(result):
        return int(result["env_runners"]["num_env_steps_sampled_lifetime"])

    done = 0
    while done < warmup:
        done = lifetime(algo.train())
    start_steps, start = done, time.perf_counter()
    spent.update(sampling=0.0, learning=0.0)
    while done < start_steps + steps:
        done = lifetime(algo.train())
    elapsed = time.perf_counter() - start
    algo.stop()
    ray.shutdown()
    result = {"steps_per_s": (done - start_steps) / elapsed, "env_steps": done - start_steps}
    if algorithm in ("rud", "td3"):
        per_step = {name: 1e3 * seconds / (done - start_steps) for name, seconds in spent.items()}
        per_step["other"] = 1e3 * elapsed / (done - start_steps) - sum(per_step.values())
        result["ms_per_step"] = per_step
    return result


def timed(function, spent: dict, key: str, device: str = "cpu"):
    """``function``, adding its wall time (until the GPU has finished, on a GPU) to ``spent[key]``."""
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        output = function(*args, **kwargs)
        synchronize(device)
        spent[key] += time.perf_counter() - start
        return output
    return wrapper


def quiet(model):
    """``model`` with a logger that writes nothing: left to itself, SB3 makes an empty
    ``SB3-<date>`` folder in the temporary directory for every model it trains."""
    from stable_baselines3.common.logger import Logger

    model.set_logger(Logger(folder=None, output_formats=[]))
    return model


def measure_sb3_dqn(env: str, warmup: int, steps: int, device: str = "cpu") -> dict:
    import gymnasium as gym
    from stable_baselines3 import DQN

    model = quiet(DQN(
        "MlpPolicy", gym.make(env), learning_rate=1e-4, buffer_size=10_000, learning_starts=32, batch_size=32,
        train_freq=1, gradient_steps=1, target_update_interval=1000, gamma=0.99,
        policy_kwargs={"net_arch": [128, 128]}, seed=0, device=device, verbose=0,
    ))
    model.learn(warmup)
    start = time.perf_counter()
    model.learn(steps, reset_num_timesteps=False)
    return {"steps_per_s": steps / (time.perf_counter() - start), "env_steps": steps}


def measure_sb3(env: str, warmup: int, steps: int, device: str = "cpu") -> dict:
    import gymnasium as gym
    import numpy as np
    from stable_baselines3 import TD3
    from stable_baselines3.common.noise import NormalActionNoise

    environment = gym.make(env)
    n = environment.action_space.shape[0]
    model = quiet(TD3(
        "MlpPolicy", environment, learning_starts=warmup, batch_size=BATCH, train_freq=1, gradient_steps=1,
        policy_delay=2, target_policy_noise=0.2, target_noise_clip=0.5,
        action_noise=NormalActionNoise(np.zeros(n), np.full(n, 0.1)),  # added in SB3's [-1, 1] action scale
        policy_kwargs={"net_arch": [HIDDEN, HIDDEN]}, seed=0, device=device, verbose=0,
    ))
    model.learn(warmup + 1000)
    start = time.perf_counter()
    model.learn(steps, reset_num_timesteps=False)
    return {"steps_per_s": steps / (time.perf_counter() - start), "env_steps": steps}


def random_transitions(env_id: str, count: int, seed: int = 0) -> dict:
    """``count`` transitions of uniformly random actions, as the replay buffers store them."""
    import gymnasium as gym
    import numpy as np

    env = gym.make(env_id)
    env.action_space.seed(seed)
    obs, _ = env.reset(seed=seed)
    fields: dict[str, list] = {"obs": [], "actions": [], "rewards": [], "next_obs": [], "terminateds": []}
    for _ in range(count):
        action = env.action_space.sample()
        next_obs, reward, terminated, truncated, _ = env.step(action)
        for name, value in zip(fields, (obs, action, reward, next_obs, float(terminated))):
            fields[name].append(value)
        obs = env.reset()[0] if terminated or truncated else next_obs
    return {name: np.asarray(values, dtype=np.float32) for name, values in fields.items()}


def measure_updates(name: str, env_id: str, updates: int, device: str = "cpu") -> dict:
    """Gradient updates per second of one update loop, after 50 untimed updates (on a GPU,
    timed until the GPU has finished them)."""
    import contextlib

    import torch

    transitions = random_transitions(env_id, 5000)
    if name == "sb3-updates":
        import gymnasium as gym
        from stable_baselines3 import TD3

        model = TD3("MlpPolicy", gym.make(env_id), learning_starts=0, batch_size=BATCH, policy_delay=2,
                    target_policy_noise=0.2, target_noise_clip=0.5, policy_kwargs={"net_arch": [HIDDEN, HIDDEN]},
                    seed=0, device=device, verbose=0)
        quiet(model).learn(1)  # sets up the progress SB3's train() reads
        buffer = model.replay_buffer
        for index in range(len(transitions["rewards"])):
            buffer.add(transitions["obs"][index], transitions["next_obs"][index], transitions["actions"][index],
                       transitions["rewards"][index], transitions["terminateds"][index], [{}])
        model.train(gradient_steps=50, batch_size=BATCH)
        synchronize(device)
        start = time.perf_counter()
        model.train(gradient_steps=updates, batch_size=BATCH)
        synchronize(device)
        return {"updates_per_s": updates / (time.perf_counter() - start), "updates": updates}

    import gymnasium as gym
    from ray.rllib.core import DEFAULT_MODULE_ID

    from agents.rud import TD3Config

    fused = name in ("rud-updates", "rud-updates-ray", "rud-updates-bf16-hidden")
    if name == "rud-updates-ray":  # as measure_raysmith starts it
        import ray

        ray.init(num_cpus=2, include_dashboard=False, logging_level="error")
        time.sleep(5)  # let its processes settle
    hidden = "bfloat16" if name == "rud-updates-bf16-hidden" else "float32"
    config = (TD3Config().environment(env_id)
              .training(train_batch_size_per_learner=BATCH, fused_updates=fused, hidden_matmul_precision=hidden)
              .rl_module(model_config={"actor_hidden": [HIDDEN, HIDDEN], "critic_hidden": [HIDDEN, HIDDEN]})
              .learners(num_gpus_per_learner=1 if device == "cuda" else 0))
    learner = config.build_learner(env=gym.make(env_id))
    learner.replay.add(transitions)
    module = learner.module[DEFAULT_MODULE_ID]
    precision = torch.autocast(device, dtype=torch.bfloat16) if name == "rud-updates-bf16" else contextlib.nullcontext()
    with precision:
        learner._updates(module, 50)
        synchronize(device)
        start = time.perf_counter()
        learner._updates(module, updates)
        synchronize(device)
    elapsed = time.perf_counter() - start
    if name == "rud-updates-ray":
        ray.shutdown()
    return {"updates_per_s": updates / elapsed, "updates": updates}


def synchronize(device: str) -> None:
    """Wait for the GPU's queued work (kernels launch asynchronously), so timings count it."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def measure_sampling(name: str, env_id: str, warmup: int, steps: int) -> dict:
    """Env steps per second of sampling alone with RUD's policy (exploring, after the warm-up):
    RLlib's ``SingleAgentEnvRunner.sample`` against raysmith's ``TransitionEnvRunner.collect``,
    on the same driver-side EnvRunner."""
    import ray

    from agents.rud import RUDConfig

    ray.init(num_cpus=2, include_dashboard=False, logging_level="error")
    algo = (RUDConfig().environment(env_id).training(learning_starts=0)
            .rl_module(model_config={"actor_hidden": [HIDDEN, HIDDEN], "critic_hidden": [HIDDEN, HIDDEN]})
            .debugging(seed=0).build_algo())
    runner = algo.env_runner_group.local_env_runner
    runner.num_env_steps_sampled_lifetime = warmup

    def run(count: int) -> None:
        if name == "collect":
            runner.collect(count, warmup)
        else:
            runner.sample(num_timesteps=count)

    run(warmup)
    start = time.perf_counter()
    run(steps)
    elapsed = time.perf_counter() - start
    algo.stop()
    ray.shutdown()
    return {"steps_per_s": steps / elapsed, "env_steps": steps}


def run_worker(name: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", name, "--env", args.env,
               "--warmup", str(args.warmup), "--steps", str(args.steps), "--device", args.device]
    environment = dict(os.environ, PYTHONWARNINGS="ignore")
    if args.threads:
        environment.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    output = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
    lines = [line for line in output.stdout.splitlines() if line.startswith("{")]
    if output.returncode != 0 or not lines:
        raise RuntimeError(f"{name} failed:\n{output.stderr[-3000:]}")
    return json.loads(lines[-1])


LABELS = {"rud": "raysmith RUD (update_interval 1000)", "td3": "raysmith TD3", "sb3": "Stable-Baselines3 TD3",
          "nrowan": "raysmith NROWAN-DQN", "dqn": "raysmith DQN", "sb3dqn": "Stable-Baselines3 DQN",
          "rud-updates": "raysmith TD3/RUD Learner loop", "rud-updates-autograd": "same through autograd",
          "rud-updates-bf16": "autograd, bf16 autocast (not used)",
          "rud-bf16": "raysmith RUD, bfloat16 hidden products", "td3-bf16": "raysmith TD3, bfloat16 hidden products",
          "rud-updates-bf16-hidden": "Learner loop, bfloat16 hidden products",
          "rud-updates-ray": "Learner loop, local Ray running",
          "sb3-updates": "Stable-Baselines3 TD3.train", "rllib-sample": "RLlib SingleAgentEnvRunner.sample",
          "collect": "raysmith TransitionEnvRunner.collect"}
SUITES = {
    "td3": {"env": "HalfCheetah-v5", "warmup": 2000, "steps": 5000, "only": "rud,rud-bf16,td3,sb3", "peer": "sb3"},
    "dqn": {"env": "CartPole-v0", "warmup": 1000, "steps": 10000, "only": "nrowan,dqn,sb3dqn", "peer": "sb3dqn"},
    "updates": {"env": "HalfCheetah-v5", "warmup": 0, "steps": 2000, "only": "rud-updates,rud-updates-bf16-hidden,rud-updates-autograd,sb3-updates",
                "peer": "sb3-updates"},
    "sampling": {"env": "HalfCheetah-v5", "warmup": 1000, "steps": 5000, "only": "rllib-sample,collect",
                 "peer": "rllib-sample"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=list(SUITES), default="td3")
    parser.add_argument("--env", help="default: the suite's (HalfCheetah-v5, CartPole-v0)")
    parser.add_argument("--warmup", type=int, help="steps before timing (random actions for TD3; default 2000 / 1000)")
    parser.add_argument("--steps", type=int,
                        help="timed env steps, one update each (default 5000 / 10000); updates for --suite updates (2000)")
    parser.add_argument("--only", help="comma-separated subset of the suite's algorithms")
    parser.add_argument("--threads", type=int, help="math threads per process (default: PyTorch's)")
    parser.add_argument("--repeats", type=int, default=1, help="measure each algorithm this often, round-robin")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where raysmith's Learner and SB3's networks run (td3 and updates suites)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    suite = SUITES[args.suite]
    for name in ("env", "warmup", "steps", "only"):
        if getattr(args, name) is None:
            setattr(args, name, suite[name])
            if name == "only" and args.device == "cuda":  # bfloat16 hidden products are a CPU setting
                args.only = ",".join(n for n in args.only.split(",") if "bf16" not in n)

    if args.worker:
        measure = {"sb3": measure_sb3, "sb3dqn": measure_sb3_dqn}.get(args.worker)
        if args.worker in (*SUITES["updates"]["only"].split(","), "rud-updates-bf16", "rud-updates-ray"):
            result = measure_updates(args.worker, args.env, args.steps, args.device)
        elif args.worker in SUITES["sampling"]["only"].split(","):
            result = measure_sampling(args.worker, args.env, args.warmup, args.steps)
        elif measure is not None:
            result = measure(args.env, args.warmup, args.steps, args.device)
        else:
            result = measure_raysmith(args.worker, args.env, args.warmup, args.steps, args.device)
        print(json.dumps(result), flush=True)
        return
    if args.device == "cuda" and args.suite in ("dqn", "sampling"):
        parser.error(f"--device cuda applies to the td3 and updates suites, not {args.suite}")
    if args.suite in ("dqn", "sampling"):
        run_suite(args, suite["peer"], ceiling=None)
        return
    if args.device == "cuda":
        import torch

        print(f"{args.env} on {torch.cuda.get_device_name()}: Learner and SB3 networks on the GPU", flush=True)
        run_suite(args, suite["peer"], None, {"device": torch.cuda.get_device_name()})
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
    run_suite(args, suite["peer"], ceiling, {"gflop_per_update": flops / 1e9, "sgemm_gflops": gflops})


def run_suite(args: argparse.Namespace, peer: str, ceiling: float | None, extra: dict | None = None) -> None:
    """Each algorithm ``--repeats`` times, round-robin, so that a slow spell on a shared
    machine hits all of them alike; rates are the medians."""
    names = args.only.split(",")
    key, unit = ("updates_per_s", "updates/s") if args.suite == "updates" else ("steps_per_s", "env steps/s")
    rates: dict[str, list[float]] = {name: [] for name in names}
    results = {}
    for _ in range(args.repeats):
        for name in names:
            results[name] = run_worker(name, args)
            rates[name].append(results[name][key])
            print(f"    {name}: {results[name][key]:.1f} {unit}", flush=True)
    for name in names:
        results[name][key] = statistics.median(rates[name])
        results[name]["runs"] = rates[name]
        spread = f"  (runs: {', '.join(f'{rate:.0f}' for rate in rates[name])})" if args.repeats > 1 else ""
        print(f"  {LABELS[name]:40s} {results[name][key]:7.1f} {unit}{spread}", flush=True)
        if "ms_per_step" in results[name]:  # the last run's
            parts = ", ".join(f"{part} {ms:.2f}" for part, ms in results[name]["ms_per_step"].items())
            print(f"  {'':40s} ms per env step: {parts}", flush=True)
    if peer in results:
        base = results[peer][key]
        bound = f" (ceiling {ceiling / base:.2f}x)" if ceiling else ""
        print(f"ratios to {LABELS[peer]}{bound}:")
        for name, result in results.items():
            if name != peer:
                print(f"  {LABELS[name]:40s} {result[key] / base:5.2f}x")
    print(json.dumps({"env": args.env, "threads": args.threads, **(extra or {}), "results": results}))


if __name__ == "__main__":
    main()
