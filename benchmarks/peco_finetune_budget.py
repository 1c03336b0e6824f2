"""Fine-tuning at a longer budget from the MIM backbones a ``peco_tokens.py`` run left in MLflow.

``peco_tokens.py`` fine-tunes for 8 epochs; this reruns only the ``finetune`` stage (any stage
can be rerun alone) for ``--epochs`` epochs from (a) the perceptual-tokenizer MIM backbone,
(b) the pixel-tokenizer one, and (c) a randomly initialised ViT, each seed's own, and prints
the held-out accuracy per epoch budget.

    python benchmarks/peco_finetune_budget.py --db /tmp/peco-bench-XXXX/mlflow.db --seeds 0 --epochs 24
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIG = ROOT / "pipelines" / "configs" / "peco_tiny.yaml"


def mim_runs(client, seed: int) -> dict[str, str]:
    """{"a_perceptual" | "b_pixel": the MIM run id} of ``seed``, found by the tokenizer each read."""
    found = {}
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id], "tags.`raysmith.peco.stage` = 'mim'"):
            if run.data.params.get("seed") != str(seed) or run.info.status != "FINISHED":
                continue
            tokenizer_run = run.data.params["tokenizer"].split("/")[1]
            weight = float(client.get_run(tokenizer_run).data.params["perceptual.weight"])
            found["a_perceptual" if weight > 0 else "b_pixel"] = run.info.run_id
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", type=Path, required=True, help="the MLflow database peco_tokens.py wrote")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=24)
    args = parser.parse_args()

    import ray
    import yaml
    from mlflow.tracking import MlflowClient

    from pipelines.runner import run_local
    from pipelines.spec import load_spec

    uri = f"sqlite:///{args.db.resolve()}"
    client = MlflowClient(uri)
    work = Path(tempfile.mkdtemp(prefix="peco-finetune-"))
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    rows = []
    for seed in args.seeds:
        sources = {**mim_runs(client, seed), "c_scratch": None}
        chain = load_spec(CONFIG, [f"tracking.uri={uri}", f"output_dir={work}/runs", f"seed={seed}"]).spec
        for variant, run_id in sources.items():
            outputs = {"mim": f"runs:/{run_id}/model/backbone.pt"} if run_id else {}
            body = chain.stage_spec("finetune", outputs).model_dump(mode="json")
            body["train"]["epochs"] = args.epochs
            path = work / f"finetune-{variant}-{seed}.yaml"
            path.write_text(yaml.safe_dump(body))
            outcome = run_local(load_spec(path))
            history = client.get_metric_history(outcome.run_id, "val/accuracy")
            row = {"variant": variant, "seed": seed, "epochs": args.epochs, "from": run_id,
                   "val/accuracy": outcome.summary.get("val/accuracy"),
                   "curve": [round(point.value, 3) for point in sorted(history, key=lambda p: p.step)]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = ROOT / "benchmarks" / "results" / "peco_finetune_budget.json"
    out.write_text(json.dumps(rows, indent=1))
    print(f"rows: {out}")


if __name__ == "__main__":
    main()
