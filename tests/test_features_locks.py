"""mmgcs/features/locks.py on its own: one writer per cache entry among the processes sharing a cache folder. The lock
sits beside the entry, is held for the block and released after; a lock held elsewhere is waited on (said at each
report interval) and given up with a clear error; a folder that cannot hold a lock, or a filesystem that refuses
locks, computes unlocked (warned). The store's use of it, with real features: tests/test_features_store.py."""

from __future__ import annotations

import errno
import logging

import pytest
from filelock import FileLock, Timeout

import mmgcs.features.locks as L
from mmgcs.features.locks import CacheLockTimeout, entry_lock, lock_path
from mmgcs.features.workers import FeatureCacheWarning

WHAT = "text features of 8 rows"


def test_the_lock_file_sits_in_the_entrys_folder(tmp_path):
    entry = tmp_path / "cache" / "text-abc.safetensors"
    assert lock_path(entry) == tmp_path / "cache" / L.LOCK_DIR / "text-abc.safetensors.lock"


def test_the_lock_is_held_for_the_block_only(tmp_path):
    entry = tmp_path / "text-abc.safetensors"
    other = FileLock(str(lock_path(entry)))  # another process asking for the same entry
    with entry_lock(entry, WHAT) as locked:
        assert locked is True and lock_path(entry).is_file()
        with pytest.raises(Timeout):
            other.acquire(timeout=0.05)
    other.acquire(timeout=0.05)  # released at the end of the block
    other.release()


def test_a_lock_held_elsewhere_is_waited_on_then_given_up_naming_what_and_where(tmp_path, caplog):
    entry = tmp_path / "text-abc.safetensors"
    lock_path(entry).parent.mkdir()
    holder = FileLock(str(lock_path(entry)))
    holder.acquire()
    try:
        with caplog.at_level(logging.WARNING, logger=L.logger.name):
            with pytest.raises(CacheLockTimeout, match=rf"another process has been computing {WHAT}.*train\.cache_dir"):
                with entry_lock(entry, WHAT, wait_s=0.3, report_s=0.1):
                    pytest.fail("the block ran while another process held the entry's lock")
    finally:
        holder.release()
    waits = [r.getMessage() for r in caplog.records if "Waiting for another process" in r.getMessage()]
    assert len(waits) >= 2 and all(WHAT in m and str(lock_path(entry)) in m for m in waits)


def test_a_folder_that_cannot_hold_a_lock_runs_the_block_unlocked(tmp_path):
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    with entry_lock(tmp_path / "cache" / "text-abc.safetensors", WHAT) as locked:
        assert locked is False


def test_a_filesystem_without_locks_runs_the_block_unlocked_with_a_warning(tmp_path, monkeypatch):
    class NoLocks:  # what some network filesystems answer to flock
        def __init__(self, path):
            pass

        def acquire(self, timeout=None):
            raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(L, "FileLock", NoLocks)
    with pytest.warns(FeatureCacheWarning, match=r"Could not lock the feature cache entry text-abc\.safetensors .*ENOLCK"):
        with entry_lock(tmp_path / "text-abc.safetensors", WHAT) as locked:
            assert locked is False
