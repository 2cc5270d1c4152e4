"""Train/validation/test assignment: iterative stratification over the multi-label genres (Sechidis et al. 2011).

Deterministic: rows are ordered by id before splitting and the only randomness is a NumPy RandomState seeded
with `seed`, so the same movies and seed give the same splits whatever the order of the sources.
"""

from __future__ import annotations

import numpy as np
from iterstrat.ml_stratifiers import IterativeStratification

SPLITS = ("train", "validation", "test")


def parse_ratios(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or any(p <= 0 for p in parts):
        raise ValueError(
            f"--split-ratios takes three positive numbers like 0.8,0.1,0.1 (every split must have movies: "
            f"an empty split cannot be loaded); got {text!r}."
        )
    total = sum(parts)
    return tuple(p / total for p in parts)  # type: ignore[return-value]


def stratified_split(
    ids: list[int], labels: np.ndarray, ratios=(0.8, 0.1, 0.1), seed: int = 42
) -> dict[int, str]:
    """Map each id to a split name. `labels` is (N, L) {0,1}; rows with no label are spread evenly too."""
    if len(ids) != len(set(ids)):
        raise ValueError("stratified_split needs distinct ids")
    if not ids:
        return {}
    order = np.argsort(np.asarray(ids, dtype=np.int64), kind="stable")
    y = np.asarray(labels, dtype=bool)[order]
    rng = np.random.RandomState(seed)
    # Shuffle before stratifying so ties are not broken by id order (as the library's own splitters do).
    perm = rng.permutation(len(order))
    folds = np.empty(len(order), dtype=int)
    folds[perm] = IterativeStratification(labels=y[perm], r=np.asarray(ratios, dtype=float), random_state=rng)
    # On a handful of rows the greedy algorithm can leave a split empty, which datasets cannot load:
    # give each empty split one row from the largest split.
    for f in range(len(ratios)):
        counts = np.bincount(folds, minlength=len(ratios))
        if counts[f] == 0 and counts.max() > 1:
            donors = np.flatnonzero(folds == counts.argmax())
            folds[donors[rng.randint(len(donors))]] = f
    return {int(ids[i]): SPLITS[f] for i, f in zip(order, folds)}
