"""On-disk cache of frozen towers' features, and fast featurization of posters and plots.

A frozen tower gives the same output for a row in every epoch, so training a fusion head over it needs the tower
run once per row, not once per epoch. `FeatureCache.get_or_compute` runs it once and stores the result under a
key made of everything the features depend on:

- the modality and the tower: its type, backbone name, resolved backbone config, pooling, and a hash of its
  *current* weights (a tower fine-tuned and then frozen gets new features, never the stale ones);
- the preprocessing: image size / mean / std / interpolation / crop (and the transform itself), or the tokenizer
  (a hash of its full definition) and the maximum text length;
- the rows: the content of the one column the tower reads (`plot` or `poster`: the encoded poster bytes, never
  decoded pixels), in row order, with the row ids and count. Not the whole split's fingerprint: a new text
  template rewrites the plots, which must not recompute the poster features.

Change any part and the key changes: the old file is simply never read again. A file is written to a temporary
name and renamed into place, so a crash never leaves a half-written file that could later be read as valid; a
file that is unreadable anyway (disk error, manual edit) is recomputed with a warning.

Featurization is built for CPU speed. Posters: DataLoader workers read the JPEG bytes straight from the dataset
(the main process never decodes), run the model's own eval transform, and, on CPU, encode them too, one worker
per core on one thread each, in batches of 4 that keep activations in cache. They run an optimized copy of the
tower built once by the main process (`FastImageEncoder`: static "SAME" padding, channels-last, traced and frozen
with BatchNorm folded into the convolutions, oneDNN-fused; checked against `model.encode_image` before use).
Plots: tokenized in groups, encoded longest-first in batches of similar length (little padding), on CPU in
workers too. On a GPU, workers decode and the main process encodes. benchmarks/bench_featurize.py measures it:
EfficientNet-Lite0 at 224 px, ~13 ms of CPU a poster, decode and resize included (2-core EPYC).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

MODALITIES = ("text", "image")
# Bump when the meaning of stored features changes (e.g. how missing rows are encoded): old files stop matching.
CACHE_FORMAT = 1
COLUMNS = {"text": "plot", "image": "poster"}
DEFAULT_CACHE_DIR = ".cache/mmgcs-features"
# Posters per forward pass and CPU thread. EfficientNet-Lite0 (FastImageEncoder, one thread, 2-core EPYC) took
# 9.6 ms a poster at 1 and 2, 10.5 at 4, 10.1 at 8 and 10.3 at 16: flat once freed memory is kept (see
# _setup_compute_worker); small batches keep results flowing from the workers.
CPU_FORWARD_BATCH = 4
# Worker processes used when the caller does not say (one per core up to this): each holds a copy of the tower.
MAX_WORKERS = 8
# Tracing and freezing the image tower costs about a second; below this many posters eager mode is faster overall.
MIN_POSTERS_TO_OPTIMIZE = 256
# Rows per slice when hashing a column for the cache key (bounds memory on huge datasets).
HASH_ROWS = 1024
# Plots are tokenized this many at a time (sorted by length inside a group), bounding memory on huge datasets.
TEXT_GROUP = 4096


class FeatureCacheWarning(UserWarning):
    """A cache file could not be used or written; features are recomputed (or kept in memory only)."""


# ------------------------------------------------------------------------------------------------ keys
def weights_hash(module: torch.nn.Module) -> str:
    """A digest of every parameter and buffer (names, dtypes, shapes and bytes) of `module`.

    Exact rather than clever: hashing MiniLM's 90 MB takes about 0.1 s, far less than one featurization pass.
    """
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A digest of a tokenizer's full definition (vocabulary, normalizer, special tokens, truncation side)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        definition = json.loads(backend.to_str())
        # Each call sets the backend's truncation/padding state; what it means for a plot is fixed by
        # max_text_length (also in the key), so the state left by the last call must not change the digest.
        definition.pop("truncation", None)
        definition.pop("padding", None)
        h.update(json.dumps(definition, sort_keys=True).encode())
    elif hasattr(tokenizer, "get_vocab"):
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    else:
        h.update(repr(tokenizer).encode())
    for attr in ("truncation_side", "padding_side", "do_lower_case"):
        h.update(f"|{attr}={getattr(tokenizer, attr, None)}".encode())
    specials = getattr(tokenizer, "all_special_tokens", None)
    h.update(json.dumps(list(specials) if specials is not None else None).encode())
    return h.hexdigest()


def _tower(model, modality: str) -> torch.nn.Module:
    if modality not in MODALITIES:
        raise ValueError(f"Unknown modality {modality!r}; available: {list(MODALITIES)}")
    tower = getattr(model, f"{modality}_tower", None)
    if tower is None:
        raise ValueError(f"The model has no {modality} tower ({modality}_tower='none'): there are no {modality} features to cache")
    return tower


def _check_split(split) -> None:
    if not hasattr(split, "_fingerprint") or not hasattr(split, "column_names"):
        raise TypeError(
            f"get_or_compute needs a datasets.Dataset (one split, e.g. ds['train']), got {type(split).__name__}"
        )


def feature_key(model, split, modality: str) -> dict:
    """Everything the features of `split` under `model`'s `modality` tower depend on, as a JSON-able dict."""
    tower = _tower(model, modality)
    _check_split(split)
    cfg = model.config
    column = COLUMNS[modality]
    if column not in split.column_names:
        raise ValueError(f"The dataset has no {column!r} column, so it has no {modality} features to compute")
    if modality == "image":
        preprocessing = {
            "image_size": cfg.image_size,
            "image_mean": list(cfg.image_mean or []),
            "image_std": list(cfg.image_std or []),
            "interpolation": cfg.interpolation,
            "crop_mode": getattr(cfg, "image_crop_mode", None),
            "crop_pct": getattr(cfg, "image_crop_pct", None),
            # Catches transform steps the fields above do not name (the repr rounds numbers, hence both).
            "transform": repr(model.image_transform(False)),
        }
        backbone = {
            "tower": cfg.image_tower,
            "name": cfg.image_backbone,
            "config": cfg.image_backbone_config,
            "kwargs": getattr(cfg, "image_backbone_kwargs", {}),
        }
    else:
        preprocessing = {
            "max_text_length": cfg.max_text_length,
            "tokenizer": tokenizer_fingerprint(model.get_tokenizer()),
        }
        backbone = {
            "tower": cfg.text_tower,
            "name": cfg.text_backbone,
            "config": cfg.text_backbone_config,
            "pooling": cfg.text_pooling,
        }
    return {
        "format": CACHE_FORMAT,
        "modality": modality,
        "backbone": backbone,
        "weights": weights_hash(tower),
        "preprocessing": preprocessing,
        "dataset": {
            "column": column,
            "content": column_digest(split, column),
            "ids": column_digest(split, "id") if "id" in split.column_names else None,
            "num_rows": len(split),
        },
    }


def column_digest(split, column: str) -> str:
    """A digest of what a tower reads from `column` of `split`, row by row in order (a reordered split differs).

    Only that column counts, so rewriting the plots (another text template) leaves the poster features' key alone.
    A poster counts by its encoded bytes, or, when stored as a path only, by the path and the file's size and
    modification time (the file can change under the same path); never by its decoded pixels. Hashed in slices
    of `HASH_ROWS` rows with xxHash (datasets' own hash): ~0.1 s for 4,000 posters of 15 KB.
    """
    import xxhash

    h = xxhash.xxh3_128()
    table = split.select_columns([column]).with_format("arrow")
    h.update(f"{column}|{len(split)}|".encode())  # not the feature type: Image(decode=False) reads the same bytes
    for start in range(0, len(split), HASH_ROWS):
        # One array per slice of rows: how the table happens to be chunked (a map rewrites it) must not count.
        _hash_chunk(h, table[start : start + HASH_ROWS][column].combine_chunks())
    return h.hexdigest()


def _hash_chunk(h, chunk) -> None:
    import pyarrow as pa

    def value(v) -> None:
        if v is None:
            h.update(b"N")
            return
        data = v if isinstance(v, bytes) else str(v).encode()
        h.update(b"V%d:" % len(data))
        h.update(data)

    if pa.types.is_struct(chunk.type) and {"bytes", "path"} <= {f.name for f in chunk.type}:  # datasets Image
        names = [f.name for f in chunk.type]
        fields = chunk.flatten()  # children sliced like the chunk, with the chunk's nulls
        blobs, paths = fields[names.index("bytes")].to_pylist(), fields[names.index("path")].to_pylist()
        for blob, path in zip(blobs, paths):
            if blob is not None:
                h.update(b"B")
                value(blob)
            elif path:
                h.update(b"P")
                value(path)
                try:
                    st = os.stat(path)
                    value(f"{st.st_size}|{st.st_mtime_ns}")
                except OSError:
                    value(None)  # missing now; if it appears later, the key changes
            else:
                value(None)
    elif pa.types.is_primitive(chunk.type):
        # Fixed-width values (ids): hash the values and the validity, not buffers that may extend past the slice.
        h.update(chunk.is_null().to_numpy(zero_copy_only=False).tobytes())
        h.update(chunk.fill_null(0).to_numpy(zero_copy_only=False).tobytes())
    else:
        for v in chunk.to_pylist():
            value(v)


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _slug(name: str) -> str:
    base = Path(str(name).rstrip("/")).name or str(name)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", base)[:40] or "backbone"


# ----------------------------------------------------------------------------------------------- cache
class FeatureCache:
    """Tower features stored on disk, one safetensors file (`features` (N, D) float32, `mask` (N,) bool) per key.

    `hits` and `misses` count this object's lookups (a miss computes and stores).
    """

    def __init__(self, cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR):
        self.cache_dir = Path(cache_dir)
        self.hits = 0
        self.misses = 0
        # After a failed write (full disk, read-only folder) the others would fail alike: stop storing, warn once.
        self.writable = True

    def path_for(self, model, split, modality: str) -> Path:
        """Where the features of (model's `modality` tower, preprocessing, split) are stored."""
        key = feature_key(model, split, modality)
        return self._path(key)

    def _path(self, key: dict) -> Path:
        return self.cache_dir / f"{key['modality']}-{_slug(key['backbone']['name'])}-{key_digest(key)}.safetensors"

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
        most 4; 0: everything in this process). `batch_size` and `num_workers` change speed, not the key.
        """
        key = feature_key(model, split_dataset, modality)
        digest = key_digest(key)
        path = self._path(key)
        n = len(split_dataset)
        if path.exists():
            loaded = self._load(path, digest, n)
            if loaded is not None:
                self.hits += 1
                logger.info("Feature cache hit: %s features of %d rows from %s", modality, n, path)
                return loaded
        self.misses += 1
        logger.info("Feature cache miss: computing %s features of %d rows (%s)", modality, n, path.name)
        start = time.perf_counter()
        features, mask = compute_features(model, split_dataset, modality, batch_size=batch_size, num_workers=num_workers)
        seconds = time.perf_counter() - start
        self._store(path, features, mask, key, digest, seconds)
        return features, mask

    # -------------------------------------------------------------------------------------- storage
    def _load(self, path: Path, digest: str, n: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        from safetensors import safe_open

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
            stacklevel=3,
        )
        return None

    def _store(self, path: Path, features: torch.Tensor, mask: torch.Tensor, key: dict, digest: str, seconds: float) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import save_file

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
                lambda tmp: save_file(
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
        """Delete every cache file (and leftovers of interrupted writes); returns how many files were removed."""
        removed = 0
        for pattern in ("*.safetensors", "*.json", ".tmp-*"):
            for p in self.cache_dir.glob(pattern):
                p.unlink(missing_ok=True)
                removed += 1
        return removed


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "timm", "transformers", "mmgcs"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


# --------------------------------------------------------------------------------------- featurization
def compute_features(
    model, split, modality: str, batch_size: int = 64, num_workers: Optional[int] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `model`'s `modality` tower (eval mode, no gradients) over every row of `split`; see get_or_compute."""
    _tower(model, modality)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if modality == "image":
        return compute_image_features(model, split, batch_size=batch_size, num_workers=num_workers)
    return compute_text_features(model, split, batch_size=batch_size, num_workers=num_workers)


def _device_of(module: torch.nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _row_ids(split, rows: Sequence[int]) -> list:
    if "id" in split.column_names:
        ids = split.select_columns(["id"])[list(rows)]["id"] if len(rows) else []
        return list(ids)
    return [f"row {r}" for r in rows]


class _eval_mode:
    """Put a module in eval mode for a block and restore its previous mode after."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __enter__(self):
        self.was_training = self.module.training
        self.module.eval()
        return self.module

    def __exit__(self, *exc):
        self.module.train(self.was_training)


# ---- text
def _text_batches(model, plots: list, rows: np.ndarray, batch_size: int):
    """(rows, input_ids, attention_mask) batches: tokenized in groups, longest first, each padded to its own
    longest plot (columns that are padding for every row of the batch are dropped, on either side)."""
    from mmgcs.models.preprocessing import tokenize

    tokenizer = model.get_tokenizer()
    for g in range(0, len(rows), TEXT_GROUP):
        group = torch.as_tensor(rows[g : g + TEXT_GROUP])
        enc = tokenize(tokenizer, model.config, [plots[int(r)] for r in group])
        ids, attn = enc["input_ids"], enc["attention_mask"]
        order = torch.argsort(attn.sum(1), descending=True, stable=True)
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            a = attn[idx]
            keep = a.any(0)
            yield group[idx], ids[idx][:, keep], a[:, keep]


class _EncodeText:
    """Worker-side: one token batch → features with the worker's own copy of the text tower."""

    def __init__(self, tower: torch.nn.Module):
        self.tower = tower
        self._ready = False

    def __call__(self, batch):
        rows, ids, attn = batch
        if not self._ready:
            _setup_compute_worker()
            self._ready = True
        with torch.no_grad():
            return rows, self.tower(input_ids=ids, attention_mask=attn)


def compute_text_features(
    model, split, batch_size: int = 64, num_workers: Optional[int] = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plots → text-tower features, encoded in batches of similar length (little padding).

    On CPU with `num_workers` > 0 (None: one per core) the batches are encoded in worker processes, each with its
    own copy of the tower on its share of the cores (checked first to give `model.encode_text`'s numbers);
    otherwise in this process on the tower's device.
    """
    from mmgcs.models.preprocessing import plot_present

    tower = _tower(model, "text")
    n = len(split)
    plots = split.select_columns(["plot"])[:]["plot"]  # one Arrow → list conversion (a Column indexes row by row)
    present = np.array([plot_present(p) for p in plots], dtype=bool)
    rows = np.flatnonzero(present)
    features = torch.zeros(n, tower.out_dim, dtype=torch.float32)
    mask = torch.from_numpy(present)
    if len(rows) == 0:
        return features, mask
    device = _device_of(tower)
    workers = default_num_workers() if num_workers is None else int(num_workers)
    with _eval_mode(tower):
        batches = _text_batches(model, plots, rows, batch_size)
        worker_tower = None
        if device.type == "cpu" and workers > 0:
            batches = list(batches)  # token ids only: a few bytes per token
            with _main_threads(1):
                worker_tower = _worker_text_tower(model, batches[-1])
        if worker_tower is not None:
            loader = torch.utils.data.DataLoader(
                batches, batch_size=None, num_workers=workers, prefetch_factor=2, collate_fn=_EncodeText(worker_tower),
            )
            with _main_threads(1):
                for batch_rows, out in loader:
                    features[batch_rows] = out.float()
        else:
            with torch.inference_mode():
                for batch_rows, ids, attn in batches:
                    features[batch_rows] = model.encode_text(ids.to(device), attn.to(device)).float().cpu()
    return features, mask


def _worker_text_tower(model, sample) -> Optional[torch.nn.Module]:
    """An eval-mode copy of the text tower for the workers, if it computes exactly `model.encode_text`."""
    _, ids, attn = sample
    ids, attn = ids[:2], attn[:2]
    copy_ = copy.deepcopy(model.text_tower).eval()
    with torch.no_grad():
        if _close(copy_(input_ids=ids, attention_mask=attn), model.encode_text(ids, attn)):
            return copy_
    logger.info("model.encode_text is not just its text tower; encoding in the main process")
    return None


# ---- image
class _PosterRows(torch.utils.data.Dataset):
    """(row, encoded poster) for the given rows; a batch is fetched from Arrow in one `take`."""

    def __init__(self, split, rows: np.ndarray):
        self.split = split
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        r = int(self.rows[i])
        return r, self.split[r]["poster"]

    def __getitems__(self, indices: list[int]):
        rows = [int(self.rows[i]) for i in indices]
        return list(zip(rows, self.split[rows]["poster"]))


class _DecodePosters:
    """Encoded posters → one float batch through the model's eval transform (runs in DataLoader workers).

    Exactly `model.preprocess`'s path (`load_image` then `model.image_transform(False)`), so the features equal
    what the model computes on raw posters. A poster that cannot be decoded is returned as an error, not raised.
    """

    def __init__(self, transform, channels_last: bool):
        self.transform = transform
        self.channels_last = channels_last
        self.split = _split_eval_transform(transform)

    def __call__(self, items):
        from mmgcs.data.images import InvalidImageError, load_image

        rows, images, bad = [], [], []
        resize = self.split[0] if self.split else self.transform
        for r, poster in items:
            try:
                images.append(resize(load_image(poster)))
                rows.append(r)
            except InvalidImageError as e:
                bad.append((r, str(e)))
        if not images:
            pixels = torch.empty(0)
        elif self.split:
            pixels = _to_normalized_batch(images, *self.split[1:])
        else:
            pixels = torch.stack(images)
        if self.channels_last and pixels.ndim == 4:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        return torch.tensor(rows, dtype=torch.long), pixels, bad


def _split_eval_transform(transform):
    """`(resize, mean, std)` when `transform` is timm's "squash" eval transform (resize to S x S, a center crop of
    S x S that keeps every pixel, to-tensor, normalize), else None.

    Then the resize runs per poster and the rest once per batch, with the very same arithmetic (uint8 → float,
    / 255, - mean, / std: the same results bit for bit) but without four tensor ops and copies per poster.
    """
    from torchvision import transforms as T

    steps = getattr(transform, "transforms", None)
    if not steps or len(steps) != 4:
        return None
    resize, crop, to_tensor, normalize = steps
    if not (type(resize) is T.Resize and type(crop) is T.CenterCrop and isinstance(to_tensor, T.ToTensor)
            and type(normalize) is T.Normalize and not normalize.inplace):
        return None
    size = list(resize.size) if isinstance(resize.size, (list, tuple)) else None
    if size is None or len(size) != 2 or list(crop.size) != size or resize.max_size is not None:
        return None
    mean = torch.as_tensor(normalize.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.as_tensor(normalize.std, dtype=torch.float32).view(1, -1, 1, 1)
    return resize, mean, std


def _to_normalized_batch(images, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Same-size RGB PIL images → (B, 3, H, W) float, as torchvision's to_tensor then normalize compute it."""
    arrays = np.stack([np.asarray(im, dtype=np.uint8) for im in images])  # (B, H, W, 3)
    pixels = torch.from_numpy(arrays).permute(0, 3, 1, 2).float()  # channels-last strides, like the model wants
    return pixels.div_(255).sub_(mean).div_(std)


class _FeaturizePosters(_DecodePosters):
    """Decode *and* encode in the worker: each worker runs its own copy of the tower on one thread.

    On CPU this beats "workers decode, main process encodes" (4,048 posters, 2 busy cores: 73 vs 18 posters/s): no
    process waits for another, and single-threaded towers waste no time in thread synchronization, above all on a
    busy machine.
    """

    def __init__(self, transform, encoder: "torch.nn.Module | bytes"):
        super().__init__(transform, channels_last=True)
        self.encoder = encoder  # an eager tower, or the optimized one saved by FastImageEncoder.save
        self._encoder = None

    def __call__(self, items):
        rows, pixels, bad = super().__call__(items)
        if len(rows) == 0:
            return rows, torch.empty(0), bad
        with torch.inference_mode(False), torch.no_grad():
            if self._encoder is None:  # first batch of this worker
                _setup_compute_worker()
                self._encoder = FastImageEncoder.load(self.encoder) if isinstance(self.encoder, bytes) else self.encoder
            return rows, self._encoder(pixels), bad


def default_num_workers() -> int:
    """One worker per core (at most `MAX_WORKERS`): on CPU each decodes and encodes its own batches on one thread."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(MAX_WORKERS, cores))


def _setup_compute_worker() -> None:
    """Settings for a DataLoader worker that runs a tower (called on its first batch).

    One thread: the worker is a forked copy of a process whose OpenMP thread pool cannot be used after fork
    (GNU OpenMP hangs in the first parallel region that needs more than one thread), and one single-threaded worker
    per core wastes nothing on thread synchronization. Freed activation memory is kept by the allocator instead of
    being returned to the OS after every batch: glibc maps blocks over its threshold (up to 32 MB) afresh each
    time, and the page faults of re-touching them cost EfficientNet-Lite0 ~30% more time at 8 posters a batch.
    """
    torch.set_num_threads(1)
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: serve blocks up to 1 GiB from the heap
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of freed heap
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


class _main_threads:
    """Run the main process on `n` threads for a block: while the workers hold every core, its own small ops
    (writing results into the output) would otherwise wake a second OpenMP thread that has no core to run on."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        self.saved = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved)


def _poster_presence(split) -> np.ndarray:
    from mmgcs.data.images import poster_present

    flags = []
    posters = split.select_columns(["poster"])
    for start in range(0, len(posters), 2048):
        flags.extend(poster_present(p) for p in posters[start : start + 2048]["poster"])
    return np.array(flags, dtype=bool)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-3) -> bool:
    return a.shape == b.shape and (a - b).abs().max().item() <= rtol * (b.abs().max().item() or 1.0)


def compute_image_features(
    model, split, batch_size: int = 64, num_workers: Optional[int] = None, encode_in_workers: Optional[bool] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posters → image-tower features; undecodable posters are reported by id and masked out.

    On CPU with workers, each worker decodes and encodes batches of `CPU_FORWARD_BATCH` posters with its own copy
    of the tower (checked first to give `model.encode_image`'s numbers); otherwise workers decode and the main
    process encodes batches of `batch_size` on the tower's device. `encode_in_workers=False` forces the latter.
    """
    from datasets import Image

    tower = _tower(model, "image")
    n = len(split)
    posters = split.select_columns(["poster"])
    if isinstance(posters.features["poster"], Image) and posters.features["poster"].decode:
        posters = posters.cast_column("poster", Image(decode=False))  # workers decode; the main process never does
    rows = np.flatnonzero(_poster_presence(posters))
    features = torch.zeros(n, tower.out_dim, dtype=torch.float32)
    mask = torch.zeros(n, dtype=torch.bool)
    if len(rows) == 0:
        return features, mask
    device = _device_of(tower)
    workers = default_num_workers() if num_workers is None else int(num_workers)
    transform = model.image_transform(False)
    optimize = len(rows) >= MIN_POSTERS_TO_OPTIMIZE
    bad: list[tuple[int, str]] = []
    with _eval_mode(tower):
        in_workers = device.type == "cpu" and workers > 0 and encode_in_workers is not False
        with _main_threads(1):  # a few posters and one trace; idle OpenMP threads would only spin against the workers
            worker_encoder = _worker_encoder(model, posters, rows, transform, optimize) if in_workers else None
        if worker_encoder is not None:
            collate = _FeaturizePosters(transform, worker_encoder)
            loader_batch = min(batch_size, CPU_FORWARD_BATCH)
        else:
            collate = _DecodePosters(transform, channels_last=device.type == "cpu")
            loader_batch = batch_size
        loader = torch.utils.data.DataLoader(
            _PosterRows(posters, rows),
            batch_size=loader_batch,
            num_workers=workers,
            collate_fn=collate,
            prefetch_factor=4 if workers > 0 else None,
        )
        encoder = None
        with _main_threads(1) if worker_encoder is not None else contextlib.nullcontext():
            for batch_rows, out, batch_bad in loader:
                bad.extend(batch_bad)
                if len(batch_rows) == 0:
                    continue
                if worker_encoder is None:  # `out` holds pixels: encode them here
                    pixels = out.to(device)
                    if encoder is None:
                        with torch.no_grad():
                            encoder = FastImageEncoder(model, pixels[:4], optimize=optimize)
                    step = CPU_FORWARD_BATCH * torch.get_num_threads() if device.type == "cpu" else len(pixels)
                    with torch.inference_mode():
                        out = torch.cat([encoder(pixels[s : s + step]) for s in range(0, len(pixels), step)])
                features[batch_rows] = out.float().cpu()
                mask[batch_rows] = True
    if bad:
        ids = _row_ids(split, [r for r, _ in bad])
        details = "; ".join(f"id {i}: {msg}" for i, (_, msg) in list(zip(ids, bad))[:10])
        warnings.warn(
            f"{len(bad)} poster(s) could not be decoded and are treated as missing (mask False): {details}"
            f"{' ...' if len(bad) > 10 else ''}. Fix or remove them in the source data and rebuild the dataset.",
            FeatureCacheWarning,
            stacklevel=3,
        )
    return features, mask


def _worker_encoder(model, posters, rows, transform, optimize: bool) -> "torch.nn.Module | bytes | None":
    """What the workers encode posters with, if it computes exactly `model.encode_image` (else None): the
    optimized tower, built and checked here once and passed as bytes (any start method can send them; each
    worker loads it in a fraction of a second instead of tracing its own), or an eager copy of the tower."""
    sample_rows, sample, _ = _DecodePosters(transform, channels_last=False)(
        [(int(r), posters[int(r)]["poster"]) for r in rows[:8]]
    )
    if len(sample_rows) == 0:
        return None
    copy_ = copy.deepcopy(model.image_tower).eval()
    with torch.no_grad():
        if not _close(copy_(sample[:2]), model.encode_image(sample[:2])):
            logger.info("model.encode_image is not just its image tower; encoding in the main process")
            return None
        if optimize:
            fast = FastImageEncoder(copy_, sample[:2])
            if fast.kind != "eager":
                return fast.save()
    return copy_


class FastImageEncoder:
    """`model.encode_image` (or a tower's forward) for frozen inference, made fast and checked to give the same numbers.

    On CPU: a private copy of the tower with TF-style "SAME" padding made static for the sample's image size
    (`static_same_padding`), in channels-last layout, traced and frozen with TorchScript (which folds BatchNorm into
    the convolutions), run with oneDNN graph fusion (convolution + bias + ReLU6 in one pass). For
    EfficientNet-Lite0 on one thread: 12.8 ms a poster traced and frozen, 10.1 with fusion, 8.4 with static padding
    too (2-core EPYC, batch 4). It is compared with the reference on a sample batch and used only when they agree;
    else (or on GPU) the reference itself runs. The model is left untouched. `source`: a GenreClassifier
    (reference `encode_image`) or an image tower.
    """

    RTOL = 1e-3

    def __init__(self, source, sample: torch.Tensor, optimize: bool = True):
        tower = source.image_tower if hasattr(source, "encode_image") else source
        reference = source.encode_image if hasattr(source, "encode_image") else source
        self.kind = "eager"
        self._fn = self._reference = reference
        self._size = tuple(sample.shape[1:])
        if not optimize or sample.device.type != "cpu":
            return
        try:
            fast = self._trace(tower, sample)
            with torch.no_grad(), _onednn_fusion():
                # The first runs profile the graph and the fused graph runs after them: check what will be used.
                for _ in range(3):
                    out = fast(sample.contiguous(memory_format=torch.channels_last))
                ok = _close(out, reference(sample.contiguous()), self.RTOL)
            if ok:
                self._fn, self.kind = fast, "torchscript-frozen"
            else:
                logger.info("The traced image tower disagrees with the eager one; not used")
        except Exception as e:  # tracing is best-effort: any backbone it cannot handle runs eagerly
            logger.info("Image tower not traceable (%s: %s); running it eagerly", type(e).__name__, e)

    @staticmethod
    def _trace(tower, sample: torch.Tensor):
        tower = copy.deepcopy(tower).eval()
        static_same_padding(tower, sample)
        tower = tower.to(memory_format=torch.channels_last)
        with warnings.catch_warnings(), torch.no_grad():
            # TorchScript is deprecated (but still the generic way to fold BatchNorm); tracer notes are noise here.
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(tower, sample.contiguous(memory_format=torch.channels_last), check_trace=False)
            return torch.jit.freeze(traced)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.kind == "eager" or tuple(pixels.shape[1:]) != self._size:  # static padding fits one size only
            if self._reference is None:
                raise ValueError(f"This encoder takes inputs of shape {self._size}, got {tuple(pixels.shape[1:])}")
            return self._reference(pixels)
        with _onednn_fusion():
            return self._fn(pixels.contiguous(memory_format=torch.channels_last))

    def save(self) -> bytes:
        """The optimized (checked) tower as bytes for `load` in another process; only when `kind` is not eager."""
        if self.kind == "eager":
            raise ValueError("Only an optimized encoder can be saved; an eager one is just its tower")
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice
            torch.jit.save(self._fn, buf, _extra_files={"input_size": json.dumps(self._size)})
        return buf.getvalue()

    @classmethod
    def load(cls, data: bytes) -> "FastImageEncoder":
        """An encoder from `save`'s bytes (which this process or its parent made: TorchScript runs code it holds)."""
        extra = {"input_size": ""}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(io.BytesIO(data), map_location="cpu", _extra_files=extra)
        encoder = cls.__new__(cls)
        encoder.kind, encoder._fn, encoder._reference = "torchscript-frozen", module, None
        encoder._size = tuple(json.loads(extra["input_size"]))
        return encoder


class _onednn_fusion:
    """oneDNN graph fusion for TorchScript on, for a block (a process-wide switch: restored after)."""

    def __enter__(self):
        self.saved = torch.jit.onednn_fusion_enabled()
        torch.jit.enable_onednn_fusion(True)

    def __exit__(self, *exc):
        torch.jit.enable_onednn_fusion(self.saved)


def static_same_padding(module: torch.nn.Module, sample: torch.Tensor) -> int:
    """Replace timm's dynamically padded "SAME" convolutions in `module` by plain convolutions with static
    padding, for inputs of `sample`'s size only; returns how many were replaced.

    timm pads TF-ported models (tf_efficientnet_*, ...) at every call, copying the whole activation map into a new
    zero-filled one (16% of EfficientNet-Lite0's time). When the padding is the same on both sides the
    convolution pads by itself; when SAME puts one more row/column at the bottom/right (a stride-2 layer on an
    even size), the kernel gets a leading row/column of zeros and one more padding on each side: each output then
    reads exactly the pixels SAME padding gives it, and the extra taps multiply zeros.
    """
    try:
        from timm.layers.conv2d_same import Conv2dSame
        from timm.layers.padding import get_same_padding
    except ImportError:  # pragma: no cover - timm missing: nothing of timm's to replace
        return 0
    sizes: dict[str, tuple[int, int]] = {}
    names = {m: n for n, m in module.named_modules() if type(m) is Conv2dSame}
    if not names:
        return 0
    hooks = [m.register_forward_pre_hook(lambda m, args: sizes.__setitem__(names[m], tuple(args[0].shape[-2:])))
             for m in names]
    try:
        with torch.no_grad():
            module(sample[:1])
    finally:
        for h in hooks:
            h.remove()
    replaced = 0
    for conv, name in names.items():
        if name not in sizes or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
            continue
        pads = [get_same_padding(size, k, s, 1) for size, k, s in zip(sizes[name], conv.kernel_size, conv.stride)]
        before = [p // 2 for p in pads]
        extra = [p - 2 * b for p, b in zip(pads, before)]  # 0 or 1: SAME's extra bottom/right row or column
        weight = torch.nn.functional.pad(conv.weight.detach(), (extra[1], 0, extra[0], 0))
        static = torch.nn.Conv2d(
            conv.in_channels, conv.out_channels, tuple(weight.shape[-2:]), stride=conv.stride,
            padding=tuple(b + e for b, e in zip(before, extra)), groups=conv.groups, bias=conv.bias is not None,
        ).to(weight.device, weight.dtype)
        with torch.no_grad():
            static.weight.copy_(weight)
            if conv.bias is not None:
                static.bias.copy_(conv.bias)
        static.train(conv.training)
        parent_name, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, child, static)
        replaced += 1
    return replaced
