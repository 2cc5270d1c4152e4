"""`mmgcs predict`: a trained model over a file of movies, streamed in batches, one output row per movie.

The input is a raw source the data builder reads (a CSV or JSONL with id, title, plot, poster_file / poster_path /
poster_url; MM-IMDb), a folder of poster images (id = file stem) or a built dataset (folder or Hub id, one split).
Rows go through the one predict path (`Predictor.predict_batch`) and are appended to the output batch by batch,
so memory does not grow with the number of rows (only the set of ids already written, kept for `--resume`).

A row that cannot be read keeps its place in the output with the reason in `error` and no scores: a missing,
corrupt, oversized or out-of-folder poster, an empty plot with no poster, an id the reader refuses. Its
batch-mates are predicted normally. Posters named by a row are read only inside the input's folder, as regular
files and at most `MAX_IMAGE_BYTES` (`mmgcs.data.confine`, the builder's rule); poster URLs are never fetched.
"""

from __future__ import annotations

import csv
import inspect
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from mmgcs.data import load_movies
from mmgcs.data.confine import Refusal, read_confined
from mmgcs.data.images import MAX_IMAGE_BYTES, InvalidImageError, load_image, poster_present
from mmgcs.data.records import BuildReport
from mmgcs.data.sources import FORMATS, detect_format, source_name
from mmgcs.evaluate import batched
from mmgcs.inference import Predictor
from mmgcs.models.classifier import GenreClassifier
from mmgcs.models.preprocessing import plot_present

POSTER_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")
OUTPUT_SUFFIXES = (".csv", ".jsonl", ".parquet")
# Alone-views of `Predictor(..., by_modality=True)` → the prefix of their output columns.
VIEW_COLUMNS = {"text": "plot_only", "image": "poster_only"}
GENRE_SEPARATOR = "|"  # CSV cell of the predicted genres ("Science Fiction" has a space, never a bar)


class OutputMismatch(ValueError):
    """The output being resumed has other columns than this run would write."""


@dataclass
class Movie:
    """One input row: what the reader found, before any poster is decoded."""

    id: str
    plot: Optional[str] = None
    title: Optional[str] = None
    poster: Any = None  # a Path (read confined to `root`), a datasets Image dict, or None
    root: Optional[Path] = None
    poster_url: bool = False  # the row names its poster only by URL (never downloaded here)
    error: Optional[str] = None  # set when the reader itself refused the row


def explain_supported() -> bool:
    """Whether the one predict path can explain its predictions (`predict_batch(..., explain=True)`)."""
    return "explain" in inspect.signature(Predictor.predict_batch).parameters


# ------------------------------------------------------------------------------------------------- inputs
def is_built_dataset(path: Path) -> bool:
    return path.is_dir() and (any((path / "data").glob("*.parquet")) or (path / "dataset_dict.json").is_file())


def read_input(source: str, split: str = "test") -> tuple[Iterator[Movie], Optional[int]]:
    """The movies of `source` and how many there are (None when it is not known without reading everything)."""
    path = Path(source).expanduser()
    if is_built_dataset(path) or not path.exists():
        return read_dataset(source, split)  # a Hub id, or a clear "no dataset folder" error from load_movies
    if path.is_dir() and not any(f.detect(path) for f in FORMATS.values()):
        files = poster_files(path)
        if not files:
            raise ValueError(f"{source!r} holds no movies.jsonl, CSV, MM-IMDb layout, built dataset or poster images "
                             f"({', '.join(POSTER_SUFFIXES)}). Point --input at one of those.")
        return (Movie(id=f.stem, poster=f, root=path) for f in files), len(files)
    fmt = detect_format(path)
    return read_source(path, fmt.name), _line_count(path) if fmt.name == "jsonl" and path.is_file() else None


def poster_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.suffix.lower() in POSTER_SUFFIXES and not f.name.startswith("."))


def read_source(path: Path, fmt: str) -> Iterator[Movie]:
    """A raw source through the data builder's own reader; a row the reader drops comes out with its reason."""
    root = path if path.is_dir() else path.parent
    report = BuildReport()
    for raw in FORMATS[fmt].read(path, source_name(path), report):
        yield from _dropped(report)
        yield Movie(id=str(raw.id), plot=raw.plot, title=raw.title, poster=raw.poster_file, root=root,
                    poster_url=raw.poster_file is None and bool(raw.poster_url))
    yield from _dropped(report)


def _dropped(report: BuildReport) -> Iterator[Movie]:
    for event in report.events:
        if event["action"] == "dropped":
            where = f" ({event['where']})" if event.get("where") else ""
            yield Movie(id="" if event["id"] is None else str(event["id"]), error=event["detail"] + where)
    report.events.clear()  # read once; keeps the report from growing with the file


def read_dataset(source: str, split: str) -> tuple[Iterator[Movie], int]:
    dd = load_movies(source)
    if split not in dd:
        raise ValueError(f"Dataset {source!r} has no split {split!r}; its splits: {sorted(dd)}. Pick one with --split.")
    ds = dd[split]
    if "poster" in ds.column_names:
        # Undecoded: a corrupt poster then fails on its own row instead of stopping the run.
        ds = ds.cast_column("poster", datasets.Image(decode=False))
    return _dataset_rows(ds), len(ds)


def _dataset_rows(ds) -> Iterator[Movie]:
    for batch in ds.iter(batch_size=256):
        for i, movie_id in enumerate(batch["id"]):
            yield Movie(id=str(movie_id), plot=batch["plot"][i] if "plot" in batch else None,
                        title=batch["title"][i] if "title" in batch else None,
                        poster=batch["poster"][i] if "poster" in batch else None)


def _line_count(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def poster_image(movie: Movie):
    """The row's poster decoded (None when it has none); raises InvalidImageError naming the problem."""
    poster = movie.poster
    if isinstance(poster, Path):
        data = read_confined(poster, movie.root, MAX_IMAGE_BYTES)
        if isinstance(data, Refusal):
            # the builder's wording ends with what it stores; here the row is not predicted
            raise InvalidImageError(data.detail.replace("; poster stored as null", "").replace(" Poster stored as null.", ""))
        return load_image({"bytes": data, "path": poster.name})
    return load_image(poster) if poster_present(poster) else None


def row_inputs(movie: Movie) -> tuple[Optional[str], Any]:
    """(plot or None, decoded poster or None) of a readable row; ValueError with the reason otherwise."""
    if movie.error:
        raise ValueError(movie.error)
    image = poster_image(movie)
    plot = movie.plot if plot_present(movie.plot) else None
    if plot is None and image is None:
        url = " (its poster is given only as a URL, which predict does not download)" if movie.poster_url else ""
        raise ValueError(f"empty plot and no poster{url}: give the movie a plot or a poster file")
    return plot, image


# ---------------------------------------------------------------------------------------------- predicting
def predict_rows(predictor: Predictor, movies: list[Movie], by_modality: bool, explain: bool = False) -> list[dict]:
    """One result per movie, in order: the predictor's result, or `{"error": reason}`. Rows are validated and
    their posters decoded one by one first, so a bad row never costs its batch-mates their prediction."""
    results: list[Optional[dict]] = [None] * len(movies)
    ready, plots, posters, titles = [], [], [], []
    for i, movie in enumerate(movies):
        try:
            plot, image = row_inputs(movie)
        except (InvalidImageError, ValueError, OSError) as e:
            results[i] = {"error": str(e)}
            continue
        ready.append(i)
        plots.append(plot)
        posters.append(image)
        titles.append(movie.title)
    if ready:
        for i, result in zip(ready, _predicted(predictor, plots, posters, titles, by_modality, explain)):
            results[i] = result
    return results


def _predicted(predictor: Predictor, plots: list, posters: list, titles: list, by_modality: bool,
               explain: bool) -> list[dict]:
    options = {"by_modality": by_modality, **({"explain": True} if explain else {})}
    try:
        return predictor.predict_batch(plots, posters, batch_size=len(plots), titles=titles, **options)
    except (ValueError, TypeError) as e:
        if len(plots) == 1:
            return [{"error": str(e)}]
    # The predictor refused the batch for one of its rows (e.g. a plot given to a poster-only model): each row
    # alone, so the others are still predicted and the culprit gets the predictor's own message.
    return [_predicted(predictor, [p], [q], [t], by_modality, explain)[0] for p, q, t in zip(plots, posters, titles)]


# ------------------------------------------------------------------------------------------------- outputs
def output_columns(labels: list[str], by_modality: bool, explain: bool) -> list[str]:
    views = [f"{VIEW_COLUMNS[v]}.{g}" for v in VIEW_COLUMNS for g in labels] if by_modality else []
    return ["id", "genres", *labels, *views, *(["explanation"] if explain else []), "error"]


def output_record(movie_id: str, result: dict, columns: list[str]) -> dict:
    """One output row: scores rounded to 6 decimals; None where there is nothing (an error, a missing input)."""
    record = dict.fromkeys(columns)
    record["id"] = movie_id
    if "error" in result:
        record["error"] = result["error"]
        return record
    record["genres"] = list(result["genres"])
    record.update({g: round(s, 6) for g, s in result["scores"].items()})
    for view, scores in result.get("by_modality", {}).items():
        if view in VIEW_COLUMNS:
            record.update({f"{VIEW_COLUMNS[view]}.{g}": round(s, 6) for g, s in scores.items()})
    if "explanation" in columns:
        record["explanation"] = result.get("explanation")
    return record


class OutputWriter:
    """Appends records to a CSV, JSONL or parquet file (by its extension), batch by batch."""

    def __init__(self, path: Path, columns: list[str], resume: bool):
        self.path, self.columns, self.format = path, columns, path.suffix.lower()
        self._parquet = self._tmp = None
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.format == ".parquet":
            self._open_parquet(resume)
            return
        keep = resume and path.is_file() and path.stat().st_size > 0
        if keep:
            _drop_partial_line(path)
        self._file = open(path, "a" if keep else "w", newline="" if self.format == ".csv" else None, encoding="utf-8")
        if self.format == ".csv":
            self._csv = csv.DictWriter(self._file, fieldnames=columns)
            if not keep or path.stat().st_size == 0:
                self._csv.writeheader()

    def _open_parquet(self, resume: bool) -> None:
        fields = [pa.field("id", pa.string()), pa.field("genres", pa.list_(pa.string()))]
        fields += [pa.field(c, pa.string() if c in ("explanation", "error") else pa.float64())
                   for c in self.columns[2:]]
        self.schema = pa.schema(fields)
        # A parquet file cannot be appended to: the rows already there are copied into a new file, which replaces
        # the old one only when it is complete (an interrupted run leaves the previous output intact).
        self._tmp = self.path.with_name(self.path.name + ".partial")
        self._parquet = pq.ParquetWriter(self._tmp, self.schema)
        if resume and self.path.is_file():
            old = pq.ParquetFile(self.path)
            for i in range(old.num_row_groups):
                self._parquet.write_table(old.read_row_group(i).cast(self.schema))

    def write(self, records: list[dict]) -> None:
        if "explanation" in self.columns and self.format != ".jsonl":  # a JSON text cell; JSONL keeps the object
            records = [{**r, "explanation": _json_or_none(r["explanation"])} for r in records]
        if self._parquet is not None:
            self._parquet.write_table(pa.Table.from_pylist(records, schema=self.schema))
            return
        for r in records:
            if self.format == ".csv":
                self._csv.writerow({**r, "genres": None if r["genres"] is None else GENRE_SEPARATOR.join(r["genres"])})
            else:
                self._file.write(json.dumps(r, ensure_ascii=False) + "\n")
        self._file.flush()  # a run stopped now keeps every batch written so far (what --resume continues)

    def close(self) -> None:
        if self._parquet is not None:
            self._parquet.close()
            os.replace(self._tmp, self.path)
        else:
            self._file.close()


def _json_or_none(value) -> Optional[str]:
    return None if value is None else json.dumps(value, ensure_ascii=False, default=str)


def _drop_partial_line(path: Path) -> None:
    """Cut a last line left half-written by an interrupted run (it would corrupt the next row)."""
    if _last_line_complete(path):
        return
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        step, pos = 1 << 16, size
        while pos > 0:
            pos = max(0, pos - step)
            f.seek(pos)
            cut = f.read(min(step, size - pos)).rfind(b"\n")
            if cut >= 0:
                f.truncate(pos + cut + 1)
                return
        f.truncate(0)


def _last_line_complete(path: Path) -> bool:
    """Whether the file is empty or ends with a newline (no row was left half-written)."""
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def written_ids(path: Path, columns: list[str]) -> set[str]:
    """The ids already in an output file (what `--resume` skips); ValueError when its columns differ."""
    if not path.is_file() or path.stat().st_size == 0:
        return set()
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        found = pq.ParquetFile(path).schema_arrow.names
        ids = pq.read_table(path, columns=["id"]).column("id").to_pylist() if found == columns else []
    elif suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            found = reader.fieldnames or []
            ids = [row["id"] for row in reader] if found == columns else []
        if ids and not _last_line_complete(path):
            ids.pop()  # the half-written last row of an interrupted run: the writer cuts it, so it is predicted again
    else:
        found, ids = columns, []
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the half-written last line of an interrupted run; rewritten
                if list(row) != columns:
                    found = list(row)
                    break
                ids.append(str(row["id"]))
    if found != columns:
        raise OutputMismatch(f"{str(path)!r} was written with other columns (another model, or a different "
                         "--by-modality/--explain); continue it with the same options, or write to a new --out")
    return {str(i) for i in ids}


# ---------------------------------------------------------------------------------------------------- run
@dataclass
class RunStats:
    written: int = 0
    errors: int = 0
    skipped: int = 0  # already in the output (--resume)
    seconds: float = 0.0

    @property
    def per_second(self) -> float:
        return self.written / self.seconds if self.seconds else 0.0


def _batches(movies: Iterator[Movie], size: int, done: set[str], stats: RunStats) -> Iterator[list[Movie]]:
    """The movies not yet in the output (`done`, counted as skipped), in batches of `size`."""

    def pending() -> Iterator[Movie]:
        for movie in movies:
            if movie.id in done:
                stats.skipped += 1
            else:
                yield movie

    return batched(pending(), size)


def predict_file(predictor: Predictor, source: str, out: Path, batch_size: int = 32, by_modality: bool = False,
                 resume: bool = False, split: str = "test", explain: bool = False, progress: Optional[bool] = None) -> RunStats:
    """Predict every movie of `source` into `out` (see the module docstring); returns the counts."""
    labels = predictor.labels
    columns = output_columns(labels, by_modality, explain)
    done = written_ids(out, columns) if resume else set()
    movies, total = read_input(source, split)
    stats, start = RunStats(), time.perf_counter()
    writer = OutputWriter(out, columns, resume)
    bar = tqdm(total=None if total is None else total - len(done), unit="movie", disable=progress is False or None,
               desc="predict", file=sys.stderr)
    try:
        for batch in _batches(movies, batch_size, done, stats):
            results = predict_rows(predictor, batch, by_modality, explain)
            records = [output_record(m.id, r, columns) for m, r in zip(batch, results)]
            writer.write(records)
            stats.written += len(records)
            stats.errors += sum(r["error"] is not None for r in records)
            bar.update(len(records))
    finally:
        bar.close()
        writer.close()
    stats.seconds = time.perf_counter() - start
    return stats


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="model bundle folder (save_pretrained) or Hub model id")
    p.add_argument("--input", required=True, metavar="PATH",
                   help="CSV / JSONL (id, title, plot, poster_file | poster_path | poster_url), a folder of poster "
                        "images (id = file stem), or a built dataset (folder or Hub id; see --split)")
    p.add_argument("--out", default="predictions.csv", metavar="FILE",
                   help="output file: .csv, .jsonl or .parquet (default predictions.csv)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="movies per forward pass (default 32)")
    p.add_argument("--by-modality", action="store_true",
                   help="also the plot-only and poster-only scores (columns plot_only.<genre>, poster_only.<genre>)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run: skip ids already in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--split", default="test", help="split of a built dataset (default test)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda when available)")
    p.add_argument("--fast", action="store_true",
                   help="the predictor's fast encoders (mmgcs.fast_path: scores within 1e-4 of the eager towers, "
                        "which serve whenever the fast one is unavailable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    if explain_supported():
        p.add_argument("--explain", action="store_true",
                       help="add why each prediction (column `explanation`: the plot words and word pairs behind each "
                            "predicted genre, the plot/poster share, the poster occlusion map; JSON; slower)")


def _checked(args) -> Optional[str]:
    """The problem with the options, or None."""
    out = Path(args.out)
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        return f"--out {args.out!r}: name a .csv, .jsonl or .parquet file (the format follows the extension)"
    if args.batch_size < 1:
        return "--batch-size must be at least 1"
    if out.exists() and not (args.resume or args.overwrite):
        return f"{args.out!r} exists: pass --resume to continue it, --overwrite to replace it, or another --out"
    if args.resume and args.overwrite:
        return "--resume and --overwrite contradict each other; pick one"
    return None


def main(args) -> int:
    problem = _checked(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        model = GenreClassifier.from_pretrained(args.model)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: could not load the model from {args.model!r}: {e}", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        stats = predict_file(Predictor(model, device=device, fast=args.fast), args.input, Path(args.out), args.batch_size,
                             args.by_modality, args.resume, args.split, getattr(args, "explain", False),
                             progress=False if args.no_progress else None)
    except OutputMismatch as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: cannot read --input {args.input!r}: {e}", file=sys.stderr)
        return 2
    print(f"{stats.written:,} movies written to {args.out} ({stats.errors:,} with an error"
          + (f", {stats.skipped:,} already there" if args.resume else "")
          + f") in {stats.seconds:.1f} s: {stats.per_second:,.0f} movies/s")
    return 0


__all__ = ["Movie", "OutputWriter", "RunStats", "add_arguments", "explain_supported", "main", "output_columns",
           "predict_file", "predict_rows", "read_input", "written_ids"]
