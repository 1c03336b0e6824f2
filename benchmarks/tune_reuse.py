"""Tune searches over RUD with trial processes reused against a fresh process per trial start.

A PBT exploit restores another trial's checkpoint with perturbed hyperparameters, and a
search with more trials than slots starts a trial whenever one ends. Tune's default
(``TuneConfig.reuse_actors=False``) starts a new Ray worker for each, which imports torch
and RLlib again before it trains. The ``rl`` kind reuses trial processes
(``Pipeline.reuse_trial_processes``): the pipeline stops its algorithm and the same process
restores the checkpoint or runs the next trial.

Both variants run the shipped ``pipelines/configs/pbt_rud_halfcheetah.yaml`` scaled down
(:func:`overrides`, ``update_interval`` fixed at 500), in one run on this machine,
alternating, each in a fresh working directory. Printed per variant: median wall time of
the whole search, trial processes started (distinct ``pid`` in Tune's results), PBT
exploits (lines of ``pbt_global.txt``), and the ratio of the wall times. PBT's exploits
depend on how the trials learn, so their number differs between runs; ``--scheduler fifo``
(trials two at a time, no scheduler) starts a fixed number of trials.

    python benchmarks/tune_reuse.py                            # PBT: 2 trials, 6,000 env steps each
    python benchmarks/tune_reuse.py --scheduler fifo --trials 6 --env-steps 2000
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPEC = ROOT / "pipelines" / "configs" / "pbt_rud_halfcheetah.yaml"


def overrides(env_steps: int, interval: int, trials: int, scheduler: str) -> list[str]:
    return [
        f"stop.env_steps={env_steps}",
        "training.learning_starts=1000",
        "training.update_interval=500",
        "training.checkpoint_replay_buffer=false",
        f"evaluation.every_env_steps={interval}",
        "evaluation.episodes=1",
        "checkpoint.every_iterations=1000",
        f"search.num_samples={trials}",
        "search.max_concurrent_trials=2",
    ] + ([f"search.scheduler.perturbation_interval={interval}", "search.scheduler.quantile_fraction=0.5"]
         if scheduler == "pbt" else ["search.scheduler=fifo"])


def scaled_spec(folder: Path) -> Path:
    """The shipped spec with ``update_interval`` fixed (not searched), so every trial reports
    at every perturbation point."""
    from pipelines.spec import read_yaml_file

    data, _ = read_yaml_file(SPEC)
    data["search"]["space"].pop("training.update_interval")
    path = folder / SPEC.name
    path.write_text(json.dumps(data))  # JSON is YAML
    return path


def run_once(reuse: bool, args: argparse.Namespace) -> dict[str, float]:
    from pipelines.rl import RLPipeline
    from pipelines.search import run_search
    from pipelines.spec import load_spec

    RLPipeline.reuse_trial_processes = reuse
    folder = Path(tempfile.mkdtemp(prefix="tune-reuse-"))
    os.chdir(folder)
    loaded = load_spec(scaled_spec(folder), overrides(args.env_steps, args.interval, args.trials, args.scheduler))
    started = time.perf_counter()
    outcome = run_search(loaded)
    wall = time.perf_counter() - started
    if outcome.errors or outcome.unfinished:
        raise SystemExit(f"the search had {outcome.errors} errored and {outcome.unfinished} unfinished trials")
    experiment = Path(outcome.experiment_dir)
    # both of Tune's per-trial logs: a restart from a checkpoint can lose result.json lines that
    # progress.csv kept (tests/test_schedulers.py::trial_reports says how)
    pids = {int(json.loads(line)["pid"]) for result in experiment.glob("*/result.json")
            for line in result.read_text().splitlines() if line.strip()}
    for progress in experiment.glob("*/progress.csv"):
        with open(progress, newline="") as rows:
            pids |= {int(row["pid"]) for row in csv.DictReader(rows)}
    exploits = sum(1 for line in (experiment / "pbt_global.txt").read_text().splitlines() if line.strip()) \
        if (experiment / "pbt_global.txt").exists() else 0
    return {"wall_s": wall, "processes": len(pids), "exploits": exploits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scheduler", choices=("pbt", "fifo"), default="pbt",
                        help="fifo: trials one after another, two at a time (a fixed number of trial starts)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--env-steps", type=int, default=6000, help="per trial")
    parser.add_argument("--interval", type=int, default=1000, help="PBT perturbation interval (env steps)")
    args = parser.parse_args()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    runs: dict[str, list[dict[str, float]]] = {"reused": [], "fresh": []}
    for round_index in range(args.rounds):
        for name in ("fresh", "reused") if round_index % 2 else ("reused", "fresh"):
            row = run_once(name == "reused", args)
            runs[name].append(row)
            print(f"round {round_index}: {name}: {row['wall_s']:.1f} s, {row['processes']} trial processes, "
                  f"{row['exploits']} exploits", flush=True)
    what = f"perturbation every {args.interval} steps" if args.scheduler == "pbt" else "no scheduler, 2 at a time"
    print(f"\n{args.scheduler.upper()} search over RUD, {args.trials} trials x {args.env_steps} HalfCheetah-v5 "
          f"steps, {what}, {args.rounds} rounds (medians):")
    medians = {}
    for name, rows in runs.items():
        medians[name] = statistics.median(r["wall_s"] for r in rows)
        walls = ", ".join(f"{r['wall_s']:.1f}" for r in rows)
        processes = ", ".join(str(r["processes"]) for r in rows)
        exploits = ", ".join(str(r["exploits"]) for r in rows)
        print(f"  {name:7s} {medians[name]:7.1f} s  (runs {walls}; trial processes {processes}; exploits {exploits})")
    print(f"  fresh / reused wall time: {medians['fresh'] / medians['reused']:.2f}x")


if __name__ == "__main__":
    main()
