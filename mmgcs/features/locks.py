"""One writer per cache entry: an exclusive lock (`filelock`, i.e. `fcntl.flock` on Unix) taken on a miss, so that
processes sharing a cache folder (several runs on one machine, or several machines on one NFS folder) compute each
entry once: the first computes and stores it, the others wait, then find it on disk.

Lock files live in `<cache>/.locks/` and stay there: deleting a lock file while another process waits on it would
let a third one lock a new file of the same name (over NFS an open, unlinked file is renamed, not gone, so its
waiters cannot tell). A lock is released when its process exits, however it exits, so a leftover file holds nothing.

The wait is bounded and says what it waits for; a folder that cannot hold a lock file (read-only, missing) or a
filesystem that refuses locks runs unlocked, which is still safe: each file is written whole and renamed into place,
so at worst two processes compute the same entry.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import time
import warnings
from pathlib import Path
from typing import Iterator, Optional

from filelock import FileLock, Timeout

from mmgcs.features.workers import FeatureCacheWarning

logger = logging.getLogger(__name__)

LOCK_DIR = ".locks"
# How long a process waits for another one computing the same entry before it gives up: a featurization of the
# full dataset takes minutes; a lock held for hours belongs to a stuck process.
LOCK_WAIT_S = 2 * 3600.0
# How often a waiting process says what it is waiting for (a WARNING, so it shows on every node, not only rank 0).
LOCK_REPORT_S = 60.0

__all__ = ["LOCK_DIR", "LOCK_REPORT_S", "LOCK_WAIT_S", "CacheLockTimeout", "entry_lock", "lock_path"]


class CacheLockTimeout(TimeoutError):
    """Another process held a cache entry's lock for longer than the wait allowed."""


def lock_path(entry: Path) -> Path:
    """The lock file of the cache file `entry`."""
    return entry.parent / LOCK_DIR / f"{entry.name}.lock"


@contextlib.contextmanager
def entry_lock(entry: Path, what: str, wait_s: float = LOCK_WAIT_S, report_s: Optional[float] = None) -> Iterator[bool]:
    """Hold the lock of the cache file `entry` (`what`: the features it holds, for the messages). Yields True when
    locked, False when the folder cannot hold a lock (the store's write then reports the folder's problem) or the
    filesystem refuses locks (warned). Raises `CacheLockTimeout` after `wait_s` seconds of waiting; says what it
    waits for every `report_s` seconds (default `LOCK_REPORT_S`)."""
    report_s = LOCK_REPORT_S if report_s is None else report_s
    path = lock_path(entry)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        yield False  # not writable: nothing will be stored either, so there is nothing to coordinate
        return
    lock = FileLock(str(path))
    try:
        _acquire(lock, path, what, wait_s, report_s)
    except OSError as e:
        if isinstance(e, CacheLockTimeout):
            raise
        warnings.warn(
            f"Could not lock the feature cache entry {entry.name} in {entry.parent} "
            f"({errno.errorcode.get(e.errno, type(e).__name__)}: the filesystem may not support locks); computing it "
            "without coordination: another process sharing this folder may compute it at the same time (each file "
            "is still written whole, never read half-written).",
            FeatureCacheWarning,
            stacklevel=3,
        )
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def _acquire(lock: FileLock, path: Path, what: str, wait_s: float, report_s: float) -> None:
    start = time.monotonic()
    while True:
        waited = time.monotonic() - start
        left = wait_s - waited
        if left <= 0:
            raise CacheLockTimeout(
                f"Waited {waited:.0f} s for the feature cache lock {path}: another process has been computing {what} "
                f"for longer than that. A lock is released when its process ends, so that process is still running: "
                f"check the other runs using {path.parent.parent} (train.cache_dir), or point train.cache_dir at "
                "another folder."
            )
        try:
            lock.acquire(timeout=min(report_s, left))
            return
        except Timeout:
            logger.warning("Waiting for another process computing %s (lock %s): %.0f s so far, giving up after "
                           "%.0f s", what, path, time.monotonic() - start, wait_s)
