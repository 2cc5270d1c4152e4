"""Partial fine-tuning from a cached prefix (mmgcs/features/prefix.py): the model's logits and gradients from the
cached text prefix equal the raw path's (BERT-style and MPNet-style encoders built in code); the cache is read back,
keyed on what it depends on; a run trains from it, resumes exactly, and saves a bundle that needs no cache. The cut
itself: tests/test_models_text_prefix.py; which stages train from a prefix, and their batches:
tests/test_prefix_loaders.py."""

from __future__ import annotations

import json
import logging
import shutil
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from engine_helpers import REPO_ROOT, build_dataset, tiny_bundle, tiny_overrides
from test_runs_frozen import _as_if_killed_after_epoch_1, _same_run, _train_keeping_epoch_1
from prefix_helpers import ARCHS, TOL, text_model, tiny_split, trainable_grads

from mmgcs import GenreClassifier
from mmgcs.config import CHOICES, TrainConfig
from mmgcs.engine import main
from mmgcs.features import FeatureCacheWarning
from mmgcs.features.prefix import STORAGE_DTYPES, PrefixCache
from mmgcs.prefix_loaders import PrefixRows, collate_prefix
from mmgcs.processor import GenreProcessor

FUSION = REPO_ROOT / "configs" / "fusion.yaml"


# ------------------------------------------------------------------------------------- through the model and cache
@pytest.mark.parametrize("arch", ARCHS)
def test_the_models_logits_and_gradients_from_the_cache_equal_the_raw_path(arch, tmp_path):
    model, split = text_model(arch), tiny_split()
    labels = torch.tensor([[1.0, 0.0, 1.0]] * len(split))
    raw = dict(GenreProcessor.from_model(model)(split["plot"]), labels=labels)
    prefix = PrefixCache(tmp_path).get_or_compute(model, split, batch_size=3)  # batches unlike the raw one
    rows = PrefixRows(prefix, {"labels": labels})
    cached = collate_prefix([rows[i] for i in range(len(rows))])
    assert prefix.mask.tolist() == raw["text_mask"].tolist() == [True, False, True, True, True, False, True]

    expected, out = model(**raw), model(**cached)
    torch.testing.assert_close(out["logits"], expected["logits"], atol=TOL, rtol=0)
    for a, b in zip(trainable_grads(model, out["loss"]), trainable_grads(model, expected["loss"])):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0)


def test_a_second_lookup_reads_the_stored_prefix_and_the_key_follows_what_it_depends_on(tmp_path):
    model, split = text_model("bert"), tiny_split()
    first = PrefixCache(tmp_path).get_or_compute(model, split)
    cache = PrefixCache(tmp_path)
    again = cache.get_or_compute(model, split)
    assert (cache.hits, cache.misses) == (1, 0)
    assert all(torch.equal(a, b) for a, b in zip(first.tensors().values(), again.tensors().values()))
    path = cache.path_for(model, split)
    assert path.name.startswith("text_prefix-") and path.with_suffix(".json").is_file()
    top, bottom = model.text_tower.backbone.encoder.layer[-1], model.text_tower.backbone.embeddings
    with torch.no_grad():
        top.output.dense.weight.add_(1.0)  # the trainable layers change every step: the prefix does not
    assert cache.path_for(model, split) == path

    def differs(change, undo) -> bool:
        change()
        try:
            return cache.path_for(model, split) != path
        finally:
            undo()

    cfg, tower = model.config, model.text_tower
    assert differs(lambda: tower.set_finetune("partial", 2), lambda: tower.set_finetune("partial", 1))
    assert differs(lambda: setattr(cfg, "max_text_length", 16), lambda: setattr(cfg, "max_text_length", 32))
    assert differs(lambda: setattr(cfg, "text_template", "{title}. {plot}"), lambda: setattr(cfg, "text_template", "{plot}"))
    with torch.no_grad():
        assert differs(lambda: bottom.word_embeddings.weight.add_(1.0), lambda: bottom.word_embeddings.weight.sub_(1.0))
    assert PrefixCache(tmp_path, "bfloat16").path_for(model, split) != path
    assert cache.path_for(model, split.select(range(6))) != path


def test_a_bfloat16_prefix_halves_the_storage_and_stays_within_its_rounding(tmp_path):
    model, split = text_model("bert"), tiny_split()
    full = PrefixCache(tmp_path, "float32").get_or_compute(model, split)
    half_cache = PrefixCache(tmp_path, "bfloat16")
    half = half_cache.get_or_compute(model, split)
    assert half.hidden.dtype == torch.bfloat16 and half.frozen_means.dtype == torch.bfloat16
    assert half_cache.path_for(model, split).stat().st_size < 0.6 * PrefixCache(tmp_path).path_for(model, split).stat().st_size
    torch.testing.assert_close(half.hidden.float(), full.hidden, atol=0, rtol=2**-8)
    logits = [model(**collate_prefix([PrefixRows(p, {})[i] for i in range(len(split))]))["logits"] for p in (full, half)]
    assert (logits[0] - logits[1]).abs().max() < 0.05


def test_an_unreadable_prefix_file_is_recomputed_with_a_warning(tmp_path):
    model, split = text_model("bert"), tiny_split()
    expected = PrefixCache(tmp_path).get_or_compute(model, split)
    path = PrefixCache(tmp_path).path_for(model, split)
    path.write_bytes(path.read_bytes()[:200])
    cache = PrefixCache(tmp_path)
    with pytest.warns(FeatureCacheWarning, match="unusable"):
        again = cache.get_or_compute(model, split)
    assert cache.misses == 1 and torch.equal(again.hidden, expected.hidden)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PrefixCache(tmp_path).get_or_compute(model, split)  # stored again, whole


def test_the_storage_dtypes_are_the_configs_choices():
    assert set(STORAGE_DTYPES) == set(CHOICES["train.prefix_dtype"]) and TrainConfig.prefix_dtype in STORAGE_DTYPES


# ------------------------------------------------------------------------------------------------ training runs
PARTIAL = {"train__text_finetune": "partial", "train__text_trainable_layers": 1, "train__backbone_lr": 0.01,
           "train__early_stopping_patience": 0}


@pytest.fixture(scope="module")
def movies(tmp_path_factory):
    return build_dataset(tmp_path_factory.mktemp("prefix-data"), n=45, poster_every=2, plot_every=3)


def test_a_run_tunes_the_top_layer_from_the_prefix_and_saves_a_bundle_that_needs_no_cache(tmp_path, movies, caplog):
    out, cache = tmp_path / "run", tmp_path / "cache"
    start = tiny_bundle(tmp_path / "start")
    with caplog.at_level(logging.INFO):
        main(tiny_overrides(movies, out, train__epochs=1, train__cache_dir=cache, train__init_from=start, **PARTIAL),
             default_config=FUSION)
    history = json.loads((out / "history.json").read_text())
    assert history[0]["inputs"] == "text_prefix+image_features"
    assert "Prefix cache miss" in caplog.text and len(list(cache.glob("text_prefix-*.safetensors"))) == 3
    before, after = load_file(start / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    changed = {k for k in before if k.startswith("text_tower.") and not torch.equal(before[k], after[k])}
    assert changed and all(".layer.1." in k for k in changed), sorted(changed)  # the last of 2 layers only

    shutil.rmtree(cache)
    model = GenreClassifier.from_pretrained(out / "model")
    saved = np.load(out / "test_predictions.npz")
    rows = _test_rows(movies, saved["ids"])
    scores = model.predict_batch(rows["plot"], rows["poster"], titles=rows["title"])
    probs = np.array([[s["scores"][g] for g in model.labels] for s in scores])
    np.testing.assert_allclose(probs, saved["probs"], atol=1e-4)  # the bundle on raw inputs = the run's scores


def _test_rows(movies, ids) -> dict:
    from mmgcs.data import load_movies

    split = load_movies(movies)["test"]
    by_id = {row["id"]: row for row in split}
    rows = [by_id[int(i)] for i in ids]
    return {k: [r[k] for r in rows] for k in ("plot", "poster", "title")}


def test_a_run_from_the_prefix_resumes_like_the_uninterrupted_run(tmp_path, movies, caplog):
    ref = tmp_path / "reference"
    args = tiny_overrides(movies, ref, train__epochs=2, train__cache_dir=tmp_path / "cache", **PARTIAL)
    expected = _train_keeping_epoch_1(args, FUSION, ref, tmp_path / "archive")
    out = tmp_path / "run"
    first = _as_if_killed_after_epoch_1(ref, out)
    # The checkpoint holds the tuned layer (the last of the tiny BERT's 2) and none of the frozen ones: resuming
    # rebuilds those from the backbone and must take the tuned one from here.
    bundle = load_file(ref / "model" / "model.safetensors")
    assert {k for k in load_file(first / "model.safetensors") if k.startswith("text_tower.")} == {
        k for k in bundle if k.startswith("text_tower.") and ".layer.1." in k} != set()
    with caplog.at_level(logging.INFO):
        metrics = main([*[a.replace(str(ref), str(out)) for a in args], "--resume"], default_config=FUSION)
    assert "Resumed from" in caplog.text and "Prefix cache hit" in caplog.text
    _same_run(out, ref, metrics, expected)
