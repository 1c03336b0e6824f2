"""Plots logged as run artifacts (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence


def plot_curves(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    target: Path,
    *,
    xlabel: str,
    title: str,
) -> Path:
    """One line per metric against its step, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4), dpi=110)
    for name, points in curves.items():
        ordered = sorted(points)
        xs = [p[0] for p in ordered]
        ys = [p[1] for p in ordered]
        axis.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=name)
    axis.set_xlabel(xlabel)
    axis.set_ylabel("value")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(loc="best")
    figure.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target)
    plt.close(figure)
    return target
