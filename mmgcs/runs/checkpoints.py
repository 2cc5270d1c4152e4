"""The checkpoints of a run (``checkpoints/epoch_NNN``): saved collectively (accelerate's state without the frozen
towers, the loop's state as JSON, then the manifest), verified before anything uses them (digests, the loop's state,
the RNG states, the frozen-weight record), and chosen on --resume (the newest intact one, each refused one named)."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from accelerate.utils import broadcast_object_list
from accelerate.utils import load as load_pickled_state  # how accelerate restores RNG states (weights_only=True)

from mmgcs import interrupts
from mmgcs.runs.failures import TrainingError, save_failed
from mmgcs.runs.frozen import frozen_problem, leave_out_frozen, load_frozen
from mmgcs.runs.lock import RunLock
from mmgcs.runs.manifest import manifest_problem, write_manifest
from mmgcs.runs.replicas import collective
from mmgcs.runs.swap import write_json_atomic

logger = logging.getLogger(__package__)  # "mmgcs.runs": the run folder's log lines keep their name

STATE_FILE = "trainer_state.json"
_CHECKPOINT_NAME = re.compile(r"^epoch_(\d+)$")


def checkpoint_dirs(root: Path) -> list[Path]:
    """Every ``epoch_NNN`` folder, newest first, whether intact or not (a damaged one must be reported, not
    skipped: it may be the newest)."""
    if not Path(root).is_dir():
        return []
    found = [p for p in Path(root).iterdir() if p.is_dir() and _CHECKPOINT_NAME.match(p.name)]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]), reverse=True)


def _int(state: dict, key: str, low: int, high: Optional[int]) -> int:
    value = state.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bounds = f"{low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"{STATE_FILE}: {key} is {value!r}, expected a whole number in {bounds}")
    return value


def state_problem(folder: Path) -> Optional[str]:
    """Why ``trainer_state.json`` cannot be the state after epoch N of the folder's name, or None."""
    try:
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{STATE_FILE} is missing"
    except (OSError, ValueError):
        return f"{STATE_FILE} is not valid JSON"
    if not isinstance(state, dict):
        return f"{STATE_FILE} is not a JSON object"
    named = int(folder.name.split("_")[1])
    try:
        planned = _int(state, "epochs", 1, None)
        epoch = _int(state, "epoch", 1, planned)
        if epoch != named:
            raise ValueError(f"{STATE_FILE}: epoch is {epoch} in the folder of epoch {named}")
        _int(state, "best_epoch", 0, epoch)
        _int(state, "bad_epochs", 0, epoch)
        step = _int(state, "global_step", 0, None)
        history = state.get("history")
        records = history if isinstance(history, list) else []
        epochs = [r.get("epoch") if isinstance(r, dict) else None for r in records]
        if epochs != list(range(1, epoch + 1)):
            raise ValueError(f"{STATE_FILE}: its history does not hold one record for each of epochs 1..{epoch}")
        if history[-1].get("step") != step:
            raise ValueError(f"{STATE_FILE}: global_step {step} differs from the last epoch's step")
    except ValueError as e:
        return str(e)
    return None


def rng_problem(folder: Path) -> Optional[str]:
    """Why the random-number states (accelerate's ``random_states_N.pkl``) cannot be restored, or None: read with
    ``weights_only`` loading (no code runs), they must hold the Python, NumPy and torch generator states."""
    files = sorted(folder.glob("random_states_*.pkl"))
    if not files:
        return "it holds no random-number states (random_states_0.pkl)"
    for path in files:
        try:
            states = load_pickled_state(path)
            random_state, numpy_state = states["random_state"], states["numpy_random_seed"]
            ok = (isinstance(random_state, tuple) and isinstance(numpy_state, tuple) and len(numpy_state) == 5
                  and isinstance(numpy_state[1], np.ndarray) and isinstance(states["torch_manual_seed"], torch.Tensor))
        except Exception:  # torch.load raises assorted errors on garbage; the reason below is what matters
            ok = False
        if not ok:
            return f"{path.name} does not hold valid random-number states"
    return None


def checkpoint_problem(folder: Path) -> Optional[str]:
    """Why resuming from ``folder`` cannot be trusted (digest, state, RNG), or None when it is intact."""
    return manifest_problem(folder) or state_problem(folder) or rng_problem(folder) or frozen_problem(folder)


def choose_checkpoint(root: Path, output_dir: Path) -> Optional[Path]:
    """The newest intact checkpoint under ``root``; each refused one is named with its reason in a warning.
    None when there is no checkpoint at all; a ``TrainingError`` when there are some but none is intact."""
    refused = []
    for folder in checkpoint_dirs(root):
        problem = checkpoint_problem(folder)
        if problem is None:
            if refused:
                logger.warning("Resuming from the older intact checkpoint %s instead", folder)
            return folder
        logger.warning("Checkpoint %s cannot be trusted (%s); it is skipped", folder, problem)
        refused.append(f"{folder.name}: {problem}")
    if refused:
        raise TrainingError(
            f"--resume: no intact checkpoint in {root} ({'; '.join(refused)}). Start again without --resume after "
            f"removing {output_dir} (or its {Path(root).name}/ folder), or choose another train.output_dir"
        )
    logger.warning("--resume: no checkpoint in %s yet; starting from the beginning", root)
    return None


def pick_checkpoint(accelerator, root: Path, output_dir: Path) -> Optional[Path]:
    """``choose_checkpoint`` on the main process, its answer (or its error) shared with every process."""
    box: list = [None]
    if accelerator.is_main_process:
        try:
            chosen = choose_checkpoint(root, output_dir)
            box = [("ok", str(chosen) if chosen else None)]
        except TrainingError as e:
            box = [("error", str(e))]
    if accelerator.num_processes > 1:
        broadcast_object_list(box)
    kind, value = box[0]
    if kind == "error":
        raise TrainingError(value)
    return Path(value) if value else None


def check_fresh_folder(output_dir: Path, root: Path, lock: Optional[RunLock]) -> None:
    """A run without --resume must not mix its checkpoints with those of an earlier run (refused: ``lock``, the
    run's lock on the folder, is released)."""
    previous = checkpoint_dirs(root)
    if previous:
        if lock is not None:
            lock.release()
        raise TrainingError(
            f"{output_dir} already holds checkpoints of a run ({previous[0].name}); pass --resume to continue it, "
            "or choose another train.output_dir (or delete that folder)"
        )


def checkpoint_epoch(folder: Path) -> int:
    """The epoch a checkpoint folder (``epoch_NNN``) was saved after."""
    return int(_CHECKPOINT_NAME.match(Path(folder).name).group(1))


def latest_checkpoint(output_dir: str | Path) -> Optional[Path]:
    """The newest complete checkpoint of ``output_dir`` (a folder is renamed into place only once fully written)."""
    found = [p for p in checkpoint_dirs(Path(output_dir) / "checkpoints") if (p / STATE_FILE).is_file()]
    return found[0] if found else None


def save_checkpoint(accelerator, root: Path, epoch: int, state: dict, keep: set, after: Callable[[], None]) -> None:
    """``root/epoch_NNN``: accelerate's state (the model without its frozen weights, optimizer, scheduler, every
    rank's RNG states), our ``state`` as JSON (not a pickled "custom object"), then the digests of every file. Each
    step is collective (a barrier), and a failed write stops every process with the same error. ``after`` runs on
    the main process once the checkpoint is in place; then every other checkpoint not named in ``keep`` is removed."""
    final, tmp = root / f"epoch_{epoch:03d}", root / f".tmp-epoch_{epoch:03d}"
    failed = save_failed(f"the checkpoint of epoch {epoch}", root)
    main = accelerator.is_main_process

    def start() -> None:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

    def publish() -> None:
        write_json_atomic(tmp / STATE_FILE, state)
        write_manifest(tmp)  # last: a checkpoint whose manifest is written is complete
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)  # a checkpoint folder exists only once it is complete
        after()
        for old in checkpoint_dirs(root):  # damaged leftovers too
            if old.name not in keep | {final.name}:
                shutil.rmtree(old, ignore_errors=True)

    with interrupts.saving():  # the three steps are one save: a signal waits for all of them
        try:
            collective(accelerator, start, failed)
            collective(accelerator, lambda: _save_state(accelerator, tmp), failed)
            collective(accelerator, lambda: publish() if main else None, failed)
        except TrainingError:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)  # a failed checkpoint gives its space back at once
            raise


def _save_state(accelerator, folder: Path) -> None:
    """accelerate's ``save_state`` with the frozen weights left out (``leave_out_frozen``, accelerate's pre-hook)."""
    handle = accelerator.register_save_state_pre_hook(leave_out_frozen(accelerator))
    try:
        accelerator.save_state(str(folder))
    finally:
        handle.remove()


def load_checkpoint(accelerator, folder: Path) -> None:
    """accelerate's ``load_state`` of a checkpoint ``pick_checkpoint`` verified: the model's weights (with or without
    its frozen towers), optimizer, scheduler and every rank's RNG states."""
    handle = accelerator.register_load_state_pre_hook(load_frozen(accelerator))
    try:
        accelerator.load_state(str(folder))
    finally:
        handle.remove()
