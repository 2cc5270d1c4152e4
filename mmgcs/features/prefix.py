"""`PrefixCache`: the frozen bottom of a partially tuned text tower, run once per split and kept on disk.

With `train.text_finetune=partial` and `text_trainable_layers=k`, the embeddings and the layers below the last `k`
give the same output every epoch. Their output (the hidden states entering the first trainable layer, valid tokens
only) and the masked means of the frozen layers the pooling reads (mean4 reads the last four layers) are computed
once and stored like the feature cache: one safetensors file per key, computed under the entry's lock, written
atomically, recomputed with a warning when unreadable. The key holds the tower's backbone, a digest of the frozen part's weights (not of the top layers,
which train), where the encoder is cut, the tokenizer and maximum length, the text template, the plots read, and
the storage dtype. Rows without a plot hold what the raw path feeds the tower for them (an empty text), so both
paths compute the same thing for every row.
"""

from __future__ import annotations

import json
import logging
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import safetensors.torch
import torch
from accelerate.utils import gather_object
from safetensors import SafetensorError, safe_open

from mmgcs.features.keys import check_split, column_digest, file_name, key_digest, model_tower
from mmgcs.features.locks import LOCK_WAIT_S, entry_lock
from mmgcs.features.store import DEFAULT_CACHE_DIR, _atomic_write, _identity, _versions
from mmgcs.features.workers import FeatureCacheWarning, _device_of, _eval_mode, _text_batches
from mmgcs.models.preprocessing import plot_present
from mmgcs.progress import progress

logger = logging.getLogger(__name__)

# Bump when the meaning of a stored prefix changes: old files stop matching.
PREFIX_FORMAT = 1
# train.prefix_dtype → how the hidden states are stored; computing always runs in float32 (bfloat16 is a cast only).
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class CachedPrefix:
    """One split's prefix: row i's valid tokens are `hidden[offsets[i]:offsets[i + 1]]` (T_i, H);
    `frozen_means` (N, P, H) or None; `mask` (N,): whether the row has a plot."""

    hidden: torch.Tensor
    offsets: torch.Tensor
    frozen_means: Optional[torch.Tensor]
    mask: torch.Tensor

    def __len__(self) -> int:
        return len(self.mask)

    def tokens(self, row: int) -> torch.Tensor:
        return self.hidden[int(self.offsets[row]) : int(self.offsets[row + 1])]

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"hidden": self.hidden, "offsets": self.offsets, "mask": self.mask}
        if self.frozen_means is not None:
            out["frozen_means"] = self.frozen_means
        return out

    def problem(self, n_rows: int, dtype: torch.dtype) -> Optional[str]:
        """What is wrong with a loaded prefix for `n_rows` rows stored as `dtype` (None: nothing)."""
        offsets, hidden = self.offsets, self.hidden
        if self.mask.shape != (n_rows,) or self.mask.dtype != torch.bool:
            return f"its mask has shape {tuple(self.mask.shape)} for {n_rows} rows"
        if offsets.shape != (n_rows + 1,) or offsets.dtype != torch.int64 or int(offsets[0]) != 0:
            return f"its offsets have shape {tuple(offsets.shape)} for {n_rows} rows"
        if bool((offsets[1:] <= offsets[:-1]).any()) or hidden.ndim != 2 or int(offsets[-1]) != hidden.shape[0]:
            return "its offsets do not index its hidden states"
        if hidden.dtype != dtype or (self.frozen_means is not None and self.frozen_means.dtype != dtype):
            return f"it holds {hidden.dtype}, not {dtype}"
        if self.frozen_means is not None and self.frozen_means.shape[::2] != (n_rows, hidden.shape[1]):
            return f"its frozen means have shape {tuple(self.frozen_means.shape)}"
        finite = torch.isfinite(hidden).all() and (self.frozen_means is None or torch.isfinite(self.frozen_means).all())
        return None if finite else "it holds non-finite values"


def check_prefix_inputs(split, column: str, what: str, dtype: str) -> None:
    """The checks every prefix key makes first (the text and the image prefix alike): a split, the column the prefix
    is computed from, a storage dtype of the config's choices."""
    check_split(split)
    if column not in split.column_names:
        raise ValueError(f"The dataset has no {column!r} column, so it has no {what} to compute")
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"Unknown prefix storage dtype {dtype!r}; available: {list(STORAGE_DTYPES)} (train.prefix_dtype)")


def prefix_key(model, split, dtype: str) -> dict:
    """Everything the prefix of `split` under `model`'s (partially tuned) text tower depends on, JSON-able."""
    tower = model_tower(model, "text")
    check_prefix_inputs(split, "plot", "text prefix", dtype)
    return {
        "format": PREFIX_FORMAT,
        "modality": "text_prefix",
        **tower.prefix_key(model.config, tokenizer=getattr(model, "tokenizer", None)),
        "template": model.config.text_template,
        "dtype": dtype,
        "dataset": {
            "column": "plot",
            "content": column_digest(split, "plot"),
            "ids": column_digest(split, "id") if "id" in split.column_names else None,
            "num_rows": len(split),
        },
    }


def compute_prefix(model, split, batch_size: int = 64, dtype: torch.dtype = torch.float32) -> CachedPrefix:
    """Run the text tower's frozen bottom (eval mode, no gradients) over every row of `split`, longest plots first in
    batches of similar length, on the tower's device; keep each row's valid tokens."""
    tower = model_tower(model, "text")
    plots = split.select_columns(["plot"])[:]["plot"]
    present = torch.tensor([plot_present(p) for p in plots], dtype=torch.bool)
    texts = [p if ok else "" for p, ok in zip(plots, present.tolist())]  # what the raw path tokenizes
    batches = list(_text_batches(model, texts, np.arange(len(texts)), batch_size))  # token ids: a few bytes a token
    lengths = torch.zeros(len(texts), dtype=torch.int64)
    for rows, _, attn in batches:
        lengths[rows] = attn.sum(1)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    device, width = _device_of(tower), tower.out_dim
    hidden = torch.empty(int(offsets[-1]), width, dtype=dtype)
    frozen_means = None
    with _eval_mode(tower), torch.inference_mode(), progress(total=len(texts), desc="caching the text prefix",
                                                            unit="plots") as bar:
        for rows, ids, attn in batches:
            states, means = tower.encode_prefix(ids.to(device), attn.to(device))
            valid = attn.bool()
            for j, row in enumerate(rows.tolist()):
                hidden[offsets[row] : offsets[row + 1]] = states[j][valid[j].to(states.device)].to("cpu", dtype)
            if means is not None:
                if frozen_means is None:
                    frozen_means = torch.zeros(len(texts), means.shape[1], width, dtype=dtype)
                frozen_means[rows] = means.to("cpu", dtype)
            bar.update(len(rows))
    return CachedPrefix(hidden, offsets, frozen_means, present)


class PrefixCache:
    """Cached prefixes on disk, one safetensors file per key (see `prefix_key`); `dtype` is train.prefix_dtype.

    `hits` and `misses` count this object's lookups (a miss computes and stores, under the entry's lock:
    mmgcs.features.locks); `seconds` the time computing took. Another prefix (the image tower's,
    mmgcs/features/image_prefix.py) subclasses it with its own `what`, `key`, `compute`, `from_tensors`, `describe`.
    """

    what = "text prefix"  # what is cached, in messages

    def __init__(self, cache_dir=DEFAULT_CACHE_DIR, dtype: str = "float32", lock_wait_s: float = LOCK_WAIT_S):
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"Unknown prefix storage dtype {dtype!r}; available: {list(STORAGE_DTYPES)} (train.prefix_dtype)")
        self.cache_dir = Path(cache_dir)
        self.dtype = dtype
        self.lock_wait_s = lock_wait_s  # how long a miss waits for another process computing the same entry
        self.hits = self.misses = 0
        self.seconds = 0.0
        self.writable = True  # after a failed write (full disk, read-only folder) the others would fail alike

    def key(self, model, split) -> dict:
        return prefix_key(model, split, self.dtype)

    def compute(self, model, split, batch_size: int):
        return compute_prefix(model, split, batch_size=batch_size, dtype=STORAGE_DTYPES[self.dtype])

    @staticmethod
    def from_tensors(tensors: dict):
        return CachedPrefix(tensors["hidden"], tensors["offsets"], tensors.get("frozen_means"), tensors["mask"])

    @staticmethod
    def describe(prefix: CachedPrefix) -> dict:
        """What the stored file's JSON beside it says of its size."""
        return {"tokens": int(prefix.hidden.shape[0]), "dim": int(prefix.hidden.shape[1])}

    def path_for(self, model, split) -> Path:
        return self.cache_dir / file_name(self.key(model, split))

    def get_or_compute(self, model, split, batch_size: int = 64) -> CachedPrefix:
        """The prefix of every row of `split` in order: loaded when the key matches, else computed and stored."""
        key = self.key(model, split)
        digest, path, n = key_digest(key), self.cache_dir / file_name(key), len(split)
        loaded = self._hit(path, digest, n)
        if loaded is not None:
            return loaded
        seen = _identity(path)  # no file, or an unusable one (warned about)
        with entry_lock(path, f"the {self.what} of {n} rows", self.lock_wait_s):
            # Whoever held the lock before may have stored the entry meanwhile (a new file: renamed into place).
            if _identity(path) != seen:
                loaded = self._hit(path, digest, n, waited=True)
                if loaded is not None:
                    return loaded
            self.misses += 1
            logger.info("Prefix cache miss: computing the %s of %d rows (%s)", self.what, n, path.name)
            start = time.perf_counter()
            prefix = self.compute(model, split, batch_size)
            seconds = time.perf_counter() - start
            self.seconds += seconds
            self._store(path, prefix, key, digest, seconds)
        return prefix

    def log_per_process(self, accelerator) -> None:
        """On a multi-process run, the main process logs what each process's cache did (the others log warnings
        only): which machine computed which prefixes, and which read them ("Text prefix cache per process: ...").
        Every process must call it."""
        if accelerator.num_processes == 1:
            return
        mine = (accelerator.process_index, accelerator.local_process_index, socket.gethostname(),
                str(self.cache_dir.resolve()), self.misses, self.hits)
        counts = gather_object([mine])
        if accelerator.is_main_process:
            logger.info("%s cache per process: %s", self.what[:1].upper() + self.what[1:], "; ".join(
                f"process {p} (local {local}, host {host}, cache {folder}): computed {misses}, read {hits}"
                for p, local, host, folder, misses, hits in sorted(counts)))

    def _hit(self, path: Path, digest: str, n: int, waited: bool = False) -> Optional[CachedPrefix]:
        """The stored prefix of `path` (counted as a hit), or None when there is no usable file."""
        if not path.exists():
            return None
        loaded = self._load(path, digest, n)
        if loaded is not None:
            self.hits += 1
            logger.info("Prefix cache hit: %s of %d rows from %s%s", self.what, n, path,
                        " (stored by another process while this one waited)" if waited else "")
        return loaded

    def _load(self, path: Path, digest: str, n_rows: int) -> Optional[CachedPrefix]:
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
            prefix = self.from_tensors(tensors)
            problem = ("its stored key does not match its name" if meta.get("mmgcs_key") != digest
                       else prefix.problem(n_rows, STORAGE_DTYPES[self.dtype]))
        except Exception as e:  # a truncated/garbled file raises assorted errors from safetensors
            problem = f"{type(e).__name__}: {e}"
        if problem is None:
            return prefix
        warnings.warn(f"Prefix cache file {path} is unusable ({problem}); recomputing it. (Delete the cache folder if "
                      "this keeps happening.)", FeatureCacheWarning, stacklevel=3)
        return None

    def _store(self, path: Path, prefix: CachedPrefix, key: dict, digest: str, seconds: float) -> None:
        if not self.writable:
            return
        meta = {"key": key, "digest": digest, "rows": len(prefix), **self.describe(prefix),
                "present": int(prefix.mask.sum()), "seconds": round(seconds, 3),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "versions": _versions()}
        tensors = {k: v.contiguous() for k, v in prefix.tensors().items()}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(path, lambda tmp: safetensors.torch.save_file(
                tensors, tmp, metadata={"mmgcs_key": digest, "mmgcs_format": str(PREFIX_FORMAT)}))
            _atomic_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1, default=str)))
        except (OSError, SafetensorError) as e:  # safetensors reports a full disk as SafetensorError
            self.writable = False
            warnings.warn(f"Could not write the prefix cache file {path} ({type(e).__name__}: {e}); the prefix is used "
                          "for this run only and nothing more is stored in this cache. Point train.cache_dir at a "
                          "writable folder with free space.", FeatureCacheWarning, stacklevel=3)
            return
        logger.info("Stored the %s (%d rows, %s, %s, %.1f s to compute) in %s", self.what, len(prefix),
                    self.describe(prefix), self.dtype, seconds, path)


__all__ = ["PREFIX_FORMAT", "STORAGE_DTYPES", "CachedPrefix", "PrefixCache", "compute_prefix", "prefix_key"]
