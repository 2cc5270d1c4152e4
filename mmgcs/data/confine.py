"""Reading a source's local poster files without ever leaving the source folder.

A source row names its poster (`poster_file`, a CSV `poster_path`); the row is data, not a trusted path. An absolute
path, a `../` or a symlink pointing out of the folder would embed a file from elsewhere on the machine in the
published dataset, and a FIFO or device would hang or flood the build. So a poster is read only when its fully
resolved path (symlinks followed) lies inside the resolved source folder, it is a regular file, and at most
`max_bytes` of it are read. A refusal carries a reason and a detail naming the path as the row gave it and the
size, never the file's content.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import PIL.Image


@dataclass(frozen=True)
class Refusal:
    """Why a poster file is not read: `reason` is the report's reason code, `detail` its human text."""

    reason: str
    detail: str
    too_big: bool = False  # over the byte limit (the report's reason is the generic "invalid_poster")


def inside(path: Path, root: Path) -> bool:
    """Whether `path`, with every symlink resolved, lies inside `root` (also resolved). A path that does not
    exist is resolved as far as it exists, so `root/../x` is outside whether or not `x` exists."""
    return _resolved_inside(path, root) is not None


def _resolved_inside(path: Path, root: Path) -> str | None:
    """The resolved path when it lies inside the resolved root, else None."""
    try:
        resolved = os.path.realpath(path)
        return resolved if Path(resolved).is_relative_to(os.path.realpath(root)) else None
    except (OSError, ValueError):  # a symlink loop or an embedded NUL: nothing we would read
        return None


def read_confined(path: Path, root: Path, max_bytes: int) -> bytes | Refusal:
    """The bytes of the poster at `path`, or a `Refusal` when it is outside `root`, missing, not a regular file,
    over `max_bytes` or unreadable."""
    shown = repr(str(path))
    resolved = _resolved_inside(path, root)
    if resolved is None:
        return Refusal("poster_outside_source", f"poster path {shown} is outside the source folder; poster stored as null")
    # O_NONBLOCK: opening a FIFO must not wait for a writer; O_NOFOLLOW: the last component cannot have become
    # a symlink since it was resolved.
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(resolved, flags)
    except FileNotFoundError:
        return Refusal("missing_poster_file", f"poster file {shown} not found; poster stored as null")
    except OSError as e:
        return Refusal("invalid_poster", f"{path.name}: cannot open the file ({_os_reason(e)}). Poster stored as null.")
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file (a FIFO, socket or device)"
            return Refusal("poster_not_regular_file", f"poster path {shown} is {kind}; poster stored as null")
        if info.st_size > max_bytes:  # refused before reading a huge file into memory
            return Refusal("invalid_poster", _too_big(path, info.st_size, max_bytes), too_big=True)
        os.set_blocking(fd, True)
        data = _read_at_most(fd, max_bytes + 1)
    except OSError as e:
        return Refusal("invalid_poster", f"{path.name}: cannot read the file ({_os_reason(e)}). Poster stored as null.")
    finally:
        os.close(fd)
    if len(data) > max_bytes:  # the file grew, or stat under-reports its size
        return Refusal("invalid_poster", f"{path.name}: over the {_mb(max_bytes)} poster limit (more than its stated "
                                         "size). Resize it. Poster stored as null.", too_big=True)
    return data


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks, size = [], 0
    while size < limit and (chunk := os.read(fd, min(1 << 20, limit - size))):
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _mb(n: int) -> str:
    return f"{n / 2**20:.0f} MB" if n >= 2**20 else f"{n:,} bytes"


def _too_big(path: Path, size: int, max_bytes: int) -> str:
    return f"{path.name}: {_mb(size)} is over the {_mb(max_bytes)} poster limit. Resize it. Poster stored as null."


def _os_reason(e: OSError) -> str:
    """The system's reason (e.g. 'Permission denied') without the path, which the detail already names."""
    return e.strerror or type(e).__name__


def unidentified_image_detail(name: str, data: bytes) -> str | None:
    """The report's detail for bytes that are no image format at all, or None when PIL recognises the format.
    Written here rather than passed on from the image loader's error, so the report says what the file is
    (its size) and never quotes it: a report ships with the dataset."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            PIL.Image.open(io.BytesIO(data)).close()  # reads the header only
        return None
    except PIL.UnidentifiedImageError:
        return (f"{name}: not a recognised image ({len(data):,} bytes); provide a JPEG, PNG, WebP or GIF file. "
                "Poster stored as null.")
    except Exception:  # recognised but broken, or a bomb: the loader's own message says which
        return None
