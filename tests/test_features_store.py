"""The on-disk feature cache: hit / miss / invalidation, missing rows, corrupt files, and that cached features
are exactly what the model computes on raw inputs."""

from __future__ import annotations

import errno
import io
import logging
import os
import stat
import threading
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Image, Sequence, Value
from filelock import FileLock

import mmgcs.features as F
import mmgcs.features.locks as L
import mmgcs.features.store as store
import mmgcs.features.workers as W
from mmgcs.features import CacheLockTimeout, FeatureCache, FeatureCacheWarning
from mmgcs.testing import tiny_model
from mmgcs.processor import GenreProcessor

LABELS = ["Action", "Comedy", "Drama"]
PLOTS = [
    "a soldier must fight a battle to save the city",
    "love",
    None,  # missing plot
    "   ",  # blank plot counts as missing
    "the ghost of a dark house haunts a family at night while a young detective tries to find the killer",
    "friends",
    "a princess meets a dragon",
    "war",
]


def _jpeg(seed: int, size=(30, 45)) -> bytes:
    rng = np.random.RandomState(seed)
    buf = io.BytesIO()
    PIL.Image.fromarray(rng.randint(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _posters():
    posters = [{"bytes": _jpeg(i), "path": None} for i in range(len(PLOTS))]
    posters[1] = None  # missing poster
    posters[5] = {"bytes": b"<html>not an image</html>", "path": None}  # corrupt poster
    return posters


def make_split(plots=PLOTS, posters=None) -> Dataset:
    posters = _posters() if posters is None else posters
    features = Features(
        {
            "id": Value("int64"),
            "plot": Value("string"),
            "poster": Image(),
            "genres": Sequence(ClassLabel(names=LABELS)),
        }
    )
    return Dataset.from_dict(
        {"id": [100 + i for i in range(len(plots))], "plot": list(plots), "poster": posters, "genres": [[0]] * len(plots)},
        features=features,
    )


@pytest.fixture(scope="module")
def split() -> Dataset:
    return make_split()


@pytest.fixture()
def model():
    return tiny_model(LABELS, seed=0)


@pytest.fixture()
def cache(tmp_path) -> FeatureCache:
    return FeatureCache(tmp_path / "cache")


def _cache_files(folder: Path) -> list[str]:
    """The names in a cache folder but its lock files' folder."""
    return sorted(p.name for p in folder.iterdir() if p.name != ".locks")


def _get(cache, model, split, modality, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FeatureCacheWarning)  # the deliberately corrupt poster
        return cache.get_or_compute(model, split, modality, batch_size=kw.pop("batch_size", 3), num_workers=kw.pop("num_workers", 0), **kw)


class CountingCompute:
    """Wraps the cache's compute_features (mmgcs.features.store's) to count real computations."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = store.compute_features

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(store, "compute_features", counted)


# ------------------------------------------------------------------------------------- correctness
def test_image_features_equal_encode_image_of_preprocess(cache, model, split, monkeypatch):
    monkeypatch.setattr(W, "MIN_POSTERS_TO_OPTIMIZE", 0)  # the optimized (traced, BatchNorm-folded) encoder too
    with pytest.warns(FeatureCacheWarning, match=r"id 105: .*not a recognised image"):
        feats, mask = cache.get_or_compute(model, split, "image", batch_size=3, num_workers=0)
    assert mask.tolist() == [True, False, True, True, True, False, True, True]
    assert feats.dtype == torch.float32 and feats.shape == (len(split), model.image_tower.out_dim)
    assert torch.all(feats[~mask] == 0)
    rows = [i for i in range(len(split)) if mask[i]]
    raw = split.cast_column("poster", Image(decode=False))["poster"]
    model.eval()
    with torch.no_grad():
        expected = model.encode_image(GenreProcessor.from_model(model)(posters=[raw[i] for i in rows])["pixel_values"])
    torch.testing.assert_close(feats[rows], expected, rtol=1e-4, atol=1e-5)


def test_text_features_equal_encode_text_of_preprocess(cache, model, split):
    # batch_size=2 with plots of very different lengths: batches are length-sorted, then put back in row order
    feats, mask = cache.get_or_compute(model, split, "text", batch_size=2)
    assert mask.tolist() == [True, True, False, False, True, True, True, True]
    assert torch.all(feats[~mask] == 0)
    rows = [i for i in range(len(split)) if mask[i]]
    model.eval()
    with torch.no_grad():
        batch = GenreProcessor.from_model(model)(plots=[PLOTS[i] for i in rows])
        expected = model.encode_text(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(feats[rows], expected, rtol=1e-4, atol=1e-5)


def test_features_do_not_change_the_models_mode_or_layout(cache, model, split):
    model.train()
    before = {k: v.clone() for k, v in model.image_tower.state_dict().items()}
    _get(cache, model, split, "image")
    assert model.training and model.image_tower.training
    after = model.image_tower.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.is_contiguous() for p in model.image_tower.parameters())  # no channels-last leaking into the model


def test_worker_processes_give_the_same_features(tmp_path, model, split, monkeypatch):
    monkeypatch.setattr(W, "MIN_POSTERS_TO_OPTIMIZE", 0)  # workers trace their own tower copy too
    one, mask_one = _get(FeatureCache(tmp_path / "a"), model, split, "image", num_workers=0)
    two, mask_two = _get(FeatureCache(tmp_path / "b"), model, split, "image", num_workers=2, batch_size=2)
    assert torch.equal(mask_one, mask_two)
    torch.testing.assert_close(one, two, rtol=1e-4, atol=1e-6)  # batch composition changes float rounding only


@pytest.mark.parametrize("fast", ["0", "1"])
def test_text_worker_processes_or_onnx_runtime_give_the_same_features(tmp_path, model, split, monkeypatch, fast):
    """On CPU with workers allowed, plots go through the ONNX Runtime text encoder when it builds (checked against
    the eager tower), else (MMGCS_FAST_PATH=0, or no onnxruntime) through the worker processes' eager towers."""
    if fast == "1":
        pytest.importorskip("onnxruntime", reason="the fast text path needs onnxruntime (mmgcs[fast])")
    monkeypatch.setenv("MMGCS_FAST_PATH", fast)
    built = []
    original = W._fast_text_encoder
    monkeypatch.setattr(W, "_fast_text_encoder", lambda *a: built.append(original(*a)) or built[-1])
    one, mask_one = _get(FeatureCache(tmp_path / "a"), model, split, "text", num_workers=0)
    two, mask_two = _get(FeatureCache(tmp_path / "b"), model, split, "text", num_workers=2, batch_size=2)
    assert len(built) == 1 and (built[0] is not None) == (fast == "1")
    assert torch.equal(mask_one, mask_two)
    torch.testing.assert_close(one, two, rtol=1e-4, atol=1e-6)


def test_the_onnx_text_encoder_is_built_once_per_tower_and_weights(tmp_path, model, split, monkeypatch):
    pytest.importorskip("onnxruntime", reason="the fast text path needs onnxruntime (mmgcs[fast])")
    monkeypatch.setenv("MMGCS_FAST_PATH", "1")
    builds = []
    original = W.FastPath
    monkeypatch.setattr(W, "FastPath", lambda m: builds.append(1) or original(m))
    first, _ = _get(FeatureCache(tmp_path / "a"), model, split, "text", num_workers=2, batch_size=2)
    _get(FeatureCache(tmp_path / "b"), model, split.select(range(4)), "text", num_workers=2, batch_size=2)
    assert builds == [1]  # a second split (as a run's validation and test) reuses the export
    with torch.no_grad():
        next(model.text_tower.parameters()).add_(0.5)  # changed weights: the snapshot would be stale
    changed, _ = _get(FeatureCache(tmp_path / "c"), model, split, "text", num_workers=2, batch_size=2)
    assert builds == [1, 1]
    with torch.no_grad():
        eager, _ = F.compute_text_features(model, split, batch_size=2, num_workers=0)
    torch.testing.assert_close(changed, eager, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(first, changed)


def test_a_bad_fast_path_setting_names_the_choices(tmp_path, model, split, monkeypatch):
    monkeypatch.setenv("MMGCS_FAST_PATH", "maybe")
    with pytest.raises(ValueError, match=r"MMGCS_FAST_PATH='maybe': use 1 .* or 0"):
        _get(FeatureCache(tmp_path / "a"), model, split, "text", num_workers=2, batch_size=2)


def test_optimized_encoder_is_checked_against_encode_image(model, monkeypatch):
    sample = torch.randn(2, 3, 64, 64)
    model.eval()
    assert F.FastImageEncoder(model, sample).kind == "torchscript-frozen"

    def wrong(model, sample):
        return lambda x: torch.zeros(x.shape[0], model.image_tower.out_dim)

    monkeypatch.setattr(F.FastImageEncoder, "_trace", staticmethod(wrong))
    encoder = F.FastImageEncoder(model, sample)
    assert encoder.kind == "eager"
    with torch.no_grad():
        torch.testing.assert_close(encoder(sample), model.encode_image(sample))


# ------------------------------------------------------------------------------------- hit / miss
def test_miss_stores_then_a_later_run_loads_without_recomputing(tmp_path, split, monkeypatch):
    counter = CountingCompute(monkeypatch)
    first = FeatureCache(tmp_path / "cache")
    feats, mask = _get(first, tiny_model(LABELS, seed=0), split, "text")
    assert (first.misses, first.hits, counter.calls) == (1, 0, 1)
    files = _cache_files(tmp_path / "cache")
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".safetensors")
    assert not any(name.startswith(".tmp-") for name in files)
    # the miss was computed under the entry's lock, whose (empty) file stays for the next writer
    assert [p.name for p in (tmp_path / "cache" / ".locks").iterdir()] == [files[1] + ".lock"]

    # "a later run": a new cache object and a new model object with the same weights
    later = FeatureCache(tmp_path / "cache")
    feats2, mask2 = _get(later, tiny_model(LABELS, seed=0), split, "text")
    assert (later.misses, later.hits, counter.calls) == (0, 1, 1)
    assert torch.equal(feats, feats2) and torch.equal(mask, mask2)
    assert later.entries()[0]["present"] == int(mask.sum())


def test_text_and_image_are_cached_apart(cache, model, split):
    text, _ = _get(cache, model, split, "text")
    image, _ = _get(cache, model, split, "image")
    assert text.shape[1] != image.shape[1]
    assert (cache.misses, cache.hits) == (2, 0)


# ------------------------------------------------------------------------------------ invalidation
@pytest.mark.parametrize("modality", ["text", "image"])
def test_fewer_rows_are_a_miss(cache, model, split, modality):
    _get(cache, model, split, modality)
    _get(cache, model, split.select(range(len(split) - 1)), modality)
    assert cache.misses == 2 and cache.hits == 0
    _get(cache, model, split, modality)
    assert cache.hits == 1


def test_new_plots_recompute_text_features_only(cache, model, split):
    """Another text template rewrites the plot column: the poster features must come from the cache."""
    from mmgcs.batching import apply_text_template

    titled = split.add_column("title", [f"Film {i}" for i in range(len(split))])
    text, _ = _get(cache, model, titled, "text")
    image, _ = _get(cache, model, titled, "image")
    composed = apply_text_template(titled, "{title}. {plot}")
    assert composed["plot"][0].startswith("Film 0. ")
    text2, mask2 = _get(cache, model, composed, "text")
    image2, _ = _get(cache, model, composed, "image")
    assert (cache.misses, cache.hits) == (3, 1)  # text, image, text again; then the image hit
    assert torch.equal(image, image2)
    assert not torch.allclose(text[mask2], text2[mask2])


def test_a_changed_poster_recomputes_image_features_only(cache, model, split):
    _get(cache, model, split, "text")
    _get(cache, model, split, "image")
    posters = _posters()
    posters[2] = {"bytes": _jpeg(99), "path": None}
    changed = make_split(posters=posters)
    _get(cache, model, changed, "text")
    assert (cache.misses, cache.hits) == (2, 1)
    feats, _ = _get(cache, model, changed, "image")
    assert (cache.misses, cache.hits) == (3, 1)
    model.eval()
    with torch.no_grad():
        expected = model.encode_image(GenreProcessor.from_model(model)(posters=[posters[2]])["pixel_values"])
    torch.testing.assert_close(feats[2:3], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("modality", ["text", "image"])
def test_reordered_rows_are_a_miss_and_come_back_in_the_new_order(cache, model, split, modality):
    feats, mask = _get(cache, model, split, modality)
    order = list(range(len(split)))[::-1]
    feats2, mask2 = _get(cache, model, split.select(order), modality)
    assert cache.misses == 2 and cache.hits == 0
    assert torch.equal(mask2, mask[order])
    torch.testing.assert_close(feats2, feats[order], rtol=1e-4, atol=1e-6)


def test_new_row_ids_are_a_miss(cache, model, split):
    _get(cache, model, split, "text")
    _get(cache, model, split.map(lambda row: {"id": row["id"] + 1000}), "text")
    assert cache.misses == 2 and cache.hits == 0


def test_undecoded_posters_and_other_columns_share_the_key(cache, model, split):
    """What is not read by the tower does not count: the Image feature's decode flag, the genres, extra columns."""
    _get(cache, model, split, "image")
    _get(cache, model, split.cast_column("poster", Image(decode=False)), "image")
    _get(cache, model, split.map(lambda row: {"genres": [1, 2]}).add_column("note", ["x"] * len(split)), "image")
    assert (cache.misses, cache.hits) == (1, 2)


def test_a_poster_file_changed_under_the_same_path_is_a_miss(cache, model, tmp_path):
    paths = []
    for i in range(3):
        path = tmp_path / f"{i}.jpg"
        path.write_bytes(_jpeg(i))
        paths.append(str(path))
    on_disk = make_split(plots=PLOTS[:3], posters=paths)
    _get(cache, model, on_disk, "image")
    _get(cache, model, on_disk, "image")
    Path(paths[1]).write_bytes(_jpeg(42, size=(31, 45)))  # new content (and size) under the same name
    feats, _ = _get(cache, model, on_disk, "image")
    assert (cache.misses, cache.hits) == (2, 1)
    with torch.no_grad():
        expected = model.eval().encode_image(GenreProcessor.from_model(model)(posters=[paths[1]])["pixel_values"])
    torch.testing.assert_close(feats[1:2], expected, rtol=1e-4, atol=1e-5)


def test_column_digest_reads_the_logical_rows_not_the_stored_table():
    """select/shuffle keep the old table behind an index mapping; equal rows must hash equal however stored."""
    full = make_split()
    picked = full.select([4, 2, 6])
    rebuilt = make_split(plots=[PLOTS[i] for i in (4, 2, 6)], posters=[_posters()[i] for i in (4, 2, 6)])
    for column in ("plot", "poster", "id"):
        assert F.column_digest(picked, column) != F.column_digest(full, column)
        if column != "id":
            assert F.column_digest(picked, column) == F.column_digest(rebuilt, column)
    # the same rows stored in other chunks (as after a map, which rewrites the table in batches)
    from datasets import concatenate_datasets

    rechunked = concatenate_datasets([full.select(range(3)).flatten_indices(), full.select(range(3, 8)).flatten_indices()])
    assert rechunked.data.column("id").num_chunks == 2 and full.data.column("id").num_chunks == 1
    for column in ("plot", "poster", "id"):
        assert F.column_digest(rechunked, column) == F.column_digest(full, column)
    # slices that start inside a stored chunk (HASH_ROWS smaller than the table)
    assert F.column_digest(full.select(range(2, 6)), "plot") == F.column_digest(make_split(plots=PLOTS[2:6], posters=_posters()[2:6]), "plot")


def test_changed_preprocessing_is_a_miss(cache, model, split):
    _get(cache, model, split, "image")
    _get(cache, model, split, "text")
    model.config.image_std = [0.5, 0.5, 0.5]
    _get(cache, model, split, "image")
    model.config.max_text_length = 8
    _get(cache, model, split, "text")
    assert cache.misses == 4 and cache.hits == 0


def test_changed_tower_weights_are_a_miss(cache, split):
    # the "fine-tuned, then frozen" case: same backbone name and config, other weights
    model = tiny_model(LABELS, seed=0)
    before, _ = _get(cache, model, split, "image")
    with torch.no_grad():
        next(model.image_tower.parameters()).add_(0.5)
    after, mask = _get(cache, model, split, "image")
    assert (cache.misses, cache.hits) == (2, 0)
    assert not torch.allclose(before[mask], after[mask])
    # a different random init of the same architecture is a different tower too
    _get(cache, tiny_model(LABELS, seed=1), split, "image")
    assert cache.misses == 3


def test_batch_size_and_workers_are_not_part_of_the_key(cache, model, split):
    _get(cache, model, split, "text", batch_size=2)
    _get(cache, model, split, "text", batch_size=64, num_workers=2)
    assert (cache.misses, cache.hits) == (1, 1)


# ------------------------------------------------------------------------------- damaged cache files
@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),  # truncated
        lambda p: p.write_bytes(b"\x00" * 64),  # garbage
        lambda p: p.write_bytes(b""),  # empty
    ],
    ids=["truncated", "garbage", "empty"],
)
def test_a_corrupt_cache_file_is_recomputed_with_a_warning(cache, model, split, damage):
    feats, _ = _get(cache, model, split, "text")
    path = cache.path_for(model, split, "text")
    damage(path)
    with pytest.warns(FeatureCacheWarning, match="unusable.*recomputing"):
        again, _ = cache.get_or_compute(model, split, "text", batch_size=3, num_workers=0)
    assert cache.misses == 2
    torch.testing.assert_close(again, feats)
    _get(cache, model, split, "text")  # repaired: a hit now
    assert cache.hits == 1


def test_a_file_stored_under_another_key_is_not_trusted(cache, model, split):
    _get(cache, model, split, "text")
    path = cache.path_for(model, split, "text")
    other = split.map(lambda row: {"plot": (row["plot"] or "") + " again"})  # new plots → another file name
    other_path = cache.path_for(model, other, "text")
    assert other_path != path
    other_path.write_bytes(path.read_bytes())  # e.g. copied or renamed by hand
    with pytest.warns(FeatureCacheWarning, match="stored key does not match"):
        cache.get_or_compute(model, other, "text", batch_size=3, num_workers=0)
    assert cache.misses == 2


def test_a_crash_while_writing_leaves_no_file_that_reads_as_valid(cache, model, split, monkeypatch):
    import safetensors.torch

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        _get(cache, model, split, "text")
    assert not cache.path_for(model, split, "text").exists()
    assert _cache_files(cache.cache_dir) == []  # the temporary file is gone too
    monkeypatch.undo()
    _get(cache, model, split, "text")
    assert cache.misses == 2 and cache.path_for(model, split, "text").exists()


def test_an_unwritable_cache_still_returns_features(tmp_path, model, split):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should be")
    cache = FeatureCache(blocker / "cache")
    with pytest.warns(FeatureCacheWarning, match="Could not write the feature cache"):
        feats, mask = cache.get_or_compute(model, split, "text", batch_size=3, num_workers=0)
    assert feats.shape[0] == len(split) and mask.sum() == 6


def test_clear_removes_every_file(cache, model, split):
    _get(cache, model, split, "text")
    (cache.cache_dir / ".tmp-leftover.safetensors").write_bytes(b"x")
    assert cache.clear() == 4  # the entry and its sidecar, the leftover, the entry's lock file
    assert list(cache.cache_dir.iterdir()) == []


def test_cache_files_get_the_umask_permissions_like_any_new_file(cache, model, split):
    """Not mkstemp's 0600: a cache folder shared by a group (several machines, several accounts) stays readable."""
    old = os.umask(0o022)
    try:
        _get(cache, model, split, "text")
    finally:
        os.umask(old)
    path = cache.path_for(model, split, "text")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE(path.with_suffix(".json").stat().st_mode) == 0o644


# ------------------------------------------------------------------------- processes sharing one cache folder
def test_a_second_process_waits_for_the_entry_being_computed_then_reads_it(tmp_path, model, split, monkeypatch,
                                                                          caplog):
    """Two caches on one folder (runs side by side, or machines on one NFS folder): the second finds no file while
    the first computes, waits on the entry's lock (saying so), then reads what the first stored: computed once."""
    monkeypatch.setattr(L, "LOCK_REPORT_S", 0.05)
    computing, waited = threading.Event(), threading.Event()

    class SeesTheWait(logging.Handler):
        def emit(self, record):
            if "Waiting for another process computing text features of 8 rows" in record.getMessage():
                waited.set()

    real, calls = store.compute_features, []

    def slow(*args, **kwargs):  # the first cache's featurization, held until the second one waits on the lock
        calls.append(threading.current_thread().name)
        computing.set()
        assert waited.wait(timeout=60), "the second cache did not wait on the entry's lock"
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "compute_features", slow)
    first, second = FeatureCache(tmp_path / "shared"), FeatureCache(tmp_path / "shared")
    out = {}
    thread = threading.Thread(target=lambda: out.update(first=_get(first, model, split, "text")), name="first")
    handler = SeesTheWait()
    L.logger.addHandler(handler)
    try:
        thread.start()
        assert computing.wait(timeout=60)
        with caplog.at_level(logging.INFO, logger="mmgcs.features.store"):
            out["second"] = _get(second, model, split, "text")
        thread.join(timeout=60)
    finally:
        L.logger.removeHandler(handler)
    assert not thread.is_alive() and calls == ["first"]
    assert (first.misses, first.hits, second.misses, second.hits) == (1, 0, 0, 1)
    assert torch.equal(out["first"][0], out["second"][0]) and torch.equal(out["first"][1], out["second"][1])
    assert "stored by another process while this one waited" in caplog.text


def test_a_lock_held_too_long_stops_the_wait_with_a_clear_error(tmp_path, model, split):
    cache = FeatureCache(tmp_path / "shared", lock_wait_s=0.3)
    entry = cache.path_for(model, split, "text")
    L.lock_path(entry).parent.mkdir(parents=True)
    holder = FileLock(str(L.lock_path(entry)))  # another process computing that entry, for too long
    holder.acquire()
    try:
        with pytest.raises(CacheLockTimeout, match=r"another process has been computing text features of 8 rows.*"
                                                   r"train\.cache_dir") as caught:
            _get(cache, model, split, "text")
    finally:
        holder.release()
    assert str(L.lock_path(entry)) in str(caught.value)
    assert cache.misses == 0 and not entry.exists()


def test_a_filesystem_without_locks_computes_unlocked_with_a_warning(cache, model, split, monkeypatch):
    class NoLocks:  # what some network filesystems answer to flock
        def __init__(self, path):
            pass

        def acquire(self, timeout=None):
            raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(L, "FileLock", NoLocks)
    with pytest.warns(FeatureCacheWarning, match=r"Could not lock the feature cache entry .*ENOLCK.*written whole"):
        feats, mask = cache.get_or_compute(model, split, "text", batch_size=3, num_workers=0)
    assert cache.misses == 1 and cache.path_for(model, split, "text").exists() and feats.shape[0] == len(split)


# ------------------------------------------------------------------------------------------- errors
def test_bad_requests_name_the_problem(cache, split):
    text_only = tiny_model(LABELS, image=False)
    with pytest.raises(ValueError, match="no image tower"):
        cache.get_or_compute(text_only, split, "image")
    with pytest.raises(ValueError, match="Unknown modality 'audio'"):
        cache.get_or_compute(text_only, split, "audio")
    with pytest.raises(TypeError, match="datasets.Dataset"):
        cache.get_or_compute(text_only, [{"plot": "x"}], "text")
    with pytest.raises(ValueError, match="no 'plot' column"):
        cache.get_or_compute(text_only, split.remove_columns("plot"), "text")


def test_a_split_without_any_poster_gives_an_all_false_mask(cache, model):
    split = make_split(posters=[None] * len(PLOTS))
    feats, mask = _get(cache, model, split, "image")
    assert not mask.any() and torch.all(feats == 0)


# ------------------------------------------------------------------------------------ tower-agnostic keys
# Digests computed by the code before the restructuring of issue 10 (mmgcs/features.py at commit 9968d98, which
# built the key itself from `config.image_*` / `config.text_*`), for this file's split and tiny_model(seed=0)
# with text_backbone renamed "tiny-bert" (the tiny backbone lives in a temporary folder of random name). The
# key now comes from the towers' own `cache_key`; equal digests mean caches written before stay warm.
KEYS_BEFORE_ISSUE_10 = {
    ("default", "text"): "59eec81eb983a259aa38c7e561fcd01d",
    ("default", "image"): "2d391a25cab53d557752c97ba3d04be1",
    ("bilstm_simplecnn", "text"): "44380ce0bef2a1006d230009a57f93ce",
    ("bilstm_simplecnn", "image"): "3d8e5357a28286e0864d0242ad50dd63",
    ("cls_center", "text"): "d1bf9480459584638d1e2301981e59a5",
    ("cls_center", "image"): "b3314adeea0a6db73d69aa4983e16ff9",
}
KEY_MODELS = {
    "default": {},
    "bilstm_simplecnn": dict(text_tower="bilstm", image_tower="simplecnn"),
    "cls_center": dict(text_pooling="cls", image_crop_mode="center"),
}


@pytest.mark.parametrize("variant", sorted(KEY_MODELS))
def test_keys_are_byte_identical_to_those_before_the_towers_said_them(split, variant):
    model = tiny_model(LABELS, seed=0, **KEY_MODELS[variant])
    model.config.text_backbone = "tiny-bert"
    for modality in ("text", "image"):
        key = F.feature_key(model, split, modality)
        assert F.key_digest(key) == KEYS_BEFORE_ISSUE_10[(variant, modality)], (variant, modality)
        assert FeatureCache("c").path_for(model, split, modality).name.startswith(f"{modality}-")


def test_the_key_is_the_towers_cache_key_and_the_rows(split, model):
    for modality in ("text", "image"):
        tower = getattr(model, f"{modality}_tower")
        key = F.feature_key(model, split, modality)
        assert {k: key[k] for k in ("backbone", "weights", "preprocessing")} == tower.cache_key(model.config, model.tokenizer)
        assert key["weights"] == F.weights_hash(tower) and key["modality"] == modality
        assert set(key) == {"format", "modality", "backbone", "weights", "preprocessing", "dataset"}


def test_a_tower_that_does_not_say_its_key_cannot_be_cached(cache, split):
    from mmgcs.models.tower import Tower

    class Opaque(Tower):
        out_dim = 4

        def forward(self, pixel_values):
            return pixel_values.flatten(1)[:, :4]

    model = tiny_model(LABELS, text=False)
    model.image_tower = Opaque()
    with pytest.raises(NotImplementedError, match="Opaque does not say what its features depend on"):
        cache.get_or_compute(model, split, "image")
    assert Opaque().fast_encoder(torch.zeros(1, 3, 8, 8)) is None  # no fast encoder: the tower itself runs


def test_a_text_tower_without_its_tokenizer_has_no_key(split):
    model = tiny_model(LABELS, image=False)
    with pytest.raises(ValueError, match="depend on its tokenizer"):
        model.text_tower.cache_key(model.config, tokenizer=None)


@pytest.mark.parametrize("image_tower", ["timm", "simplecnn"])
def test_image_towers_offer_a_checked_fast_encoder(image_tower):
    model = tiny_model(LABELS, text=False, image_tower=image_tower).eval()
    sample = torch.randn(2, 3, 64, 64)
    fast = model.image_tower.fast_encoder(sample)
    assert isinstance(fast, F.FastImageEncoder) and fast.kind == "torchscript-frozen"
    with torch.no_grad():
        torch.testing.assert_close(fast(sample), model.image_tower(sample), rtol=1e-4, atol=1e-5)
