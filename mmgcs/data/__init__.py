"""Movie data: sources (jsonl + posters, MM-IMDb, CSV + poster URLs) → a Hugging Face `DatasetDict`.

`python -m mmgcs.data build --source PATH ... --out DIR` builds the dataset; `load_movies(DIR or repo id)`
loads it. Image helpers every stream uses live in `mmgcs.data.images`.
"""

from __future__ import annotations

from mmgcs.data.images import MAX_IMAGE_PIXELS, InvalidImageError, load_image

__all__ = ["MAX_IMAGE_PIXELS", "InvalidImageError", "load_image", "load_movies"]


def load_movies(path_or_repo_id, **kwargs):
    """Load a dataset built by `python -m mmgcs.data build` (a local folder in Hub layout, or a Hub repo id)."""
    from mmgcs.data.load import load_movies as _load

    return _load(path_or_repo_id, **kwargs)
