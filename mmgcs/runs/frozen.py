"""Checkpoints without the frozen towers' weights. A frozen tower never changes in training and create_model rebuilds
it from its backbone (all-mpnet-base-v2: 438 MB per checkpoint), so a checkpoint keeps only what trains plus the names
and one digest of what it left out (``frozen_weights.json``); on resume the rebuilt towers must match that digest. A
full checkpoint of older code still loads. The hooks here are accelerate's save/load pre-hooks."""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file

from mmgcs.digest import tensors_digest
from mmgcs.runs.failures import TrainingError
from mmgcs.runs.swap import write_json_atomic

# The names and digest of the frozen weights a checkpoint leaves out (next to accelerate's model.safetensors).
FROZEN_FILE = "frozen_weights.json"
FROZEN_FORMAT = 1
CHECKPOINT_WEIGHTS = "model.safetensors"  # accelerate's file of the (first) model's weights


def frozen_names(model: torch.nn.Module) -> list[str]:
    """The state-dict names of ``model`` (unwrapped) a checkpoint leaves out: every entry of a tower none of whose
    parameters train, and the parameters that do not train of a partly tuned tower (its buffers are kept: a trained
    block's BatchNorm statistics move). The head is always kept, the lexical branch too (fitted, never graded)."""
    names = []
    for prefix in ("text_tower", "image_tower"):  # GenreClassifier's towers (mmgcs.optim.tower_modules)
        tower = getattr(model, prefix, None)
        if tower is None:
            continue
        params = dict(tower.named_parameters(prefix=prefix, remove_duplicate=False))
        if any(p.requires_grad for p in params.values()):
            names += [name for name, p in params.items() if not p.requires_grad]
        else:
            names += list(tower.state_dict(prefix=f"{prefix}."))
    return sorted(names)


def leave_out_frozen(accelerator) -> Callable:
    """accelerate's save_state pre-hook: the model's weights without ``frozen_names`` (unwrapped names, so DDP's
    ``module.`` prefix never reaches the file) and, from the main process, their names and digest in FROZEN_FILE."""

    def hook(models: list, weights: list, output_dir: str) -> None:
        if len(models) != 1 or len(weights) != 1:
            return  # FSDP / DeepSpeed save their own way; MMGCS prepares one model
        model = accelerator.unwrap_model(models[0])
        names = frozen_names(model)
        if not names:
            return  # nothing frozen: accelerate's full checkpoint, loaded by accelerate as before
        state, left_out = model.state_dict(), set(names)
        weights[0] = OrderedDict((k, v) for k, v in state.items() if k not in left_out)
        if accelerator.is_main_process:
            write_json_atomic(Path(output_dir) / FROZEN_FILE, {
                "format": FROZEN_FORMAT, "weights": CHECKPOINT_WEIGHTS, "names": names,
                "sha256": tensors_digest({n: state[n] for n in names})})

    return hook


def _differs(names) -> str:
    towers = sorted({n.split("_tower.")[0] for n in names})
    return f"{' and '.join(towers)} " + ("backbones differ from those" if len(towers) > 1 else "backbone differs from the one")


def _checked_weights(model: torch.nn.Module, folder: Path) -> dict:
    """The weights of a checkpoint written without its frozen ones, once they are known to fit ``model`` (unwrapped,
    built from the run's config: its frozen towers came back from the backbone) strictly: the checkpoint lacks
    exactly the recorded frozen names and holds nothing the model lacks, and the rebuilt frozen weights match the
    recorded digest."""
    record = json.loads((folder / FROZEN_FILE).read_text(encoding="utf-8"))
    names, saved = set(record["names"]), load_file(str(folder / CHECKPOINT_WEIGHTS))
    current = model.state_dict()
    missing, unexpected = set(current) - set(saved), set(saved) - set(current)
    if unexpected or missing != names:
        lacking = sorted(missing - names)
        raise TrainingError(
            f"The checkpoint {folder} does not fit this model: it lacks {len(missing)} of the model's weights where it "
            f"recorded {len(names)} frozen ones{f' (e.g. it lacks {lacking[0]}, which is not frozen)' if lacking else ''}"
            f", and holds {len(unexpected)} the model does not have. Resume with the model settings of the run that "
            "wrote it, or start a new run (remove the folder or choose another train.output_dir)")
    if tensors_digest({n: current[n] for n in names}) != record["sha256"]:
        raise TrainingError(
            f"The frozen {_differs(names)} the run in {folder.parent.parent} started with (another "
            f"version of its weights?): the checkpoint {folder.name} leaves those weights out and needs them rebuilt "
            "identically. Resume with the same backbone, or start a new run (remove the folder or choose another "
            "train.output_dir)")
    return saved


def check_frozen_weights(model: torch.nn.Module, folder: Optional[Path]) -> None:
    """Refuse, before anything slow (featurizing), a resume whose rebuilt frozen towers are not those the checkpoint
    ``folder`` left out (see ``load_without_frozen``); nothing to check without a checkpoint or for a full one."""
    if folder is not None and (Path(folder) / FROZEN_FILE).is_file():
        _checked_weights(model, Path(folder))


def load_without_frozen(model: torch.nn.Module, folder: Path) -> None:
    """Load a checkpoint written without its frozen weights into ``model``, strictly (``_checked_weights``)."""
    saved = _checked_weights(model, Path(folder))
    model.load_state_dict(saved, strict=False)  # strict in effect: the key sets were compared


def load_frozen(accelerator) -> Callable:
    """accelerate's load_state pre-hook: a checkpoint with FROZEN_FILE is loaded by ``load_without_frozen`` and taken
    off accelerate's list (its strict load would miss the frozen names); a full one is left to accelerate."""

    def hook(models: list, input_dir: str) -> None:
        if len(models) == 1 and (Path(input_dir) / FROZEN_FILE).is_file():
            load_without_frozen(accelerator.unwrap_model(models[0]), Path(input_dir))
            models.clear()

    return hook


def frozen_problem(folder: Path) -> Optional[str]:
    """Why the record of the weights a checkpoint left out (FROZEN_FILE) is unusable, or None (also when the
    checkpoint holds all its weights)."""
    path = Path(folder) / FROZEN_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"{FROZEN_FILE} is not valid JSON"
    record = record if isinstance(record, dict) else {}
    names, digest = record.get("names"), record.get("sha256")
    if (record.get("format") != FROZEN_FORMAT or record.get("weights") != CHECKPOINT_WEIGHTS or not names
            or not isinstance(names, list) or not all(isinstance(n, str) for n in names)
            or not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest)):
        return f"{FROZEN_FILE} is not a valid record of the frozen weights left out"
    return None
