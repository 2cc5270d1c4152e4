"""mmgcs/features/store.py on a full disk: safetensors reports it as SafetensorError (not OSError); the run must
carry on with the features it computed ("used for this run only"), warn once, and leave no partial file."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine_helpers import REPO_ROOT, build_dataset, tiny_overrides

from mmgcs.engine import main
from mmgcs.features import FeatureCacheWarning


def test_a_full_cache_disk_downgrades_to_not_cached_with_one_warning(tmp_path, monkeypatch, recwarn):
    import safetensors.torch
    from safetensors import SafetensorError

    data = build_dataset(tmp_path, n=30)
    cache = tmp_path / "cache"
    real = safetensors.torch.save_file
    attempts = []

    def disk_full(tensors, filename, metadata=None):
        if Path(filename).parent != cache:
            return real(tensors, filename, metadata=metadata)  # the run's own bundle still saves
        attempts.append(filename)
        Path(filename).write_bytes(b"\0" * 16)  # what a full disk leaves: the start of a file
        # The message safetensors gives for ENOSPC
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    out = tmp_path / "run"
    metrics = main(tiny_overrides(data, out, train__epochs=1, train__cache_dir=cache),
                   default_config=REPO_ROOT / "configs" / "fusion.yaml")
    assert metrics["epochs_run"] == 1 and (out / "COMPLETE").is_file()
    cache_warnings = [str(w.message) for w in recwarn if issubclass(w.category, FeatureCacheWarning)]
    assert len(cache_warnings) == 1 and "used for this run only" in cache_warnings[0], cache_warnings
    assert "SafetensorError" in cache_warnings[0] and "train.cache_dir" in cache_warnings[0]
    assert len(attempts) == 1  # the other towers and splits were not tried on the full disk
    assert [p.name for p in cache.iterdir()] == [".locks"]  # no partial or temporary file (lock files only)


def test_an_oserror_while_storing_also_downgrades(tmp_path, monkeypatch):
    import mmgcs.features.store as F
    from mmgcs.testing import tiny_model
    from datasets import Dataset

    split = Dataset.from_dict({"id": [1, 2], "plot": ["a ghost at night", "two friends"], "genres": [[0], [1]]})
    cache = F.FeatureCache(tmp_path / "cache")

    def no_space(path, write):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(F, "_atomic_write", no_space)
    model = tiny_model(["Action", "Comedy"], image=False)
    with pytest.warns(FeatureCacheWarning, match="used for this run only"):
        feats, mask = cache.get_or_compute(model, split, "text", batch_size=2, num_workers=0)
    assert feats.shape[0] == 2 and mask.all() and not cache.writable
