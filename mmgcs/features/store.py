"""`FeatureCache`: frozen towers' features on disk, one safetensors file per key (see mmgcs.features.keys).

Change any part of the key and the file name changes: the old file is simply never read again. A file is written
to a temporary name and renamed into place, so a crash never leaves a half-written file that could later be read
as valid; a file that is unreadable anyway (disk error, manual edit) is recomputed with a warning. A write that
fails (full disk, read-only folder) keeps the features for this run only and stops further writes.

A miss is computed under the entry's lock (mmgcs.features.locks): processes sharing the folder (runs side by side,
machines on one NFS folder) compute each entry once; the others wait, then read it. A hit takes no lock.
"""

import contextlib
import importlib.metadata
import json
import logging
import os
import stat
import time
import uuid
import warnings
from pathlib import Path
from typing import Optional

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open

from mmgcs.config import TrainConfig
from mmgcs.features.keys import CACHE_FORMAT, feature_key, file_name, key_digest
from mmgcs.features.locks import LOCK_DIR, LOCK_WAIT_S, entry_lock
from mmgcs.features.workers import FeatureCacheWarning, compute_features

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = TrainConfig.cache_dir  # config.py is the one home of defaults


class FeatureCache:
    """Tower features stored on disk, one safetensors file (`features` (N, D) float32, `mask` (N,) bool) per key.

    `hits` and `misses` count this object's lookups (a miss computes and stores). `lock_wait_s`: how long a miss
    waits for another process computing the same entry (see mmgcs.features.locks).
    """

    def __init__(self, cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR, lock_wait_s: float = LOCK_WAIT_S):
        self.cache_dir = Path(cache_dir)
        self.lock_wait_s = lock_wait_s
        self.hits = 0
        self.misses = 0
        # After a failed write (full disk, read-only folder) the others would fail alike: stop storing, warn once.
        self.writable = True

    def path_for(self, model, split, modality: str) -> Path:
        """Where the features of (model's `modality` tower, preprocessing, split) are stored."""
        return self._path(feature_key(model, split, modality))

    def _path(self, key: dict) -> Path:
        return self.cache_dir / file_name(key)

    def get_or_compute(
        self,
        model,
        split_dataset,
        modality: str,
        batch_size: int = 64,
        num_workers: Optional[int] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(features (N, D) float32, mask (N,) bool)` for the rows of `split_dataset`, in order.

        Rows without that modality (no plot / no poster, or a poster that cannot be decoded, reported by id)
        get zeros and mask False. Loaded from the cache when the key matches, else computed and stored.
        `num_workers`: worker processes that decode posters and, on CPU, run the tower (None: one per core, at
        most `mmgcs.features.workers.MAX_WORKERS`; 0: everything in this process). `batch_size` and `num_workers`
        change speed, not the key.
        """
        key = feature_key(model, split_dataset, modality)
        digest = key_digest(key)
        path = self._path(key)
        n = len(split_dataset)
        loaded = self._hit(path, digest, n, modality)
        if loaded is not None:
            return loaded
        seen = _identity(path)  # no file, or an unusable one (warned about)
        with entry_lock(path, f"{modality} features of {n} rows", self.lock_wait_s):
            # Whoever held the lock before may have stored the entry meanwhile (a new file: renamed into place).
            if _identity(path) != seen:
                loaded = self._hit(path, digest, n, modality, waited=True)
                if loaded is not None:
                    return loaded
            self.misses += 1
            logger.info("Feature cache miss: computing %s features of %d rows (%s)", modality, n, path.name)
            start = time.perf_counter()
            features, mask = compute_features(model, split_dataset, modality, batch_size=batch_size,
                                              num_workers=num_workers)
            seconds = time.perf_counter() - start
            self._store(path, features, mask, key, digest, seconds)
        return features, mask

    def _hit(self, path: Path, digest: str, n: int, modality: str,
             waited: bool = False) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """The stored features of `path` (counted as a hit), or None when there is no usable file."""
        if not path.exists():
            return None
        loaded = self._load(path, digest, n)
        if loaded is not None:
            self.hits += 1
            logger.info("Feature cache hit: %s features of %d rows from %s%s", modality, n, path,
                        " (stored by another process while this one waited)" if waited else "")
        return loaded

    # -------------------------------------------------------------------------------------- storage
    def _load(self, path: Path, digest: str, n: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                features = f.get_tensor("features")
                mask = f.get_tensor("mask")
            problem = None
            if meta.get("mmgcs_key") != digest:
                problem = "its stored key does not match its name"
            elif features.ndim != 2 or features.shape[0] != n or mask.shape != (n,) or mask.dtype != torch.bool:
                problem = f"it holds shapes {tuple(features.shape)}/{tuple(mask.shape)} for {n} rows"
            elif not torch.isfinite(features).all():
                problem = "it holds non-finite values"
        except Exception as e:  # a truncated/garbled file raises assorted errors from safetensors
            problem = f"{type(e).__name__}: {e}"
        if problem is None:
            return features.float(), mask
        warnings.warn(
            f"Feature cache file {path} is unusable ({problem}); recomputing it. "
            "(Delete the cache folder if this keeps happening.)",
            FeatureCacheWarning,
            stacklevel=4,
        )
        return None

    def _store(self, path: Path, features: torch.Tensor, mask: torch.Tensor, key: dict, digest: str, seconds: float) -> None:
        if not self.writable:
            return
        meta = {
            "key": key,
            "digest": digest,
            "rows": int(features.shape[0]),
            "dim": int(features.shape[1]),
            "present": int(mask.sum()),
            "seconds": round(seconds, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": _versions(),
        }
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(
                path,
                lambda tmp: safetensors.torch.save_file(  # looked up per call: tests fill the disk through it
                    {"features": features.contiguous(), "mask": mask.contiguous()},
                    tmp,
                    metadata={"mmgcs_key": digest, "mmgcs_format": str(CACHE_FORMAT)},
                ),
            )
            # Human-readable sidecar (what the file was computed from); the safetensors file alone is authoritative.
            sidecar = path.with_suffix(".json")
            _atomic_write(sidecar, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1, default=str)))
        except (OSError, SafetensorError) as e:  # safetensors reports a full disk as SafetensorError
            self.writable = False
            warnings.warn(
                f"Could not write the feature cache file {path} ({type(e).__name__}: {e}); the features are used "
                "for this run only and nothing more is stored in this cache. "
                "Point train.cache_dir at a writable folder with free space.",
                FeatureCacheWarning,
                stacklevel=3,
            )
            return
        logger.info("Stored %s features (%d x %d, %.1f s to compute) in %s", key["modality"], *features.shape, seconds, path)

    def entries(self) -> list[dict]:
        """The sidecar metadata of every stored file (for listing and cleaning)."""
        out = []
        for sidecar in sorted(self.cache_dir.glob("*.json")):
            try:
                meta = json.loads(sidecar.read_text())
            except (OSError, ValueError):
                continue
            data = sidecar.with_suffix(".safetensors")
            meta["file"] = str(data)
            meta["bytes"] = data.stat().st_size if data.exists() else 0
            out.append(meta)
        return out

    def clear(self) -> int:
        """Delete every cache file, the leftovers of interrupted writes and the entries' lock files (run it while no
        run uses the folder); returns how many files were removed."""
        removed = 0
        for pattern in ("*.safetensors", "*.json", ".tmp-*", f"{LOCK_DIR}/*.lock"):
            for p in self.cache_dir.glob(pattern):
                p.unlink(missing_ok=True)
                removed += 1
        with contextlib.suppress(OSError):
            (self.cache_dir / LOCK_DIR).rmdir()
        return removed


def _identity(path: Path) -> Optional[tuple]:
    """Which file `path` is now (None: none): a file renamed into place is a new one."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _atomic_write(path: Path, write) -> None:
    """`write(tmp)` into a new temporary file beside `path`, flushed to disk, then renamed over `path`: a reader, on
    this machine or another one sharing the folder, sees the old file or the whole new one, never a part."""
    # With the umask's permissions like any other new file (mkstemp's, and safetensors' own, 0600 would hide a
    # folder shared by a group); the random name keeps concurrent writers of one entry apart.
    tmp = path.parent / f".tmp-{uuid.uuid4().hex}{path.suffix}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    os.close(fd)
    try:
        write(str(tmp))
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (best effort: some filesystems refuse to open or sync a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _versions() -> dict:
    out = {}
    for pkg in ("torch", "timm", "transformers", "mmgcs"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out
