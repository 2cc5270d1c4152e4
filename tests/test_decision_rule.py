"""The decision rules measured by benchmarks/bench_decision.py, on hand-built scores: what each rule decides, its
ties, a movie with no genre over its threshold, and the cross-fit that keeps a fold out of its own fitting."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from engine_helpers import REPO_ROOT
from mmgcs.metrics import compute_metrics


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_decision", REPO_ROOT / "benchmarks" / "bench_decision.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load_bench()
THR = np.array([0.5, 0.12, 0.3])
# Movie 0 clears two thresholds; movie 1 clears none (top score: genre 0, top score/threshold: genre 1);
# movie 2 sits exactly on genre 2's threshold.
PROBS = np.array([[0.9, 0.2, 0.1],
                  [0.3, 0.1, 0.05],
                  [0.1, 0.05, 0.3]])


def decide(name: str, probs: np.ndarray = PROBS, **params) -> np.ndarray:
    return bench.RULES[name][1](probs, params).astype(int)


def test_thresholds_rule_is_probs_at_or_over_each_genres_threshold():
    assert decide("thresholds", t=THR).tolist() == [[1, 1, 0], [0, 0, 0], [0, 0, 1]]


def test_at_least_one_fills_only_the_movie_without_a_genre_and_the_two_keys_differ():
    by_score = decide("at_least_one (top score)", t=THR)
    by_ratio = decide("at_least_one (score/threshold)", t=THR)
    assert by_score.tolist() == [[1, 1, 0], [1, 0, 0], [0, 0, 1]]
    assert by_ratio.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]  # 0.1 / 0.12 beats 0.3 / 0.5


def test_at_least_one_tie_goes_to_the_first_genre():
    probs = np.array([[0.2, 0.2, 0.2]])
    assert decide("at_least_one (top score)", probs, t=np.full(3, 0.5)).tolist() == [[1, 0, 0]]


def test_top_k_by_the_predicted_count_is_clipped_and_breaks_ties_by_genre_order():
    probs = np.array([[0.4, 0.4, 0.1],    # sum 0.9 -> k 1: of the tie, genre 0
                      [0.9, 0.8, 0.7],    # sum 2.4 -> k 2
                      [0.01, 0.02, 0.0],  # sum 0.03 -> k 0, clipped to 1
                      [1.0, 1.0, 1.0]])   # sum 3 -> clipped to k_max 2
    assert decide("top_k, k = round(sum p)", probs, k_max=2).tolist() == [
        [1, 0, 0], [1, 1, 0], [0, 1, 0], [1, 1, 0]]


def test_cap_keeps_the_genres_furthest_above_their_thresholds():
    probs = np.array([[0.9, 0.6, 0.35]])  # ratios 1.8, 5, 1.17: all over; at most 2 -> genres 1 and 0
    assert decide("thresholds, at most K (K tuned)", probs, t=THR, cap=2).tolist() == [[1, 1, 0]]


def test_joint_thresholds_never_lower_validation_micro_f1_and_keep_rare_genres():
    rng = np.random.default_rng(0)
    labels = (rng.random((200, 3)) < [0.5, 0.3, 0.01]).astype(int)
    labels[:2, 2] = 1  # genre 2: two positives, too few to tune
    probs = np.clip(labels * 0.3 + rng.random((200, 3)) * 0.6, 0, 1)
    start = bench.tuned_thresholds(probs, labels)
    joint = bench.joint_thresholds(probs, labels, start)
    micro = lambda t: compute_metrics(probs, labels, list("abc"), t)["micro_f1"]  # noqa: E731
    assert micro(joint) >= micro(start)
    assert joint[2] == start[2]


def test_cross_fit_decides_each_fold_with_a_rule_fitted_without_it():
    probs = np.arange(10, dtype=float)[:, None] / 10
    labels = np.zeros((10, 1), dtype=int)
    # fit: remember which rows it saw; decide: flag the rows that were among them (must be none)
    rule = (lambda p, y: {"seen": set(p[:, 0].tolist())},
            lambda p, a: np.array([[x in a["seen"]] for x in p[:, 0]]))
    assert not bench.cross_fit(rule, probs, labels, folds=5).any()


def test_scores_match_compute_metrics_for_the_thresholds_rule():
    labels = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    ours = bench.scores(decide("thresholds", t=THR).astype(bool), labels, PROBS, np.array([True, True, False]))
    ref = compute_metrics(PROBS, labels, list("abc"), THR)
    assert ours["micro_f1"] == pytest.approx(ref["micro_f1"])
    assert ours["macro_f1"] == pytest.approx(ref["macro_f1"])
    assert ours["mAP"] == pytest.approx(ref["mAP"])
    assert ours["macro50"] == pytest.approx(np.mean([ref["per_genre"][g]["f1"] for g in "ab"]))
    assert ours["empty"] == pytest.approx(1 / 3)


def test_an_ensemble_refuses_runs_on_different_movies():
    run = {role: {"probs": PROBS, "labels": np.eye(3, dtype=int), "ids": np.arange(3)} for role in bench.ROLES}
    other = {role: dict(v, ids=np.array([0, 1, 5])) for role, v in run.items()}
    assert np.allclose(bench.average([run, run])["test"]["probs"], PROBS)
    with pytest.raises(SystemExit, match="rows differ"):
        bench.average([run, other])
