"""The one rule that turns genre scores into genres: per-genre thresholds (or the top genre, single-label).

It lives apart from `mmgcs.metrics` (which re-exports it) because the metrics are computed with scikit-learn,
and predicting needs only this: a serving process then never loads scikit-learn (75 MB with the SciPy modules
it imports, 0.7 s).
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np

ThresholdSpec = Union[None, float, Sequence[float], np.ndarray]

DEFAULT_THRESHOLD = 0.5


def resolve_thresholds(thresholds: ThresholdSpec, n_labels: int) -> np.ndarray:
    """``None`` → 0.5 everywhere; a float → that value everywhere; a sequence → one threshold per genre."""
    if thresholds is None:
        return np.full(n_labels, DEFAULT_THRESHOLD)
    arr = np.asarray(thresholds, dtype=np.float64)
    if arr.ndim == 0:
        arr = np.full(n_labels, float(arr))
    if arr.shape != (n_labels,):
        raise ValueError(f"thresholds must be a float or {n_labels} per-genre values; got shape {arr.shape}")
    if not np.all((arr >= 0) & (arr <= 1)):
        raise ValueError(f"thresholds must lie in [0, 1]; got {arr.tolist()}")
    return arr


def binarize(probs: np.ndarray, thresholds: ThresholdSpec = None, *, argmax: bool = False) -> np.ndarray:
    """Decisions (N, L) in {0, 1}: ``probs >= threshold`` per genre, or one-hot of the top genre (single-label)."""
    probs = np.asarray(probs, dtype=np.float64)
    if argmax:
        out = np.zeros(probs.shape, dtype=np.int64)
        out[np.arange(probs.shape[0]), probs.argmax(axis=1)] = 1
        return out
    return (probs >= resolve_thresholds(thresholds, probs.shape[1])[None, :]).astype(np.int64)


def decision_thresholds(cfg) -> np.ndarray:
    """A model config's per-genre decision thresholds: its tuned `thresholds`, else its global `threshold`."""
    chosen = cfg.thresholds if getattr(cfg, "thresholds", None) else getattr(cfg, "threshold", DEFAULT_THRESHOLD)
    return resolve_thresholds(chosen, len(cfg.labels))


def decide(probs, labels: Sequence[str], thresholds: ThresholdSpec = None, *, argmax: bool = False) -> list[list[str]]:
    """Scores (N, L) → each movie's genres (the one rule turning scores into genres, by :func:`binarize`),
    in label order."""
    return [[label for label, on in zip(labels, row) if on] for row in binarize(probs, thresholds, argmax=argmax)]


__all__ = ["DEFAULT_THRESHOLD", "ThresholdSpec", "binarize", "decide", "decision_thresholds", "resolve_thresholds"]
