"""Pieces of the training loop on their own: trackers, batches (parameter groups, optimizers and schedules:
tests/test_optim.py; the mixed precision `auto` resolves to: tests/test_accelerator.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmgcs.config import ConfigError


def test_trackers(monkeypatch):
    from mmgcs.report import resolve_trackers

    assert resolve_trackers("none") is None
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbored'"):
        resolve_trackers("tensorbored")
    monkeypatch.setattr("accelerate.utils.is_tensorboard_available", lambda: False)
    assert resolve_trackers("auto") is None
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        resolve_trackers("tensorboard")
    monkeypatch.setattr("accelerate.utils.is_tensorboard_available", lambda: True)
    assert resolve_trackers("auto") == ["tensorboard"]


def test_targets_and_label_maps():
    from mmgcs.batching import label_map, targets

    mapping = label_map(["Action", "Comedy", "Drama"], ["Drama", "Action"])
    assert mapping.tolist() == [1, -1, 0]
    y = targets([[0, 1], [2], []], mapping, 2, "multilabel")
    assert y.tolist() == [[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]
    assert targets([[1, 2], [1]], mapping, 2, "singlelabel").tolist() == [0, -100]
    with pytest.raises(ValueError, match="Cooking"):
        label_map(["Action"], ["Cooking"])


def test_unusable_rows_are_dropped_and_named_by_id(caplog):
    from datasets import ClassLabel, Dataset, Features, Image, Sequence, Value

    from mmgcs.batching import drop_unusable_rows, select_inputs

    feats = Features({"id": Value("int64"), "plot": Value("string"), "poster": Image(),
                      "genres": Sequence(ClassLabel(names=["A", "B"]))})
    ds = Dataset.from_dict({"id": [1, 2, 3], "plot": ["a plot", None, "  "], "poster": [None, None, None],
                            "genres": [[0], [1], [0, 1]]}, features=feats)
    ds = select_inputs(ds, use_text=True, use_image=True)
    kept, dropped = drop_unusable_rows(ds, "train", True, True, np.array([0, 1]), "multilabel")
    assert kept["id"] == [1] and dropped == [2, 3]
    assert "skipping 2 of 3 rows with no plot or poster (ids: 2, 3)" in caplog.text


# ------------------------------------------------------------------------------------- CPU threads under launch
LAUNCHED = {"ACCELERATE_DYNAMO_BACKEND": "NO", "OMP_NUM_THREADS": "1"}


def test_accelerate_launch_one_thread_default_is_raised_to_the_cores_per_process():
    from mmgcs.runtime import launcher_thread_cap

    assert launcher_thread_cap(LAUNCHED, "cpu", local_processes=1, cores=8) == 8
    assert launcher_thread_cap(LAUNCHED, "cpu", local_processes=2, cores=8) == 4
    assert launcher_thread_cap(LAUNCHED, "cpu", local_processes=4, cores=2) is None  # already one core each


def test_thread_choices_of_the_user_are_kept():
    from mmgcs.runtime import launcher_thread_cap

    assert launcher_thread_cap({**LAUNCHED, "OMP_NUM_THREADS": "3"}, "cpu", 1, 8) is None
    assert launcher_thread_cap({"OMP_NUM_THREADS": "1"}, "cpu", 1, 8) is None  # not under accelerate launch
    assert launcher_thread_cap(LAUNCHED, "cuda", 1, 8) is None
    assert launcher_thread_cap({**LAUNCHED, "MMGCS_NUM_THREADS": "1"}, "cpu", 1, 8) == 1
    with pytest.raises(ConfigError, match="MMGCS_NUM_THREADS"):
        launcher_thread_cap({"MMGCS_NUM_THREADS": "many"}, "cpu", 1, 8)


# ------------------------------------------------------------------------------------------- text template
def test_text_template_adds_the_title_and_keeps_missing_plots_missing():
    from datasets import Dataset

    from mmgcs.batching import apply_text_template

    split = Dataset.from_dict({"id": [1, 2, 3, 4], "title": ["Alien", None, "Up", "  "],
                               "plot": ["A crew meets a creature.", "No title here.", None, "Blank title."]})
    assert apply_text_template(split, "{plot}") is split
    out = apply_text_template(split, "{title}. {plot}")
    assert out["plot"] == ["Alien. A crew meets a creature.", "No title here.", None, "Blank title."]
    assert out["title"] == split["title"] and out["id"] == [1, 2, 3, 4]
    # Deterministic fingerprint: the feature cache (keyed on it) is reused by the next run.
    assert apply_text_template(split, "{title}. {plot}")._fingerprint == out._fingerprint
    with pytest.raises(ValueError, match="no 'title' column"):
        apply_text_template(split.remove_columns("title"), "{title}. {plot}")


@pytest.mark.parametrize("template", ["{title}", "{plot} {year}", "{plot", "no fields"])
def test_bad_text_templates_are_config_errors(template):
    from mmgcs.config import load_config

    with pytest.raises(ConfigError, match="model.text_template"):
        from mmgcs.config import validate_config

        validate_config(load_config(None, [f"model.text_template={template}"]))

