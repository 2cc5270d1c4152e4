"""Steps every process of a launch takes together: one outcome for all (a step that failed on one process fails on
every one, none left waiting at the next barrier), and the check that the processes train one model."""

from __future__ import annotations

from typing import Callable, Optional, TypeVar

import torch
from accelerate.utils import gather_object

from mmgcs import interrupts
from mmgcs.digest import tensors_digest
from mmgcs.runs.failures import TrainingError, write_failure

T = TypeVar("T")


def _gather(accelerator, value) -> list:
    if accelerator.num_processes == 1:
        return [value]
    return gather_object([value])


def collective(accelerator, fn: Callable[[], T], failed: Optional[Callable[[OSError], str]] = None) -> T:
    """Run ``fn`` on every process (it checks ``is_main_process`` itself when only the main one writes), then
    raise one ``TrainingError`` on every process if it failed on any: a process that failed alone would leave
    the others waiting forever at the next barrier. ``failed`` turns a failed write (``write_failure``) into the
    message. A signal arriving meanwhile stops the run only once the step is done (``interrupts.saving``)."""
    error, value = None, None
    with interrupts.saving():
        try:
            value = fn()
        except TrainingError as e:
            error = str(e)
        except Exception as e:  # noqa: BLE001 — only write failures are turned into a message; the rest re-raised
            write_error = write_failure(e)
            if write_error is None:
                raise
            error = failed(write_error) if failed else str(write_error)
        errors = [e for e in _gather(accelerator, error) if e]
    if errors:
        raise TrainingError(errors[0])
    return value


def replicas_in_sync(accelerator, model: torch.nn.Module) -> bool:
    """Every process must hold the same weights after an epoch; a launch that silently trains independent
    copies (e.g. `--multi_gpu` without a GPU and without cpu=True) is stopped here rather than reported."""
    digests = gather_object([tensors_digest(model.state_dict())])
    if len(set(digests)) != 1:
        raise TrainingError(
            f"The {len(digests)} processes hold different weights after an epoch: they are not training one "
            "model together. Launch with `accelerate launch --multi_gpu` on GPUs, or let MMGCS force the CPU "
            "backend (it does when no GPU is visible)"
        )
    return True
