"""mmgcs/decisions.py: the one scores → genres rule (per-genre thresholds, or the top genre of a single-label
model), checked against a plain loop over every score, and kept free of scikit-learn."""

import subprocess
import sys

import numpy as np
import pytest

from mmgcs import decisions, metrics
from mmgcs.config import ModelConfig
from mmgcs.decisions import DEFAULT_THRESHOLD, binarize, decide, decision_thresholds, resolve_thresholds

LABELS = ["Action", "Comedy", "Drama", "Horror"]


@pytest.fixture
def probs():
    rng = np.random.default_rng(0)
    scores = rng.random((12, len(LABELS)))
    scores[0, 1] = 0.3  # exactly on a threshold below: "at least the threshold" is a yes
    return scores


def _loop(probs, thr):
    """The rule written as a loop: genre j is on for a movie when its score is at least genre j's threshold."""
    return [[label for j, label in enumerate(LABELS) if row[j] >= thr[j]] for row in probs]


def test_resolve_thresholds_spellings():
    assert resolve_thresholds(None, 3).tolist() == [DEFAULT_THRESHOLD] * 3
    assert resolve_thresholds(0.2, 3).tolist() == [0.2, 0.2, 0.2]
    assert resolve_thresholds([0.1, 0.9, 0.4], 3).tolist() == [0.1, 0.9, 0.4]
    assert resolve_thresholds(np.array([0.0, 1.0]), 2).dtype == np.float64


@pytest.mark.parametrize("bad, match", [([0.5, 0.5], r"3 per-genre values; got shape \(2,\)"),
                                        ([[0.5, 0.5, 0.5]], "shape"),
                                        ([0.5, 1.5, 0.5], r"\[0, 1\]"),
                                        (-0.1, r"\[0, 1\]"),
                                        ([0.5, float("nan"), 0.5], r"\[0, 1\]")])
def test_resolve_thresholds_rejects_what_no_rule_can_use(bad, match):
    with pytest.raises(ValueError, match=match):
        resolve_thresholds(bad, 3)


def test_binarize_and_decide_follow_the_loop_per_genre(probs):
    thr = [0.3, 0.3, 0.7, 0.95]
    expected = _loop(probs, thr)
    assert "Comedy" in expected[0]  # the score equal to its threshold
    assert decide(probs, LABELS, thr) == expected
    got = binarize(probs, thr)
    assert got.dtype == np.int64 and got.shape == probs.shape
    assert [[LABELS[j] for j in np.flatnonzero(row)] for row in got] == expected


def test_a_float_or_none_is_the_same_threshold_for_every_genre(probs):
    assert decide(probs, LABELS, 0.6) == _loop(probs, [0.6] * 4)
    assert decide(probs, LABELS) == _loop(probs, [DEFAULT_THRESHOLD] * 4)
    assert decide(probs.tolist(), LABELS, 0.6) == decide(probs, LABELS, 0.6)  # plain lists are scores too


def test_single_label_takes_the_top_genre_whatever_the_thresholds(probs):
    top = [[LABELS[int(np.argmax(row))]] for row in probs]
    assert decide(probs, LABELS, argmax=True) == top
    assert decide(probs, LABELS, [1.0] * 4, argmax=True) == top  # thresholds play no part
    onehot = binarize(probs, argmax=True)
    assert onehot.sum(axis=1).tolist() == [1] * len(probs)
    assert onehot.argmax(axis=1).tolist() == probs.argmax(axis=1).tolist()


def test_decision_thresholds_of_a_model_config():
    tuned = ModelConfig(labels=LABELS, threshold=0.4, thresholds=[0.1, 0.2, 0.3, 0.9])
    assert decision_thresholds(tuned).tolist() == [0.1, 0.2, 0.3, 0.9]  # the tuned ones win
    assert decision_thresholds(ModelConfig(labels=LABELS, threshold=0.4)).tolist() == [0.4] * 4
    assert decision_thresholds(ModelConfig(labels=LABELS, threshold=0.4, thresholds=[])).tolist() == [0.4] * 4
    with pytest.raises(ValueError, match="4 per-genre values"):
        decision_thresholds(ModelConfig(labels=LABELS, thresholds=[0.1, 0.2]))


def test_metrics_serves_the_same_rule():
    """`mmgcs.metrics` re-exports the rule: one implementation, not a copy that could drift."""
    for name in ("binarize", "decide", "decision_thresholds", "resolve_thresholds"):
        assert getattr(metrics, name) is getattr(decisions, name), name


def test_predicting_never_loads_scikit_learn():
    code = "import sys, mmgcs.decisions; print(sorted(m for m in ('sklearn', 'scipy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
