"""mmgcs.runs.folder: a folder a run writes into is not marked finished until COMPLETE is written last; its settings
are saved, and a --resume with other data/model settings is refused (other training settings warned, the resumable
ones silent); the best bundle read back at the end must exist."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from mmgcs.config import load_config
from mmgcs.runs.failures import TrainingError
from mmgcs.runs.folder import (
    COMPLETE, check_resumed_config, load_bundle_weights, mark_complete, start_run_folder,
)
from mmgcs.testing import tiny_model


def test_complete_is_written_last_and_removed_when_a_run_starts_again(tmp_path):
    out = tmp_path / "run"
    start_run_folder(out, load_config(overrides=["train.epochs=3"]))
    assert (out / "config.yaml").is_file() and not (out / COMPLETE).exists()
    assert load_config(out / "config.yaml").train.epochs == 3  # loadable with --config
    mark_complete(out, {"best_epoch": 2})
    assert json.loads((out / COMPLETE).read_text())["best_epoch"] == 2
    start_run_folder(out, load_config())
    assert not (out / COMPLETE).exists()


def test_a_resume_with_other_data_or_model_settings_is_refused(tmp_path, caplog):
    out = tmp_path / "run"
    start_run_folder(out, load_config(overrides=["model.fusion_dim=64", "train.lr=0.001"]))
    with pytest.raises(TrainingError, match=r"different data/model settings than the checkpointed run \(model.fusion_dim"):
        check_resumed_config(out, load_config(overrides=["model.fusion_dim=32", "train.lr=0.001"]))
    with caplog.at_level(logging.WARNING, logger="mmgcs.runs"):
        check_resumed_config(out, load_config(overrides=["model.fusion_dim=64", "train.lr=0.002", "train.epochs=9"]))
    assert "Resuming with changed training settings: train.lr" in caplog.text
    assert "train.epochs" not in caplog.text  # a resumed run may extend its plan
    check_resumed_config(tmp_path / "never-started", load_config())  # nothing saved: nothing to compare


def test_the_best_bundle_is_read_back_or_its_absence_named(tmp_path):
    saved, model = tiny_model(seed=0), tiny_model(seed=1)
    saved.save_pretrained(tmp_path / "model")
    load_bundle_weights(model, tmp_path / "model")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), saved.state_dict().values()))
    with pytest.raises(TrainingError, match="The best model bundle .* is missing; the run cannot be finished"):
        load_bundle_weights(model, tmp_path / "gone")
