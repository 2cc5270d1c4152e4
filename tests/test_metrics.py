"""Metrics against hand-computed values and threshold tuning (the run report's files: tests/test_report.py)."""

import warnings

import numpy as np
import pytest

from mmgcs.metrics import binarize, bootstrap_intervals, compute_metrics, resolve_thresholds, tune_global_threshold, tune_thresholds

# 4 movies x 3 genres (A, B, C). At the default 0.5 threshold the predictions are:
#   movie  truth    probs               pred
#   m0     A . C    .9  .2  .4          A . .
#   m1     . B .    .6  .7  .1          A B .
#   m2     A B C    .8  .3  .2          A . .
#   m3     . . C    .1  .4  .55         . . C
LABELS = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 1], [0, 0, 1]])
PROBS = np.array([[0.9, 0.2, 0.4], [0.6, 0.7, 0.1], [0.8, 0.3, 0.2], [0.1, 0.4, 0.55]])
NAMES = ["A", "B", "C"]


def test_f1_family_matches_hand_computation():
    m = compute_metrics(PROBS, LABELS, NAMES)
    # Per genre: A tp=2 fp=1 fn=0 -> P 2/3, R 1,   F1 = 2*2/(2*2+1+0) = 4/5
    #            B tp=1 fp=0 fn=1 -> P 1,   R 1/2, F1 = 2/(2+0+1)     = 2/3
    #            C tp=1 fp=0 fn=2 -> P 1,   R 1/3, F1 = 2/(2+0+2)     = 1/2
    a, b, c = (m["per_genre"][n] for n in NAMES)
    assert (a["precision"], a["recall"], a["f1"]) == pytest.approx((2 / 3, 1.0, 4 / 5))
    assert (b["precision"], b["recall"], b["f1"]) == pytest.approx((1.0, 1 / 2, 2 / 3))
    assert (c["precision"], c["recall"], c["f1"]) == pytest.approx((1.0, 1 / 3, 1 / 2))
    assert [a["support"], b["support"], c["support"]] == [2, 2, 3]
    assert [a["predicted"], b["predicted"], c["predicted"]] == [3, 1, 1]
    # Micro: tp=4 fp=1 fn=3 -> P 4/5, R 4/7, F1 = 8/(8+1+3) = 2/3
    assert m["micro_precision"] == pytest.approx(4 / 5)
    assert m["micro_recall"] == pytest.approx(4 / 7)
    assert m["micro_f1"] == pytest.approx(2 / 3)
    # Macro: (4/5 + 2/3 + 1/2) / 3 = 59/90; weighted by support (2, 2, 3): (1.6 + 4/3 + 1.5) / 7 = 19/30
    assert m["macro_f1"] == pytest.approx(59 / 90)
    assert m["weighted_f1"] == pytest.approx(19 / 30)
    assert m["macro_precision"] == pytest.approx((2 / 3 + 1 + 1) / 3)
    assert m["macro_recall"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    # Samples: m0 {A,C} vs {A} -> 2/3; m1 {B} vs {A,B} -> 2/3; m2 {A,B,C} vs {A} -> 2/4; m3 {C} vs {C} -> 1
    #          mean = (2/3 + 2/3 + 1/2 + 1) / 4 = 17/24
    assert m["samples_f1"] == pytest.approx(17 / 24)
    # Only m3 is exactly right; 4 of the 12 cells are wrong (m0 C, m1 A, m2 B, m2 C).
    assert m["subset_accuracy"] == pytest.approx(1 / 4)
    assert m["hamming_loss"] == pytest.approx(4 / 12)
    assert m["n_samples"] == 4


def test_average_precision_matches_hand_computation():
    m = compute_metrics(PROBS, LABELS, NAMES)
    # A ranks .9(+) .8(+) .6 .1 -> AP 1. B ranks .7(+) .4 .3(+) .2 -> AP (1 + 2/3)/2 = 5/6.
    # C ranks .55(+) .4(+) .2(+) .1 -> AP 1. mAP = (1 + 5/6 + 1)/3 = 17/18.
    assert [m["per_genre"][n]["ap"] for n in NAMES] == pytest.approx([1.0, 5 / 6, 1.0])
    assert m["mAP"] == pytest.approx(17 / 18)


def test_per_genre_thresholds_change_decisions():
    # Lowering C's threshold to 0.15 makes m0 (.4) and m2 (.2) positives for C -> C is perfect (F1 1).
    m = compute_metrics(PROBS, LABELS, NAMES, thresholds=[0.5, 0.5, 0.15])
    assert m["per_genre"]["C"]["f1"] == pytest.approx(1.0)
    assert m["per_genre"]["C"]["threshold"] == pytest.approx(0.15)
    assert m["per_genre"]["A"]["f1"] == pytest.approx(4 / 5)
    # A single float applies to every genre.
    m = compute_metrics(PROBS, LABELS, NAMES, thresholds=0.95)
    assert m["micro_f1"] == 0.0 and all(g["predicted"] == 0 for g in m["per_genre"].values())


def test_genre_without_positives_has_no_ap_and_no_warnings():
    labels = np.hstack([LABELS, np.zeros((4, 1), dtype=int)])
    probs = np.hstack([PROBS, np.array([[0.7], [0.1], [0.2], [0.3]])])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sklearn's UndefinedMetricWarning would fail the test
        m = compute_metrics(probs, labels, NAMES + ["D"])
    d = m["per_genre"]["D"]
    assert d["ap"] is None and d["support"] == 0 and d["f1"] == 0.0 and d["predicted"] == 1
    assert m["genres_without_positives"] == ["D"]
    assert m["mAP"] == pytest.approx(17 / 18)  # D is excluded, not counted as 0
    assert m["macro_f1"] == pytest.approx((4 / 5 + 2 / 3 + 1 / 2 + 0) / 4)


def test_samples_f1_counts_a_correct_empty_prediction_as_right():
    # Movie 0: {a} predicted {a} -> 1. Movie 1: no genre, none predicted -> exactly right, 1.
    # Movie 2: no genre, but a predicted -> 0. Mean 2/3.
    labels = np.array([[1, 0], [0, 0], [0, 0]])
    probs = np.array([[0.9, 0.1], [0.1, 0.1], [0.7, 0.1]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = compute_metrics(probs, labels, ["a", "b"])
    assert m["samples_f1"] == pytest.approx(2 / 3)
    assert m["per_genre"]["a"]["precision"] == pytest.approx(1 / 2)


def test_argmax_scores_top_genre_only():
    m = compute_metrics(PROBS, LABELS, NAMES, argmax=True)
    # Top genres: m0 A, m1 B, m2 A, m3 C -> all four are true positives, none of the 7 truths beyond those.
    assert m["micro_precision"] == pytest.approx(1.0)
    assert m["micro_recall"] == pytest.approx(4 / 7)
    assert binarize(PROBS, argmax=True).sum(axis=1).tolist() == [1, 1, 1, 1]
    assert m["accuracy"] == 1.0 and m["per_genre"]["A"]["threshold"] is None
    # m3's top genre becomes B (not its genre): top-1 accuracy 3/4.
    probs = PROBS.copy()
    probs[3, 1] = 0.9
    assert compute_metrics(probs, LABELS, NAMES, argmax=True)["accuracy"] == pytest.approx(3 / 4)


@pytest.mark.parametrize(
    "probs, labels, names, match",
    [
        (PROBS, LABELS[:3], NAMES, "same shape"),
        (PROBS, LABELS, ["A", "B"], "label_names has 2"),
        (PROBS[:, 0], LABELS[:, 0], NAMES, "2-D"),
        (np.where(PROBS > 0.8, np.nan, PROBS), LABELS, NAMES, "NaN"),
        (PROBS, LABELS * 2, NAMES, r"\{0, 1\}"),
        (PROBS[:0], LABELS[:0], NAMES, "No samples"),
    ],
)
def test_bad_inputs_are_named(probs, labels, names, match):
    with pytest.raises(ValueError, match=match):
        compute_metrics(probs, labels, names)


def test_resolve_thresholds_rejects_wrong_length_and_range():
    assert resolve_thresholds(None, 2).tolist() == [0.5, 0.5]
    with pytest.raises(ValueError, match="3 per-genre"):
        resolve_thresholds([0.5, 0.5], 3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        resolve_thresholds([0.5, 1.5], 2)


def test_tune_thresholds_separable_genre_lands_between_classes_and_rare_genre_falls_back():
    rng = np.random.default_rng(0)
    n = 40
    sep_truth = np.arange(n) < 10  # 10 positives scored 0.30-0.40, negatives 0.05-0.20
    sep = np.where(sep_truth, rng.uniform(0.30, 0.40, n), rng.uniform(0.05, 0.20, n))
    rare_truth = np.arange(n) == 3  # one positive: too few to tune on
    rare = rng.uniform(0, 1, n)
    probs = np.stack([sep, rare], axis=1)
    labels = np.stack([sep_truth, rare_truth], axis=1).astype(int)

    thr = tune_thresholds(probs, labels, min_positives=5, default=0.42)
    assert sep[~sep_truth].max() < thr[0] <= sep[sep_truth].min()
    # The middle of the perfect plateau, not its lowest edge.
    assert thr[0] == pytest.approx((sep[~sep_truth].max() + sep[sep_truth].min()) / 2, abs=0.011)
    assert thr[1] == tune_global_threshold(probs, labels)  # the rare genre falls back to the global threshold
    assert compute_metrics(probs, labels, ["sep", "rare"], thr)["per_genre"]["sep"]["f1"] == 1.0
    # With the guard lowered, the single positive is fitted (the overfitting the guard prevents).
    assert tune_thresholds(probs, labels, min_positives=1, default=0.42)[1] != thr[1]


def test_rare_genre_gets_the_threshold_that_maximizes_micro_f1_over_all_genres():
    # 10 movies, 3 genres. Columns: a (5 positives at 0.35, negatives at 0.10), b (5 positives at 0.30, negatives
    # at 0.20), c (2 positives at 0.32, negatives at 0.15): too rare to tune on its own with min_positives=5.
    a = [0.35] * 5 + [0.10] * 5
    b = [0.20] * 5 + [0.30] * 5
    c = [0.32, 0.32] + [0.15] * 8
    probs = np.array([a, b, c]).T
    labels = np.array([[1] * 5 + [0] * 5, [0] * 5 + [1] * 5, [1, 1] + [0] * 8]).T
    thr = tune_thresholds(probs, labels, min_positives=5)
    # Over all genres every positive scores >= 0.30 and every negative <= 0.20: micro F1 is 1 on (0.20, 0.30],
    # whose grid points 0.21..0.30 have their middle at 0.255 -- not the fixed 0.5, which would predict c never.
    assert thr[2] == pytest.approx(0.255) == tune_global_threshold(probs, labels)
    assert thr[0] == pytest.approx((0.11 + 0.35) / 2) and thr[1] == pytest.approx((0.21 + 0.30) / 2)  # their own
    assert compute_metrics(probs, labels, ["a", "b", "c"], thr)["per_genre"]["c"]["f1"] == 1.0
    assert compute_metrics(probs, labels, ["a", "b", "c"], 0.5)["per_genre"]["c"]["f1"] == 0.0


def test_threshold_tuning_without_any_positive_keeps_the_default():
    probs = np.array([[0.2, 0.7], [0.4, 0.1]])
    assert tune_thresholds(probs, np.zeros((2, 2), dtype=int), default=0.42).tolist() == [0.42, 0.42]


def test_tune_thresholds_respects_grid_and_validates():
    probs = np.array([[0.1], [0.2], [0.8], [0.9]])
    labels = np.array([[0], [0], [1], [1]])
    # Grid points 0.3 and 0.7 both separate perfectly; the plateau's middle is 0.5.
    assert tune_thresholds(probs, labels, min_positives=2, grid=[0.3, 0.7])[0] == pytest.approx(0.5)
    assert tune_thresholds(probs, labels, min_positives=2, grid=[0.85])[0] == pytest.approx(0.85)
    with pytest.raises(ValueError, match="grid"):
        tune_thresholds(probs, labels, grid=[])
    with pytest.raises(ValueError, match="default"):
        tune_thresholds(probs, labels, default=2.0)


def test_tune_global_threshold_maximizes_micro_f1():
    probs = np.array([[0.9, 0.35], [0.3, 0.1], [0.45, 0.05], [0.2, 0.6]])
    labels = np.array([[1, 1], [0, 0], [1, 0], [0, 1]])
    # Positives score .9 .35 .45 .6, negatives .3 .1 .05 .2: anything in (0.3, 0.35] is perfect.
    t = tune_global_threshold(probs, labels)
    assert 0.3 < t <= 0.35
    assert compute_metrics(probs, labels, ["x", "y"], t)["micro_f1"] == 1.0


def _noisy_predictions(n, seed=0):
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, 4)) < 0.3).astype(int)
    probs = np.clip(0.35 * labels + 0.65 * rng.random((n, 4)), 0, 1)
    return probs, labels


def test_bootstrap_intervals_bracket_the_estimate_and_shrink_with_more_movies():
    probs, labels = _noisy_predictions(200)
    m = compute_metrics(probs, labels, list("abcd"))
    ci = bootstrap_intervals(probs, labels, n_boot=400)
    for key in ("micro_f1", "macro_f1", "samples_f1"):
        low, high = ci[key]
        assert low < m[key] < high, key
    big = bootstrap_intervals(*_noisy_predictions(3200), n_boot=400)
    # Width falls like 1/sqrt(n): 16x the movies, about a quarter of the width.
    assert big["micro_f1"][1] - big["micro_f1"][0] < 0.5 * (ci["micro_f1"][1] - ci["micro_f1"][0])
    assert bootstrap_intervals(probs, labels, n_boot=50, seed=3) == bootstrap_intervals(probs, labels, n_boot=50, seed=3)
    # Perfect predictions have no spread.
    assert bootstrap_intervals(labels.astype(float), labels, n_boot=50)["micro_f1"] == [1.0, 1.0]
