"""One tower fine-tuned while the other stays frozen: the frozen one is read from the feature cache, never re-run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from engine_helpers import REPO_ROOT, build_dataset, tiny_overrides

from mmgcs.engine import Trainer, main

FUSION = REPO_ROOT / "configs" / "fusion.yaml"
# Text frozen (fusion.yaml's default), the image tower's last block trained.
IMAGE_PARTIAL = dict(train__image_finetune="partial", train__image_trainable_blocks=1, train__backbone_lr=0.01,
                     train__early_stopping_patience=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_dataset(tmp_path_factory.mktemp("mixed-data"), n=45, poster_every=2, plot_every=1)


@pytest.fixture
def text_tower_calls(monkeypatch):
    """Epochs (0-based) in which the text tower ran while training or validating (featurization not counted)."""
    calls = []

    def counting(method):
        def wrapper(self, loader, *args, **kwargs):
            tower = self.accelerator.unwrap_model(self.model).text_tower
            handle = tower.register_forward_hook(lambda *_: calls.append(len(self.state.history)))
            try:
                return method(self, loader, *args, **kwargs)
            finally:
                handle.remove()

        return wrapper

    monkeypatch.setattr(Trainer, "_train_epoch", counting(Trainer._train_epoch))
    monkeypatch.setattr(Trainer, "_evaluate", counting(Trainer._evaluate))
    return calls


def _history(out):
    return json.loads((out / "history.json").read_text())


def test_frozen_text_tower_is_read_from_the_cache_and_matches_the_raw_path(tmp_path, data, text_tower_calls):
    mixed = main(tiny_overrides(data, tmp_path / "mixed", train__epochs=2, **IMAGE_PARTIAL), default_config=FUSION)
    assert text_tower_calls == []
    assert [h["inputs"] for h in _history(tmp_path / "mixed")] == ["raw+text_features"] * 2

    raw = main(tiny_overrides(data, tmp_path / "raw", train__epochs=2, train__cache_features="false", **IMAGE_PARTIAL),
               default_config=FUSION)
    assert sorted(set(text_tower_calls)) == [0, 1]  # the raw path runs the frozen tower every step
    assert [h["inputs"] for h in _history(tmp_path / "raw")] == ["raw", "raw"]

    # The same training (image augmentation, dropout and modality dropout draw the same random numbers), up to the
    # float noise between the cached and the on-the-fly text features.
    for a, b in zip(_history(tmp_path / "mixed"), _history(tmp_path / "raw")):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-4)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-4)
        assert a["trainable_parameters"] == b["trainable_parameters"]
    p_mixed = np.load(tmp_path / "mixed" / "test_predictions.npz")
    p_raw = np.load(tmp_path / "raw" / "test_predictions.npz")
    np.testing.assert_allclose(p_mixed["probs"], p_raw["probs"], atol=1e-4)
    assert mixed["test"]["micro_f1"] == pytest.approx(raw["test"]["micro_f1"], abs=1e-6)
    assert mixed["best_epoch"] == raw["best_epoch"]


class Crash(Exception):
    pass


def test_two_stage_run_reads_the_frozen_tower_from_the_cache_in_both_stages_and_resumes(
    tmp_path, data, text_tower_calls, caplog, monkeypatch
):
    cache = tmp_path / "cache"
    two_stage = dict(train__epochs=3, train__freeze_epochs=1, train__cache_dir=cache, **IMAGE_PARTIAL)
    with caplog.at_level("INFO", logger="mmgcs.features"):
        whole = main(tiny_overrides(data, tmp_path / "whole", **two_stage), default_config=FUSION)
    history = _history(tmp_path / "whole")
    assert [h["inputs"] for h in history] == ["features", "raw+text_features", "raw+text_features"]
    assert history[1]["trainable_parameters"] > history[0]["trainable_parameters"]
    assert text_tower_calls == []
    # Stage 1 computed the text features; stage 2 read them back (the frozen tower's weights did not change).
    assert caplog.text.count("Feature cache miss: computing text") == 3
    assert caplog.text.count("Feature cache hit: text") == 3

    # Crashed right after the checkpoint of epoch 2, then resumed: the same model as the uninterrupted run.
    out = tmp_path / "resumed"
    save_checkpoint = Trainer._save_checkpoint

    def crash_after_epoch_2(self, epoch):
        save_checkpoint(self, epoch)
        if epoch == 2:
            raise Crash

    monkeypatch.setattr(Trainer, "_save_checkpoint", crash_after_epoch_2)
    with pytest.raises(Crash):
        main(tiny_overrides(data, out, **two_stage), default_config=FUSION)
    assert len(_history(out)) == 2 and not (out / "metrics.json").exists()
    monkeypatch.setattr(Trainer, "_save_checkpoint", save_checkpoint)
    resumed = main(["--resume", *tiny_overrides(data, out, **two_stage)], default_config=FUSION)
    assert text_tower_calls == []
    strip = lambda h: [{k: v for k, v in r.items() if k != "time_s"} for r in h]  # noqa: E731
    assert strip(_history(out)) == strip(history)
    a = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    b = load_file(out / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["test"] == whole["test"]
    # --resume of the finished run re-scores the best model on the last stage's inputs (the image tower trained,
    # so the first stage's cached image features would be stale).
    again = main(["--resume", *tiny_overrides(data, out, **two_stage)], default_config=FUSION)
    assert again["test"] == whole["test"]
    np.testing.assert_array_equal(np.load(out / "test_predictions.npz")["probs"],
                                  np.load(tmp_path / "whole" / "test_predictions.npz")["probs"])


def test_head_only_epochs_run_on_one_thread_and_the_callers_threads_come_back(tmp_path, data, monkeypatch):
    """Cached-feature epochs (tiny ops) use one CPU thread; epochs that run a tower use the run's threads."""
    monkeypatch.delenv("MMGCS_NUM_THREADS", raising=False)
    seen = []
    original = Trainer._train_epoch

    def recording(self, loader, epoch):
        seen.append((self.loader_kind, torch.get_num_threads()))
        return original(self, loader, epoch)

    monkeypatch.setattr(Trainer, "_train_epoch", recording)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        main(tiny_overrides(data, tmp_path / "run", train__epochs=2, train__freeze_epochs=1, **IMAGE_PARTIAL),
             default_config=FUSION)
        assert seen == [("features", 1), ("raw+text_features", 2)]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
