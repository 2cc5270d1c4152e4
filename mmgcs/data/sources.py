"""Readers for each source format, and a registry that detects which one a path is.

Each reader turns a path into `RawMovie`s and records in the `BuildReport` whatever it could not read (a malformed
line, non-UTF-8 bytes), by line number or file name. Validation of plots, genres and posters happens later, in
one place (`build.py`), so every format gets the same rules.
"""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mmgcs.data.confine import inside
from mmgcs.data.genres import parse_genres
from mmgcs.data.records import BuildReport, RawMovie

# Where TMDb serves posters when a CSV gives only a `poster_path` such as "/abc.jpg".
TMDB_IMAGE_BASE_URL = "https://image.tmdb.org/t/p/w500"


@dataclass(frozen=True)
class SourceFormat:
    name: str
    description: str
    detect: Callable[[Path], bool]
    read: Callable[[Path, str, BuildReport], Iterator[RawMovie]]
    download_by_default: bool  # fetch `poster_url`s unless told otherwise


def _decode(raw: bytes, first: bool) -> tuple[str, bool]:
    """UTF-8 decode; bad bytes become U+FFFD and the caller reports the row as changed (never lost)."""
    if first and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


def _int_id(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        s = value.strip()
        if s.lower().startswith("tt"):  # IMDb ids ("tt0000008")
            s = s[2:]
        if s.isdigit():
            return int(s)
    return None


# ---------------------------------------------------------------- jsonl + posters (tmdb5000, tmdb-plots-extra)


def _jsonl_file(path: Path) -> Path | None:
    if path.is_file() and path.suffix == ".jsonl":
        return path
    if path.is_dir():
        if (path / "movies.jsonl").is_file():
            return path / "movies.jsonl"
        found = sorted(path.glob("*.jsonl"))
        if len(found) == 1:
            return found[0]
    return None


def read_jsonl(path: Path, source: str, report: BuildReport) -> Iterator[RawMovie]:
    file = _jsonl_file(path)
    if file is None:
        raise FileNotFoundError(f"No movies.jsonl in {str(path)!r}.")
    base = file.parent
    with open(file, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{file.name}:{lineno}"
            text, bad_bytes = _decode(raw, first=lineno == 1)
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                report.dropped(source, None, "malformed_line", f"line {lineno} is not valid JSON ({e.msg} at column {e.colno})", where)
                continue
            if not isinstance(row, dict):
                report.dropped(source, None, "malformed_line", f"line {lineno} is a JSON {type(row).__name__}, not an object", where)
                continue
            movie = _movie_from_mapping(row, source, where, base, report)
            if movie is None:
                continue
            if bad_bytes:
                report.changed(source, movie.id, "invalid_utf8", f"line {lineno} has bytes that are not UTF-8; replaced with U+FFFD", where)
            yield movie


def _movie_from_mapping(row: dict, source: str, where: str, base: Path, report: BuildReport) -> RawMovie | None:
    movie_id = _int_id(row.get("id"))
    if movie_id is None:
        report.dropped(source, row.get("id"), "bad_id", f"id {row.get('id')!r} is missing or not an integer", where)
        return None
    genres, problem = parse_genres(row.get("genres"))
    if problem:
        report.changed(source, movie_id, "bad_genres_field", problem, where)
    plot = row.get("plot", row.get("overview"))
    if plot is not None and not isinstance(plot, str):
        report.changed(source, movie_id, "bad_plot_field", f"plot has type {type(plot).__name__}, not text; stored as null", where)
        plot = None
    poster_file = row.get("poster_file")
    return RawMovie(
        source=source,
        where=where,
        id=movie_id,
        title=_str_or_none(row.get("title")),
        plot=plot,
        genres=genres,
        poster_file=(base / poster_file) if isinstance(poster_file, str) and poster_file.strip() else None,
        poster_url=_str_or_none(row.get("poster_url")),
    )


def _str_or_none(value) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


# ---------------------------------------------------------------- MM-IMDb (Arevalo et al. 2017)

_MMIMDB_SPLITS = {"train": "train", "dev": "validation", "val": "validation", "validation": "validation", "test": "test"}


def _mmimdb_root(path: Path) -> Path | None:
    for root in (path, path / "mmimdb"):
        if (root / "dataset").is_dir() and ((root / "split.json").is_file() or any((root / "dataset").glob("*.json"))):
            return root
    return None


def read_mmimdb(path: Path, source: str, report: BuildReport) -> Iterator[RawMovie]:
    root = _mmimdb_root(path)
    if root is None:
        raise FileNotFoundError(f"No MM-IMDb layout (dataset/<id>.json) in {str(path)!r}.")
    official: dict[str, str] = {}
    split_file = root / "split.json"
    if split_file.is_file():
        try:
            splits = json.loads(split_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{split_file}: not valid JSON ({e}). Restore the file from the MM-IMDb archive.") from None
        for name, ids in splits.items():
            if name not in _MMIMDB_SPLITS:
                raise ValueError(f"{split_file}: unknown split {name!r}; expected train/dev/test.")
            for movie_id in ids:
                official[str(movie_id)] = _MMIMDB_SPLITS[name]
    for file in sorted((root / "dataset").glob("*.json")):
        where = f"dataset/{file.name}"
        text, bad_bytes = _decode(file.read_bytes(), first=True)
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            report.dropped(source, file.stem, "malformed_line", f"{file.name} is not valid JSON ({e.msg}, line {e.lineno})", where)
            continue
        movie_id = _int_id(file.stem)
        if movie_id is None or not isinstance(row, dict):
            report.dropped(source, file.stem, "bad_id", f"{file.name}: the file name is not a numeric IMDb id or the JSON is not an object", where)
            continue
        plots = row.get("plot")
        if isinstance(plots, str):
            plots = [plots]
        plots = [p for p in (plots or []) if isinstance(p, str) and p.strip()]
        genres, problem = parse_genres(row.get("genres"))
        if problem:
            report.changed(source, movie_id, "bad_genres_field", problem, where)
        if bad_bytes:
            report.changed(source, movie_id, "invalid_utf8", f"{file.name} has bytes that are not UTF-8; replaced with U+FFFD", where)
        yield RawMovie(
            source=source,
            where=where,
            id=movie_id,
            title=_str_or_none(row.get("title")),
            # several plot summaries per movie: the longest one, as the MM-IMDb baselines use
            plot=max(plots, key=len) if plots else None,
            genres=genres,
            poster_file=file.with_suffix(".jpeg"),
            split=official.get(file.stem),
        )


# ---------------------------------------------------------------- CSV (original MMGCS: id, overview, genres, poster_url | poster_path)


def _csv_file(path: Path) -> Path | None:
    if path.is_file() and path.suffix.lower() == ".csv":
        return path
    if path.is_dir():
        found = sorted(path.glob("*.csv"))
        if len(found) == 1:
            return found[0]
    return None


def read_csv(path: Path, source: str, report: BuildReport) -> Iterator[RawMovie]:
    file = _csv_file(path)
    if file is None:
        raise FileNotFoundError(f"No .csv file in {str(path)!r} (or more than one: name the file).")
    # The file is streamed (`mmgcs predict` over a million rows must not hold it); the UTF-8 check is a pass of its
    # own so that the report still names the bad bytes first, before any row, as it did when the file was read whole.
    if not _is_utf8(file):
        report.changed(source, None, "invalid_utf8", f"{file.name} has bytes that are not UTF-8; replaced with U+FFFD", file.name)
    csv.field_size_limit(16 * 1024 * 1024)
    # utf-8-sig drops a leading BOM only; errors="replace" gives the same U+FFFD as decoding the whole file did.
    with open(file, encoding="utf-8-sig", errors="replace", newline="") as f:
        yield from _csv_movies(file, csv.DictReader(_split_lines(f)), source, report)


def _is_utf8(file: Path) -> bool:
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 16), b""):
                decoder.decode(chunk)  # the text is dropped: only whether it decodes matters
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _split_lines(f) -> Iterator[str]:
    """The lines `str.splitlines(keepends=True)` gives (it also ends a line at \\v, \\f, U+2028 … outside quotes,
    which the file's own lines do not): rows and their line numbers stay those of the whole-file reader."""
    for line in f:
        yield from line.splitlines(keepends=True)


def _csv_movies(file: Path, reader: csv.DictReader, source: str, report: BuildReport) -> Iterator[RawMovie]:
    columns = set(reader.fieldnames or [])
    if "id" not in columns or not ({"overview", "plot"} & columns):
        raise ValueError(
            f"{file}: a MMGCS CSV needs columns id, overview (or plot), genres and poster_url or poster_path; "
            f"found {sorted(columns)}."
        )
    for row in reader:
        where = f"{file.name}:{reader.line_num}"
        if None in row:  # more cells than header columns
            report.changed(source, row.get("id"), "extra_cells", f"row has {len(row[None])} cells beyond the header", where)
            row.pop(None)
        movie = _movie_from_mapping(
            {"id": row.get("id"), "title": row.get("title"), "plot": row.get("overview", row.get("plot")), "genres": row.get("genres")},
            source, where, file.parent, report,
        )
        if movie is None:
            continue
        poster_url = (row.get("poster_url") or "").strip()
        poster_path = (row.get("poster_path") or "").strip()
        if poster_url:
            movie.poster_url = poster_url
        elif poster_path:
            local = file.parent / poster_path.lstrip("/")
            if poster_path.startswith(("http://", "https://")):
                movie.poster_url = poster_path
            elif not inside(local, file.parent):
                # refused (and reported) by the builder; testing is_file() first would tell whether a file
                # exists outside the source folder
                movie.poster_file = local
            elif local.is_file():
                movie.poster_file = local
            elif poster_path.startswith("/"):
                movie.poster_url = TMDB_IMAGE_BASE_URL + poster_path
            else:
                movie.poster_file = local  # reported as a missing poster file later
        yield movie


# ---------------------------------------------------------------- registry

FORMATS: dict[str, SourceFormat] = {
    f.name: f
    for f in (
        SourceFormat("jsonl", "folder with movies.jsonl (id, title, plot, genres, poster_file | poster_url) + posters/",
                     lambda p: _jsonl_file(p) is not None, read_jsonl, download_by_default=False),
        SourceFormat("mmimdb", "MM-IMDb: dataset/<id>.json + <id>.jpeg, split.json",
                     lambda p: _mmimdb_root(p) is not None, read_mmimdb, download_by_default=False),
        SourceFormat("csv", "CSV with id, overview, genres, poster_url | poster_path (posters downloaded)",
                     lambda p: _csv_file(p) is not None, read_csv, download_by_default=True),
    )
}


def detect_format(path: Path) -> SourceFormat:
    """The format of `path`; raises ValueError naming the formats and what each looks like."""
    if not path.exists():
        raise FileNotFoundError(f"Source {str(path)!r} does not exist. Check the --source path.")
    matches = [f for f in FORMATS.values() if f.detect(path)]
    if len(matches) == 1:
        return matches[0]
    known = "; ".join(f"{f.name}: {f.description}" for f in FORMATS.values())
    if not matches:
        raise ValueError(f"Cannot tell the format of source {str(path)!r}. Known formats — {known}. Name one with --format.")
    raise ValueError(f"Source {str(path)!r} matches several formats ({[f.name for f in matches]}); name one with --format.")


def get_format(name: str) -> SourceFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"Unknown source format {name!r}; available: {sorted(FORMATS)}") from None


def source_name(path: Path) -> str:
    """Provenance name of a source: the folder name (or the file's stem for a named, non-generic file)."""
    path = path.resolve()
    if path.is_file() and path.stem not in ("movies", "data", "dataset"):
        return path.stem
    return (path.parent if path.is_file() else path).name
