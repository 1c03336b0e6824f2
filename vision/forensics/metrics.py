"""Detection metrics as DeepfakeBench reports them, in numpy: label 1 = fake, score = P(fake).

- frame-level ROC AUC (the Mann-Whitney statistic; tied scores count one half),
- video-level AUC: each video's score is the mean of its frames' scores,
- EER: the error rate where the false-positive rate equals the miss rate on the ROC curve
  (interpolated linearly between the two ROC points that bracket it),
- average precision (step-wise, sklearn's definition),
- accuracy with the threshold 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


def _check(labels: Sequence[int], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=np.int64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"{y.size} labels but {s.size} scores")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 (real) or 1 (fake), got {sorted(set(y.tolist()) - {0, 1})[:5]}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinity")
    return y, s


def roc_curve(labels: Sequence[int], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false-positive rates, true-positive rates, thresholds), starting at (0, 0); one point
    per distinct score, thresholds falling."""
    y, s = _check(labels, scores)
    positives, negatives = int(y.sum()), int((1 - y).sum())
    if positives == 0 or negatives == 0:
        raise ValueError("the ROC curve needs both real (0) and fake (1) labels")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_each = np.r_[np.nonzero(np.diff(s))[0], y.size - 1]
    true_positives = np.cumsum(y)[last_of_each]
    false_positives = (last_of_each + 1) - true_positives
    fpr = np.r_[0.0, false_positives / negatives]
    tpr = np.r_[0.0, true_positives / positives]
    return fpr, tpr, np.r_[np.inf, s[last_of_each]]


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """P(score of a random fake > score of a random real) + 0.5 P(tie)."""
    y, s = _check(labels, scores)
    positives, negatives = int(y.sum()), int((1 - y).sum())
    if positives == 0 or negatives == 0:
        raise ValueError("AUC needs both real (0) and fake (1) labels")
    # average ranks handle ties: the Mann-Whitney U of the fakes
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size, dtype=np.float64)
    sorted_scores = s[order]
    starts = np.r_[0, np.nonzero(np.diff(sorted_scores))[0] + 1]
    ends = np.r_[starts[1:], s.size]
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2.0  # 1-based average rank
    u = ranks[y == 1].sum() - positives * (positives + 1) / 2.0
    return float(u / (positives * negatives))


def equal_error_rate(labels: Sequence[int], scores: Sequence[float]) -> float:
    """The rate at which false positives (reals called fake) equal misses (fakes called real)."""
    fpr, tpr, _ = roc_curve(labels, scores)
    fnr = 1.0 - tpr
    gap = fnr - fpr  # falls from 1 to -1 along the curve
    index = int(np.nonzero(gap <= 0)[0][0])
    if gap[index] == 0 or index == 0:
        return float(fpr[index])
    # the crossing lies on the segment between points index-1 and index
    t = gap[index - 1] / (gap[index - 1] - gap[index])
    return float(fpr[index - 1] + t * (fpr[index] - fpr[index - 1]))


def average_precision(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Sum over thresholds of (recall gain) x precision, with fake as the positive class."""
    y, s = _check(labels, scores)
    positives = int(y.sum())
    if positives == 0:
        raise ValueError("average precision needs at least one fake (1) label")
    fpr, tpr, _ = roc_curve(y, s)
    negatives = y.size - positives
    true_positives, false_positives = tpr[1:] * positives, fpr[1:] * negatives
    precision = true_positives / (true_positives + false_positives)
    recall_gain = np.diff(tpr)
    return float((recall_gain * precision).sum())


def accuracy(labels: Sequence[int], scores: Sequence[float], threshold: float = 0.5) -> float:
    y, s = _check(labels, scores)
    return float(((s >= threshold).astype(np.int64) == y).mean())


def video_scores(video_ids: Sequence, labels: Sequence[int], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(per-video labels, per-video mean scores), videos in order of first appearance.

    Every frame of a video must carry the video's label."""
    y, s = _check(labels, scores)
    ids = np.asarray(video_ids, dtype=object).ravel()
    if ids.size != y.size:
        raise ValueError(f"{ids.size} video ids but {y.size} labels")
    unique, first, inverse = np.unique(ids.astype(str), return_index=True, return_inverse=True)
    counts = np.bincount(inverse)
    means = np.bincount(inverse, weights=s) / counts
    fakes = np.bincount(inverse, weights=y)
    mixed = (fakes > 0) & (fakes < counts)
    if mixed.any():
        raise ValueError(f"video {unique[np.nonzero(mixed)[0][0]]!r} has both real and fake frames")
    order = np.argsort(first)
    return (fakes[order] > 0).astype(np.int64), means[order]


@dataclass(frozen=True)
class DetectionReport:
    frames: int
    videos: int
    frame_auc: float
    video_auc: float
    eer: float
    ap: float
    accuracy: float

    def as_metrics(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{name}": float(value) for name, value in self.__dict__.items()}


def detection_report(labels: Sequence[int], scores: Sequence[float], video_ids: Sequence | None = None) -> DetectionReport:
    """All of the metrics above; without ``video_ids`` every frame is its own video."""
    y, s = _check(labels, scores)
    if video_ids is None:
        video_labels, video_means = y, s
    else:
        video_labels, video_means = video_scores(video_ids, y, s)
    return DetectionReport(frames=int(y.size), videos=int(video_labels.size), frame_auc=roc_auc(y, s),
                           video_auc=roc_auc(video_labels, video_means), eer=equal_error_rate(y, s),
                           ap=average_precision(y, s), accuracy=accuracy(y, s))
