"""Movie data: sources (jsonl + posters, MM-IMDb, CSV + poster URLs) → a Hugging Face `DatasetDict`.

`python -m mmgcs.data build --source PATH ... --out DIR` builds the dataset; `load_movies(DIR or repo id)`
loads it. Image helpers every stream uses live in `mmgcs.data.images`.
"""

from __future__ import annotations

import importlib

from mmgcs.data.images import MAX_IMAGE_PIXELS, InvalidImageError, load_image

__all__ = ["MAX_IMAGE_PIXELS", "InvalidImageError", "load_image", "load_movies"]


def __getattr__(name):
    # load_movies imports `datasets` (over a second): only callers that load a dataset pay for it, not the Space's
    # image checks, which import mmgcs.data.images.
    if name == "load_movies":
        value = importlib.import_module("mmgcs.data.load").load_movies
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mmgcs.data' has no attribute {name!r}")
