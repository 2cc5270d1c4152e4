"""Optimizers and learning-rate schedules for the training loop (registries; the choices are listed on failure)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from mmgcs.config import TrainConfig


def tower_modules(model: nn.Module) -> list[nn.Module]:
    """The pretrained backbones of a model (they get ``backbone_lr``); everything else is head."""
    return [m for m in (getattr(model, "text_tower", None), getattr(model, "image_tower", None)) if m is not None]


def param_groups(model: nn.Module, lr: float, backbone_lr: float, weight_decay: float) -> list[dict]:
    """Parameter groups: head vs backbone learning rate, and weight decay by shape.

    Only parameters with ``requires_grad`` are included, so call this after the fine-tuning modes of the
    final training stage are applied. Decay is decided by ``p.ndim`` (matrices and conv kernels decay;
    biases, norm scales, embeddings' 1-d params do not), which also covers timm's ``norm.weight`` names.
    """
    backbone_ids = {id(p) for m in tower_modules(model) for p in m.parameters()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        groups.setdefault((id(p) in backbone_ids, p.ndim >= 2), []).append(p)
    out = []
    for (is_backbone, decay), params in sorted(groups.items()):
        out.append(
            {
                "params": params,
                "lr": backbone_lr if is_backbone else lr,
                "weight_decay": weight_decay if decay else 0.0,
                "name": f"{'backbone' if is_backbone else 'head'}{'' if decay else '_no_decay'}",
            }
        )
    return out


OPTIMIZERS: dict[str, Callable[[list[dict], TrainConfig], torch.optim.Optimizer]] = {
    "adamw": lambda groups, cfg: torch.optim.AdamW(groups, lr=cfg.lr),
    "adam": lambda groups, cfg: torch.optim.Adam(groups, lr=cfg.lr),
    "sgd": lambda groups, cfg: torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum),
}


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {cfg.optimizer!r}; available: {sorted(OPTIMIZERS)}")
    groups = param_groups(model, cfg.lr, cfg.backbone_lr, cfg.weight_decay)
    if not groups:
        raise ValueError(
            "The model has no trainable parameters; set train.text_finetune / train.image_finetune to "
            "'partial' or 'full', or use a model with a trainable head"
        )
    return OPTIMIZERS[cfg.optimizer](groups, cfg)


@dataclass
class Schedule:
    """A scheduler and when the loop steps it: after each optimizer step, each epoch, or each epoch's metric."""

    scheduler: Optional[object]
    interval: str  # "step" | "epoch" | "metric" | "none"


def _cosine(optimizer, cfg: TrainConfig, steps_per_epoch: int, metric_mode: str) -> Schedule:
    total = max(1, steps_per_epoch * cfg.epochs)
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    warmup = int(math.floor(cfg.warmup_ratio * total))
    return Schedule(get_cosine_schedule_with_warmup(optimizer, warmup, total), "step")


def _step(optimizer, cfg: TrainConfig, steps_per_epoch: int, metric_mode: str) -> Schedule:
    return Schedule(torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size_epochs, gamma=cfg.gamma), "epoch")


def _plateau(optimizer, cfg: TrainConfig, steps_per_epoch: int, metric_mode: str) -> Schedule:
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode=metric_mode, factor=cfg.gamma, patience=cfg.plateau_patience
    )
    return Schedule(sched, "metric")


def _none(optimizer, cfg: TrainConfig, steps_per_epoch: int, metric_mode: str) -> Schedule:
    return Schedule(None, "none")


SCHEDULERS: dict[str, Callable[..., Schedule]] = {
    "cosine": _cosine,
    "step": _step,
    "plateau": _plateau,
    "none": _none,
}


def build_schedule(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int, metric_mode: str = "max"
) -> Schedule:
    """``steps_per_epoch`` counts optimizer steps (after gradient accumulation) on this process."""
    if cfg.scheduler not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {cfg.scheduler!r}; available: {sorted(SCHEDULERS)}")
    return SCHEDULERS[cfg.scheduler](optimizer, cfg, steps_per_epoch, metric_mode)


# Each tower's fine-tuning settings in TrainConfig: (its mode once unfrozen, how many layers/blocks a "partial"
# mode trains).
FINETUNE_SETTINGS = {"text": ("text_finetune", "text_trainable_layers"),
                     "image": ("image_finetune", "image_trainable_blocks")}


def finetune_mode(cfg: TrainConfig, modality: str, epoch: int) -> str:
    """The fine-tuning mode of a tower during ``epoch`` (0-based): frozen for the first ``freeze_epochs``."""
    return "frozen" if epoch < cfg.freeze_epochs else getattr(cfg, FINETUNE_SETTINGS[modality][0])


def two_stage(cfg: TrainConfig) -> bool:
    """Towers frozen for the first ``freeze_epochs`` and tuned afterwards: parameters that do not train in the
    first stage must still be known to DDP, which then has to tolerate unused parameters."""
    return cfg.freeze_epochs > 0 and any(getattr(cfg, mode) != "frozen" for mode, _ in FINETUNE_SETTINGS.values())


def frozen_towers(cfg: TrainConfig, modalities: Iterable[str], epoch: int) -> tuple[str, ...]:
    """The towers among ``modalities`` frozen during ``epoch`` (0-based): all of them in a first frozen stage."""
    return tuple(m for m in modalities if finetune_mode(cfg, m, epoch) == "frozen")


def apply_stage(model: nn.Module, cfg: TrainConfig, epoch: int) -> bool:
    """Set each tower's fine-tuning mode for ``epoch`` (0-based); True when every tower is frozen."""
    all_frozen = True
    for modality, (_, trainable) in FINETUNE_SETTINGS.items():
        tower = getattr(model, f"{modality}_tower", None)
        if tower is None:
            continue
        mode = finetune_mode(cfg, modality, epoch)
        tower.set_finetune(mode, getattr(cfg, trainable))
        all_frozen &= mode == "frozen"
    return all_frozen


__all__ = [
    "OPTIMIZERS",
    "SCHEDULERS",
    "Schedule",
    "build_optimizer",
    "apply_stage",
    "build_schedule",
    "finetune_mode",
    "frozen_towers",
    "param_groups",
    "tower_modules",
    "two_stage",
]
