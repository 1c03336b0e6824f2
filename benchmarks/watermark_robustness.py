"""MBRS, the HiDDeN-style baseline and invisible-watermark's three methods under attacks.

1. Trains MBRS (``watermark_mbrs_tiny.yaml``: SE blocks, per-mini-batch noise real JPEG
   Q50 / JpegMask / identity) and the HiDDeN-style baseline (the same spec with
   ``model.preset=hidden_tiny`` and one noise layer, the differentiable JPEG at Q50) with the
   ``watermark-train`` pipeline, ``--epochs`` each.
2. Runs the ``watermark-eval`` grid (``watermark_peers_photos.yaml``'s attacks) on crops of
   bundled photographs that neither model trained on, for the two models and dwtDct,
   dwtDctSvd and RivaGAN.
3. Prints, per method, PSNR, SSIM and the bit error rate under each attack.

Sizes differ by necessity: the tiny models work at 32 x 32 with 16 bits (what 2 CPU cores
train in minutes), invisible-watermark refuses images under 256 x 256 and carries 32 bits;
each method sees the same held-out crops brought to its size.

    python benchmarks/watermark_robustness.py --epochs 10 --images 24
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--steps-per-epoch", type=int, default=100)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--peers", nargs="*", default=["dwtDct", "dwtDctSvd", "rivaGan"])
    args = parser.parse_args()

    import pandas as pd
    import ray
    from mlflow.tracking import MlflowClient

    from pipelines.runner import run_local
    from pipelines.spec import load_spec

    configs = ROOT / "pipelines" / "configs"
    work = Path(tempfile.mkdtemp(prefix="raysmith-watermark-bench-"))
    tracking = f"tracking.uri=sqlite:///{work}/mlflow.db"
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    common = [tracking, f"output_dir={work}/runs", f"train.epochs={args.epochs}",
              f"train.steps_per_epoch={args.steps_per_epoch}"]
    checkpoints = {}
    for label, extra in (("mbrs", []), ("hidden", ["model.preset=hidden_tiny", "noise=[{diff_jpeg: {quality: 50}}]",
                                                    "name=watermark-hidden-tiny"])):
        outcome = run_local(load_spec(configs / "watermark_mbrs_tiny.yaml", common + extra))
        checkpoints[label] = outcome.summary["method_checkpoint"]
        print(f"{label}: trained, {outcome.summary}", flush=True)
    methods = [f"{{name: mbrs, checkpoint: {checkpoints['mbrs']}}}", f"{{name: hidden, checkpoint: {checkpoints['hidden']}}}"]
    methods += [f"{{name: {peer}, message_length: 32}}" for peer in args.peers]
    grid = run_local(load_spec(configs / "watermark_peers_photos.yaml",
                               [tracking, f"output_dir={work}/runs", f"methods=[{', '.join(methods)}]",
                                f"data.count={args.images}"]))
    ray.shutdown()
    folder = MlflowClient(grid.tracking_uri).download_artifacts(grid.run_id, "results", str(work / "artifacts"))
    summary = pd.read_csv(f"{folder}/summary.csv")
    summary["cell"] = summary["attack"] + " " + summary["strength"].map(lambda v: f"{v:g}")
    table = summary.pivot_table(index="method", columns="cell", values="ber")
    quality = summary.groupby("method")[["size", "psnr", "ssim"]].mean()
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 40)
    print(f"\nheld-out crops: {args.images}; PSNR (dB), SSIM of the watermarked images, and BER per attack:")
    print(quality.round(3).to_string())
    print(table.round(4).T.to_string())
    print(f"\nresults: {folder}")


if __name__ == "__main__":
    main()
