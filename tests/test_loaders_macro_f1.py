"""The training options for macro-F1 (issue 13): focal and asymmetric losses, epoch selection on the mean of micro-
and macro-F1. Hand-built logits and targets; one seconds-long run on tiny towers wires them end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml

from engine_helpers import REPO_ROOT, build_dataset, tiny_overrides

from mmgcs.config import ConfigError, load_config
from mmgcs.engine import main, selection_scores
from mmgcs.loaders import head_loss, train_log_odds
from mmgcs.models.classifier import multilabel_loss


def test_bad_loss_settings_in_the_config_name_the_field():
    with pytest.raises(ConfigError, match="train.loss"):
        load_config([REPO_ROOT / "configs" / "fusion.yaml"], ["train.loss=hinge"])
    with pytest.raises(ConfigError, match="train.focal_gamma"):
        load_config([REPO_ROOT / "configs" / "fusion.yaml"], ["train.focal_gamma=-1"])
    single = load_config([REPO_ROOT / "configs" / "fusion.yaml"], ["model.task=singlelabel", "train.loss=focal"])
    with pytest.raises(ConfigError, match="set train.loss=bce"):
        head_loss(single)


def test_selection_score_is_the_mean_of_micro_and_macro_f1():
    scores = selection_scores({"micro_f1": 0.70, "macro_f1": 0.50, "mAP": 0.6})
    assert scores["micro_macro_f1"] == pytest.approx(0.60) and scores["mAP"] == 0.6


def test_train_log_odds_count_only_rows_with_a_text_and_skip_constant_genres():
    texts = ["a plot", "", None, "another plot", "a third", "a fourth"]
    targets = np.array([[1, 0, 1], [1, 1, 0], [1, 1, 0], [0, 0, 1], [0, 0, 1], [0, 0, 1]])
    # Rows with a text: 0, 3, 4, 5. Genre 0: 1 of 4 -> log(1/3); genre 1: none -> 0; genre 2: all -> 0.
    assert train_log_odds(texts, targets) == pytest.approx([math.log(1 / 3), 0.0, 0.0])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_dataset(tmp_path_factory.mktemp("macro-data"), n=45)


def test_a_run_trains_with_the_chosen_loss_and_keeps_the_epoch_of_the_best_mean(tmp_path, data, monkeypatch):
    seen = []
    original = multilabel_loss

    def spy(logits, targets, options, pos_weight=None):
        seen.append(options["kind"])
        return original(logits, targets, options, pos_weight)

    monkeypatch.setattr("mmgcs.models.classifier.multilabel_loss", spy)
    out = tmp_path / "run"
    main(tiny_overrides(data, out, train__epochs=3, train__early_stopping_patience=0, train__loss="asymmetric",
                        train__metric_for_best="micro_macro_f1", model__lexical="false"),
         default_config=REPO_ROOT / "configs" / "fusion.yaml")
    assert seen and set(seen) == {"asymmetric"}
    history = json.loads((out / "history.json").read_text())
    means = [(r["val_micro_f1"] + r["val_macro_f1"]) / 2 for r in history]
    assert all(r["val_micro_macro_f1"] == pytest.approx(m) for r, m in zip(history, means))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best_epoch"] == 1 + max(range(len(means)), key=lambda i: (means[i], -i))
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["loss"] == "asymmetric"


def test_prior_once_takes_the_training_log_odds_out_of_the_lexical_intercepts(tmp_path, data):
    from safetensors.torch import load_file

    from mmgcs.data import load_movies

    runs = {}
    for once in ("false", "true"):
        out = tmp_path / f"run-{once}"
        main(tiny_overrides(data, out, train__epochs=1, train__max_steps=1, train__lexical_prior_once=once),
             default_config=REPO_ROOT / "configs" / "fusion.yaml")
        runs[once] = load_file(str(out / "model" / "model.safetensors"))
    train = load_movies(data)["train"]
    labels = json.loads((tmp_path / "run-true" / "model" / "config.json").read_text())["labels"]
    names = train.features["genres"].feature.names
    targets = np.zeros((len(train), len(labels)))
    for i, ids in enumerate(train["genres"]):
        targets[i, [labels.index(names[k]) for k in ids]] = 1
    expected = runs["false"]["lexical.bias"].numpy() - train_log_odds(train["plot"], targets)
    assert runs["true"]["lexical.bias"].numpy() == pytest.approx(expected, abs=1e-5)
    assert torch.equal(runs["true"]["lexical.weight"], runs["false"]["lexical.weight"])
