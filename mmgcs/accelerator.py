"""The Accelerator a training run uses, and the work that spans its processes: the mixed precision `auto` resolves
to, the accelerator itself (seedable sampler, trackers, DDP settings), the torch threads of a stage, resetting
Accelerate's state between runs in one process, and gathering a split's predictions from every process."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from accelerate import Accelerator
from accelerate import utils as accelerate_utils
from accelerate.state import AcceleratorState, GradientState

from mmgcs import loaders
from mmgcs.config import RunConfig
from mmgcs.inference import without_modality
from mmgcs.report import resolve_trackers


def resolve_mixed_precision(value: str) -> str:
    """"auto": whatever `accelerate launch --mixed_precision` asked for, else bf16/fp16 on a GPU that has it."""
    if value != "auto":
        return value
    gpu = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if torch.cuda.is_available() else "no"
    return os.environ.get("ACCELERATE_MIXED_PRECISION") or gpu


def make_accelerator(cfg: RunConfig, find_unused_parameters: bool = False) -> Accelerator:
    out = Path(cfg.train.output_dir)
    xpu, mps = getattr(torch, "xpu", None), getattr(torch.backends, "mps", None)
    device = torch.cuda.is_available() or bool(xpu and xpu.is_available()) or bool(mps and mps.is_available())
    return Accelerator(
        # Without cpu=True, `accelerate launch --multi_gpu` on a GPU-less machine trains independent copies.
        cpu=not device,
        mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision),
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        log_with=resolve_trackers(cfg.train.log_with),
        project_config=accelerate_utils.ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        # Seedable sampler: the shuffle order of an epoch depends only on (seed, epoch), so a resumed run
        # replays exactly the order the interrupted one would have used.
        dataloader_config=accelerate_utils.DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.train.seed),
        # The loop steps step-wise schedulers itself, once per optimizer step on every process.
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[accelerate_utils.DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
    )


def reset_accelerate_state() -> None:
    """Let another run start in this process (the sweep, tests); keeps the process group of a launched job."""
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def set_threads(threads: Optional[int]) -> None:
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)


@torch.no_grad()
def gather_predictions(accelerator, model, loader, take, data: loaders.RunData,
                       hide: Optional[str] = None) -> dict[str, np.ndarray]:
    """Probabilities, logits, targets and input presence (``has_<modality>``) of exactly the rows of ``loader``'s split
    on every process (gather_for_metrics drops DDP's padding); ``hide``: a modality withheld from every row."""
    unwrapped = accelerator.unwrap_model(model)
    model.eval()
    probs, all_logits, labels, present = [], [], [], {}
    for batch in loader:
        batch = without_modality(take(batch), hide) if hide is not None else take(batch)
        target = batch.pop("labels")
        logits = model(**batch)["logits"].float()
        logits, target, has = accelerator.gather_for_metrics((logits, target, loaders.presence(batch)))
        probs.append(unwrapped.probabilities(logits).cpu())
        all_logits.append(logits.cpu())
        labels.append(target.cpu())
        for m, v in has.items():
            present.setdefault(m, []).append(v.cpu())
    y = data.multi_hot(torch.cat(labels))
    out = {"probs": torch.cat(probs).numpy(), "logits": torch.cat(all_logits).numpy(), "labels": y.numpy()}
    return dict(out, **{f"has_{m}": torch.cat(parts).numpy() for m, parts in present.items()})


__all__ = ["gather_predictions", "make_accelerator", "reset_accelerate_state", "resolve_mixed_precision", "set_threads"]
