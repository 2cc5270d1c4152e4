"""Load a dataset built by `python -m mmgcs.data build`, from a local folder or the Hub."""

from __future__ import annotations

from pathlib import Path

import datasets

from mmgcs.data.splits import SPLITS
from mmgcs.hub.ids import is_hub_id


def load_movies(path_or_repo_id: str | Path, **kwargs):
    """`datasets.DatasetDict` with splits train/validation/test and features id, title, plot, poster, genres, source.

    A local folder in Hub layout is loaded with `datasets.load_dataset(folder)`; anything else is taken as a Hub
    dataset id. `kwargs` go to `load_dataset` (e.g. `revision`, `cache_dir`).
    """
    target = Path(path_or_repo_id).expanduser()
    looks_local = target.exists() or not is_hub_id(str(path_or_repo_id))
    if looks_local and not target.is_dir():
        raise FileNotFoundError(
            f"No dataset folder at {str(target)!r}. Build one with "
            f"`python -m mmgcs.data build --source PATH --out {target}`, or pass a Hub dataset id (owner/name)."
        )
    if looks_local and not any((target / "data").glob("*.parquet")):
        raise FileNotFoundError(f"{str(target)!r} has no data/*.parquet shards: it is not a dataset built by mmgcs (run `python -m mmgcs.data build`).")
    try:
        ds = datasets.load_dataset(str(target) if looks_local else str(path_or_repo_id), **kwargs)
    except Exception as e:
        if looks_local:
            raise
        raise RuntimeError(
            f"Could not load the Hub dataset {str(path_or_repo_id)!r} ({type(e).__name__}: {e}). "
            "Check the id and your connection, or build it locally with `python -m mmgcs.data build`."
        ) from e
    missing = [s for s in SPLITS if s not in ds]
    genres = ds[next(iter(ds))].features.get("genres") if len(ds) else None
    if missing or genres is None or not hasattr(getattr(genres, "feature", None), "names"):
        raise ValueError(
            f"{path_or_repo_id}: not an MMGCS movie dataset (needs splits {list(SPLITS)} and a multi-label "
            f"`genres` ClassLabel column; found splits {list(ds)}). Build it with `python -m mmgcs.data build`."
        )
    return ds
