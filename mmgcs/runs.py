"""The run folder's safety net: one run per folder, writes that fail clearly, saves that survive a kill, and
checkpoints that are verified before anything uses them.

- ``RunLock``: an exclusive lock on ``train.output_dir`` (``.mmgcs-run.lock``, an ``flock`` plus the holder's pid
  and host). A second run in the folder is refused; a lock left by a dead process on this host is taken over.
- ``replace_folder`` / ``recover_folder``: a bundle is written to ``.NAME.tmp``, marked complete
  (``.NAME.complete``), then swapped in. Whatever step a kill interrupts, ``recover_folder`` leaves either the old
  bundle or the new one, never none: a complete tmp folder is promoted, an incomplete one discarded.
- ``write_manifest`` / ``checkpoint_problem`` / ``choose_checkpoint``: every checkpoint carries the sha256 of its
  files (``MANIFEST.json``, written last); resume takes the newest checkpoint that is intact and consistent.
- ``COMPLETE``: written last by a finished run; ``make train`` targets it, not the weights file.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

logger = logging.getLogger(__name__)

LOCK_FILE = ".mmgcs-run.lock"
MANIFEST = "MANIFEST.json"
COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
MANIFEST_FORMAT = 1
_CHECKPOINT_NAME = re.compile(r"^epoch_(\d+)$")
T = TypeVar("T")


class TrainingError(RuntimeError):
    """A problem the user can fix (bad data path, an output folder in use, ...); the message says how."""


# ------------------------------------------------------------------------------------ small file steps
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
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _hostname() -> str:
    return socket.gethostname()


# ------------------------------------------------------------------------------------------------ lock
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class RunLock:
    """An exclusive lock on a run folder, held from the start of a run until ``release``.

    The ``flock`` decides on this host (the kernel drops it when the holder dies, so a killed run never blocks
    the next); the JSON inside names the holder for the error message and for hosts sharing the folder over a
    network file system, where a lock of another host is never taken over automatically.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = self._locked_fd()
            previous = self._holder(fd)
            self._check_previous(previous)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": _hostname(), "since": time.time()}).encode(), 0)
            os.fsync(fd)  # also proves the folder takes writes before any featurizing starts
        except OSError as e:
            self.release()
            raise not_writable(self.folder, e) from None
        except TrainingError:
            self._close()  # the other run's lock file stays as it is
            raise
        self._fd = fd
        return self

    def _locked_fd(self) -> int:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder(fd)
                os.close(fd)
                raise TrainingError(
                    f"Another run is using the output folder {self.folder} ({_describe(holder)}). Wait for it to "
                    "finish or stop it, or choose another train.output_dir"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            # The holder may have released (unlinked) the file between our open and our flock: lock the file
            # that is at the path now, not a deleted one.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return fd
            os.close(fd)

    @staticmethod
    def _holder(fd: int) -> dict:
        try:
            raw = os.pread(fd, 4096, 0)
            holder = json.loads(raw.decode("utf-8")) if raw else {}
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _check_previous(self, holder: dict) -> None:
        if not holder:
            return
        host, pid = holder.get("host"), holder.get("pid")
        if host != _hostname():
            raise TrainingError(
                f"The output folder {self.folder} is locked by a run on another host ({_describe(holder)}). If that "
                f"run is no longer running, delete {self.path}; else choose another train.output_dir"
            )
        state = "no longer running" if not isinstance(pid, int) or not _pid_alive(pid) else "not holding the lock"
        logger.warning("Taking over the stale lock of %s: %s is %s", self.folder, _describe(holder), state)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # while still locked: nobody else can be holding this file
        except OSError:
            pass
        self._close()

    def _close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def _describe(holder: dict) -> str:
    if not holder:
        return "its holder is unknown"
    since = holder.get("since")
    started = ""
    if isinstance(since, (int, float)):
        started = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since))
    return f"pid {holder.get('pid')} on host {holder.get('host')}{started}"


def not_writable(folder: Path, e: OSError) -> TrainingError:
    if e.errno == errno.ENOSPC:
        why = "the disk is full; free some space"
    else:
        why = f"{e.strerror or type(e).__name__}; fix its permissions"
    return TrainingError(f"The output folder {folder} is not writable ({why}), or choose another train.output_dir")


# ------------------------------------------------------------------------------------- collective steps
def _gather(accelerator, value) -> list:
    if accelerator.num_processes == 1:
        return [value]
    from accelerate.utils import gather_object

    return gather_object([value])


def collective(accelerator, fn: Callable[[], T], failed: Optional[Callable[[OSError], str]] = None) -> T:
    """Run ``fn`` on every process (it checks ``is_main_process`` itself when only the main one writes), then
    raise one ``TrainingError`` on every process if it failed on any: a process that failed alone would leave
    the others waiting forever at the next barrier. ``failed`` turns an OSError into the message."""
    error, value = None, None
    try:
        value = fn()
    except TrainingError as e:
        error = str(e)
    except OSError as e:
        error = failed(e) if failed else str(e)
    errors = [e for e in _gather(accelerator, error) if e]
    if errors:
        raise TrainingError(errors[0])
    return value


def save_failed(what: str, folder: Path) -> Callable[[OSError], str]:
    """The message of a write that failed while saving ``what`` into ``folder`` (full disk, read-only)."""

    def message(e: OSError) -> str:
        why = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or type(e).__name__)
        return (f"Could not save {what} in {folder}: {why}. Free some space (or fix the folder's permissions) and "
                "run again with --resume: the last checkpoint and the best model saved so far are kept")

    return message


def take_run_folder(accelerator, folder: Path, bundle: Path) -> Optional[RunLock]:
    """The main process locks ``folder`` and repairs an interrupted save of ``bundle``; every process gets the
    outcome (the lock for the main one, an error for all when the folder is in use or not writable)."""
    box: list = [None]

    def take():
        if not accelerator.is_main_process:
            return
        lock = RunLock(folder).acquire()
        try:
            recover_folder(bundle)
        except BaseException:
            lock.release()
            raise
        box[0] = lock

    collective(accelerator, take, failed=lambda e: str(not_writable(folder, e)))
    return box[0]


# ------------------------------------------------------------------------------------------ bundle swap
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


# -------------------------------------------------------------------------------------------- manifest
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path) -> None:
    """The sha256 and size of every file in ``folder``, written last and atomically: a checkpoint is verifiable
    only once all of it is on disk."""
    files = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
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
        if _sha256(path) != entry.get("sha256"):
            return f"{name} does not match its recorded sha256 (the file was changed or damaged)"
    unknown = [n for n in (p.relative_to(folder).as_posix() for p in _files(folder)) if n not in files]
    if unknown:
        return f"it holds files its manifest does not list ({', '.join(unknown[:3])})"
    return None


# ------------------------------------------------------------------------------------------ checkpoints
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
    import numpy as np
    import torch
    from accelerate.utils import load  # the loader accelerate restores them with (weights_only=True)

    files = sorted(folder.glob("random_states_*.pkl"))
    if not files:
        return "it holds no random-number states (random_states_0.pkl)"
    for path in files:
        try:
            states = load(path)
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
    return manifest_problem(folder) or state_problem(folder) or rng_problem(folder)


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
    return None


def pick_checkpoint(accelerator, root: Path, output_dir: Path) -> Optional[Path]:
    """``choose_checkpoint`` on the main process, its answer (or its error) shared with every process."""
    from accelerate.utils import broadcast_object_list

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


# ------------------------------------------------------------------------------------------- completion
def mark_incomplete(output_dir: Path) -> None:
    """A run is writing into ``output_dir``: until it finishes, the folder does not hold a finished run."""
    _remove_file(Path(output_dir) / COMPLETE)


def mark_complete(output_dir: Path, details: dict) -> None:
    """Written last by a finished run (``make train`` targets it)."""
    write_json_atomic(Path(output_dir) / COMPLETE, {"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **details})
