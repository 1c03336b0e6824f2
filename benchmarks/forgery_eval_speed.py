"""forgery-eval's Ray Data pipeline against a single-process loop over the same frames and model.

Both score the same frames (PNG files of a generated dataset, every split) with the same
detector and batch size, from reading the files to P(fake) per frame:

- **loop**: one process reads and decodes a batch of files, then runs the model on it
  (torch with ``--loop-threads`` math threads, default all cores), batch after batch;
- **ray**: :func:`pipelines.forgery.evaluate_rows` on a local Ray with ``--cpus`` CPUs: an
  actor pool of ``--actors`` actors (one math thread each, the model loaded once per actor)
  that read, decode and score their batches (``in_actors``), and the variant with separate
  Ray Data decoding tasks feeding the actors (``tasks``).

The frames are the generated dataset's, listed ``--copies`` times (an evaluation set of
realistic size: FF++'s test split is ~4,500 frames at 32 per video). The timed Ray figures
exclude Ray's start-up but include starting the actor pool and loading the model. Each is run
``--repeats`` times, round robin; medians and ratios printed.

    python benchmarks/forgery_eval_speed.py --detector xception_tiny --copies 4 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def loop(rows, checkpoint: str, size: int, batch_size: int, threads: int) -> float:
    import numpy as np
    import torch

    from pipelines.forgery import load_detector, read_frame
    from vision.forensics.training import fake_probability

    torch.set_num_threads(threads)
    started = time.perf_counter()
    model, _ = load_detector(checkpoint)
    scores = []
    for start in range(0, len(rows), batch_size):
        frames = [read_frame(row["path"], size)[0] for row in rows[start: start + batch_size]]
        pixels = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float().div_(255.0)
        scores.append(fake_probability(model, pixels))
    assert sum(len(s) for s in scores) == len(rows)
    return time.perf_counter() - started


def with_ray(rows, checkpoint: str, size: int, batch_size: int, actors: int, decode: str, cpus: int) -> float:
    from pipelines.forgery import InferenceSettings, evaluate_rows

    decode_cpus = 0.25
    per_actor = (cpus - decode_cpus) / actors if decode == "tasks" else cpus / actors
    settings = InferenceSettings(actors=actors, cpus_per_actor=per_actor, batch_size=batch_size, decode=decode,
                                 decode_cpus=decode_cpus)
    started = time.perf_counter()
    frame = evaluate_rows(rows, checkpoint, size, settings)
    assert len(frame) == len(rows) and (frame["error"] == "").all()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detector", default="xception_tiny")
    parser.add_argument("--size", type=int, default=128, help="frames are generated and scored at this size")
    parser.add_argument("--videos-per-method", type=int, default=60)
    parser.add_argument("--copies", type=int, default=4, help="score the dataset's frames this many times over")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--loop-threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", default="raysmith_data/forgery")
    args = parser.parse_args()

    import ray
    import torch

    from pipelines.forgery import GeneratedData, ensure_generated
    from vision.forensics import build_detector
    from vision.forensics.manifest import read_parquet_manifest

    rows = read_parquet_manifest(ensure_generated(GeneratedData(
        videos_per_method=args.videos_per_method, size=args.size, directory=args.data_dir))) * args.copies
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = str(Path(directory) / "state.pt")
        torch.manual_seed(0)
        torch.save({"detector": args.detector, "model": build_detector(args.detector).state_dict(),
                    "image_size": args.size}, checkpoint)
        ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="warning")
        with_ray(rows[: args.batch_size * 2], checkpoint, args.size, args.batch_size, args.actors, "in_actors",
                 args.cpus)  # warm Ray Data up
        times: dict[str, list[float]] = {"loop": [], "in_actors": [], "tasks": []}
        for repeat in range(args.repeats):
            times["loop"].append(loop(rows, checkpoint, args.size, args.batch_size, args.loop_threads))
            for decode in ("in_actors", "tasks"):
                times[decode].append(with_ray(rows, checkpoint, args.size, args.batch_size, args.actors, decode, args.cpus))
            print(f"repeat {repeat + 1}: " + ", ".join(f"{name} {values[-1]:.2f} s" for name, values in times.items()),
                  flush=True)
        ray.shutdown()
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"\n{len(rows)} frames of {args.size} px, {args.detector}, batch {args.batch_size}:")
    print(f"  single-process loop ({args.loop_threads} math threads):        {len(rows) / medians['loop']:8.1f} frames/s")
    for decode in ("in_actors", "tasks"):
        print(f"  Ray Data, {args.cpus} CPUs, {args.actors} actors, decode {decode:9s}: "
              f"{len(rows) / medians[decode]:8.1f} frames/s  ({medians['loop'] / medians[decode]:.2f}x the loop)")


if __name__ == "__main__":
    main()
