"""How much a tokenizer's tokens say about image labels (PeCo's "semantic tokens" claim).

- :func:`mutual_information`: ``I(T; Y)`` in bits between the token ``T`` at a random
  position of an image and the image's label ``Y``, from the joint counts.
- :func:`histogram_probe`: accuracy of a logistic regression on each image's normalised
  token histogram (bag of visual words), trained and scored on disjoint images.
"""

from __future__ import annotations

import numpy as np


def mutual_information(ids: np.ndarray, labels: np.ndarray, vocab_size: int) -> float:
    ids, labels = np.asarray(ids), np.asarray(labels)
    classes = np.unique(labels)
    joint = np.zeros((vocab_size, classes.size))
    for column, label in enumerate(classes):
        joint[:, column] = np.bincount(ids[labels == label].reshape(-1), minlength=vocab_size)
    joint /= joint.sum()
    tokens, marginal = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    present = joint > 0
    return float((joint[present] * np.log2(joint[present] / (tokens @ marginal)[present])).sum())


def histograms(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    ids = np.asarray(ids).reshape(len(ids), -1)
    counts = np.stack([np.bincount(row, minlength=vocab_size) for row in ids]).astype(np.float64)
    return counts / counts.sum(1, keepdims=True)


def histogram_probe(train_ids: np.ndarray, train_labels: np.ndarray, test_ids: np.ndarray, test_labels: np.ndarray,
                    vocab_size: int) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(histograms(train_ids, vocab_size))
    probe = LogisticRegression(max_iter=3000, C=1.0)
    probe.fit(scaler.transform(histograms(train_ids, vocab_size)), train_labels)
    return float(probe.score(scaler.transform(histograms(test_ids, vocab_size)), test_labels))
