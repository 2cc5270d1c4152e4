"""mmgcs/calibrate.py: the per-genre thresholds and the lexical branch's weight chosen from validation predictions,
checked against a brute-force search scored by scikit-learn's f1_score on small synthetic splits."""

from types import SimpleNamespace

import numpy as np
import pytest
from sklearn.metrics import f1_score

from mmgcs import calibrate
from mmgcs.metrics import DEFAULT_GRID

LABELS = ["Action", "Comedy", "Drama"]


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


@pytest.fixture
def val():
    """60 validation rows: Action and Comedy well populated and noisy, Drama with only 3 positives."""
    rng = np.random.default_rng(7)
    labels = np.zeros((60, 3), dtype=np.int64)
    labels[:, 0] = rng.random(60) < 0.4
    labels[:, 1] = rng.random(60) < 0.3
    labels[[4, 17, 33], 2] = 1
    probs = np.clip(0.35 * labels + 0.65 * rng.random((60, 3)) - 0.1, 0.0, 1.0)
    return {"probs": probs, "labels": labels}


def _best_f1(truth, scores, grid=DEFAULT_GRID):
    return max(f1_score(truth, scores >= t, zero_division=0) for t in grid)


def test_thresholds_maximize_each_genres_validation_f1(val):
    found = calibrate.thresholds(val, "multilabel", True, min_positives=5, default=0.5)
    assert isinstance(found, list) and len(found) == 3 and all(type(t) is float for t in found)
    for j in (0, 1):  # enough positives: the genre's own F1-optimal threshold
        assert DEFAULT_GRID[0] <= found[j] <= DEFAULT_GRID[-1]  # on the grid, or the middle of a best plateau
        got = f1_score(val["labels"][:, j], val["probs"][:, j] >= found[j], zero_division=0)
        assert got == pytest.approx(_best_f1(val["labels"][:, j], val["probs"][:, j]), abs=1e-12), LABELS[j]
    # Drama has 3 < 5 positives: the one threshold maximizing micro F1 over every genre of the split.
    flat_truth, flat_scores = val["labels"].ravel(), val["probs"].ravel()
    got = f1_score(flat_truth, flat_scores >= found[2], zero_division=0)
    assert got == pytest.approx(_best_f1(flat_truth, flat_scores), abs=1e-12)


def test_thresholds_are_none_when_not_tuned_or_single_label(val):
    assert calibrate.thresholds(val, "multilabel", False, min_positives=5, default=0.5) is None
    assert calibrate.thresholds(val, "singlelabel", True, min_positives=5, default=0.5) is None


def test_a_split_without_positives_keeps_the_default(val):
    empty = dict(val, labels=np.zeros_like(val["labels"]))
    assert calibrate.thresholds(empty, "multilabel", True, min_positives=5, default=0.35) == [0.35] * 3


def _lexical_case(seed=0, n=80):
    """Fused logits that miss part of the signal, and a lexical branch carrying it (plus its own noise)."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, 3)) < 0.35).astype(np.int64)
    signal = np.where(labels == 1, 1.0, -1.0)
    fused = 0.6 * signal + rng.normal(0.0, 1.2, (n, 3)) - 0.3
    lexical = 1.0 * signal + rng.normal(0.0, 1.8, (n, 3))  # noisier: too much of it hurts
    pred = lambda logits: {"logits": logits, "probs": _sigmoid(logits), "labels": labels}  # noqa: E731
    return pred(fused), pred(fused + lexical), lexical


def _brute_force_weight(fused, lexical, labels, thr):
    """micro F1 of every weight at thresholds `thr`, scored by scikit-learn; the best, ties to the smaller."""
    scores = {w: f1_score(labels, _sigmoid(fused + w * lexical) >= np.asarray(thr)[None, :], average="micro",
                          zero_division=0) for w in calibrate.LEXICAL_WEIGHTS}
    best = min(w for w in scores if round(scores[w], 6) == max(round(v, 6) for v in scores.values()))
    return best, scores


@pytest.mark.parametrize("thr", [0.5, [0.3, 0.5, 0.7]])
def test_lexical_weight_is_the_best_validation_micro_f1(thr):
    fused, full, lexical = _lexical_case()
    calls = []

    def tune(pred):
        calls.append(pred["probs"])
        return None if np.isscalar(thr) else list(thr)

    default = thr if np.isscalar(thr) else 0.5  # what `tune` returning None falls back to
    weight, summary = calibrate.lexical_weight(fused, full, LABELS, tune, default=default)
    per_genre = [thr] * 3 if np.isscalar(thr) else thr
    best, scores = _brute_force_weight(fused["logits"], lexical, fused["labels"], per_genre)
    assert weight == best and type(weight) is float
    assert best not in (0.0, max(calibrate.LEXICAL_WEIGHTS)), "the case should pick an inner weight"
    assert summary["weight"] == best
    assert summary["val_micro_f1_by_weight"] == {str(w): round(v, 4) for w, v in scores.items()}
    # `tune` saw each weight's probabilities, in the order of LEXICAL_WEIGHTS.
    assert len(calls) == len(calibrate.LEXICAL_WEIGHTS)
    for w, seen in zip(calibrate.LEXICAL_WEIGHTS, calls):
        np.testing.assert_allclose(seen, _sigmoid(fused["logits"] + w * lexical), rtol=1e-12)


def test_lexical_weight_ties_go_to_the_smaller_weight():
    fused, _, _ = _lexical_case()
    weight, summary = calibrate.lexical_weight(fused, fused, LABELS, lambda pred: None, default=0.5)
    assert weight == 0.0  # a branch adding nothing scores the same at every weight
    assert len(set(summary["val_micro_f1_by_weight"].values())) == 1


class _Model:
    """The engine's side of branch_weights: a config writer and a validation prediction at the current weight."""

    def __init__(self, fused, lexical, lexical_on=True):
        self.config = SimpleNamespace(lexical=lexical_on, lexical_weight=None)
        self.fused, self.lexical, self.weights_set = fused, lexical, []

    def set_config(self, lexical_weight):
        self.config.lexical_weight = lexical_weight
        self.weights_set.append(lexical_weight)

    def predict(self):
        logits = self.fused["logits"] + self.config.lexical_weight * self.lexical
        return {"logits": logits, "probs": _sigmoid(logits), "labels": self.fused["labels"]}


def test_branch_weights_probes_at_0_and_1_then_sets_the_choice():
    fused, full, lexical = _lexical_case()
    model = _Model(fused, lexical)
    summary, pred = calibrate.branch_weights(model.config, model.set_config, model.predict, LABELS,
                                             lambda p: None, default=0.5)
    expected, expected_summary = calibrate.lexical_weight(fused, full, LABELS, lambda p: None, default=0.5)
    assert model.weights_set == [0.0, 1.0, expected] and model.config.lexical_weight == expected
    assert summary == {"lexical": expected_summary}
    assert pred is None  # the chosen inner weight was not one of the two probes: the caller predicts again


def test_branch_weights_returns_the_probe_made_at_the_chosen_weight():
    fused, full, lexical = _lexical_case(seed=1)  # a case whose best weight is 1, by brute force
    assert _brute_force_weight(fused["logits"], lexical, fused["labels"], [0.5] * 3)[0] == 1.0
    model = _Model(fused, lexical)
    summary, pred = calibrate.branch_weights(model.config, model.set_config, model.predict, LABELS,
                                             lambda p: None, default=0.5)
    assert summary["lexical"]["weight"] == 1.0 and model.weights_set == [0.0, 1.0, 1.0]
    np.testing.assert_allclose(pred["logits"], full["logits"])


def test_branch_weights_without_a_lexical_branch_touch_nothing():
    fused, _, lexical = _lexical_case()
    model = _Model(fused, lexical, lexical_on=False)
    assert calibrate.branch_weights(model.config, model.set_config, model.predict, LABELS,
                                    lambda p: None, default=0.5) == (None, None)
    assert model.weights_set == []
