"""watermark-eval's Ray Data grid against a single-process loop over the same grid.

Both run ``watermark_peers_photos.yaml``'s attacks for the same methods (dwtDct, dwtDctSvd and
a tiny MBRS with random weights by default: the speed does not depend on the weights) over
the same held-out photo crops: the loop calls the pipeline's own grid worker on every image
in this process (torch and NumPy with their default threads); the pipeline runs it on an
actor pool of ``--actors`` actors on a local Ray with ``--cpus`` CPUs (start-up of Ray
excluded, the actor pool's included). Medians over ``--repeats`` round-robin repeats.

    python benchmarks/watermark_eval_speed.py --images 24 --repeats 3
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
    parser.add_argument("--images", type=int, default=24)
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

    def loop() -> float:
        started = time.perf_counter()
        worker = GridWorker(spec.model_dump(mode="json"), threads=torch.get_num_threads())
        rows = 0
        for start in range(0, len(paths), spec.inference.batch_size):
            chunk = paths[start: start + spec.inference.batch_size]
            out = worker({"index": list(range(start, start + len(chunk))), "path": chunk})
            rows += len(out["path"])
        assert rows == len(paths) * len(spec.methods) * sum(len(a.strengths) for a in spec.attacks)
        return time.perf_counter() - started

    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="warning")
    run_grid(spec, paths[:2])  # warm Ray Data up
    times: dict[str, list[float]] = {"loop": [], "ray": []}
    for repeat in range(args.repeats):
        times["loop"].append(loop())
        started = time.perf_counter()
        frame = run_grid(spec, paths)
        times["ray"].append(time.perf_counter() - started)
        assert (frame["error"] == "").all()
        print(f"repeat {repeat + 1}: loop {times['loop'][-1]:.1f} s, ray {times['ray'][-1]:.1f} s", flush=True)
    ray.shutdown()
    loop_s, ray_s = statistics.median(times["loop"]), statistics.median(times["ray"])
    cells = len(spec.methods) * sum(len(a.strengths) for a in spec.attacks)
    print(f"\n{len(paths)} images x {cells} (method, attack, strength) cells:")
    print(f"  single-process loop ({torch.get_num_threads()} math threads): {len(paths) / loop_s:6.2f} images/s")
    print(f"  Ray Data, {args.cpus} CPUs, {args.actors} actors:        {len(paths) / ray_s:6.2f} images/s")
    print(f"  ratio: {loop_s / ray_s:.2f}x")


if __name__ == "__main__":
    main()
