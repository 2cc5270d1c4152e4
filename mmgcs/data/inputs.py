"""The movies a tool reads: one `Movie` per input row, from `read_movies(source, split)` over every input the tools
take — a built dataset's split (a folder or a Hub id), a raw source the data builder reads (`movies.jsonl` + posters,
MM-IMDb, CSV) or a folder of poster images (id = file stem). `mmgcs evaluate`, `mmgcs predict` and the Space's
examples read movies through it.

Rows stream: memory does not grow with the input. A row the source's reader refuses keeps its place, as a `Movie`
with `error` and `reason` set, so a tool reports it by id or writes it where it was. Posters are never decoded here: a
path (read confined to `root` by whoever decodes it) or a built dataset's undecoded image cell; a poster given only as
a URL is flagged (`poster_url`), never fetched.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import datasets

from mmgcs.data.confine import Refusal, read_confined
from mmgcs.data.images import MAX_IMAGE_BYTES, InvalidImageError, load_image, poster_present
from mmgcs.data.load import load_movies
from mmgcs.data.records import BuildReport, RawMovie
from mmgcs.data.sources import FORMATS, SourceFormat, detect_format, get_format, source_name

POSTER_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")


@dataclass
class Movie:
    """One input row, before any poster is decoded."""

    id: Any  # as the input gives it (a dataset's or a source's id, a poster's file stem); None: refused without one
    row: str = ""  # where it is in the input ("movies.jsonl:12", "test[3]", a poster's file name): tells duplicates apart
    plot: Optional[str] = None
    title: Optional[str] = None
    poster: Any = None  # a Path (read confined to `root`), a built dataset's image cell, or None
    root: Optional[Path] = None
    poster_url: bool = False  # the row names its poster only by URL (never downloaded here)
    genres: list[str] = field(default_factory=list)  # empty when the input has none (poster folders, some sources)
    error: Optional[str] = None  # the reader refused the row: why (the build report's detail)
    reason: Optional[str] = None  # ... and its short reason ("malformed_line", "bad_id", ...)

    @property
    def key(self) -> str:
        """The id as text ("" for none): what an output row holds and duplicates are found by."""
        return "" if self.id is None else str(self.id)


@dataclass
class Movies:
    """The rows of one input and what is known of it; `notes` fill in as the rows are read."""

    rows: Iterable[Movie]
    kind: str  # "dataset", "source:<format>" or "posters"
    vocabulary: Optional[list[str]] = None  # the label names of a built dataset, else None
    split: Optional[str] = None  # a built dataset's split, or a raw source's official one (MM-IMDb) once met
    size: Optional[int] = None  # how many rows `rows` yields, when known without reading them all (for an ETA)
    notes: Counter = field(default_factory=Counter)  # poster_url_not_fetched, rows_of_other_splits

    def __iter__(self) -> Iterator[Movie]:
        return iter(self.rows)


def read_movies(source: str | Path, split: str = "test", fmt: Optional[str] = None, *, labelled: bool = False,
                official_split: bool = False) -> Movies:
    """The movies of `source`: a built dataset's `split`, a raw source (format `fmt`, else detected) or a folder of
    poster images. `labelled`: the caller scores against genres (a built split must have them; a folder that is no
    source is read as a dataset, whose loader says what one needs). `official_split`: of a raw source with official
    splits (MM-IMDb), only `split`'s rows (the others counted in `notes`); else every row."""
    path = Path(source).expanduser()
    wanted = split if official_split else None
    if fmt:
        return read_source(path, get_format(fmt), wanted)
    if not path.exists() or is_built_dataset(path):
        return read_dataset(str(source), split, labelled)  # a Hub id, or load_movies' "no dataset folder"
    if any(f.detect(path) for f in FORMATS.values()):
        return read_source(path, detect_format(path), wanted)
    if labelled:
        return read_dataset(str(source), split, labelled)
    if path.is_dir():
        return read_posters(path, str(source))
    return read_source(path, detect_format(path), wanted)  # raises, naming the formats it knows


def is_built_dataset(path: Path) -> bool:
    return path.is_dir() and (any((path / "data").glob("*.parquet")) or (path / "dataset_dict.json").is_file())


def batched(it: Iterable, size: int) -> Iterator[list]:
    """Lists of `size` items from `it` (the last one shorter), read lazily (itertools.batched from Python 3.12)."""
    batch = []
    for x in it:
        batch.append(x)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ------------------------------------------------------------------------------------------- built datasets
def read_dataset(source: str, split: str, labelled: bool = False) -> Movies:
    """One split of a dataset built by `python -m mmgcs.data build` (a folder or a Hub id)."""
    dd = load_movies(source)
    if split not in dd:
        raise ValueError(f"Dataset {source!r} has no split {split!r}; its splits: {sorted(dd)}. Pick one with --split.")
    ds = dd[split]
    missing = ({"id", "genres"} if labelled else {"id"}) - set(ds.column_names)
    if missing:
        raise ValueError(f"Split {split!r} of {source!r} lacks columns {sorted(missing)}; rebuild it with python -m mmgcs.data build")
    names = list(ds.features["genres"].feature.names) if "genres" in ds.column_names else None
    if "poster" in ds.column_names:
        # Undecoded: a corrupt poster then fails on its own row (and is reported) instead of stopping the scan.
        ds = ds.cast_column("poster", datasets.Image(decode=False))
    return Movies(rows=_dataset_rows(ds, split, names), kind="dataset", vocabulary=names, split=split,
                  size=ds.num_rows)


def _dataset_rows(ds, split: str, names: Optional[list[str]]) -> Iterator[Movie]:
    start = 0
    for batch in ds.iter(batch_size=256):
        for i, movie_id in enumerate(batch["id"]):
            yield Movie(id=movie_id, row=f"{split}[{start + i}]", plot=batch["plot"][i] if "plot" in batch else None,
                        title=batch["title"][i] if "title" in batch else None,
                        poster=batch["poster"][i] if "poster" in batch else None,
                        genres=[names[j] for j in batch["genres"][i]] if names is not None else [])
        start += len(batch["id"])


# ---------------------------------------------------------------------------------------------- raw sources
def read_source(path: Path, fmt: SourceFormat, split: Optional[str] = None) -> Movies:
    """A raw source through the data builder's own reader; `split`: only the rows of that official split (when the
    source has official splits). A row the reader refuses comes out in its place with the reason."""
    movies = Movies(rows=[], kind=f"source:{fmt.name}")
    movies.rows = _source_rows(path, fmt, split, movies)
    if fmt.name == "jsonl" and path.is_file():
        movies.size = _line_count(path)
    return movies


def _source_rows(path: Path, fmt: SourceFormat, split: Optional[str], movies: Movies) -> Iterator[Movie]:
    root = path if path.is_dir() else path.parent
    report = BuildReport()
    for raw in fmt.read(path, source_name(path), report):
        yield from _refused(report)
        if raw.split is not None and split:
            movies.split = split
            if raw.split != split:
                movies.notes["rows_of_other_splits"] += 1
                continue
        yield _movie(raw, root, movies.notes)
    yield from _refused(report)


def _movie(raw: RawMovie, root: Path, notes: Counter) -> Movie:
    url_only = raw.poster_file is None and bool(raw.poster_url)
    if url_only:
        notes["poster_url_not_fetched"] += 1  # the tools never download; the row is read without its poster
    return Movie(id=raw.id, row=raw.where, plot=raw.plot, title=raw.title, poster=raw.poster_file, root=root,
                 poster_url=url_only, genres=raw.genres)


def _refused(report: BuildReport) -> Iterator[Movie]:
    """The rows the reader dropped since the last call, in their place (the report's "changed" events are not
    the tools' business)."""
    for event in report.events:
        if event["action"] == "dropped":
            yield Movie(id=event["id"], row=event.get("where", ""), error=event["detail"], reason=event["reason"])
    report.events.clear()  # read once; keeps the report from growing with the file


def _line_count(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


# ------------------------------------------------------------------------------------------- poster folders
def read_posters(folder: Path, source: str = "") -> Movies:
    """A folder of poster images, one movie each (id = the file's stem), in file-name order."""
    files = poster_files(folder)
    if not files:
        raise ValueError(f"{source or str(folder)!r} holds no movies.jsonl, CSV, MM-IMDb layout, built dataset or "
                         f"poster images ({', '.join(POSTER_SUFFIXES)}). Point --input at one of those.")
    rows = (Movie(id=f.stem, row=f.name, poster=f, root=folder) for f in files)
    return Movies(rows=rows, kind="posters", size=len(files))


def poster_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.suffix.lower() in POSTER_SUFFIXES and not f.name.startswith("."))


def poster_image(movie: Movie):
    """The row's poster decoded (None when it has none); raises InvalidImageError naming the problem. A path from a
    source (a data file's `poster_file`) is read confined to the source folder, regular files only, bounded."""
    poster = movie.poster
    if isinstance(poster, Path):
        data = read_confined(poster, movie.root, MAX_IMAGE_BYTES)
        if isinstance(data, Refusal):
            # the builder's wording ends with what it stores; here the row is not predicted
            raise InvalidImageError(data.detail.replace("; poster stored as null", "").replace(" Poster stored as null.", ""))
        return load_image({"bytes": data, "path": poster.name})
    return load_image(poster) if poster_present(poster) else None
