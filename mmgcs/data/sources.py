"""Readers for each source format, and a registry that detects which one a path is.

Each reader turns a path into `RawMovie`s and records in the `BuildReport` whatever it could not read (a malformed
line, non-UTF-8 bytes), by line number or file name. No one row stops a reader: a line over `MAX_ROW_BYTES` (read
past, never held: `mmgcs.data.lines`), JSON nested too deeply, a number Python will not convert and a plot over
`MAX_PLOT_CHARS` (the one limit every entry point shares) are each that row's drop, by id when it can be read.
Further validation of plots, genres and posters happens later, in one place (`build.py`), so every format gets
the same rules.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mmgcs.data.confine import inside
from mmgcs.data.genres import parse_genres
from mmgcs.data.lines import BoundedTextLines, LineTooLong, LongLine, bounded_lines, size_text
from mmgcs.data.records import MAX_PLOT_CHARS, MAX_ROW_BYTES, BuildReport, RawMovie, plot_too_long, reportable_id

# Where TMDb serves posters when a CSV gives only a `poster_path` such as "/abc.jpg".
TMDB_IMAGE_BASE_URL = "https://image.tmdb.org/t/p/w500"

# An MM-IMDb dataset/<id>.json holds many IMDb fields beside its plot summaries (cast, crew, synopsis): it gets
# more room than one row of a JSONL or CSV, and is still never read past this.
MAX_MMIMDB_FILE_BYTES = 16 * MAX_ROW_BYTES

# What a JSON or CSV row nesting too deeply is told (json.loads raises RecursionError past ~1,000 levels).
TOO_DEEP = "nests too deeply to read (lists or objects inside each other beyond Python's recursion limit)"


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
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        s = value.strip()
        if s.lower().startswith("tt"):  # IMDb ids ("tt0000008")
            s = s[2:]
        # isdecimal, not isdigit: int() refuses "²"; the length keeps int() off a 5,000-digit string (ValueError)
        value = int(s) if s.isdecimal() and len(s) <= 19 else None
    if isinstance(value, int) and -(2**63) <= value < 2**63:  # the dataset's id column is int64
        return value
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
    with open(file, "rb") as f:
        for lineno, raw in enumerate(bounded_lines(f, MAX_ROW_BYTES), start=1):
            where = f"{file.name}:{lineno}"
            if isinstance(raw, LongLine):
                report.dropped(source, _jsonl_head_id(raw.head), "row_too_long", _too_long(raw.size, lineno), where)
                continue
            movie = _jsonl_movie(raw, lineno, where, source, file.parent, report)
            if movie is not None:
                yield movie


def _jsonl_movie(raw: bytes, lineno: int, where: str, source: str, base: Path, report: BuildReport) -> RawMovie | None:
    text, bad_bytes = _decode(raw, first=lineno == 1)
    if not text.strip():
        return None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        report.dropped(source, None, "malformed_line", f"line {lineno} is not valid JSON ({e.msg} at column {e.colno})", where)
        return None
    except RecursionError:
        report.dropped(source, _jsonl_head_id(raw[:200]), "malformed_line", f"line {lineno} {TOO_DEEP}; "
                       "a movie is an object of plain fields (id, title, plot, genres, poster_file)", where)
        return None
    except ValueError as e:  # e.g. an integer of more than 4,300 digits, which Python refuses to convert
        report.dropped(source, None, "malformed_line", f"line {lineno} cannot be read as JSON ({str(e)[:120]})", where)
        return None
    if not isinstance(row, dict):
        report.dropped(source, None, "malformed_line", f"line {lineno} is a JSON {type(row).__name__}, not an object", where)
        return None
    movie = _movie_from_mapping(row, source, where, base, report)
    if movie is not None and bad_bytes:
        report.changed(source, movie.id, "invalid_utf8", f"line {lineno} has bytes that are not UTF-8; replaced with U+FFFD", where)
    return movie


def _too_long(size: int, lineno: int) -> str:
    return (f"line {lineno} is {size_text(size)} long, over the {size_text(MAX_ROW_BYTES)} limit for one movie "
            f"(a plot may have at most {MAX_PLOT_CHARS:,} characters); shorten the plot to a summary")


# `{"id": 12, ...` or `{"id": "tt0012", ...` at the start of a line: the id of a row too long or too deep to parse.
_HEAD_ID = re.compile(rb'^(?:\xef\xbb\xbf)?\s*\{\s*"id"\s*:\s*("?)((?:tt)?\d{1,19})\1\s*[,}]')


def _jsonl_head_id(head: bytes) -> int | None:
    match = _HEAD_ID.match(head)
    return _int_id(match.group(2).decode("ascii")) if match else None


def _movie_from_mapping(row: dict, source: str, where: str, base: Path, report: BuildReport) -> RawMovie | None:
    movie_id = _int_id(row.get("id"))
    if movie_id is None:
        report.dropped(source, row.get("id"), "bad_id", f"id {_shown(row.get('id'))} is missing or not an integer", where)
        return None
    plot = row.get("plot", row.get("overview"))
    too_long = plot_too_long(plot)
    if too_long:
        report.dropped(source, movie_id, "plot_too_long", too_long, where)
        return None
    genres, problem = _genres(row.get("genres"))
    if problem:
        report.changed(source, movie_id, "bad_genres_field", problem, where)
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


def _genres(value) -> tuple[list[str], str | None]:
    """`parse_genres`, with a genres text that nests too deeply ("[[[[…") reported instead of raised."""
    try:
        return parse_genres(value)
    except RecursionError:
        return [], f"genres field {TOO_DEEP}; expected a list of names"


def _shown(value) -> str:
    """A value of a row as a message names it: short scalars as they are, anything else by its type."""
    kept = reportable_id(value)
    return f"of type {type(value).__name__}" if kept is None and value is not None else repr(kept)


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
        except RecursionError:
            raise ValueError(f"{split_file}: {TOO_DEEP}. Restore the file from the MM-IMDb archive.") from None
        if not isinstance(splits, dict):
            raise ValueError(f"{split_file}: not an object of split name -> ids. Restore the file from the MM-IMDb archive.")
        for name, ids in splits.items():
            if name not in _MMIMDB_SPLITS:
                raise ValueError(f"{split_file}: unknown split {name!r}; expected train/dev/test.")
            for movie_id in ids:
                official[str(movie_id)] = _MMIMDB_SPLITS[name]
    for file in sorted((root / "dataset").glob("*.json")):
        movie = _mmimdb_movie(file, source, official, report)
        if movie is not None:
            yield movie


def _mmimdb_movie(file: Path, source: str, official: dict[str, str], report: BuildReport) -> RawMovie | None:
    where = f"dataset/{file.name}"
    parsed = _mmimdb_json(file, source, where, report)
    if parsed is None:
        return None
    row, bad_bytes = parsed
    movie_id = _int_id(file.stem)
    if movie_id is None or not isinstance(row, dict):
        report.dropped(source, file.stem, "bad_id", f"{file.name}: the file name is not a numeric IMDb id or the JSON is not an object", where)
        return None
    plot = _mmimdb_plot(row.get("plot"), movie_id, source, where, report)
    if plot is False:
        return None
    genres, problem = _genres(row.get("genres"))
    if problem:
        report.changed(source, movie_id, "bad_genres_field", problem, where)
    if bad_bytes:
        report.changed(source, movie_id, "invalid_utf8", f"{file.name} has bytes that are not UTF-8; replaced with U+FFFD", where)
    return RawMovie(source=source, where=where, id=movie_id, title=_str_or_none(row.get("title")), plot=plot,
                    genres=genres, poster_file=file.with_suffix(".jpeg"), split=official.get(file.stem))


def _mmimdb_json(file: Path, source: str, where: str, report: BuildReport) -> tuple[object, bool] | None:
    """(the parsed file, whether it had bytes that are not UTF-8), or None when it is reported as unreadable."""
    with open(file, "rb") as f:
        data = f.read(MAX_MMIMDB_FILE_BYTES + 1)
    if len(data) > MAX_MMIMDB_FILE_BYTES:
        report.dropped(source, file.stem, "row_too_long", f"{file.name} is over the {size_text(MAX_MMIMDB_FILE_BYTES)} "
                       f"limit for one movie (a plot may have at most {MAX_PLOT_CHARS:,} characters)", where)
        return None
    text, bad_bytes = _decode(data, first=True)
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        report.dropped(source, file.stem, "malformed_line", f"{file.name} is not valid JSON ({e.msg}, line {e.lineno})", where)
        return None
    except RecursionError:
        report.dropped(source, file.stem, "malformed_line", f"{file.name} {TOO_DEEP}", where)
        return None
    except ValueError as e:  # e.g. an integer of more than 4,300 digits
        report.dropped(source, file.stem, "malformed_line", f"{file.name} cannot be read as JSON ({str(e)[:120]})", where)
        return None
    return row, bad_bytes


def _mmimdb_plot(plots, movie_id: int, source: str, where: str, report: BuildReport) -> str | None | bool:
    """The longest of the movie's plot summaries (as the MM-IMDb baselines use) within `MAX_PLOT_CHARS`; a longer
    one is passed over and reported. False (the movie dropped, reported) when every summary is over the limit."""
    if isinstance(plots, str):
        plots = [plots]
    plots = [p for p in (plots if isinstance(plots, list) else []) if isinstance(p, str) and p.strip()]
    fit = [p for p in plots if not plot_too_long(p)]
    if len(fit) == len(plots):
        return max(plots, key=len) if plots else None
    longest = plot_too_long(max(plots, key=len))
    if not fit:
        report.dropped(source, movie_id, "plot_too_long", longest, where)
        return False
    report.changed(source, movie_id, "plot_too_long", f"{len(plots) - len(fit)} of its {len(plots)} plot summaries "
                   f"passed over: {longest}; the longest summary within the limit is used", where)
    return max(fit, key=len)


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
    # A field may be as long as a row (a longer one is that row's error, below); the limit is process-wide, so it
    # is set for each read.
    csv.field_size_limit(MAX_ROW_BYTES)
    # utf-8-sig drops a leading BOM only; errors="replace" gives the same U+FFFD as decoding the whole file did.
    with open(file, encoding="utf-8-sig", errors="replace", newline="") as f:
        yield from _csv_movies(file, f, source, report)


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


def _csv_movies(file: Path, text: Iterable[str], source: str, report: BuildReport) -> Iterator[RawMovie]:
    """The movies of a CSV's text (an open file, or its lines)."""
    lines = BoundedTextLines(text, MAX_ROW_BYTES)
    reader = csv.DictReader(lines)
    try:
        columns = set(reader.fieldnames or [])
    except (LineTooLong, csv.Error) as e:
        raise ValueError(f"{file}: the header cannot be read ({e}). Check that it is a CSV file.") from None
    if "id" not in columns or not ({"overview", "plot"} & columns):
        raise ValueError(
            f"{file}: a MMGCS CSV needs columns id, overview (or plot), genres and poster_url or poster_path; "
            f"found {sorted(columns)}."
        )
    lines.mark()
    for row, where in _csv_rows(reader, lines, file.name, source, report):
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


def _csv_rows(reader: csv.DictReader, lines: BoundedTextLines, name: str, source: str,
              report: BuildReport) -> Iterator[tuple[dict, str]]:
    """(row, "file:line where it ends") of each record; a record the csv module cannot take (a line or a field
    over the limit) is reported by the line it starts on, and by its id when that line starts with it, and the
    rows after it are read on."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except (LineTooLong, csv.Error) as e:
            _report_unreadable(e, reader.fieldnames, lines, name, source, report)
            continue
        lines.mark()
        yield row, f"{name}:{reader.line_num + lines.passed}"


def _report_unreadable(error: Exception, fieldnames, lines: BoundedTextLines, name: str, source: str,
                       report: BuildReport) -> None:
    start = lines.record_start
    long_line = isinstance(error, LineTooLong)
    movie_id = _csv_head_id(error.line.head, fieldnames) if long_line and error.lineno == start else None
    lines.skip_record()
    span = f"; lines {start}-{lines.line} were read past" if lines.line > start else ""
    if long_line:
        detail = _too_long(error.line.size, error.lineno)
    elif "field larger than field limit" in str(error):
        detail = (f"the row starting at line {start} has a field over the {size_text(MAX_ROW_BYTES)} limit (a plot "
                  f"may have at most {MAX_PLOT_CHARS:,} characters); shorten it")
    else:
        detail = f"the row starting at line {start} is not valid CSV ({error})"
    reason = "malformed_line" if not long_line and "field larger" not in str(error) else "row_too_long"
    report.dropped(source, movie_id, reason, detail + span, f"{name}:{start}")


def _csv_head_id(head: str, fieldnames) -> int | None:
    """The id of an over-long line from its first cells, when the id column comes before the cut."""
    try:
        column = list(fieldnames or []).index("id")
        cells = next(csv.reader([head]), [])
    except (ValueError, csv.Error):
        return None
    return _int_id(cells[column]) if column < len(cells) - 1 else None


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
