"""MBRS, the HiDDeN-style baseline and invisible-watermark's three methods under attacks.

1. Trains MBRS (``watermark_mbrs_tiny.yaml``: SE blocks, per-mini-batch noise real JPEG
   Q50 / JpegMask / identity) and the HiDDeN-style baseline (the same spec with
   ``model.preset=hidden_tiny`` and one noise layer, the differentiable JPEG at Q50) with the
   ``watermark-train`` pipeline, ``--epochs`` each.
   With ``--diffusion`` also MBRS's diffusion variant (``mbrs_tiny_diffusion``) trained for
   crops (``watermark_mbrs_tiny_diffusion.yaml``: MBRS's Crop, real JPEG Q50, identity).
   With ``--image-weights W ...`` also MBRS trained with the image loss weighted W instead of the
   paper's 1 (a model trained for a higher PSNR, not one scaled down after training).
2. Runs the ``watermark-eval`` grid (``watermark_peers_photos.yaml``'s attacks) on crops of
   bundled photographs that no model trained on, for the models and dwtDct, dwtDctSvd and
   RivaGAN. ``--strengths`` adds MBRS at lower embedding strengths (``mbrs-s0.3``: residual x
   0.3), which raises its PSNR, so it can be compared with the peers at equal PSNR.
3. Prints, per method, PSNR, SSIM and the bit error rate under each attack.

Sizes differ by necessity: the tiny models work at 32 x 32 with 16 bits (what 2 CPU cores
train in minutes), invisible-watermark refuses images under 256 x 256 and carries 32 bits;
each method sees the same held-out crops brought to its size.

    python benchmarks/watermark_robustness.py --epochs 10 --images 24
    python benchmarks/watermark_robustness.py --epochs 30 --images 24 --strengths 1 0.5 0.3 0.25 --diffusion \
        --image-weights 20 100
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
    parser.add_argument("--strengths", nargs="+", type=float, default=[1.0],
                        help="MBRS embedding strengths to evaluate (1 = as trained)")
    parser.add_argument("--diffusion", action="store_true", help="also train and evaluate the diffusion variant")
    parser.add_argument("--image-weights", nargs="*", type=float, default=[],
                        help="also train MBRS with each of these image-loss weights (the paper's is 1; higher "
                             "trades robustness for PSNR) and evaluate it as mbrs-wN")
    parser.add_argument("--checkpoints", nargs="*", default=[], metavar="MODEL=PATH",
                        help="skip training a model (mbrs, hidden, diffusion, w<weight>): evaluate this mbrs.pt instead")
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
    models = [("mbrs", "watermark_mbrs_tiny.yaml", []),
              ("hidden", "watermark_mbrs_tiny.yaml", ["model.preset=hidden_tiny", "noise=[{diff_jpeg: {quality: 50}}]",
                                                      "name=watermark-hidden-tiny"])]
    if args.diffusion:
        models.append(("diffusion", "watermark_mbrs_tiny_diffusion.yaml", []))
    for weight in args.image_weights:
        models.append((f"w{weight:g}", "watermark_mbrs_tiny.yaml", [f"train.image_weight={weight:g}",
                                                                   f"name=watermark-mbrs-tiny-w{weight:g}"]))
    given = {}
    for item in args.checkpoints:
        label, _, path = item.partition("=")
        if label not in [name for name, _, _ in models] or not path:
            parser.error(f"--checkpoints takes MODEL=PATH with MODEL one of {', '.join(n for n, _, _ in models)}; got {item!r}")
        given[label] = path
    for label, spec_file, extra in models:
        if label in given:
            checkpoints[label] = given[label]
            continue
        outcome = run_local(load_spec(configs / spec_file, common + extra))
        checkpoints[label] = outcome.summary["method_checkpoint"]
        print(f"{label}: trained, {outcome.summary}", flush=True)
    methods = [f"{{name: mbrs, checkpoint: {checkpoints['mbrs']}}}"]
    methods += [f"{{name: mbrs, checkpoint: {checkpoints['mbrs']}, strength: {strength:g}, label: mbrs-s{strength:g}}}"
                for strength in args.strengths if strength != 1.0]
    methods += [f"{{name: hidden, checkpoint: {checkpoints['hidden']}}}"]
    if args.diffusion:
        methods += [f"{{name: mbrs, checkpoint: {checkpoints['diffusion']}, label: mbrs-diffusion}}"]
    methods += [f"{{name: mbrs, checkpoint: {checkpoints[f'w{weight:g}']}, label: mbrs-w{weight:g}}}"
                for weight in args.image_weights]
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
