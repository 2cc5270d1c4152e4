"""Partial fine-tuning of the image tower from a cached prefix (mmgcs/features/image_prefix.py): the model's logits
and gradients from the cached feature maps equal the raw path's on the movies with a poster; the cache is read back,
keyed on what it depends on; a run trains from it, resumes exactly, and saves a bundle that needs no cache. The cut
itself: tests/test_models_image_prefix.py; which stages train from a prefix: tests/test_prefix_loaders.py."""

from __future__ import annotations

import json
import logging
import shutil
import warnings

import datasets
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from engine_helpers import REPO_ROOT, build_dataset, tiny_bundle, tiny_overrides
from test_runs_frozen import _as_if_killed_after_epoch_1, _same_run, _train_keeping_epoch_1
from test_features_store import LABELS, make_split
from test_features_prefix import _test_rows
from prefix_helpers import cached_maps, trainable_grads

from mmgcs import GenreClassifier
from mmgcs.batching import decode_posters
from mmgcs.engine import main
from mmgcs.features import FeatureCacheWarning
from mmgcs.features.image_prefix import ImagePrefixCache
from mmgcs.models.image_prefix import ImageBottom, features_from_prefix, image_cut
from mmgcs.prefix_loaders import PrefixRows, collate_prefix
from mmgcs.testing import TINY_IMAGE_SIZE, tiny_model
from mmgcs.processor import GenreProcessor

FUSION = REPO_ROOT / "configs" / "fusion.yaml"
TOL = 1e-5


# ------------------------------------------------------------------------------------- through the model and cache
def image_model(blocks: int = 1, **overrides):
    model = tiny_model(LABELS, text=False, dropout=0.0, **overrides)
    model.image_tower.set_finetune("partial", blocks)
    return model


def prefix_batch(prefix, extra: dict) -> dict:
    rows = PrefixRows(None, extra, image_prefix=prefix)
    return collate_prefix([rows[i] for i in range(len(rows))])


def test_the_models_logits_and_gradients_from_the_cache_equal_the_raw_path_on_the_movies_with_a_poster(tmp_path):
    model, split = image_model().train(), make_split()  # train mode: the tuned BatchNorms read the batch
    labels = torch.tensor([[1.0, 0.0, 1.0]] * len(split))
    posters, _ = decode_posters(list(split.cast_column("poster", datasets.Image(decode=False))))
    prefix = ImagePrefixCache(tmp_path, num_workers=0).get_or_compute(model, split, batch_size=3)
    cached = prefix_batch(prefix, {"labels": labels})
    present = prefix.mask  # a missing and an undecodable poster: masked out
    assert present.tolist() == [p is not None for p in posters] == [True, False, True, True, True, False, True, True]
    assert prefix.maps.shape[0] == 6 and cached["image_hidden"].dtype == torch.float32

    raw = GenreProcessor.from_model(model)(None, [p for p in posters if p is not None])  # the whole tower over the real posters
    weights = torch.randn(int(present.sum()), len(LABELS))
    expected, out = model(**raw)["logits"], model(**cached)["logits"]
    torch.testing.assert_close(out[present], expected, atol=TOL, rtol=0)
    got = trainable_grads(model.image_tower, (out[present] * weights).sum())
    for a, b in zip(got, trainable_grads(model.image_tower, (expected * weights).sum())):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0)
    # A movie without a poster reads zero image features under a False mask, as the feature cache gives them.
    zeros = model(image_features=torch.zeros(len(split), model.image_tower.out_dim), image_mask=present)["logits"]
    torch.testing.assert_close(out[~present], zeros[~present], atol=TOL, rtol=0)


def test_a_training_batch_without_a_poster_keeps_the_tuned_stages_in_the_graph():
    tower = image_model().image_tower.train()
    maps = torch.randn(3, *ImageBottom(tower, image_cut(tower), TINY_IMAGE_SIZE).map_shape)
    out = features_from_prefix(tower, maps, torch.zeros(3, dtype=torch.bool))
    assert torch.equal(out, torch.zeros(3, tower.out_dim))
    grads = trainable_grads(tower, out.sum())  # every tuned parameter reached (DistributedDataParallel needs it)
    assert len(grads) > 0 and all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_a_second_lookup_reads_the_stored_prefix_and_the_key_follows_what_it_depends_on(tmp_path):
    model, split = image_model(), make_split()
    first = ImagePrefixCache(tmp_path, num_workers=0).get_or_compute(model, split)
    cache = ImagePrefixCache(tmp_path, num_workers=0)
    again = cache.get_or_compute(model, split)
    assert (cache.hits, cache.misses) == (1, 0)
    assert all(torch.equal(a, b) for a, b in zip(first.tensors().values(), again.tensors().values()))
    path = cache.path_for(model, split)
    assert path.name.startswith("image_prefix-test_efficientnet-") and path.with_suffix(".json").is_file()
    backbone = model.image_tower.backbone
    with torch.no_grad():  # what trains (the last stage, conv_head, bn2 and its statistics) does not count
        backbone.conv_head.weight.add_(1.0)
        backbone.bn2.running_mean.add_(1.0)
        backbone.blocks[-1][0].conv_pw.weight.add_(1.0)
    assert cache.path_for(model, split) == path

    def differs(change, undo) -> bool:
        change()
        try:
            return cache.path_for(model, split) != path
        finally:
            undo()

    tower, cfg = model.image_tower, model.config
    assert differs(lambda: tower.set_finetune("partial", 2), lambda: tower.set_finetune("partial", 1))
    assert differs(lambda: setattr(cfg, "image_crop_mode", "center"), lambda: setattr(cfg, "image_crop_mode", "squash"))
    with torch.no_grad():
        assert differs(lambda: backbone.conv_stem.weight.add_(1.0), lambda: backbone.conv_stem.weight.sub_(1.0))
    assert ImagePrefixCache(tmp_path, "bfloat16").path_for(model, split) != path
    assert cache.path_for(model, split.select(range(6))) != path


def test_a_bfloat16_prefix_halves_the_storage_and_stays_within_its_rounding(tmp_path):
    model, split = image_model().eval(), make_split()
    full = ImagePrefixCache(tmp_path, "float32", num_workers=0).get_or_compute(model, split)
    half_cache = ImagePrefixCache(tmp_path, "bfloat16", num_workers=0)
    half = half_cache.get_or_compute(model, split)
    assert half.maps.dtype == torch.bfloat16
    fp32_file = ImagePrefixCache(tmp_path, num_workers=0).path_for(model, split)
    assert half_cache.path_for(model, split).stat().st_size < 0.6 * fp32_file.stat().st_size
    torch.testing.assert_close(half.maps.float(), full.maps, atol=0, rtol=2**-8)
    logits = [model(**prefix_batch(p, {}))["logits"] for p in (full, half)]
    assert (logits[0] - logits[1]).abs().max() < 0.05


def test_an_unreadable_prefix_file_is_recomputed_with_a_warning(tmp_path):
    model, split = image_model(), make_split()
    expected = ImagePrefixCache(tmp_path, num_workers=0).get_or_compute(model, split)
    path = ImagePrefixCache(tmp_path).path_for(model, split)
    path.write_bytes(path.read_bytes()[:200])
    cache = ImagePrefixCache(tmp_path, num_workers=0)
    with pytest.warns(FeatureCacheWarning, match="unusable"):
        again = cache.get_or_compute(model, split)
    assert cache.misses == 1 and torch.equal(again.maps, expected.maps)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ImagePrefixCache(tmp_path, num_workers=0).get_or_compute(model, split)  # stored again, whole


# ------------------------------------------------------------------------------------------------ training runs
PARTIAL = {"train__image_finetune": "partial", "train__image_trainable_blocks": 1, "train__image_prefix_cache": True,
           "train__backbone_lr": 0.01,
           "train__early_stopping_patience": 0, "data__num_workers": 0}


@pytest.fixture(scope="module")
def movies(tmp_path_factory):
    return build_dataset(tmp_path_factory.mktemp("image-prefix-data"), n=45, poster_every=2, plot_every=3)


def test_a_run_tunes_the_last_stage_from_the_prefix_and_saves_a_bundle_that_needs_no_cache(tmp_path, movies, caplog):
    out, cache = tmp_path / "run", tmp_path / "cache"
    start = tiny_bundle(tmp_path / "start")
    with caplog.at_level(logging.INFO):
        main(tiny_overrides(movies, out, train__epochs=1, train__cache_dir=cache, train__init_from=start, **PARTIAL),
             default_config=FUSION)
    history = json.loads((out / "history.json").read_text())
    assert history[0]["inputs"] == "text_features+image_prefix"
    assert "Cached the image prefix" in caplog.text and len(list(cache.glob("image_prefix-*.safetensors"))) == 3
    before, after = load_file(start / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    towers = [k for k in before if k.startswith(("text_tower.", "image_tower."))]
    changed = {k for k in towers if not torch.equal(before[k], after[k])}
    last = len(GenreClassifier.from_pretrained(start).image_tower.backbone.blocks) - 1
    tuned = (f"image_tower.backbone.blocks.{last}.", "image_tower.backbone.conv_head.", "image_tower.backbone.bn2.")
    assert changed and all(k.startswith(tuned) for k in changed), sorted(changed)  # the last stage and the head conv

    shutil.rmtree(cache)
    model = GenreClassifier.from_pretrained(out / "model")
    saved = np.load(out / "test_predictions.npz")
    rows = _test_rows(movies, saved["ids"])
    scores = model.predict_batch(rows["plot"], rows["poster"], titles=rows["title"])
    probs = np.array([[s["scores"][g] for g in model.labels] for s in scores])
    np.testing.assert_allclose(probs, saved["probs"], atol=1e-4)  # the bundle on raw inputs = the run's scores


def test_a_run_from_the_image_prefix_resumes_like_the_uninterrupted_run(tmp_path, movies, caplog):
    ref = tmp_path / "reference"
    args = tiny_overrides(movies, ref, train__epochs=2, train__cache_dir=tmp_path / "cache", **PARTIAL)
    expected = _train_keeping_epoch_1(args, FUSION, ref, tmp_path / "archive")
    out = tmp_path / "run"
    _as_if_killed_after_epoch_1(ref, out)
    with caplog.at_level(logging.INFO):
        metrics = main([*[a.replace(str(ref), str(out)) for a in args], "--resume"], default_config=FUSION)
    assert "Resumed from" in caplog.text and "Prefix cache hit: image prefix" in caplog.text
    _same_run(out, ref, metrics, expected)
