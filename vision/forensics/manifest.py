"""Forgery datasets as rows: ``path``, ``label`` (0 real, 1 fake), ``video_id``, ``method``, ``split``.

Two layouts are read:

- a **parquet manifest** (a file, or a folder of files) with those columns; ``label`` may be
  0/1 or a name (``real``/``fake`` or a method name), ``split`` and ``method`` are optional;
- **DeepfakeBench's dataset JSON** (``preprocessing/dataset_json/<dataset>.json``):
  ``{dataset: {label name: {split: {video: {"label", "frames": [...]}}}}}``, with one more
  level, the compression (``c23``, ``c40``, ``raw``), for the FaceForensics++ family. A label
  name is real when it ends in ``real`` (``FF-real``, ``CelebDFv2_real``, ``DFDC_Real``),
  fake otherwise (``FF-DF``, ``CelebDFv2_fake``...), as in DeepfakeBench's ``label_dict``;
  the label name is the row's ``method``.

Relative frame paths are resolved against ``root`` (default: the manifest's folder).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

COLUMNS = ("path", "label", "video_id", "method", "split")


def label_of(name: Any) -> int:
    """0 (real) or 1 (fake) from a manifest's label: the numbers 0/1 (ints, floats, bools,
    numpy scalars, "0"/"1"), or a label name: names ending in 'real' (any case) are real,
    other names fake. Anything else (None, 2, 0.5, "") is refused, naming what is allowed."""
    allowed = "0/1 (real/fake) or a label name such as 'FF-real' or 'FF-DF'"
    if name is None:
        raise ValueError(f"a label is missing; labels are {allowed}")
    if hasattr(name, "item") and not isinstance(name, (str, bytes)):
        name = name.item()  # numpy scalars
    if isinstance(name, (bool, int, float)):
        if float(name) in (0.0, 1.0):
            return int(name)
        raise ValueError(f"label {name!r} is neither 0 nor 1; labels are {allowed}")
    text = str(name).strip()
    if not text or text.lstrip("+-").replace(".", "", 1).isdigit():
        if text and float(text) in (0.0, 1.0):
            return int(float(text))
        raise ValueError(f"label {name!r} is not allowed; labels are {allowed}")
    return 0 if text.lower().endswith("real") else 1


def _resolve(path: str, root: Path) -> str:
    if "://" in path or Path(path).is_absolute():
        return path
    return str(root / path)


def read_parquet_manifest(path: str | Path, root: str | Path | None = None) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    table = pq.read_table(str(path))
    missing = [column for column in ("path", "label") if column not in table.column_names]
    if missing:
        raise ValueError(f"{path}: the manifest has no {' or '.join(missing)} column; columns: {', '.join(table.column_names)}")
    base = Path(root) if root is not None else (Path(path) if Path(path).is_dir() else Path(path).parent)
    rows = []
    for number, row in enumerate(table.to_pylist()):
        label_name = row["label"]
        try:
            label_of(label_name)
        except ValueError as err:
            raise ValueError(f"{path}, row {number} ({row['path']}): {err}") from None
        rows.append({
            "path": _resolve(str(row["path"]), base),
            "label": label_of(label_name),
            "video_id": str(row.get("video_id") if row.get("video_id") is not None else row["path"]),
            "method": str(row.get("method") or ("real" if label_of(label_name) == 0 else
                                                 (label_name if isinstance(label_name, str) else "fake"))),
            "split": str(row.get("split") or ""),
        })
    return rows


def read_deepfakebench_json(path: str | Path, split: str | None = None, compression: str | None = None,
                            root: str | Path | None = None, labels: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Rows of a DeepfakeBench JSON; ``split`` (train/val/test) and ``labels`` (label names)
    select; ``compression`` picks the level of FaceForensics++-style files (required there)."""
    data = json.loads(Path(path).read_text())
    base = Path(root) if root is not None else Path(path).parent
    wanted = set(labels) if labels is not None else None
    rows = []
    for dataset, by_label in data.items():
        for label_name, by_split in by_label.items():
            if wanted is not None and label_name not in wanted:
                continue
            for split_name, level in by_split.items():
                if split is not None and split_name != split:
                    continue
                videos = level
                if videos and all(isinstance(v, dict) and "frames" not in v for v in videos.values()):
                    # FaceForensics++ family: one more level, the compression
                    if compression is None:
                        raise ValueError(f"{path}: {dataset}/{label_name}/{split_name} is split by compression "
                                         f"({', '.join(videos)}); set the compression")
                    if compression not in videos:
                        raise ValueError(f"{path}: {dataset}/{label_name}/{split_name} has no compression "
                                         f"'{compression}'; it has {', '.join(videos)}")
                    videos = videos[compression]
                for video, entry in videos.items():
                    label = label_of(entry.get("label", label_name))
                    for frame in entry["frames"]:
                        rows.append({"path": _resolve(frame, base), "label": label, "video_id": f"{label_name}/{video}",
                                     "method": "real" if label == 0 else label_name, "split": split_name})
    return rows


def write_parquet_manifest(rows: list[dict[str, Any]], path: str | Path, root: str | Path | None = None) -> Path:
    """Write rows (paths relative to ``root`` when they lie under it) as a parquet manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = Path(root).resolve() if root is not None else None
    columns: dict[str, list] = {column: [] for column in COLUMNS}
    for row in rows:
        location = row["path"]
        if base is not None:
            try:
                location = str(Path(location).resolve().relative_to(base))
            except ValueError:
                pass
        columns["path"].append(location)
        for column in COLUMNS[1:]:
            columns[column].append(row[column])
    pq.write_table(pa.table(columns), str(path))
    return Path(path)


def write_deepfakebench_json(rows: list[dict[str, Any]], path: str | Path, dataset: str, root: str | Path) -> Path:
    """The rows in DeepfakeBench's layout (label name = ``<dataset>_real`` or the method)."""
    base = Path(root).resolve()
    data: dict[str, Any] = {dataset: {}}
    for row in rows:
        name = f"{dataset}_real" if row["label"] == 0 else f"{dataset}_{row['method']}"
        video = data[dataset].setdefault(name, {}).setdefault(row["split"], {}).setdefault(
            row["video_id"], {"label": name, "frames": []})
        video["frames"].append(str(Path(row["path"]).resolve().relative_to(base)))
    Path(path).write_text(json.dumps(data, indent=1))
    return Path(path)
