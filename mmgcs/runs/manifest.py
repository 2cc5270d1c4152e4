"""Every checkpoint carries the sha256 and size of its files (``MANIFEST.json``, written last): a checkpoint is
verifiable only once all of it is on disk, and a changed, damaged, missing or extra file is named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from mmgcs.digest import file_sha256
from mmgcs.runs.swap import write_json_atomic

MANIFEST = "MANIFEST.json"
MANIFEST_FORMAT = 1


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path) -> None:
    """The sha256 and size of every file in ``folder``, written last and atomically: a checkpoint is verifiable
    only once all of it is on disk."""
    files = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in _files(folder)}
    write_json_atomic(folder / MANIFEST, {"format": MANIFEST_FORMAT, "files": files})


def manifest_problem(folder: Path) -> Optional[str]:
    """Why ``folder`` does not match its manifest, or None."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
        valid = manifest.get("format") == MANIFEST_FORMAT and isinstance(files, dict) and files
    except FileNotFoundError:
        return f"it has no {MANIFEST} (digests of its files)"
    except (OSError, ValueError, KeyError, TypeError):
        valid = False
    if not valid:
        return f"its {MANIFEST} is not a valid manifest"
    for name, entry in sorted(files.items()):
        path = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts:  # never read outside the checkpoint
            return f"its {MANIFEST} names a file outside the checkpoint"
        if not path.is_file():
            return f"{name} is missing"
        recorded = entry.get("bytes") if isinstance(entry, dict) else None
        if path.stat().st_size != recorded:
            return f"{name} has {path.stat().st_size} bytes, not the {recorded} recorded"
        if file_sha256(path) != entry.get("sha256"):
            return f"{name} does not match its recorded sha256 (the file was changed or damaged)"
    unknown = [n for n in (p.relative_to(folder).as_posix() for p in _files(folder)) if n not in files]
    if unknown:
        return f"it holds files its manifest does not list ({', '.join(unknown[:3])})"
    return None
