"""RUD vs TD3 vs DDPG at equal env steps: several seeds per task, run through raysmith itself.

Each (algorithm, task, seed) is one `raysmith run` of the shipped spec
``pipelines/configs/{algorithm}_{task}.yaml`` with the budget, seed and evaluation cadence
set on the command line, recorded in one MLflow experiment. Finished runs are found by name
and not run again, so an interrupted benchmark continues where it stopped. At the end the
script prints a markdown table (final deterministic evaluation return, mean and standard
deviation over seeds, and the mean of the last three evaluations) and writes it as JSON.

    python benchmarks/rl_learning.py --steps 200000 --seeds 0 1 2 --tasks halfcheetah hopper
    python benchmarks/rl_learning.py --summary-only     # table from what is recorded
    python benchmarks/rl_learning.py --summary-only --plot docs/rl_learning.png

``--merge A.json B.json`` adds the seeds recorded in earlier JSON outputs (runs made in
another tree or MLflow store) to the table, the statistics and the plot. The JSON output
(``--json``) accumulates in the same way: the seeds it already holds count as merged, and
its rows outside this run's tasks and algorithms are kept, so a run for a few new seeds
adds them instead of replacing the record. Point ``--json`` at a new file to start over.

``--parallel 2`` runs two at a time with one math thread each, which gets more env steps
per second out of 2 cores than one run with two threads (sampling is single-threaded).

Two more kinds of row: ``sb3-td3`` is Stable-Baselines3's TD3 with the TD3 spec's
hyperparameters, evaluated the same way (the peer users would pick, as a check that a
task's figures are what a standard implementation reaches at this budget), and
``rud:N`` is RUD with ``update_interval`` N instead of the spec's 1000; a raysmith token
ending in ``+bf16`` (``rud+bf16``, ``td3+bf16``, ``rud:250+bf16``) runs with
``hidden_matmul_precision: bfloat16``:

    python benchmarks/rl_learning.py --tasks hopper --algorithms sb3-td3 rud:250 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALGORITHMS = ("rud", "td3", "ddpg")
EXPERIMENT = "rl-learning"


SB3 = "sb3-td3"


BF16 = "+bf16"


def parse_algorithm(token: str) -> tuple[str, int | None]:
    """``rud``, ``td3``, ``ddpg``, ``sb3-td3`` or ``rud:N`` (RUD with update_interval N); raysmith's
    may end in ``+bf16`` (``hidden_matmul_precision: bfloat16``)."""
    if token.endswith(BF16) and not token.startswith(SB3):
        token = token.removesuffix(BF16)
    name, _, interval = token.partition(":")
    if name in (*ALGORITHMS, SB3) and not interval:
        return name, None
    if name == "rud" and interval.isdigit() and int(interval) > 0:
        return name, int(interval)
    raise argparse.ArgumentTypeError(f"unknown algorithm {token!r}: allowed are {', '.join(ALGORITHMS)}, {SB3} "
                                     "and rud:N (RUD with update_interval N, a positive integer); raysmith's may "
                                     f"end in {BF16} (bfloat16 hidden products)")


def algorithm_token(token: str) -> str:
    parse_algorithm(token)
    return token


def label(token: str) -> str:
    name, interval = parse_algorithm(token)
    text = f"RUD (update_interval {interval})" if interval else "SB3 TD3" if name == SB3 else name.upper()
    return f"{text}, bfloat16 hidden products" if token.endswith(BF16) else text


def run_name(algorithm: str, task: str, seed: int, steps: int) -> str:
    return f"bench-{algorithm.replace(':', '').replace('+', '-')}-{task}-s{seed}-{steps // 1000}k"


def finished_runs(uri: str) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return {}
    runs = client.search_runs([experiment.experiment_id], filter_string="attributes.status = 'FINISHED'",
                              max_results=5000)
    return {run.info.run_name: run.info.run_id for run in runs}


def launch(algorithm: str, task: str, seed: int, args: argparse.Namespace, threads: int) -> tuple[str, int, float]:
    name = run_name(algorithm, task, seed, args.steps)
    base, interval = parse_algorithm(algorithm)
    if base == SB3:
        command = [sys.executable, __file__, "--sb3-worker", task, str(seed), "--steps", str(args.steps),
                   "--eval-every", str(args.eval_every), "--eval-episodes", str(args.eval_episodes)]
        return run_logged(command, name, args, threads)
    spec = ROOT / "pipelines" / "configs" / f"{base}_{task}.yaml"
    overrides = {
        "name": name,
        "seed": seed,
        "stop.env_steps": args.steps,
        "evaluation.every_env_steps": args.eval_every,
        "evaluation.episodes": args.eval_episodes,
        "tracking.experiment": EXPERIMENT,
        "tracking.log_checkpoints": "false",
        "checkpoint.every_iterations": 1_000_000,
        "output_dir": args.output_dir,
    }
    if interval:
        overrides["training.update_interval"] = interval
    if algorithm.endswith(BF16):
        overrides["training.hidden_matmul_precision"] = "bfloat16"
    command = [sys.executable, "-m", "pipelines", "run", str(spec)]
    for key, value in overrides.items():
        command += ["--set", f"{key}={value}"]
    return run_logged(command, name, args, threads)


def run_logged(command: list[str], name: str, args: argparse.Namespace, threads: int) -> tuple[str, int, float]:
    environment = dict(os.environ, MLFLOW_TRACKING_URI=args.tracking_uri, PYTHONWARNINGS="ignore")
    if threads:
        environment.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log = Path(args.output_dir) / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with log.open("w") as handle:
        code = subprocess.call(command, cwd=ROOT, env=environment, stdout=handle, stderr=subprocess.STDOUT)
    return name, code, time.monotonic() - started


def sb3_td3(task: str, seed: int, args: argparse.Namespace) -> None:
    """Stable-Baselines3 TD3 with the hyperparameters of ``td3_{task}.yaml``, its deterministic
    evaluation logged like raysmith's (``evaluation/return_mean`` at env steps) in an MLflow
    run named as the others; the run is FINISHED only if training completed."""
    import gymnasium as gym
    import mlflow
    import numpy as np
    import yaml
    from stable_baselines3 import TD3
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.evaluation import evaluate_policy
    from stable_baselines3.common.noise import NormalActionNoise

    from rl_throughput import quiet  # the script's own folder is on sys.path

    spec = yaml.safe_load((ROOT / "pipelines" / "configs" / f"td3_{task}.yaml").read_text())
    training, model_config = spec["training"], spec["model"]
    if training["actor_lr"] != training["critic_lr"] or model_config["actor_hidden"] != model_config["critic_hidden"]:
        raise SystemExit("SB3's TD3 takes one learning rate and one net_arch; the spec has two")
    if training.get("update_interval", 1) != 1 or training.get("updates_per_step", 1.0) != 1.0:
        raise SystemExit("the TD3 spec is expected to update once per env step")
    env = gym.make(spec["env"])
    evaluation_env = gym.make(spec["env"])
    evaluation_env.reset(seed=seed + 10_000)
    # SB3 adds the noise to the action scaled to [-1, 1] (OffPolicyAlgorithm._sample_action), as
    # raysmith does, so the spec's sigma is passed unchanged whatever the env's bounds
    shape = env.action_space.shape
    noise = NormalActionNoise(np.zeros(shape), np.full(shape, training["exploration_noise"]))
    model = quiet(TD3(
        "MlpPolicy", env, learning_rate=training["actor_lr"], buffer_size=training["replay_capacity"],
        learning_starts=training["learning_starts"], batch_size=training["train_batch_size_per_learner"],
        tau=training["tau"], gamma=training["gamma"], train_freq=1, gradient_steps=1, action_noise=noise,
        policy_delay=training["policy_delay"], target_policy_noise=training["target_noise"],
        target_noise_clip=training["target_noise_clip"], policy_kwargs={"net_arch": list(model_config["actor_hidden"])},
        seed=seed, device="cpu", verbose=0,
    ))

    def evaluate(step: int) -> None:
        mean, _ = evaluate_policy(model, evaluation_env, n_eval_episodes=args.eval_episodes, deterministic=True)
        mlflow.log_metric("evaluation/return_mean", float(mean), step=step)
        print(f"{step} env steps: evaluation return {mean:.1f}", flush=True)

    class Evaluate(BaseCallback):
        def _on_step(self) -> bool:
            if self.num_timesteps % args.eval_every == 0:
                evaluate(self.num_timesteps)
            return True

    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name=run_name(SB3, task, seed, args.steps)):
        mlflow.log_params({"implementation": "stable-baselines3 TD3", "env": spec["env"], "seed": seed,
                           **{key: training[key] for key in sorted(training)}})
        evaluate(0)
        model.learn(args.steps, callback=Evaluate())


def row(curves: dict[int, list]) -> dict:
    """One table row from each seed's evaluation curve, ``[(env step, return), ...]``."""
    finals = [curve[-1][1] for curve in curves.values()]
    return {
        "seeds": len(finals),
        "final_mean": statistics.fmean(finals),
        "final_std": statistics.pstdev(finals) if len(finals) > 1 else 0.0,
        "last3_mean": statistics.fmean(statistics.fmean(value for _, value in curve[-3:]) for curve in curves.values()),
        "finals": finals,
        "curves": curves,
    }


def summarise(args: argparse.Namespace) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(args.tracking_uri)
    runs = finished_runs(args.tracking_uri)
    table: dict = {}
    for task, algorithm in itertools.product(args.tasks, args.algorithms):
        curves = {}
        for seed in args.seeds:
            run_id = runs.get(run_name(algorithm, task, seed, args.steps))
            if run_id is not None:
                curves[seed] = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "evaluation/return_mean"))
        if curves:
            table.setdefault(task, {})[algorithm] = row(curves)
    return table


def read_recorded(paths: list[str], steps: int, option: str = "--merge") -> list[tuple[str, dict]]:
    """Earlier JSON outputs of this script, checked before any run starts."""
    recorded = []
    for path in paths:
        try:
            content = json.loads(Path(path).read_text())
        except (OSError, ValueError) as error:
            raise SystemExit(f"{option} {path}: cannot be read as JSON ({error})") from None
        if not isinstance(content, dict) or not isinstance(content.get("results"), dict):
            raise SystemExit(f"{option} {path}: not an output of this script (it has no 'results' table)")
        if content.get("steps") != steps:
            raise SystemExit(f"{option} {path}: holds {content.get('steps')}-step runs, not --steps {steps}")
        recorded.append((path, content["results"]))
    return recorded


def read_output(path: str, steps: int) -> list[tuple[str, dict]]:
    """The ``--json`` output already written, as one more recorded source; none if absent."""
    if not Path(path).exists():
        return []
    try:
        return read_recorded([path], steps, option="--json")
    except SystemExit as error:
        raise SystemExit(f"{error}; this run adds to its --json output, so pass --json with a new file") from None


def accumulate(recorded: list[tuple[str, dict]], table: dict) -> dict:
    """The earlier output with this run's seeds added: each row of ``table`` joins the seeds
    the earlier output holds for it (those outside ``--seeds`` too), and rows of other tasks
    and algorithms stay as they were recorded. ``table`` came through :func:`merge`, so a
    seed in both has the same curve."""
    results = {task: dict(rows) for _, earlier in recorded for task, rows in earlier.items()}
    for task, rows in table.items():
        for algorithm, entry in rows.items():
            earlier = results.setdefault(task, {}).get(algorithm, {"curves": {}})
            curves = {int(seed): [tuple(point) for point in curve] for seed, curve in earlier["curves"].items()}
            curves.update(entry["curves"])
            results[task][algorithm] = row(dict(sorted(curves.items())))
    return results


def merge(table: dict, recorded: list[tuple[str, dict]], args: argparse.Namespace) -> dict:
    """``table`` with the seeds of earlier JSON outputs (:func:`read_recorded`: runs made in
    other trees or MLflow stores) added, for the chosen tasks, algorithms and seeds. The
    same seed found twice with different curves is refused."""
    curves: dict = {task: {algorithm: dict(entry["curves"]) for algorithm, entry in rows.items()}
                    for task, rows in table.items()}
    for path, results in recorded:
        for task, rows in results.items():
            for algorithm, entry in rows.items():
                if task not in args.tasks or algorithm not in args.algorithms:
                    continue
                known = curves.setdefault(task, {}).setdefault(algorithm, {})
                for seed, curve in entry["curves"].items():
                    seed, curve = int(seed), [tuple(point) for point in curve]
                    if seed not in args.seeds:
                        continue
                    if seed in known and known[seed] != curve:
                        raise SystemExit(f"{task} {algorithm} seed {seed} is recorded twice with different "
                                         f"curves (in {path} and an earlier source); keep one of them")
                    known[seed] = curve
    return {task: {algorithm: row(dict(sorted(seeds.items()))) for algorithm in args.algorithms
                   if (seeds := rows.get(algorithm))}
            for task in args.tasks if (rows := curves.get(task))}


def markdown(table: dict, steps: int) -> str:
    lines = [f"| task | algorithm | seeds | final return at {steps // 1000}k steps (mean ± std) | mean of last 3 evaluations |",
             "|---|---|---|---|---|"]
    for task, rows in table.items():
        for algorithm, row in rows.items():
            lines.append(f"| {task} | {label(algorithm)} | {row['seeds']} | {row['final_mean']:.0f} ± {row['final_std']:.0f} "
                         f"| {row['last3_mean']:.0f} |")
    return "\n".join(lines)


def plot(table: dict, path: Path) -> None:
    """Mean evaluation return over seeds against env steps (band: min to max), one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, axes = plt.subplots(1, len(table), figsize=(5 * len(table), 3.6), squeeze=False)
    order = list(dict.fromkeys(algorithm for rows in table.values() for algorithm in rows))  # one colour each
    for axis, (task, rows) in zip(axes[0], table.items()):
        for algorithm, row in rows.items():
            colour = f"C{order.index(algorithm) % 10}"
            # seeds share the evaluation cadence; keep the steps every seed reached
            common = sorted(set.intersection(*(set(dict(curve)) for curve in row["curves"].values())))
            values = [[dict(curve)[step] for step in common] for curve in row["curves"].values()]
            mean = [statistics.fmean(column) for column in zip(*values)]
            axis.plot(common, mean, color=colour,
                      label=f"{label(algorithm)} ({row['seeds']} seed{'s' if row['seeds'] > 1 else ''})")
            axis.fill_between(common, [min(c) for c in zip(*values)], [max(c) for c in zip(*values)], color=colour,
                              alpha=0.2)
        axis.set_title(task)
        axis.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1000:.0f}k"))
        axis.set_xlabel("env steps")
        axis.set_ylabel("evaluation return")
        axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tasks", nargs="+", default=["halfcheetah", "hopper"],
                        choices=["halfcheetah", "hopper", "walker2d", "ant"])
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), type=algorithm_token,
                        help="rud, td3, ddpg, sb3-td3 (Stable-Baselines3's TD3), rud:N (update_interval N); "
                             "raysmith's with a +bf16 suffix: bfloat16 hidden products")
    parser.add_argument("--eval-every", type=int, default=10_000)
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--tracking-uri", default=f"sqlite:///{ROOT / 'benchmarks' / 'results' / 'rl_learning.db'}")
    parser.add_argument("--output-dir", default=str(ROOT / "benchmarks" / "results" / "rl_learning_runs"))
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "rl_learning.json"))
    parser.add_argument("--plot", help="also draw the learning curves to this PNG")
    parser.add_argument("--summary-only", action="store_true")
    parser.add_argument("--merge", nargs="+", default=[], metavar="JSON",
                        help="also take the seeds recorded in these earlier JSON outputs")
    parser.add_argument("--sb3-worker", nargs=2, metavar=("TASK", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sb3_worker:
        os.environ.setdefault("MLFLOW_TRACKING_URI", args.tracking_uri)
        sb3_td3(args.sb3_worker[0], int(args.sb3_worker[1]), args)
        return
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    output = read_output(args.json, args.steps)
    recorded = read_recorded(args.merge, args.steps) + output

    if not args.summary_only:
        done = finished_runs(args.tracking_uri)
        todo = [(a, t, s) for s in args.seeds for t in args.tasks for a in args.algorithms
                if run_name(a, t, s, args.steps) not in done]
        print(f"{len(todo)} run(s) to do, {args.parallel} at a time", flush=True)
        threads = 1 if args.parallel > 1 else 0
        with ThreadPoolExecutor(max_workers=args.parallel) as pool:
            for name, code, seconds in pool.map(lambda job: launch(*job, args, threads), todo):
                print(f"  {name}: {'ok' if code == 0 else f'FAILED ({code})'} in {seconds / 60:.1f} min", flush=True)

    table = summarise(args)
    if recorded:
        table = merge(table, recorded, args)
    results = accumulate(output, table)
    seeds = sorted({int(seed) for rows in results.values() for entry in rows.values() for seed in entry["curves"]})
    Path(args.json).write_text(json.dumps({"steps": args.steps, "seeds": seeds, "results": results}, indent=1))
    print(markdown(table, args.steps))
    if args.plot and table:
        plot(table, Path(args.plot))


if __name__ == "__main__":
    main()
