"""Whether an output can be written, asked before the work that fills it.

`mmgcs predict`, `evaluate` and `data build` write their results at the end of minutes or hours of work; an --out
that is a folder, read-only or on a full disk must fail in a second, with the reason, not after the work. The check
writes and removes a small probe file beside the output (permissions alone do not tell: root ignores them, and a
read-only or full file system only shows on writing).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# What the probe writes: a few blocks, so a disk that is already full refuses it.
PROBE_BYTES = 64 * 1024


def unwritable_file(path: Path) -> str | None:
    """Why the file `path` cannot be written (created, or appended to when it exists), or None when it can.
    Creates the missing parent folders, as writing it would."""
    if path.is_dir():
        return f"it is a folder; name a file inside it (e.g. {str(path / ('out' + path.suffix))!r})"
    problem = _unwritable_folder(path.parent)
    if problem:
        return problem
    if path.exists():
        try:
            with open(path, "ab"):  # appending nothing: the file is left as it is
                pass
        except OSError as e:
            return f"the file cannot be written ({_reason(e)})"
    return None


def unwritable_folder(path: Path) -> str | None:
    """Why files cannot be written inside the folder `path` (created when missing), or None when they can."""
    if path.exists() and not path.is_dir():
        return "it is a file, not a folder; name a folder (it is created when missing)"
    return _unwritable_folder(path)


def _unwritable_folder(folder: Path) -> str | None:
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        return f"{str(existing)!r} is a file, not a folder"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"the folder {str(folder)!r} cannot be created ({_reason(e)})"
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".mmgcs-write-check-")
    except OSError as e:
        return f"nothing can be written in {str(folder)!r} ({_reason(e)}); pick another place or fix its permissions"
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(b"\0" * PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return f"nothing can be written in {str(folder)!r} ({_reason(e)}); free space or pick another place"
    finally:
        os.unlink(probe)
    return None


def _reason(e: OSError) -> str:
    """The system's reason ('Permission denied', 'Read-only file system', 'No space left on device')."""
    return e.strerror or type(e).__name__
