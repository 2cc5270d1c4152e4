"""What a cached feature file is keyed on: the tower's own `cache_key` (backbone, weights, preprocessing), the
modality and the cache format, and the content of the one column the tower reads.

Rows count by the content of the one column the tower reads (`plot` or `poster`: the encoded poster bytes, never
decoded pixels), in row order, with the row ids and count. Not the whole split's fingerprint: a new text template
rewrites the plots, which must not recompute the poster features.
"""

import hashlib
import json
import os
import re
from pathlib import Path

import pyarrow as pa
import torch
import xxhash

from mmgcs.models.text import tokenizer_fingerprint
from mmgcs.models.tower import weights_hash

MODALITIES = ("text", "image")
# Bump when the meaning of stored features changes (e.g. how missing rows are encoded): old files stop matching.
CACHE_FORMAT = 1
COLUMNS = {"text": "plot", "image": "poster"}
# Rows per slice when hashing a column for the cache key (bounds memory on huge datasets).
HASH_ROWS = 1024

__all__ = [
    "CACHE_FORMAT", "COLUMNS", "HASH_ROWS", "MODALITIES", "check_split", "column_digest", "feature_key",
    "file_name", "key_digest", "model_tower", "tokenizer_fingerprint", "weights_hash",
]


def model_tower(model, modality: str) -> torch.nn.Module:
    """`model`'s tower for `modality`, or a ValueError naming the modality the model lacks."""
    if modality not in MODALITIES:
        raise ValueError(f"Unknown modality {modality!r}; available: {list(MODALITIES)}")
    tower = getattr(model, f"{modality}_tower", None)
    if tower is None:
        raise ValueError(f"The model has no {modality} tower ({modality}_tower='none'): there are no {modality} features to cache")
    return tower


def check_split(split) -> None:
    if not hasattr(split, "_fingerprint") or not hasattr(split, "column_names"):
        raise TypeError(
            f"get_or_compute needs a datasets.Dataset (one split, e.g. ds['train']), got {type(split).__name__}"
        )


def feature_key(model, split, modality: str) -> dict:
    """Everything the features of `split` under `model`'s `modality` tower depend on, as a JSON-able dict."""
    tower = model_tower(model, modality)
    check_split(split)
    column = COLUMNS[modality]
    if column not in split.column_names:
        raise ValueError(f"The dataset has no {column!r} column, so it has no {modality} features to compute")
    return {
        "format": CACHE_FORMAT,
        "modality": modality,
        **tower.cache_key(model.config, tokenizer=getattr(model, "tokenizer", None)),
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
    h = xxhash.xxh3_128()
    table = split.select_columns([column]).with_format("arrow")
    h.update(f"{column}|{len(split)}|".encode())  # not the feature type: Image(decode=False) reads the same bytes
    for start in range(0, len(split), HASH_ROWS):
        # One array per slice of rows: how the table happens to be chunked (a map rewrites it) must not count.
        _hash_chunk(h, table[start : start + HASH_ROWS][column].combine_chunks())
    return h.hexdigest()


def _hash_value(h, v) -> None:
    if v is None:
        h.update(b"N")
        return
    data = v if isinstance(v, bytes) else str(v).encode()
    h.update(b"V%d:" % len(data))
    h.update(data)


def _hash_chunk(h, chunk) -> None:
    if pa.types.is_struct(chunk.type) and {"bytes", "path"} <= {f.name for f in chunk.type}:  # datasets Image
        _hash_images(h, chunk)
    elif pa.types.is_primitive(chunk.type):
        # Fixed-width values (ids): hash the values and the validity, not buffers that may extend past the slice.
        h.update(chunk.is_null().to_numpy(zero_copy_only=False).tobytes())
        h.update(chunk.fill_null(0).to_numpy(zero_copy_only=False).tobytes())
    else:
        for v in chunk.to_pylist():
            _hash_value(h, v)


def _hash_images(h, chunk) -> None:
    names = [f.name for f in chunk.type]
    fields = chunk.flatten()  # children sliced like the chunk, with the chunk's nulls
    blobs, paths = fields[names.index("bytes")].to_pylist(), fields[names.index("path")].to_pylist()
    for blob, path in zip(blobs, paths):
        if blob is not None:
            h.update(b"B")
            _hash_value(h, blob)
        elif path:
            h.update(b"P")
            _hash_value(h, path)
            try:
                st = os.stat(path)
                _hash_value(h, f"{st.st_size}|{st.st_mtime_ns}")
            except OSError:
                _hash_value(h, None)  # missing now; if it appears later, the key changes
        else:
            _hash_value(h, None)


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]


def file_name(key: dict) -> str:
    """The cache file's name: readable (modality, backbone) and unique (the key's digest)."""
    return f"{key['modality']}-{_slug(key['backbone']['name'])}-{key_digest(key)}.safetensors"


def _slug(name: str) -> str:
    base = Path(str(name).rstrip("/")).name or str(name)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", base)[:40] or "backbone"
