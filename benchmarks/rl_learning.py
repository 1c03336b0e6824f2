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

``--parallel 2`` runs two at a time with one math thread each, which gets more env steps
per second out of 2 cores than one run with two threads (sampling is single-threaded).
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


def run_name(algorithm: str, task: str, seed: int, steps: int) -> str:
    return f"bench-{algorithm}-{task}-s{seed}-{steps // 1000}k"


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
    spec = ROOT / "pipelines" / "configs" / f"{algorithm}_{task}.yaml"
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
    command = [sys.executable, "-m", "pipelines", "run", str(spec)]
    for key, value in overrides.items():
        command += ["--set", f"{key}={value}"]
    environment = dict(os.environ, MLFLOW_TRACKING_URI=args.tracking_uri, PYTHONWARNINGS="ignore")
    if threads:
        environment.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log = Path(args.output_dir) / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with log.open("w") as handle:
        code = subprocess.call(command, cwd=ROOT, env=environment, stdout=handle, stderr=subprocess.STDOUT)
    return name, code, time.monotonic() - started


def summarise(args: argparse.Namespace) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(args.tracking_uri)
    runs = finished_runs(args.tracking_uri)
    table: dict = {}
    for task, algorithm in itertools.product(args.tasks, ALGORITHMS):
        finals, tails, curves = [], [], {}
        for seed in args.seeds:
            run_id = runs.get(run_name(algorithm, task, seed, args.steps))
            if run_id is None:
                continue
            history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "evaluation/return_mean"))
            curves[seed] = history
            finals.append(history[-1][1])
            tails.append(statistics.fmean(value for _, value in history[-3:]))
        if finals:
            table.setdefault(task, {})[algorithm] = {
                "seeds": len(finals),
                "final_mean": statistics.fmean(finals),
                "final_std": statistics.pstdev(finals) if len(finals) > 1 else 0.0,
                "last3_mean": statistics.fmean(tails),
                "finals": finals,
                "curves": curves,
            }
    return table


def markdown(table: dict, steps: int) -> str:
    lines = [f"| task | algorithm | seeds | final return at {steps // 1000}k steps (mean ± std) | mean of last 3 evaluations |",
             "|---|---|---|---|---|"]
    for task, rows in table.items():
        for algorithm, row in rows.items():
            lines.append(f"| {task} | {algorithm.upper()} | {row['seeds']} | {row['final_mean']:.0f} ± {row['final_std']:.0f} "
                         f"| {row['last3_mean']:.0f} |")
    return "\n".join(lines)


def plot(table: dict, path: Path) -> None:
    """Mean evaluation return over seeds against env steps (band: min to max), one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, axes = plt.subplots(1, len(table), figsize=(5 * len(table), 3.6), squeeze=False)
    for axis, (task, rows) in zip(axes[0], table.items()):
        for algorithm, row in rows.items():
            # seeds share the evaluation cadence; keep the steps every seed reached
            common = sorted(set.intersection(*(set(dict(curve)) for curve in row["curves"].values())))
            values = [[dict(curve)[step] for step in common] for curve in row["curves"].values()]
            mean = [statistics.fmean(column) for column in zip(*values)]
            axis.plot(common, mean, label=f"{algorithm.upper()} ({row['seeds']} seed{'s' if row['seeds'] > 1 else ''})")
            axis.fill_between(common, [min(c) for c in zip(*values)], [max(c) for c in zip(*values)], alpha=0.2)
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
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    parser.add_argument("--eval-every", type=int, default=10_000)
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--tracking-uri", default=f"sqlite:///{ROOT / 'benchmarks' / 'results' / 'rl_learning.db'}")
    parser.add_argument("--output-dir", default=str(ROOT / "benchmarks" / "results" / "rl_learning_runs"))
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "rl_learning.json"))
    parser.add_argument("--plot", help="also draw the learning curves to this PNG")
    parser.add_argument("--summary-only", action="store_true")
    args = parser.parse_args()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)

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
    Path(args.json).write_text(json.dumps({"steps": args.steps, "seeds": args.seeds, "results": table}, indent=1))
    print(markdown(table, args.steps))
    if args.plot and table:
        plot(table, Path(args.plot))


if __name__ == "__main__":
    main()
