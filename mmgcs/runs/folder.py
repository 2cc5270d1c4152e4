"""The run folder from start to finish: marked unfinished while a run writes into it, its resolved settings saved and
compared by the next --resume, the best bundle read back at the end, and ``COMPLETE`` written last (``make train``
targets it, not the weights file)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Mapping

import torch
import yaml
from safetensors.torch import load_file

from mmgcs.config import RunConfig, config_to_dict, save_config
from mmgcs.runs.failures import TrainingError
from mmgcs.runs.swap import write_json_atomic

logger = logging.getLogger(__package__)  # "mmgcs.runs": the run folder's log lines keep their name

COMPLETE = "COMPLETE"


# Run records and settings as one level: history.json for trackers and plots, configs for the resumed-run check
# (mmgcs.report re-exports it).
def flatten_dict(record: Mapping, sep: str = ".", prefix: str = "") -> dict:
    """Nested mappings as one level, keys joined by ``sep``: ``{"lr": {"head": 0.1}}`` → ``{"lr.head": 0.1}``."""
    out = {}
    for k, v in record.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_dict(v, sep, f"{key}{sep}"))
        else:
            out[key] = v
    return out


def mark_incomplete(output_dir: Path) -> None:
    """A run is writing into ``output_dir``: until it finishes, the folder does not hold a finished run."""
    (Path(output_dir) / COMPLETE).unlink(missing_ok=True)


def start_run_folder(output_dir: Path, cfg: RunConfig) -> None:
    """The folder a run (re)starts writing into: no longer marked finished, its resolved config saved (loadable
    with --config, and compared by the next --resume)."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    mark_incomplete(output_dir)
    save_config(cfg, Path(output_dir) / "config.yaml")


def mark_complete(output_dir: Path, details: dict) -> None:
    """Written last by a finished run (``make train`` targets it)."""
    write_json_atomic(Path(output_dir) / COMPLETE, {"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **details})


def _diff(a: dict, b: dict) -> list[str]:
    fa, fb = flatten_dict(a), flatten_dict(b)
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))


# Training settings a resumed run may change without a warning.
RESUMABLE_CHANGES = {"train.resume", "train.push_to_hub", "train.epochs", "train.early_stopping_patience",
                     "train.max_steps"}


def check_resumed_config(output_dir: Path, cfg: RunConfig) -> None:
    """--resume with other data/model settings than the checkpointed run is refused; other training ones warned."""
    saved = Path(output_dir) / "config.yaml"
    if not saved.is_file():
        return
    old = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
    new = config_to_dict(cfg)
    changed = _diff({s: old.get(s, {}) for s in ("data", "model")}, {s: new[s] for s in ("data", "model")})
    if changed:
        raise TrainingError(
            f"--resume with different data/model settings than the checkpointed run ({', '.join(changed)}); "
            f"resume with the settings saved in {saved}, or start a new run in another train.output_dir"
        )
    changed = [k for k in _diff({"train": old.get("train", {})}, {"train": new["train"]}) if k not in RESUMABLE_CHANGES]
    if changed:
        logger.warning("Resuming with changed training settings: %s", ", ".join(changed))


def load_bundle_weights(model: torch.nn.Module, bundle: Path) -> None:
    """The weights of a saved bundle copied into ``model`` (loaded on the CPU: the model keeps its device)."""
    weights = Path(bundle) / "model.safetensors"
    if not weights.is_file():
        raise TrainingError(f"The best model bundle {weights} is missing; the run cannot be finished")
    model.load_state_dict(load_file(str(weights)), strict=True)
