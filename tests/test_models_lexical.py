"""The lexical branch: TF-IDF logistic regressions over hashed n-grams, added to the fused logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mmgcs.models.lexical import LexicalBranch
from mmgcs.testing import tiny_model
from mmgcs.processor import GenreProcessor

GENRES = ["Drama", "Comedy", "Horror"]
TEXTS = [
    "a ghost haunts the old house at night", "zombie night of the dead ghost", "a vampire and a ghost in the dark",
    "a funny wedding full of jokes", "the wedding party laughs and jokes", "jokes at a funny birthday party",
    "a mother and son grieve the family loss", "a family drama of a father and son", "the mother grieves",
]
TARGETS = np.array([[0, 0, 1]] * 3 + [[0, 1, 0]] * 3 + [[1, 0, 0]] * 3)


def fitted(n_features: int = 4096, **kwargs) -> LexicalBranch:
    branch = LexicalBranch(n_features, len(GENRES), **kwargs)
    branch.fit(TEXTS, TARGETS, c=10.0)
    return branch


def test_fit_learns_the_telling_words():
    branch = fitted()
    assert branch.fitted
    logits = branch(**branch.featurize(["a ghost at night", "jokes at the wedding", "a father and his family"]))
    assert logits.argmax(1).tolist() == [2, 1, 0]


def test_padding_and_missing_texts_add_nothing():
    branch = fitted()
    alone = branch(**branch.featurize(["a ghost at night"]))
    padded = branch(**branch.featurize(["a ghost at night"], length=50))
    assert branch.featurize(["a ghost at night"], length=50)["lexical_ids"].shape == (1, 50)
    torch.testing.assert_close(alone, padded)
    empty = branch(**branch.featurize([None, ""]))
    torch.testing.assert_close(empty, branch.bias.detach().expand(2, -1))


def test_ngrams_seen_in_fewer_than_min_df_texts_are_dropped():
    strict = fitted(min_df=3)
    loose = fitted(min_df=1)
    assert 0 < int((strict.idf > 0).sum()) < int((loose.idf > 0).sum())
    # "grieve" (one text) weighs nothing under min_df=3
    assert strict.featurize(["grieve"])["lexical_values"].abs().sum() == 0


def test_a_genre_without_positives_gets_a_constant_low_logit():
    targets = TARGETS.copy()
    targets[:, 0] = 0
    branch = LexicalBranch(1024, len(GENRES))
    summary = branch.fit(TEXTS, targets)
    assert summary["constant_genres"] == [0]
    assert float(branch(**branch.featurize(["the mother grieves"]))[0, 0]) < -5


def test_fit_rejects_mismatched_targets_and_textless_data():
    branch = LexicalBranch(1024, len(GENRES))
    with pytest.raises(ValueError, match="targets must be"):
        branch.fit(TEXTS, TARGETS[:, :2])
    with pytest.raises(ValueError, match="no training row has a text"):
        branch.fit([None, " "], TARGETS[:2])


def lexical_model(**overrides):
    model = tiny_model(GENRES, lexical=True, lexical_features=4096, **overrides)
    model.lexical.fit(TEXTS, TARGETS, c=10.0)
    return model.eval()


def test_the_branch_adds_to_the_fused_logits_only_where_the_text_is_present():
    model = lexical_model()
    batch = GenreProcessor.from_model(model)(["a ghost at night", None], [None, None])
    with torch.no_grad():
        with_branch = model(**batch)["logits"]
        model.config.lexical_weight = 0.0
        fused = model(**batch)["logits"]
        lexical = model.lexical(batch["lexical_ids"], batch["lexical_values"])
    torch.testing.assert_close(with_branch[0], fused[0] + lexical[0])
    torch.testing.assert_close(with_branch[1], fused[1])  # no plot: the branch is off for that row


def test_the_loss_trains_the_head_alone():
    model = lexical_model().train()
    batch = GenreProcessor.from_model(model)(["a ghost at night"], [None])
    labels = torch.tensor([[0.0, 0.0, 1.0]])
    torch.manual_seed(0)
    a = model(**batch, labels=labels)["loss"]
    model.config.lexical_weight = 3.0
    torch.manual_seed(0)
    b = model(**batch, labels=labels)["loss"]
    torch.testing.assert_close(a, b)
    a.backward()
    assert all(p.grad is None for p in model.lexical.parameters())


def test_the_optimizer_leaves_the_branch_alone():
    from mmgcs.config import TrainConfig
    from mmgcs.optim import build_optimizer

    model = lexical_model()
    optimizer = build_optimizer(model, TrainConfig())
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not in_optimizer & {id(p) for p in model.lexical.parameters()}


def test_save_and_load_keep_the_branch_bit_for_bit(tmp_path):
    from mmgcs import GenreClassifier

    model = lexical_model()
    model.config.lexical_weight = 0.75
    model.save_pretrained(tmp_path)
    assert {"lexical.idf", "lexical.weight", "lexical.bias"} <= set(load_file(str(tmp_path / "model.safetensors")))
    assert json.loads((tmp_path / "config.json").read_text())["lexical_weight"] == 0.75
    assert "**Lexical branch:** TF-IDF logistic regression" in (tmp_path / "README.md").read_text()
    assert "weight 0.75" in (tmp_path / "README.md").read_text()
    loaded = GenreClassifier.from_pretrained(tmp_path)
    assert loaded.lexical.fitted and loaded.config.lexical_weight == 0.75
    plots = ["a ghost at night", "jokes at the wedding", None]
    posters = [None, None, np.zeros((40, 30, 3), dtype=np.uint8)]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**GenreProcessor.from_model(loaded)(plots, posters))["logits"],
                                   model(**GenreProcessor.from_model(model)(plots, posters))["logits"], rtol=0, atol=0)


def test_by_modality_views_put_the_branch_in_the_plot_view_only():
    model = lexical_model()
    poster = np.full((40, 30, 3), 128, dtype=np.uint8)
    result = model.predict(plot="a ghost at night", poster=poster, by_modality=True)
    model.config.lexical_weight = 0.0
    without = model.predict(plot="a ghost at night", poster=poster, by_modality=True)
    views, plain = result["by_modality"], without["by_modality"]
    assert views["image"] == plain["image"]
    assert views["text"]["Horror"] > plain["text"]["Horror"]
    assert views["fused"]["Horror"] > plain["fused"]["Horror"]


def test_the_config_refuses_a_branch_without_text():
    from mmgcs import create_model

    with pytest.raises(ValueError, match="lexical reads the plot text"):
        create_model(labels=GENRES, text_tower="none", image_backbone="test_efficientnet", pretrained=False,
                     lexical=True)


def test_a_training_run_fits_the_branch_tunes_its_weight_and_the_bundle_scores_the_same(tmp_path):
    """Head trained on cached features + the branch fed from the split; the bundle, served through
    model.preprocess (mmgcs.evaluate), gives the same test metrics."""
    from engine_helpers import REPO_ROOT, build_dataset, tiny_overrides

    from mmgcs import GenreClassifier
    from mmgcs.engine import LEXICAL_WEIGHTS, main
    from mmgcs.evaluate import main as evaluate

    data = build_dataset(tmp_path, n=60)
    out = tmp_path / "run"
    metrics = main(tiny_overrides(data, out, model__lexical="true", model__lexical_features=2048, model__lexical_min_df=1,
                                  train__epochs=2), default_config=REPO_ROOT / "configs" / "fusion.yaml")
    lexical = metrics["lexical"]
    assert lexical["weight"] in LEXICAL_WEIGHTS and lexical["weight"] > 0  # the n-grams here name the genres
    assert set(lexical["val_micro_f1_by_weight"]) == {str(w) for w in LEXICAL_WEIGHTS}
    bundle = GenreClassifier.from_pretrained(out / "model")
    assert bundle.lexical.fitted and bundle.config.lexical_weight == lexical["weight"]
    history = json.loads((out / "history.json").read_text())
    assert {h["inputs"] for h in history} == {"features"}

    report = tmp_path / "eval.json"
    evaluate(["--model", str(out / "model"), "--data", str(data), "--split", "test", "--out", str(report)])
    served = json.loads(report.read_text())["metrics"]
    for key in ("micro_f1", "macro_f1", "mAP"):
        assert served[key] == pytest.approx(metrics["test"][key], abs=1e-6), key
