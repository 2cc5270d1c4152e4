"""Partial fine-tuning from a cached prefix (mmgcs/features/prefix.py, mmgcs/models/text_prefix.py): the top layers
run from the frozen bottom's cached output give the whole forward's features, logits and gradients (BERT-style and
MPNet-style encoders built in code); the cache is read back, keyed on what it depends on; a run trains from it,
resumes exactly, and saves a bundle that needs no cache."""

from __future__ import annotations

import atexit
import functools
import json
import logging
import shutil
import tempfile
import warnings

import datasets
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertConfig, BertModel, MPNetConfig, MPNetModel

from engine_helpers import REPO_ROOT, build_dataset, tiny_bundle, tiny_overrides
from test_runs_frozen import _as_if_killed_after_epoch_1, _same_run, _train_keeping_epoch_1

from mmgcs import GenreClassifier
from mmgcs.config import CHOICES, TrainConfig
from mmgcs.engine import main
from mmgcs.features import FeatureCacheWarning
from mmgcs.features.prefix import STORAGE_DTYPES, PrefixCache
from mmgcs.models.text import POOLINGS, HFTextTower
from mmgcs.prefix_loaders import LengthGroupedBatches, PrefixRows, collate_prefix, prefix_stage_kind
from mmgcs.testing import tiny_model, tiny_text_backbone_dir
from mmgcs.processor import GenreProcessor

FUSION = REPO_ROOT / "configs" / "fusion.yaml"
ARCHS = ("bert", "mpnet")
LAYERS = 4
TOL = 1e-5


def tiny_config(arch: str, dropout: float = 0.0, vocab: int = 60, pad: int = 0):
    sizes = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2,
                 intermediate_size=64, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, pad_token_id=pad)
    if arch == "bert":
        return BertConfig(max_position_embeddings=64, **sizes)
    # MPNet: a relative position bias computed once in its encoder and passed to every layer
    return MPNetConfig(max_position_embeddings=80, relative_attention_num_buckets=32, **sizes)


def tiny_backbone(arch: str, dropout: float = 0.0):
    model_cls = BertModel if arch == "bert" else MPNetModel
    return model_cls(tiny_config(arch, dropout), add_pooling_layer=False)


@functools.lru_cache(maxsize=None)
def backbone_dir(arch: str) -> str:
    """A local folder backbone: the tiny test tokenizer with a 4-layer BERT or MPNet of its vocabulary."""
    if arch == "bert":
        return tiny_text_backbone_dir(num_layers=LAYERS)
    folder = tempfile.mkdtemp(prefix="mmgcs-tiny-mpnet-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_text_backbone_dir())
    with torch.random.fork_rng():
        torch.manual_seed(0)
        config = tiny_config("mpnet", vocab=len(tokenizer), pad=tokenizer.pad_token_id)
        MPNetModel(config, add_pooling_layer=False).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def padded_batch(lengths=(5, 9, 12), width: int = 16, pad: int = 0):
    """Rows of the given valid lengths, padded (right) past the longest: the prefix path pads to the longest only."""
    ids = torch.randint(5, 60, (len(lengths), width))
    attn = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        attn[i, :n] = 1
    return ids.masked_fill(attn == 0, pad), attn


def prefix_rows(tower, ids, attn) -> list[dict]:
    """Each row's cached prefix, computed alone as the cache computes it (eval mode, no gradients, valid tokens)."""
    rows = []
    was_training = tower.training
    tower.eval()
    with torch.no_grad():
        for i in range(len(ids)):
            n = int(attn[i].sum())
            hidden, means = tower.encode_prefix(ids[i : i + 1, :n], attn[i : i + 1, :n])
            rows.append({"text_hidden": hidden[0], **({"text_frozen_means": means[0]} if means is not None else {})})
    tower.train(was_training)
    return rows


def trainable_grads(module, loss) -> list[torch.Tensor]:
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


# ------------------------------------------------------------------------------- same numbers as the whole forward
@pytest.mark.parametrize("trainable", [1, 2, LAYERS])
@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("arch", ARCHS)
def test_top_layers_from_the_prefix_give_the_whole_forwards_features_and_gradients(arch, pooling, trainable):
    torch.manual_seed(0)
    tower = HFTextTower(tiny_backbone(arch), pooling).set_finetune("partial", trainable).train()
    ids, attn = padded_batch(pad=tower.backbone.config.pad_token_id)
    weights = torch.randn(len(ids), tower.out_dim)

    whole = tower(ids, attn)
    expected = trainable_grads(tower, (whole * weights).sum())
    batch = collate_prefix(prefix_rows(tower, ids, attn))
    assert batch["text_hidden"].shape[1] == 12  # padded to the longest row, not to the raw batch's 16 columns
    from_prefix = tower.forward_from_prefix(batch["text_hidden"], batch["attention_mask"],
                                            batch.get("text_frozen_means"))
    got = trainable_grads(tower, (from_prefix * weights).sum())

    torch.testing.assert_close(from_prefix, whole, atol=TOL, rtol=0)
    assert len(got) == len(expected) > 0 and any(g.abs().sum() > 0 for g in got)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0)


def test_the_trainable_layers_keep_their_dropout_in_train_mode():
    torch.manual_seed(0)
    tower = HFTextTower(tiny_backbone("bert", dropout=0.5), "mean").set_finetune("partial", 1)
    ids, attn = padded_batch()
    batch = collate_prefix(prefix_rows(tower, ids, attn))
    run = lambda: tower.forward_from_prefix(batch["text_hidden"], batch["attention_mask"])  # noqa: E731
    tower.train()
    assert not torch.allclose(run(), run())
    tower.eval()
    torch.testing.assert_close(run(), tower(ids, attn), atol=TOL, rtol=0)


def test_a_prefix_for_another_cut_is_refused_with_the_remedy():
    tower = HFTextTower(tiny_backbone("bert"), "mean4").set_finetune("partial", 1)
    ids, attn = padded_batch()
    batch = collate_prefix(prefix_rows(tower, ids, attn))  # 3 frozen layers' means
    tower.set_finetune("partial", 2)
    with pytest.raises(ValueError, match="text_trainable_layers"):
        tower.forward_from_prefix(batch["text_hidden"], batch["attention_mask"], batch["text_frozen_means"])
    with pytest.raises(ValueError, match="set_finetune"):
        tower.set_finetune("frozen").forward_from_prefix(batch["text_hidden"], batch["attention_mask"])


# ------------------------------------------------------------------------------------- through the model and cache
def tiny_split(n: int = 7):
    plots = ["the young agent must escape the city", None, "a ghost story", "love", "the family of a soldier and "
             "his friends who fight a long war in the mountains and return home", "   ", "a dog and a cat"][:n]
    return datasets.Dataset.from_dict({"id": list(range(100, 100 + n)), "plot": plots,
                                       "genres": [[i % 3] for i in range(n)]})


def text_model(arch: str, trainable: int = 1, **overrides):
    model = tiny_model(image=False, text_backbone=backbone_dir(arch), text_pooling="mean4", **overrides)
    model.text_tower.set_finetune("partial", trainable)
    return model.eval()  # no dropout: the two paths must give the same numbers


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


def test_which_stages_train_from_the_prefix():
    model = tiny_model(fusion="gated")
    tcfg = TrainConfig(text_finetune="partial", text_trainable_layers=1)
    assert prefix_stage_kind(model, tcfg, ("text", "image"), 0) == "text_prefix+image_features"
    assert prefix_stage_kind(model, tcfg, ("text",), 0) == "text_prefix"
    off = [TrainConfig(text_finetune="partial", prefix_cache=False), TrainConfig(text_finetune="partial", cache_features=False),
           TrainConfig(text_finetune="full"), TrainConfig(text_finetune="partial", text_trainable_layers=0),
           TrainConfig(text_finetune="partial", image_finetune="partial"),
           TrainConfig(text_finetune="partial", image_finetune="full")]
    assert [prefix_stage_kind(model, t, ("text", "image"), 0) for t in off] == [None] * len(off)
    two_stage = TrainConfig(text_finetune="partial", freeze_epochs=1)
    assert [prefix_stage_kind(model, two_stage, ("text",), e) for e in (0, 1)] == [None, "text_prefix"]
    lstm = tiny_model(image=False, text_tower="bilstm")
    assert prefix_stage_kind(lstm, tcfg, ("text",), 0) is None


def test_training_batches_group_rows_of_similar_length_in_an_order_fixed_by_seed_and_epoch():
    lengths = torch.randint(3, 129, (1000,), generator=torch.Generator().manual_seed(0))
    batches = LengthGroupedBatches(lengths, batch_size=32, seed=42)

    def epoch(e: int) -> list[list[int]]:
        batches.sampler.set_epoch(e)
        return list(batches)

    first = epoch(0)
    assert len(first) == len(batches) == 32 and sorted(sum(first, [])) == list(range(1000))  # each row once
    assert [len(b) for b in first] == [32] * 31 + [8]  # the short batch last (accelerate shards batches so)
    assert epoch(0) == first and epoch(1) != first  # the order depends on (seed, epoch) only
    padded = sum(len(b) * int(lengths[b].max()) for b in first)
    shuffled = torch.randperm(1000, generator=torch.Generator().manual_seed(1)).split(32)
    assert padded < 0.75 * sum(len(b) * int(lengths[b].max()) for b in shuffled)


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
