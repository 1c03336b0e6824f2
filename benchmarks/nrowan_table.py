"""The NROWAN-DQN paper's Table 3 protocol: DQN, NoisyNet-DQN and NROWAN-DQN, 5 seeds x 64 tests.

Each (algorithm, seed) trains the shipped paper preset (``pipelines/configs/{dqn,noisynet,
nrowan}_{task}.yaml``) for its budget, then plays 64 test episodes; mean and standard
deviation are over all 5 x 64 episode returns, as in the paper. Two test modes are
reported: as the agent acts in training (noisy weights; DQN at epsilon_final), which is the
presets' evaluation setting, and greedy on the mean weights. Every run is an MLflow run
(params, its 64 returns as a metric series, mean and std) in the experiment
``nrowan-table``; the table is printed beside the paper's figures and written as JSON.

    python benchmarks/nrowan_table.py                       # CartPole-v0, 5 seeds, 30k steps each
    python benchmarks/nrowan_table.py --tasks cartpole acrobot --seeds 0 1 2 3 4
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

ALGORITHMS = {"dqn": "DQN", "noisynet": "NoisyNet-DQN", "nrowan": "NROWAN-DQN"}
PAPER = {  # Table 3 of arXiv 2006.10980: mean +- std of the test return
    "cartpole": {"dqn": (170.49, 35.86), "noisynet": (164.96, 31.56), "nrowan": (187.04, 13.99)},
}
EXPERIMENT = "nrowan-table"


def play(module, env_id: str, episodes: int, seed: int, noisy: bool) -> list[float]:
    """Returns of ``episodes`` test episodes; ``noisy``: act as in training (explore noise on)."""
    import gymnasium as gym
    import torch

    env = gym.make(env_id)
    returns = []
    module.evaluation_noise = noisy
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed * 1000 + episode)
        total, done = 0.0, False
        while not done:
            action = module.act(torch.as_tensor(obs, dtype=torch.float32).reshape(1, -1), 0.0, explore=False)
            obs, reward, terminated, truncated, _ = env.step(int(action[0]))
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    env.close()
    return returns


def train_and_test(algorithm: str, task: str, seed: int, episodes: int, tracking_uri: str) -> dict:
    from ray.rllib.core import DEFAULT_MODULE_ID

    from pipelines.rl import build_algorithm_config
    from pipelines.spec import flatten, load_spec
    from pipelines.tracking.mlflow_run import RunTracker

    spec_file = ROOT / "pipelines" / "configs" / f"{algorithm}_{task}.yaml"
    spec = load_spec(spec_file, overrides=[f"seed={seed}"]).spec
    config = build_algorithm_config(spec).evaluation(evaluation_interval=None)
    algo = config.build_algo()
    started = time.perf_counter()
    steps = 0
    try:
        while steps < spec.stop.env_steps:
            result = algo.train()
            steps = int(result["env_runners"]["num_env_steps_sampled_lifetime"])
        train_s = time.perf_counter() - started
        module = algo.learner_group._learner.module[DEFAULT_MODULE_ID]
        learner_metrics = result["learners"][DEFAULT_MODULE_ID]
        noisy_returns = play(module, spec.env, episodes, seed, noisy=True)
        mean_returns = play(module, spec.env, episodes, seed, noisy=False)
    finally:
        algo.stop()
    row = {
        "algorithm": algorithm, "task": task, "seed": seed, "env_steps": steps, "train_s": round(train_s, 1),
        "noisy_returns": noisy_returns, "mean_weight_returns": mean_returns,
        "final_sigma_output": learner_metrics.get("sigma_mean_layer2"),
    }
    tracker = RunTracker.start(tracking_uri, EXPERIMENT, f"{algorithm}-{task}-s{seed}",
                               tags={"raysmith.benchmark": "nrowan_table"})
    tracker.log_params(flatten(spec.model_dump(mode="json")))
    for index, (noisy, plain) in enumerate(zip(noisy_returns, mean_returns)):
        tracker.log_metrics({"test/return": noisy, "test_mean_weights/return": plain}, step=index)
    tracker.log_metrics({
        "test/return_mean": statistics.fmean(noisy_returns), "test/return_std": statistics.pstdev(noisy_returns),
        "test_mean_weights/return_mean": statistics.fmean(mean_returns),
        "test_mean_weights/return_std": statistics.pstdev(mean_returns), "train_s": train_s,
    }, step=steps)
    tracker.finish("FINISHED")
    return row


def summarise(rows: list[dict], task: str) -> dict:
    table = {}
    for algorithm in ALGORITHMS:
        mine = [row for row in rows if row["algorithm"] == algorithm and row["task"] == task]
        if not mine:
            continue
        entry = {"seeds": len(mine)}
        for key in ("noisy_returns", "mean_weight_returns"):
            returns = [value for row in mine for value in row[key]]
            per_seed = [statistics.fmean(row[key]) for row in mine]
            entry[key] = {"mean": statistics.fmean(returns), "std": statistics.pstdev(returns),
                          "per_seed_means": per_seed}
        table[algorithm] = entry
    return table


def log_summary(table: dict, task: str, tracking_uri: str) -> None:
    """One MLflow run per task holding the table: mean and std per algorithm and test mode."""
    from pipelines.tracking.mlflow_run import RunTracker

    tracker = RunTracker.start(tracking_uri, EXPERIMENT, f"summary-{task}", tags={"raysmith.benchmark": "nrowan_table"})
    metrics = {}
    for algorithm, entry in table.items():
        for mode, key in (("test", "noisy_returns"), ("test_mean_weights", "mean_weight_returns")):
            metrics[f"{algorithm}/{mode}/return_mean"] = entry[key]["mean"]
            metrics[f"{algorithm}/{mode}/return_std"] = entry[key]["std"]
        metrics[f"{algorithm}/seeds"] = entry["seeds"]
    tracker.log_metrics(metrics, step=0)
    tracker.finish("FINISHED")


def print_table(table: dict, task: str) -> None:
    paper = PAPER.get(task, {})
    print(f"\n{task}: test return over all seeds x episodes (mean +- std)")
    print("| algorithm | seeds | ours, acting as in training | ours, mean weights | paper (Table 3) |")
    print("|---|---|---|---|---|")
    for algorithm, entry in table.items():
        noisy, plain = entry["noisy_returns"], entry["mean_weight_returns"]
        reference = paper.get(algorithm)
        ref = f"{reference[0]:.2f} +- {reference[1]:.2f}" if reference else "-"
        print(f"| {ALGORITHMS[algorithm]} | {entry['seeds']} | {noisy['mean']:.2f} +- {noisy['std']:.2f} | "
              f"{plain['mean']:.2f} +- {plain['std']:.2f} | {ref} |")
    if "nrowan" in table and "noisynet" in table:
        ours, theirs = table["nrowan"]["noisy_returns"], table["noisynet"]["noisy_returns"]
        ratio = f"{ours['std'] / theirs['std']:.2f}" if theirs["std"] > 0 else "n/a (NoisyNet's std is 0)"
        print(f"NROWAN mean above NoisyNet's: {ours['mean'] > theirs['mean']}; "
              f"NROWAN std / NoisyNet std = {ratio} (target <= 0.5)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["cartpole"], choices=["cartpole", "acrobot", "mountaincar"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    parser.add_argument("--episodes", type=int, default=64)
    parser.add_argument("--tracking-uri", default=f"sqlite:///{ROOT / 'benchmarks' / 'results' / 'nrowan_table.db'}")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "nrowan_table.json"))
    args = parser.parse_args()

    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="error")
    output = Path(args.json)
    previous = json.loads(output.read_text()) if output.is_file() else {"rows": []}
    done = {(row["algorithm"], row["task"], row["seed"]) for row in previous["rows"]}
    rows = list(previous["rows"])
    for task in args.tasks:
        for seed in args.seeds:
            for algorithm in args.algorithms:
                if (algorithm, task, seed) in done:
                    continue
                row = train_and_test(algorithm, task, seed, args.episodes, args.tracking_uri)
                rows.append(row)
                output.parent.mkdir(parents=True, exist_ok=True)
                output.write_text(json.dumps({"rows": rows}, indent=1))
                print(f"{ALGORITHMS[algorithm]:13s} {task} seed {seed}: test {statistics.fmean(row['noisy_returns']):7.2f}"
                      f" (mean weights {statistics.fmean(row['mean_weight_returns']):7.2f}) in {row['train_s']:.0f}s",
                      flush=True)
    ray.shutdown()
    summary = {task: summarise(rows, task) for task in args.tasks}
    for task in args.tasks:
        print_table(summary[task], task)
        log_summary(summary[task], task, args.tracking_uri)
    output.write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
