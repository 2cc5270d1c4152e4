"""mmgcs/optim.py: parameter groups (weight decay by shape, a separate backbone learning rate, frozen parameters left
out), the optimizer choices and the learning-rate schedules (cosine with warm-up, step, plateau, none)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmgcs.config import TrainConfig
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
