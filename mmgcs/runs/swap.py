"""Replacing on disk so that a kill at any step leaves the old content or the new, never a mix or nothing.

- ``write_json_atomic``: write-then-rename with fsync, for every JSON file of the run folder.
- ``replace_folder`` / ``recover_folder``: a bundle is written to ``.NAME.tmp``, marked complete
  (``.NAME.complete``), then swapped in. Whatever step a kill interrupts, ``recover_folder`` leaves either the old
  bundle or the new one, never none: a complete tmp folder is promoted, an incomplete one discarded.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

logger = logging.getLogger(__package__)  # "mmgcs.runs": the run folder's log lines keep their name


# Every change the bundle swap makes to the disk goes through these three, so a test can stop the swap at
# each of them in turn (a simulated kill) and check what recovery makes of the folder.
def _rename(src: Path, dst: Path) -> None:
    os.rename(src, dst)


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _remove_file(path: Path) -> None:
    Path(path).unlink(missing_ok=True)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write-then-rename with fsync: the file is either the old one or the complete new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, default=_json_default)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove_file(tmp)  # a full disk leaves no partial file behind
        raise


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _swap_paths(folder: Path) -> tuple[Path, Path, Path]:
    folder = Path(folder)
    return (folder.with_name(f".{folder.name}.tmp"), folder.with_name(f".{folder.name}.old"),
            folder.with_name(f".{folder.name}.complete"))


def replace_folder(folder: Path, write: Callable[[Path], None]) -> None:
    """Replace ``folder`` by what ``write(tmp)`` puts in a fresh ``tmp`` folder, recoverably (see the module)."""
    tmp, _, marker = _swap_paths(folder)
    recover_folder(folder)  # a swap a kill interrupted earlier is finished first
    _remove_tree(tmp)
    try:
        write(tmp)
    except BaseException:
        _remove_tree(tmp)  # no half-written folder is left behind (a kill is repaired by recover_folder)
        raise
    write_json_atomic(marker, {"complete": tmp.name, "files": sorted(p.name for p in tmp.iterdir())})
    _promote(folder)


def _promote(folder: Path) -> None:
    tmp, old, marker = _swap_paths(folder)
    if folder.exists():
        _remove_tree(old)
        _rename(folder, old)
    _rename(tmp, folder)
    _remove_file(marker)
    _remove_tree(old)


def recover_folder(folder: Path) -> Optional[str]:
    """Finish or undo a ``replace_folder`` a kill interrupted; returns what was done (None: nothing to do)."""
    tmp, old, marker = _swap_paths(folder)
    done = None
    _remove_file(marker.with_name(f".{marker.name}.tmp"))  # a marker whose own write was killed
    if marker.exists():
        if tmp.is_dir():
            _promote(folder)
            done = f"finished saving {folder} (a complete {tmp.name} was waiting)"
        else:  # the new folder is already in place; only the clean-up was missed
            _remove_file(marker)
    elif tmp.exists():
        _remove_tree(tmp)
        done = f"discarded the incomplete {tmp} of an interrupted save"
    if old.exists():
        if folder.exists():
            _remove_tree(old)
        else:
            _rename(old, folder)
            done = f"restored {folder} from {old.name}"
    if done:
        logger.warning("Interrupted save repaired: %s", done)
    return done
