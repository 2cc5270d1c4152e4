"""Multi-label genre metrics (F1 family, per-genre report, mAP) and per-genre threshold tuning.

The rule that turns scores into genres is `mmgcs.decisions` (re-exported here); it needs no scikit-learn, so
predicting does not load it. Everything here is computed with scikit-learn on plain NumPy arrays: ``probs`` (N, L)
in [0, 1] and ``labels`` (N, L) in {0, 1}. Genres with no positives in the evaluated split are a normal situation
(rare genres, small held-out sets): their precision/recall/F1 count as 0 (``zero_division=0``) without warnings,
and their average precision is undefined, so it is reported as ``None`` and left out of ``mAP``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    hamming_loss,
    precision_recall_fscore_support,
)

from mmgcs.decisions import (  # noqa: F401  (the decision rule; importable from here, as before)
    DEFAULT_THRESHOLD,
    ThresholdSpec,
    binarize,
    decide,
    decision_thresholds,
    resolve_thresholds,
)

# Candidate thresholds for tuning. A 0.01 grid is fine enough for calibrated sigmoid outputs; the tuner takes the
# middle of the best plateau, so a finer grid would only add noise.
DEFAULT_GRID = np.round(np.arange(0.01, 1.0, 0.01), 2)


def _check_inputs(probs, labels, label_names=None) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if probs.ndim != 2 or labels.ndim != 2:
        raise ValueError(
            f"probs and labels must be 2-D (n_samples, n_genres); got shapes {probs.shape} and {labels.shape}"
        )
    if probs.shape != labels.shape:
        raise ValueError(f"probs {probs.shape} and labels {labels.shape} must have the same shape (n_samples, n_genres)")
    if probs.shape[0] == 0:
        raise ValueError("No samples to score: probs and labels are empty; check the split or data path")
    if not np.all(np.isfinite(probs)):
        raise ValueError("probs contains NaN or infinite values; the model diverged or its outputs are not probabilities")
    if not np.all((labels == 0) | (labels == 1)):
        raise ValueError("labels must be multi-hot with values in {0, 1}")
    if label_names is not None and len(label_names) != probs.shape[1]:
        raise ValueError(f"label_names has {len(label_names)} names but probs has {probs.shape[1]} genre columns")
    return probs, labels.astype(np.int64)


def _average_precisions(probs: np.ndarray, labels: np.ndarray) -> list[Optional[float]]:
    # AP is undefined for a genre without positives (sklearn would warn and return a meaningless value).
    return [
        float(average_precision_score(labels[:, j], probs[:, j])) if labels[:, j].any() else None
        for j in range(labels.shape[1])
    ]


def _per_genre(labels, preds, aps, thr, label_names) -> tuple[dict, np.ndarray]:
    """{genre: precision, recall, f1, support, predicted, ap, threshold} and the support per genre."""
    p, r, f, support = precision_recall_fscore_support(labels, preds, average=None, zero_division=0)
    per_genre = {
        name: {
            "precision": float(p[j]),
            "recall": float(r[j]),
            "f1": float(f[j]),
            "support": int(support[j]),
            "predicted": int(preds[:, j].sum()),
            "ap": aps[j],
            "threshold": None if thr is None else float(thr[j]),
        }
        for j, name in enumerate(label_names)
    }
    return per_genre, support


def compute_metrics(
    probs,
    labels,
    label_names: Sequence[str],
    thresholds: ThresholdSpec = None,
    *,
    argmax: bool = False,
) -> dict:
    """Score multi-label predictions.

    ``thresholds``: ``None`` (0.5), one float, or one value per genre (e.g. tuned on validation with
    :func:`tune_thresholds`). ``argmax=True`` scores a single-label model by its top genre instead.

    Returns a JSON-serializable dict: ``micro_f1, macro_f1, weighted_f1, samples_f1, micro_precision,
    micro_recall, macro_precision, macro_recall, mAP, micro_ap, subset_accuracy, hamming_loss, n_samples,
    genres_without_positives`` (plus top-1 ``accuracy`` when ``argmax``) and
    ``per_genre: {name: {precision, recall, f1, support, predicted, ap, threshold}}``. ``macro_*`` average over all genres (a genre without positives counts as 0, as in
    scikit-learn); ``mAP`` averages AP over the genres that have positives, and is ``None`` if none do.
    In ``samples_f1`` a movie with no true and no predicted genre scores 1 (it is exactly right).
    """
    probs, labels = _check_inputs(probs, labels, label_names)
    n_labels = probs.shape[1]
    thr = resolve_thresholds(thresholds, n_labels)
    preds = binarize(probs, thr, argmax=argmax)

    def f1(avg: str) -> float:
        # samples: a movie with none of the genres, predicted as none, is exactly right (1), not undefined (0).
        return float(f1_score(labels, preds, average=avg, zero_division=1 if avg == "samples" else 0))

    micro_p, micro_r, _, _ = precision_recall_fscore_support(labels, preds, average="micro", zero_division=0)
    macro_p, macro_r, _, _ = precision_recall_fscore_support(labels, preds, average="macro", zero_division=0)
    aps = _average_precisions(probs, labels)
    defined_aps = [a for a in aps if a is not None]
    micro_ap = float(average_precision_score(labels.ravel(), probs.ravel())) if labels.any() else None
    per_genre, support = _per_genre(labels, preds, aps, None if argmax else thr, label_names)
    extra = {}
    if argmax:
        # Top-1 accuracy: the single predicted genre is one of the movie's genres.
        extra["accuracy"] = float(labels[np.arange(len(labels)), probs.argmax(axis=1)].mean())
    return {
        **extra,
        "n_samples": int(probs.shape[0]),
        "micro_f1": f1("micro"),
        "macro_f1": f1("macro"),
        "weighted_f1": f1("weighted"),
        "samples_f1": f1("samples"),
        "micro_precision": float(micro_p),
        "micro_recall": float(micro_r),
        "macro_precision": float(macro_p),
        "macro_recall": float(macro_r),
        "mAP": float(np.mean(defined_aps)) if defined_aps else None,
        "micro_ap": micro_ap,
        "subset_accuracy": float(accuracy_score(labels, preds)),
        "hamming_loss": float(hamming_loss(labels, preds)),
        "genres_without_positives": [name for j, name in enumerate(label_names) if support[j] == 0],
        "per_genre": per_genre,
    }


def _f1_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, empty: float) -> np.ndarray:
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), empty)


def bootstrap_intervals(
    probs,
    labels,
    thresholds: ThresholdSpec = None,
    *,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    argmax: bool = False,
) -> dict[str, list[float]]:
    """Percentile bootstrap intervals (movies resampled with replacement) for micro, macro and samples F1.

    A test split of a few hundred movies moves F1 by several points from one sample to the next; the interval
    says whether two models really differ. Returns ``{"micro_f1": [low, high], ...}``.
    """
    probs, labels = _check_inputs(probs, labels)
    if n_boot < 1 or not 0 < confidence < 1:
        raise ValueError("n_boot must be >= 1 and confidence in (0, 1)")
    preds = binarize(probs, thresholds, argmax=argmax).astype(bool)
    truth = labels.astype(bool)
    tp, fp, fn = (preds & truth).astype(float), (preds & ~truth).astype(float), (~preds & truth).astype(float)
    row_f1 = _f1_from_counts(tp.sum(1), fp.sum(1), fn.sum(1), empty=1.0)
    n = len(probs)
    rng = np.random.default_rng(seed)
    out = {"micro_f1": [], "macro_f1": [], "samples_f1": []}
    for start in range(0, n_boot, 200):  # blocks bound the (block, n) weight matrix's memory
        block = min(200, n_boot - start)
        idx = rng.integers(0, n, size=(block, n))
        weights = np.stack([np.bincount(row, minlength=n) for row in idx]).astype(float)  # (block, n)
        g_tp, g_fp, g_fn = weights @ tp, weights @ fp, weights @ fn  # (block, L)
        out["micro_f1"].append(_f1_from_counts(g_tp.sum(1), g_fp.sum(1), g_fn.sum(1), empty=0.0))
        out["macro_f1"].append(_f1_from_counts(g_tp, g_fp, g_fn, empty=0.0).mean(1))
        out["samples_f1"].append(weights @ row_f1 / n)
    tail = (1 - confidence) / 2 * 100
    return {k: [float(x) for x in np.percentile(np.concatenate(v), [tail, 100 - tail])] for k, v in out.items()}


def _f1_over_grid(scores: np.ndarray, truth: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """F1 of ``scores >= t`` for every t in ``grid`` (vectorized; zero_division=0)."""
    pred = scores[None, :] >= grid[:, None]  # (G, N)
    tp = (pred & truth[None, :]).sum(axis=1)
    fp = (pred & ~truth[None, :]).sum(axis=1)
    fn = truth.sum() - tp
    return _f1_from_counts(tp, fp, fn, empty=0.0)


def _middle_of_best_plateau(values: np.ndarray, grid: np.ndarray) -> float:
    """The centre of the longest run of grid points achieving the best value.

    A separable genre has a whole interval of perfect thresholds; its centre keeps the widest margin to both
    classes instead of hugging the lowest-scored positive (which the first argmax would do).
    """
    best = values.max()
    hit = np.isclose(values, best, rtol=0, atol=1e-12)
    runs, start = [], None
    for i, h in enumerate(np.append(hit, False)):
        if h and start is None:
            start = i
        elif not h and start is not None:
            runs.append((start, i - 1))
            start = None
    lo, hi = max(runs, key=lambda ab: ab[1] - ab[0])
    return float((grid[lo] + grid[hi]) / 2)


def _check_grid(grid) -> np.ndarray:
    grid = np.asarray(DEFAULT_GRID if grid is None else grid, dtype=np.float64)
    if grid.ndim != 1 or grid.size == 0 or not np.all((grid >= 0) & (grid <= 1)):
        raise ValueError("grid must be a non-empty 1-D sequence of thresholds in [0, 1]")
    return np.sort(grid)


def tune_thresholds(
    probs,
    labels,
    min_positives: int = 5,
    default: float = DEFAULT_THRESHOLD,
    grid: Optional[Sequence[float]] = None,
) -> np.ndarray:
    """Per-genre thresholds (L,) that maximize each genre's F1 on a validation split.

    A genre with fewer than ``min_positives`` positives gets the global threshold instead
    (:func:`tune_global_threshold`: the one threshold maximizing micro F1 over all genres of the same split): an
    F1-optimal threshold fitted on two or three examples is noise and would not carry over to the test split, while
    a fixed 0.5 ignores how the model is calibrated (with many genres its probabilities sit well below 0.5, so a
    rare genre would never be predicted). ``default`` is used only when the split has no positive at all. Ties
    between grid points are broken by taking the middle of the best plateau.
    """
    probs, labels = _check_inputs(probs, labels)
    if not 0 <= default <= 1:
        raise ValueError(f"default threshold must lie in [0, 1]; got {default}")
    grid = _check_grid(grid)
    positives = labels.sum(axis=0)
    rare = positives < max(min_positives, 1)
    fallback = tune_global_threshold(probs, labels, grid) if rare.any() and labels.any() else float(default)
    out = np.full(probs.shape[1], fallback)
    for j in np.flatnonzero(~rare):
        out[j] = _middle_of_best_plateau(_f1_over_grid(probs[:, j], labels[:, j].astype(bool), grid), grid)
    return out


def tune_global_threshold(probs, labels, grid: Optional[Sequence[float]] = None) -> float:
    """The single threshold that maximizes micro F1 over all genres (a sturdier fallback than a fixed 0.5)."""
    probs, labels = _check_inputs(probs, labels)
    grid = _check_grid(grid)
    f1s = _f1_over_grid(probs.ravel(), labels.ravel().astype(bool), grid)
    return _middle_of_best_plateau(f1s, grid)


__all__ = [
    "DEFAULT_GRID",
    "bootstrap_intervals",
    "DEFAULT_THRESHOLD",
    "binarize",
    "decide",
    "decision_thresholds",
    "compute_metrics",
    "resolve_thresholds",
    "tune_global_threshold",
    "tune_thresholds",
]
