"""One run per folder: ``RunLock``, an exclusive lock on ``train.output_dir`` (``.mmgcs-run.lock``, an ``flock`` plus
the holder's pid and host). A second run in the folder is refused; a lock left by a dead process on this host is taken
over. ``take_run_folder`` takes it on the main process, repairs an interrupted bundle save, and checks that every
process of the launch sees that same folder."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Optional

from accelerate.utils import broadcast_object_list

from mmgcs.runs.failures import TrainingError, not_writable
from mmgcs.runs.replicas import collective
from mmgcs.runs.swap import recover_folder

logger = logging.getLogger(__package__)  # "mmgcs.runs": the run folder's log lines keep their name

LOCK_FILE = ".mmgcs-run.lock"


def _hostname() -> str:
    return socket.gethostname()


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
