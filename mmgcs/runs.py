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
- ``save_checkpoint`` / ``load_checkpoint``: accelerate's state without the frozen towers' weights (rebuilt from
  the backbone on resume, checked against the names and digest in ``frozen_weights.json``; a full checkpoint of
  older code still loads).
- ``LoopState``: what a checkpoint holds besides accelerate's state (the loop's epoch count, best epoch,
  early-stopping count and history), written and read back; ``check_resumed_config`` refuses a --resume with other
  data/model settings; ``replicas_in_sync`` stops a launch that trains independent copies.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
import re
import shutil
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, TypeVar

import numpy as np
import torch
import yaml
from accelerate.utils import broadcast_object_list, gather_object
from accelerate.utils import load as load_pickled_state  # how accelerate restores RNG states (weights_only=True)
from safetensors import SafetensorError
from safetensors.torch import load_file

from mmgcs import interrupts
from mmgcs.config import RunConfig, config_to_dict, save_config
from mmgcs.digest import file_sha256, tensors_digest
from mmgcs.hub import PushError
from mmgcs.hub.push import push_bundle

logger = logging.getLogger(__name__)

LOCK_FILE = ".mmgcs-run.lock"
MANIFEST = "MANIFEST.json"
COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
# The names and digest of the frozen weights a checkpoint leaves out (next to accelerate's model.safetensors).
FROZEN_FILE = "frozen_weights.json"
FROZEN_FORMAT = 1
CHECKPOINT_WEIGHTS = "model.safetensors"  # accelerate's file of the (first) model's weights
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
    return gather_object([value])


def collective(accelerator, fn: Callable[[], T], failed: Optional[Callable[[OSError], str]] = None) -> T:
    """Run ``fn`` on every process (it checks ``is_main_process`` itself when only the main one writes), then
    raise one ``TrainingError`` on every process if it failed on any: a process that failed alone would leave
    the others waiting forever at the next barrier. ``failed`` turns a failed write (``write_failure``) into the
    message. A signal arriving meanwhile stops the run only once the step is done (``interrupts.saving``)."""
    error, value = None, None
    with interrupts.saving():
        try:
            value = fn()
        except TrainingError as e:
            error = str(e)
        except Exception as e:  # noqa: BLE001 — only write failures are turned into a message; the rest re-raised
            write_error = write_failure(e)
            if write_error is None:
                raise
            error = failed(write_error) if failed else str(write_error)
        errors = [e for e in _gather(accelerator, error) if e]
    if errors:
        raise TrainingError(errors[0])
    return value


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
    _check_folder_shared(accelerator, folder)
    return box[0]


def _check_folder_shared(accelerator, folder: Path) -> None:
    """Every process must see the folder the main process locked: at the end each reads the best model from it, and
    checkpoints hold every process's random states. A folder on each machine's own disk would fail only after
    training ("the best model bundle ... is missing"); say so now, on every process."""
    if accelerator.num_processes == 1:
        return
    holder = [_read_holder(folder / LOCK_FILE) if accelerator.is_main_process else None]
    broadcast_object_list(holder)

    def check():
        if not accelerator.is_main_process and _read_holder(folder / LOCK_FILE) != holder[0]:
            raise TrainingError(
                f"train.output_dir {folder} on {_hostname()} is not the folder the main process locked on "
                f"{holder[0].get('host', 'its host')}: on several machines it must be one folder every machine sees "
                "at the same path (e.g. on NFS), since every process reads the best model at the end and "
                "checkpoints hold every process's random states. Mount a shared folder and pass it as "
                "train.output_dir (the feature cache, train.cache_dir, may stay on each machine's own disk)"
            )

    collective(accelerator, check)


def _read_holder(path: Path) -> dict:
    """The JSON a RunLock wrote (pid, host, since), or {} when the file is missing or unreadable."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read(4096).decode("utf-8") or "{}")
    except (OSError, ValueError):
        return {}


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


# ------------------------------------------------------------------------------------------- completion
def mark_incomplete(output_dir: Path) -> None:
    """A run is writing into ``output_dir``: until it finishes, the folder does not hold a finished run."""
    _remove_file(Path(output_dir) / COMPLETE)


def start_run_folder(output_dir: Path, cfg: RunConfig) -> None:
    """The folder a run (re)starts writing into: no longer marked finished, its resolved config saved (loadable
    with --config, and compared by the next --resume)."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    mark_incomplete(output_dir)
    save_config(cfg, Path(output_dir) / "config.yaml")


def mark_complete(output_dir: Path, details: dict) -> None:
    """Written last by a finished run (``make train`` targets it)."""
    write_json_atomic(Path(output_dir) / COMPLETE, {"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **details})


# ------------------------------------------------------------------------------------ the run's own checks
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


# ------------------------------------------------------------------------- checkpoints without frozen towers
# A frozen tower never changes in training and create_model rebuilds it from its backbone (all-mpnet-base-v2: 438 MB
# per checkpoint), so a checkpoint keeps only what trains plus the names and one digest of what it left out.
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


def _leave_out_frozen(accelerator) -> Callable:
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


def _save_state(accelerator, folder: Path) -> None:
    handle = accelerator.register_save_state_pre_hook(_leave_out_frozen(accelerator))
    try:
        accelerator.save_state(str(folder))
    finally:
        handle.remove()


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


def _load_frozen_hook(accelerator) -> Callable:
    """accelerate's load_state pre-hook: a checkpoint with FROZEN_FILE is loaded by ``load_without_frozen`` and taken
    off accelerate's list (its strict load would miss the frozen names); a full one is left to accelerate."""

    def hook(models: list, input_dir: str) -> None:
        if len(models) == 1 and (Path(input_dir) / FROZEN_FILE).is_file():
            load_without_frozen(accelerator.unwrap_model(models[0]), Path(input_dir))
            models.clear()

    return hook


def load_checkpoint(accelerator, folder: Path) -> None:
    """accelerate's ``load_state`` of a checkpoint ``pick_checkpoint`` verified: the model's weights (with or without
    its frozen towers), optimizer, scheduler and every rank's RNG states."""
    handle = accelerator.register_load_state_pre_hook(_load_frozen_hook(accelerator))
    try:
        accelerator.load_state(str(folder))
    finally:
        handle.remove()


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


@dataclass
class LoopState:
    """What the training loop carries from epoch to epoch; each checkpoint saves it as trainer_state.json."""

    history: list = field(default_factory=list)  # one record per epoch run
    best_metric: Optional[float] = None
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the best one (early stopping)
    global_step: int = 0

    def track_best(self, value: Optional[float], epoch: int, higher: bool) -> bool:
        """Early stopping's bookkeeping after ``epoch``: True when ``value`` is the best so far (a missing or NaN
        value is the worst)."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            value = -math.inf if higher else math.inf
        better = self.best_metric is None or (value > self.best_metric if higher else value < self.best_metric)
        if better:
            self.best_metric, self.best_epoch, self.bad_epochs = float(value), epoch, 0
        else:
            self.bad_epochs += 1
        return better

    def should_stop(self, max_steps: int, patience: int, metric: str) -> bool:
        """After an epoch: the step budget (``train.max_steps``) is spent, or ``patience`` epochs brought no
        improvement of ``metric`` (early stopping)."""
        stop = False
        if max_steps and self.global_step >= max_steps:
            logger.info("Reached train.max_steps=%d", max_steps)
            stop = True
        if patience and self.bad_epochs >= patience:
            logger.info("Early stopping: no %s improvement for %d epochs", metric, self.bad_epochs)
            stop = True
        return stop

    def to_json(self, epoch: int, epochs: int, metric_for_best: str) -> dict:
        return {
            "epoch": epoch,
            "epochs": epochs,  # the run's plan: a checkpoint past it is refused on resume
            "global_step": self.global_step,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "metric_for_best": metric_for_best,
            "history": self.history,
        }

    @classmethod
    def from_checkpoint(cls, folder: Path) -> tuple["LoopState", int]:
        """The state saved in a checkpoint verified by ``pick_checkpoint``, and the epochs it had done."""
        state = json.loads((Path(folder) / STATE_FILE).read_text(encoding="utf-8"))
        loop = cls(list(state["history"]), state["best_metric"], int(state["best_epoch"]), int(state["bad_epochs"]),
                   int(state["global_step"]))
        return loop, int(state["epoch"])

    def resumed_at(self, done: int, epochs: int, patience: int, folder: Path) -> int:
        """The epoch a run resumed from ``folder`` after ``done`` epochs continues with: past its plan when it had
        stopped early (``patience`` epochs without improvement)."""
        logger.info("Resumed from %s (epoch %d done, best %s at epoch %d)", folder, done, self.best_metric,
                    self.best_epoch)
        if done >= epochs:
            logger.info("The checkpointed run already finished its %d epochs; re-evaluating the best model", epochs)
        return epochs if patience and self.bad_epochs >= patience else done


def load_bundle_weights(model: torch.nn.Module, bundle: Path) -> None:
    """The weights of a saved bundle copied into ``model`` (loaded on the CPU: the model keeps its device)."""
    weights = Path(bundle) / "model.safetensors"
    if not weights.is_file():
        raise TrainingError(f"The best model bundle {weights} is missing; the run cannot be finished")
    model.load_state_dict(load_file(str(weights)), strict=True)


def replicas_in_sync(accelerator, model: torch.nn.Module) -> bool:
    """Every process must hold the same weights after an epoch; a launch that silently trains independent
    copies (e.g. `--multi_gpu` without a GPU and without cpu=True) is stopped here rather than reported."""
    digests = gather_object([tensors_digest(model.state_dict())])
    if len(set(digests)) != 1:
        raise TrainingError(
            f"The {len(digests)} processes hold different weights after an epoch: they are not training one "
            "model together. Launch with `accelerate launch --multi_gpu` on GPUs, or let MMGCS force the CPU "
            "backend (it does when no GPU is visible)"
        )
    return True


def push_run_bundle(bundle: Path, repo_id: str, output_dir: Path) -> str:
    """Upload a finished run's bundle; a failure says that everything is saved and how to push it later."""
    try:
        return push_bundle(bundle, repo_id)
    except Exception as e:
        raise PushError(
            f"Could not push {bundle} to the Hub repo {repo_id!r}: {type(e).__name__}: {e}. "
            f"Everything is saved in {output_dir}; push it later with "
            f"`huggingface-cli upload {repo_id} {bundle} .` once the Hub is reachable and you are logged in"
        ) from None
