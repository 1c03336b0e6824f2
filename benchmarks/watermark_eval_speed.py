"""watermark-eval's Ray Data grid against a single-process loop over the same grid.

Both run ``watermark_peers_photos.yaml``'s attacks for the same methods (dwtDct, dwtDctSvd and
a tiny MBRS with random weights by default: the speed does not depend on the weights) over
the same held-out photo crops: the loop calls the pipeline's own grid worker on every image
in this process (torch and NumPy with their default threads); the pipeline runs it on an
actor pool of ``--actors`` actors on a local Ray with ``--cpus`` CPUs (start-up of Ray
excluded, the actor pool's included). Medians over ``--repeats`` round-robin repeats.

Two figures come out. End to end: images / wall time of the whole run, the pool's start-up
included (Ray Data starting the actors' processes, the actors importing torch and building
the methods: ~3 s here). Steady state: each side also runs the first ``--small`` images, and
the rate is the added images over the added time, ``(images - small) / (t(images) -
t(small))``: the throughput a long evaluation approaches, with the fixed cost
(``t(images) - images / rate``) printed beside it.

    python benchmarks/watermark_eval_speed.py --images 64 --small 16 --repeats 3
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--small", type=int, default=16, help="the smaller run for the steady-state rate (0: none)")
    parser.add_argument("--methods", nargs="+", default=["dwtDct", "dwtDctSvd", "mbrs"])
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, help="images per actor call (default: the spec's)")
    args = parser.parse_args()

    import ray
    import torch

    from pipelines.spec import load_spec
    from pipelines.watermark import GridWorker, image_paths, run_grid
    from vision.watermark.mbrs import mbrs_tiny
    from vision.watermark.methods import save_mbrs

    work = Path(tempfile.mkdtemp(prefix="raysmith-watermark-speed-"))
    torch.manual_seed(0)
    checkpoint = save_mbrs(mbrs_tiny(), work / "mbrs.pt")
    methods = [f"{{name: mbrs, checkpoint: {checkpoint}}}" if name == "mbrs" else f"{{name: {name}, message_length: 32}}"
               for name in args.methods]
    spec = load_spec(ROOT / "pipelines" / "configs" / "watermark_peers_photos.yaml",
                     [f"methods=[{', '.join(methods)}]", f"data.count={args.images}", f"inference.actors={args.actors}",
                      f"inference.cpus_per_actor={args.cpus / args.actors:g}"]
                     + ([f"inference.batch_size={args.batch_size}"] if args.batch_size else [])).spec
    paths = image_paths(spec.data)

    def loop(count: int) -> float:
        started = time.perf_counter()
        worker = GridWorker(spec.model_dump(mode="json"), threads=torch.get_num_threads())
        rows = 0
        for start in range(0, count, spec.inference.batch_size):
            chunk = paths[start: min(count, start + spec.inference.batch_size)]
            out = worker({"index": list(range(start, start + len(chunk))), "path": chunk})
            rows += len(out["path"])
        assert rows == count * len(spec.methods) * sum(len(a.strengths) for a in spec.attacks)
        return time.perf_counter() - started

    def pool(count: int) -> float:
        started = time.perf_counter()
        frame = run_grid(spec, paths[:count])
        elapsed = time.perf_counter() - started
        assert (frame["error"] == "").all() and len(frame) == count * len(spec.methods) * sum(
            len(a.strengths) for a in spec.attacks)
        return elapsed

    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="warning")
    run_grid(spec, paths[:2])  # warm Ray Data up
    sizes = [len(paths)] + ([args.small] if 0 < args.small < len(paths) else [])
    times: dict[tuple[str, int], list[float]] = {(side, size): [] for side in ("loop", "ray") for size in sizes}
    for repeat in range(args.repeats):
        for size in sizes:
            times["loop", size].append(loop(size))
            times["ray", size].append(pool(size))
        print(f"repeat {repeat + 1}: " + ", ".join(f"{side} {size} images {values[-1]:.1f} s"
                                                   for (side, size), values in times.items()), flush=True)
    ray.shutdown()
    median = {key: statistics.median(values) for key, values in times.items()}
    count = len(paths)
    cells = len(spec.methods) * sum(len(a.strengths) for a in spec.attacks)
    print(f"\n{count} images x {cells} (method, attack, strength) cells, batch size {spec.inference.batch_size}:")
    print(f"  end to end:   single-process loop ({torch.get_num_threads()} math threads) {count / median['loop', count]:6.2f} "
          f"images/s; Ray Data ({args.cpus} CPUs, {args.actors} actors) {count / median['ray', count]:6.2f} images/s; "
          f"ratio {median['loop', count] / median['ray', count]:.2f}x")
    if len(sizes) > 1 and all(median[side, count] > median[side, sizes[1]] for side in ("loop", "ray")):
        small = sizes[1]
        rate = {side: (count - small) / (median[side, count] - median[side, small]) for side in ("loop", "ray")}
        fixed = {side: median[side, count] - count / rate[side] for side in ("loop", "ray")}
        print(f"  steady state ({small} -> {count} images): loop {rate['loop']:6.2f} images/s (fixed "
              f"{fixed['loop']:.1f} s); Ray Data {rate['ray']:6.2f} images/s (fixed {fixed['ray']:.1f} s); "
              f"ratio {rate['ray'] / rate['loop']:.2f}x")


if __name__ == "__main__":
    main()
