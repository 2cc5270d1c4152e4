"""Movie data: sources (jsonl + posters, MM-IMDb, CSV + poster URLs) → a Hugging Face `DatasetDict`.

`python -m mmgcs.data build --source PATH ... --out DIR` builds the dataset; `load_movies(DIR or repo id)`
loads it. Image helpers every stream uses live in `mmgcs.data.images`.
"""

from __future__ import annotations

from mmgcs.data.images import MAX_IMAGE_PIXELS, InvalidImageError, load_image
from mmgcs.lazy import lazy_exports

__all__ = ["MAX_IMAGE_PIXELS", "InvalidImageError", "load_image", "load_movies"]


# load_movies imports `datasets` (over a second): only callers that load a dataset pay for it, not the Space's
# image checks, which import mmgcs.data.images.
__getattr__ = lazy_exports("mmgcs.data", globals(), {"load_movies": "mmgcs.data.load"})
