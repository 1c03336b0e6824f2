"""RIM against ERL and TD3 at equal env steps, and the population's speed-up from Ray workers.

Each run trains from the shipped spec (``pipelines/configs/{rim,erl,td3}_<env>.yaml``; TD3
on Swimmer uses td3_hopper's settings with the env swapped) until it has taken
``--env-steps`` environment steps, counting every population rollout, then scores it: for
ERL and RIM the generation champion's return on fresh episodes (ERL's "test score",
``population/champion_test_return`` of the last generation), for TD3 the mean return of
10 deterministic episodes. Mean and standard deviation over seeds are printed per
algorithm and environment, with the ratio to ERL.

``--speedup`` instead times one population evaluation (10 members with the same random
genomes, one Swimmer-v5 episode of 1,000 steps each by default) on 1 and on 2 rollout
workers and prints the ratio.

    python benchmarks/rim_vs_erl.py --envs Hopper-v5 Swimmer-v5 --seeds 0 1 2 --env-steps 50000
    python benchmarks/rim_vs_erl.py --speedup
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPEC_NAMES = {"Hopper-v5": "hopper", "Swimmer-v5": "swimmer", "Walker2d-v5": "walker2d", "HalfCheetah-v5": "halfcheetah"}
ALGORITHMS = ("RIM", "ERL", "TD3", "RIM-no-imitation", "RIM-pg-only", "RIM-ea-only", "RIM-hard")


def build(algorithm: str, env: str, seed: int, env_steps: int):
    from pipelines.rl import build_algorithm_config
    from pipelines.spec import load_spec

    base = algorithm.split("-")[0].lower()
    name = SPEC_NAMES[env]
    path = ROOT / "pipelines" / "configs" / f"{base}_{name}.yaml"
    overrides = [f"seed={seed}", f"stop.env_steps={env_steps}"]
    if not path.exists():  # e.g. TD3 on Swimmer: TD3's Hopper settings on the other task
        path = ROOT / "pipelines" / "configs" / f"{base}_hopper.yaml"
        overrides.append(f"env={env}")
    if base == "td3":
        overrides.append(f"training.learning_starts={min(25_000, env_steps // 5)}")
    spec = load_spec(path, overrides).spec
    config = build_algorithm_config(spec)
    ablation = algorithm.partition("-")[2]
    if ablation == "no-imitation":
        config.training(imitation=False)
    elif ablation == "pg-only":
        config.training(acting="pg")
    elif ablation == "ea-only":
        config.training(acting="ea")
    elif ablation == "hard":
        config.training(recruitment="hard")
    if base == "td3":
        config.evaluation(evaluation_num_env_runners=0, evaluation_duration=10, evaluation_duration_unit="episodes")
    return config.build_algo()


def run(algorithm: str, env: str, seed: int, env_steps: int) -> dict:
    algo = build(algorithm, env, seed, env_steps)
    started = time.perf_counter()
    try:
        steps, result, pg_shares = 0, {}, []
        while steps < env_steps:
            result = algo.train()
            steps = int(result["env_runners"]["num_env_steps_sampled_lifetime"])
            share = result.get("population", {}).get("rl_acted_with_pg")
            if share is not None:
                pg_shares.append(float(share))
        if algorithm.startswith("TD3"):
            score = float(algo.evaluate()["env_runners"]["episode_return_mean"])
        else:
            score = float(result["population"]["champion_test_return"])
    finally:
        algo.stop()
    row = {"algorithm": algorithm, "env": env, "seed": seed, "env_steps": steps, "score": score,
           "seconds": time.perf_counter() - started}
    if pg_shares:  # RIM: the share of the agent's states where the critic chose pi_pg, per generation
        row["acted_with_pg"] = [round(share, 3) for share in pg_shares]
    return row


def speedup(repeats: int, env: str, episodes: int) -> None:
    import ray
    import torch

    from agents.common.networks import DeterministicActor
    from agents.rim.population import ActorSpec, PopulationEvaluator, genome_of

    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    import gymnasium as gym

    probe = gym.make(env)
    obs_dim, act_dim = probe.observation_space.shape[0], probe.action_space.shape[0]
    probe.close()
    spec = ActorSpec(obs_dim, act_dim, (256, 256), "relu")
    torch.manual_seed(0)
    population = torch.stack([genome_of(DeterministicActor(obs_dim, act_dim, (256, 256))) for _ in range(10)])
    times = {}
    for workers in (1, 2):
        evaluator = PopulationEvaluator(env, {}, spec, workers, seed=0, cpus_per_worker=1.0)
        evaluator.evaluate(population, 1, seed=0)  # warm-up: workers started, environments built
        runs = []
        for _ in range(repeats):
            started = time.perf_counter()
            results = evaluator.evaluate(population, episodes, seed=1)
            runs.append(time.perf_counter() - started)
        steps = sum(result["steps"] for result in results)
        times[workers] = statistics.median(runs)
        print(f"{workers} worker(s): {times[workers]:.2f} s per evaluation of 10 members x {episodes} episode(s) "
              f"({steps} env steps; runs {', '.join(f'{r:.2f}' for r in runs)})")
        evaluator.stop()
    print(f"speed-up 1 -> 2 workers: {times[1] / times[2]:.2f}x (target >= 1.7x)")
    ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=["Hopper-v5", "Swimmer-v5"], choices=sorted(SPEC_NAMES))
    parser.add_argument("--algorithms", nargs="+", default=["RIM", "ERL", "TD3"], choices=ALGORITHMS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--env-steps", type=int, default=50_000)
    parser.add_argument("--speedup", action="store_true", help="time 1 vs 2 rollout workers instead")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--speedup-env", default="Swimmer-v5", help="fixed 1000-step episodes: the same work per member")
    parser.add_argument("--speedup-episodes", type=int, default=1)
    args = parser.parse_args()
    if args.speedup:
        speedup(args.repeats, args.speedup_env, args.speedup_episodes)
        return
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    rows = []
    for env in args.envs:
        for seed in args.seeds:
            for algorithm in args.algorithms:
                row = run(algorithm, env, seed, args.env_steps)
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\nscore at {args.env_steps} env steps, mean ± std over seeds {args.seeds}:")
    for env in args.envs:
        scores = {a: [r["score"] for r in rows if r["env"] == env and r["algorithm"] == a] for a in args.algorithms}
        erl = statistics.mean(scores["ERL"]) if scores.get("ERL") else None
        for algorithm, values in scores.items():
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            ratio = f"  ({statistics.mean(values) / erl:.2f}x ERL)" if erl and erl > 0 else ""
            print(f"  {env:14s} {algorithm:18s} {statistics.mean(values):9.1f} ± {spread:7.1f}{ratio}")


if __name__ == "__main__":
    main()
