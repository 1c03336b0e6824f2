"""Xception vs SPSL vs MAT: trained on one family of generated fakes, scored on every family.

The data is :func:`vision.forensics.synthetic.generate`'s (real crops of the photographs
scikit-image and scikit-learn ship; fakes by nearest, bilinear and transposed-convolution
up-sampling through random decoders, and by blended face swaps). Each detector is trained
at the same budget (epochs, batch size, optimiser, learning-rate schedule) with the loss
and class-balanced sampler of the ``forgery-train`` pipeline (``detector_loss``,
``balanced_indices``), in this process, then scored on the test split of every family
against the test split's real frames. Printed: frame AUC per detector and family, mean ±
std over seeds; within-family is the training family's column.

    python benchmarks/forgery_transfer.py --train-method transposed --seeds 0 1 2
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


def load(rows, size):
    import numpy as np
    import torch

    from pipelines.forgery import read_frame

    frames = []
    for row in rows:
        image, error = read_frame(row["path"], size)
        if error:
            raise RuntimeError(f"{row['path']}: {error}")
        frames.append(image)
    pixels = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float().div_(255.0)
    return pixels, torch.tensor([row["label"] for row in rows])


def train_and_score(detector: str, seed: int, train, tests, epochs: int, batch_size: int, lr: float) -> dict:
    import torch

    from pipelines.forgery import balanced_indices
    from vision.data import random_flip
    from vision.forensics import build_detector
    from vision.forensics.metrics import roc_auc
    from vision.forensics.training import detector_loss, fake_probability, make_regional_loss
    from vision.training import learning_rate, parameter_groups

    pixels, labels = train
    torch.manual_seed(seed)
    model = build_detector(detector)
    regional = make_regional_loss(model)
    optimizer = torch.optim.AdamW(parameter_groups(model, 5e-4), lr=lr)
    steps_per_epoch = len(labels) // batch_size
    total, step = epochs * steps_per_epoch, 0
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        for batch in balanced_indices(labels.tolist(), steps_per_epoch * batch_size, seed, epoch).split(batch_size):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, total, round(0.5 * steps_per_epoch), lr, 1e-6)
            loss, _ = detector_loss(model, random_flip(pixels[batch], generator), labels[batch], regional,
                                    generator=generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        if regional is not None:
            regional.decay_momentum(0.9)
    seconds = time.perf_counter() - started
    scores = {}
    for family, (test_pixels, test_labels) in tests.items():
        probabilities = torch.cat([fake_probability(model, chunk) for chunk in test_pixels.split(256)])
        scores[family] = roc_auc(test_labels.numpy(), probabilities.numpy())
    return {"detector": detector, "seed": seed, "train_seconds": round(seconds, 1), "auc": scores}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detectors", nargs="+", default=["xception_tiny", "spsl_tiny", "mat_tiny"])
    parser.add_argument("--train-method", default="transposed")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--videos-per-method", type=int, default=60)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", default="raysmith_data/forgery")
    args = parser.parse_args()

    import torch

    from pipelines.forgery import GeneratedData, ensure_generated
    from vision.forensics.manifest import read_parquet_manifest
    from vision.forensics.synthetic import METHODS

    torch.set_num_threads(args.threads)
    settings = GeneratedData(videos_per_method=args.videos_per_method, size=args.size, directory=args.data_dir)
    rows = read_parquet_manifest(ensure_generated(settings))
    train_rows = [r for r in rows if r["split"] == "train" and r["method"] in ("real", args.train_method)]
    train = load(train_rows, args.size)
    tests = {}
    test_reals = [r for r in rows if r["split"] == "test" and r["label"] == 0]
    for family in METHODS:
        tests[family] = load(test_reals + [r for r in rows if r["split"] == "test" and r["method"] == family], args.size)
    print(f"train: {len(train_rows)} frames (real + {args.train_method}); test per family: "
          f"{len(test_reals)} real + fakes; {args.epochs} epochs, batch {args.batch_size}", flush=True)
    results = []
    for seed in args.seeds:
        for detector in args.detectors:
            result = train_and_score(detector, seed, train, tests, args.epochs, args.batch_size, args.lr)
            results.append(result)
            print(json.dumps(result), flush=True)
    print(f"\nframe AUC, trained on {args.train_method}, mean ± std over seeds {args.seeds}:")
    print(f"  {'detector':16s}" + "".join(f"{family + (' *' if family == args.train_method else ''):>18s}" for family in METHODS))
    for detector in args.detectors:
        cells = []
        for family in METHODS:
            values = [r["auc"][family] for r in results if r["detector"] == detector]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} ± {spread:.3f}")
        print(f"  {detector:16s}" + "".join(f"{cell:>18s}" for cell in cells))
    print("  (* the training family)")


if __name__ == "__main__":
    main()
