"""What a run says when a step fails: ``TrainingError`` (a problem the user can fix, the message says how), a failed
write recognised whichever writer raised it (Python's files, safetensors, torch.save), and its message (full disk,
permissions) with the remedy."""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

from safetensors import SafetensorError


class TrainingError(RuntimeError):
    """A problem the user can fix (bad data path, an output folder in use, ...); the message says how."""


def not_writable(folder: Path, e: OSError) -> TrainingError:
    """The error of an output folder that refused a write (full disk, permissions), with the remedy."""
    if e.errno == errno.ENOSPC:
        why = "the disk is full; free some space"
    else:
        why = f"{e.strerror or type(e).__name__}; fix its permissions"
    return TrainingError(f"The output folder {folder} is not writable ({why}), or choose another train.output_dir")


# What each writer raises when a write fails, seen on a full tmpfs: OSError from Python's files and matplotlib;
# SafetensorError "Error while serializing: I/O error: No space left on device (os error 28)" from safetensors
# (bundles, accelerate's model file); RuntimeError "[enforce fail at inline_container.cc:672] . unexpected pos 60800
# vs 60688" or "basic_ios::clear: iostream error" from torch.save (accelerate's optimizer, scheduler, RNG files).
_OS_ERROR_CODE = re.compile(r"(?:os error|code:)\s*(\d+)")
_TORCH_WRITE_FAILED = ("inline_container.cc", "PytorchStreamWriter", "iostream error", "file write failed")
_UNKNOWN_WRITE_ERROR = -1  # errno of a failed torch write: torch does not say why


def write_failure(e: BaseException) -> Optional[OSError]:
    """``e`` as an OSError when it is a failed write (errno from the message where the writer gives one), else None."""
    if isinstance(e, OSError):
        return e
    if isinstance(e, SafetensorError):
        code = _OS_ERROR_CODE.search(str(e))
        if code:
            return OSError(int(code.group(1)), os.strerror(int(code.group(1))))
        return OSError(errno.EIO, f"SafetensorError: {str(e)[:200]}")
    if isinstance(e, RuntimeError) and any(sign in str(e) for sign in _TORCH_WRITE_FAILED):
        return OSError(_UNKNOWN_WRITE_ERROR, f"the write failed ({str(e).splitlines()[0][:200]})")
    return None


def _nearly_full(folder: Path) -> bool:
    """Less than 1 MiB left for this user where ``folder`` (or its nearest existing parent) lives."""
    for path in (Path(folder), *Path(folder).parents):
        if path.exists():
            try:
                return shutil.disk_usage(path).free < (1 << 20)
            except OSError:
                return False
    return False


def save_failed(what: str, folder: Path) -> Callable[[OSError], str]:
    """The message of a write that failed while saving ``what`` into ``folder`` (full disk, read-only)."""

    def message(e: OSError) -> str:
        full = e.errno == errno.ENOSPC or (e.errno == _UNKNOWN_WRITE_ERROR and _nearly_full(folder))
        why = "the disk is full" if full else (e.strerror or type(e).__name__)
        return (f"Could not save {what} in {folder}: {why}. Free some space (or fix the folder's permissions) and "
                "run again with --resume: the last checkpoint and the best model saved so far are kept")

    return message
