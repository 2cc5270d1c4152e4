"""Pieces of the training loop on their own: parameter groups, optimizers, schedules, trackers, precision, batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mmgcs.config import ConfigError, TrainConfig
from mmgcs.optim import build_optimizer, build_schedule, param_groups


class TwoTowers(nn.Module):
    def __init__(self):
        super().__init__()
        self.text_tower = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4), nn.Linear(4, 4))
        self.image_tower = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.fusion = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 3))


def _groups_by_name(groups):
    return {g["name"]: g for g in groups}


def test_weight_decay_by_shape_and_a_separate_backbone_lr():
    model = TwoTowers()
    groups = _groups_by_name(param_groups(model, lr=1e-3, backbone_lr=1e-5, weight_decay=0.1))
    assert set(groups) == {"backbone", "backbone_no_decay", "head", "head_no_decay"}
    for name, g in groups.items():
        assert all((p.ndim >= 2) == (not name.endswith("no_decay")) for p in g["params"])
        assert g["weight_decay"] == (0.0 if name.endswith("no_decay") else 0.1)
        assert g["lr"] == (1e-5 if name.startswith("backbone") else 1e-3)
    # The LayerNorm/BatchNorm scales (1-d, whatever they are called) never decay.
    no_decay = {id(p) for g in groups.values() if g["weight_decay"] == 0 for p in g["params"]}
    assert id(model.text_tower[1].weight) in no_decay and id(model.image_tower[1].weight) in no_decay
    assert id(model.fusion[0].weight) not in no_decay
    # Every parameter exactly once.
    ids = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())


def test_frozen_parameters_are_left_out():
    model = TwoTowers()
    for p in model.text_tower.parameters():
        p.requires_grad_(False)
    groups = param_groups(model, 1e-3, 1e-5, 0.1)
    ids = {id(p) for g in groups for p in g["params"]}
    assert not ids & {id(p) for p in model.text_tower.parameters()}


@pytest.mark.parametrize("name, cls", [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)])
def test_optimizer_choices(name, cls):
    opt = build_optimizer(TwoTowers(), TrainConfig(optimizer=name, lr=0.01, momentum=0.8))
    assert isinstance(opt, cls)
    if name == "sgd":
        assert opt.param_groups[0]["momentum"] == 0.8


def test_no_trainable_parameters_is_a_clear_error():
    model = TwoTowers()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, TrainConfig())


def _lrs(schedule, optimizer, steps, metric=None):
    out = []
    for _ in range(steps):
        optimizer.step()
        if schedule.interval == "metric":
            schedule.scheduler.step(metric)
        else:
            schedule.scheduler.step()
        out.append(optimizer.param_groups[0]["lr"])
    return out


def test_cosine_schedule_warms_up_then_decays_to_zero():
    cfg = TrainConfig(scheduler="cosine", lr=1.0, epochs=2, warmup_ratio=0.25)
    opt = build_optimizer(nn.Linear(2, 2), cfg)
    schedule = build_schedule(opt, cfg, steps_per_epoch=4)
    assert schedule.interval == "step"
    assert opt.param_groups[0]["lr"] == 0.0  # starts from zero
    lrs = _lrs(schedule, opt, 8)
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)  # 2 warmup steps
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:])) and lrs[-1] == pytest.approx(0.0)


def test_step_and_plateau_schedules():
    cfg = TrainConfig(scheduler="step", lr=1.0, step_size_epochs=2, gamma=0.5)
    opt = build_optimizer(nn.Linear(2, 2), cfg)
    schedule = build_schedule(opt, cfg, steps_per_epoch=10)
    assert schedule.interval == "epoch"
    assert _lrs(schedule, opt, 4) == pytest.approx([1.0, 0.5, 0.5, 0.25])

    cfg = TrainConfig(scheduler="plateau", lr=1.0, plateau_patience=0, gamma=0.1)
    opt = build_optimizer(nn.Linear(2, 2), cfg)
    schedule = build_schedule(opt, cfg, steps_per_epoch=10, metric_mode="max")
    assert schedule.interval == "metric"
    assert _lrs(schedule, opt, 2, metric=0.5) == pytest.approx([1.0, 0.1])  # no improvement on the 2nd epoch

    assert build_schedule(opt, TrainConfig(scheduler="none"), 10).scheduler is None


def test_trackers_and_mixed_precision(monkeypatch):
    from mmgcs.engine import resolve_mixed_precision
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

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert resolve_mixed_precision("fp16") == "fp16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_mixed_precision("auto") == "no"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_mixed_precision("auto") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_mixed_precision("auto") == "fp16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # `accelerate launch --mixed_precision no` wins
    assert resolve_mixed_precision("auto") == "no"


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

