"""Calibration on the validation split: the per-genre decision thresholds and the weight of the lexical branch.

Each function takes gathered validation predictions (``{"probs", "logits", "labels"}`` arrays of every row) and
returns values; the engine sets them on the model, in one place.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence

import numpy as np

from mmgcs.metrics import compute_metrics, tune_thresholds

logger = logging.getLogger(__name__)

# Weights of the lexical branch tried on validation at the end of a run (0 = the fused head alone).
LEXICAL_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)


def thresholds(pred: dict, task: str, enabled: bool, min_positives: int, default: float) -> Optional[list[float]]:
    """Per-genre thresholds maximizing validation F1 (``train.tune_thresholds``), or None: a single-label model
    takes the top genre, and untuned models use ``default`` for every genre."""
    if not enabled or task == "singlelabel":
        return None
    found = tune_thresholds(pred["probs"], pred["labels"], min_positives=min_positives, default=default)
    return [float(t) for t in found]


def lexical_weight(fused: dict, full: dict, labels: Sequence[str], tune: Callable[[dict], Optional[list[float]]],
                   default: float) -> tuple[float, dict]:
    """The weight of the lexical logits added to the fused ones, chosen on validation.

    ``fused`` and ``full`` are the validation predictions at weight 0 and 1: the logits are linear in the weight, so
    the lexical logits are their difference, and each weight of ``LEXICAL_WEIGHTS`` is scored by validation
    micro-F1 under its own thresholds (``tune``; ``default`` when it gives none). Ties go to the smaller weight.
    Returns (the weight, a summary for metrics.json).
    """
    lexical = full["logits"] - fused["logits"]
    scores = {}
    for weight in LEXICAL_WEIGHTS:
        pred = dict(fused, probs=1.0 / (1.0 + np.exp(-(fused["logits"] + weight * lexical))))
        tuned = tune(pred)
        scores[weight] = compute_metrics(pred["probs"], pred["labels"], labels,
                                         thresholds=tuned if tuned is not None else default)["micro_f1"]
    best = max(scores, key=lambda w: (round(scores[w], 6), -w))
    logger.info("Lexical weight %.2f (validation micro-F1 %.4f; without the lexical branch %.4f)",
                best, scores[best], scores[0.0])
    summary = {"weight": float(best), "val_micro_f1_by_weight": {str(w): round(v, 4) for w, v in scores.items()}}
    return float(best), summary


def branch_weights(config, set_config: Callable[..., Any], predict: Callable[[], dict], labels: Sequence[str],
                   tune: Callable[[dict], Optional[list[float]]], default: float) -> tuple[Optional[dict], Optional[dict]]:
    """The weight of the lexical branch of a model whose ``config`` has one, chosen on validation: ``predict``
    (the gathered validation prediction) is called with the branch off and at weight 1, set through
    ``set_config`` (the caller's one writer of the model's config), which finally sets the chosen weight.
    Returns (the summary for metrics.json, the validation prediction at the chosen weight when one of the two
    made it, else None); (None, None) without a lexical branch."""
    if not config.lexical:
        return None, None
    probes = {}
    for weight in (0.0, 1.0):
        set_config(lexical_weight=weight)
        probes[weight] = predict()
    weight, summary = lexical_weight(probes[0.0], probes[1.0], labels, tune, default)
    set_config(lexical_weight=weight)
    return {"lexical": summary}, probes.get(weight)


__all__ = ["LEXICAL_WEIGHTS", "branch_weights", "lexical_weight", "thresholds"]
