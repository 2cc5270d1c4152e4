"""`mmgcs predict`: a trained model over a file of movies, streamed in batches, one output row per movie.

The input is a raw source the data builder reads (a CSV or JSONL with id, title, plot, poster_file / poster_path /
poster_url; MM-IMDb), a folder of poster images (id = file stem) or a built dataset (folder or Hub id, one split), read
by `mmgcs.data.inputs.read_movies` as `mmgcs evaluate` reads them (every row of a raw source, whatever its splits).
Rows go through the one predict path (`Predictor.predict_batch`) a window of 8 batches at a time (sorted there by
plot length, so a batch pads little; results back in input order), the next window read and its posters decoded in a
thread meanwhile, and are appended to the output window by window, so memory does not grow with the number of rows
(only the ids met, as 8-byte hashes, which find an id given to several rows, and the ids already written, kept for
`--resume`). Each output row says in `input_row` which input row it is
(two rows of one id are both predicted, and told apart there; the run warns of them). The output is checked to be
writable before the model loads; a write that fails later says what was kept and how to resume. On CPU the towers run
through the fast path (`mmgcs.fast_path`: the text tower in ONNX Runtime, scores within 1e-4 of the eager towers;
`--eager` or MMGCS_FAST_PATH=0 for the eager ones), built on a made-up movie before the first window, so the run's
line reports the start-up apart from the steady rate.

A row that cannot be read keeps its place in the output with the reason in `error` and no scores: a missing,
corrupt, oversized or out-of-folder poster, an empty plot with no poster, a plot over `MAX_PLOT_CHARS`, a line
too long or too deeply nested to read, an id the reader refuses. Its batch-mates are predicted normally. Posters named by a row are read only inside the input's folder, as regular
files and at most `MAX_IMAGE_BYTES` (`mmgcs.data.confine`, the builder's rule); poster URLs are never fetched.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import groupby
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import PIL.Image
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from mmgcs.data.images import InvalidImageError
from mmgcs.data.inputs import Movie, batched, poster_image, read_movies
from mmgcs.data.outfiles import unwritable_file
from mmgcs.data.records import plot_too_long
from mmgcs.fast_path import fast_path_setting
from mmgcs.inference import Predictor
from mmgcs.models.load import ModelNotFoundError, load_model
from mmgcs.models.preprocessing import plot_present
from mmgcs.progress import progress as progress_bar
from mmgcs.shards import Shard

OUTPUT_SUFFIXES = (".csv", ".jsonl", ".parquet")
# Alone-views of `Predictor(..., by_modality=True)` → the prefix of their output columns.
VIEW_COLUMNS = {"text": "plot_only", "image": "poster_only"}
GENRE_SEPARATOR = "|"  # CSV cell of the predicted genres ("Science Fiction" has a space, never a bar)


class OutputMismatch(ValueError):
    """The output being resumed has other columns than this run would write."""


def explain_supported() -> bool:
    """Whether the one predict path can explain its predictions (`predict_batch(..., explain=True)`)."""
    return "explain" in inspect.signature(Predictor.predict_batch).parameters


# ------------------------------------------------------------------------------------------------- inputs
def row_inputs(movie: Movie) -> tuple[Optional[str], Any]:
    """(plot or None, decoded poster or None) of a readable row; ValueError with the reason otherwise."""
    if movie.error:  # the reader refused the row: its reason, and where the row is
        raise ValueError(f"{movie.error} ({movie.row})" if movie.row else movie.error)
    too_long = plot_too_long(movie.plot)  # a built dataset's rows; a raw source's reader refused them already
    if too_long:
        raise ValueError(too_long)
    image = poster_image(movie)
    plot = movie.plot if plot_present(movie.plot) else None
    if plot is None and image is None:
        url = " (its poster is given only as a URL, which predict does not download)" if movie.poster_url else ""
        raise ValueError(f"empty plot and no poster{url}: give the movie a plot or a poster file")
    return plot, image


# ---------------------------------------------------------------------------------------------- predicting
@dataclass
class Prepared:
    """A window's rows read and checked (posters decoded): what the predictor gets, and the rows refused."""

    results: list  # per movie: {"error": reason} for a refused row, else None until predicted
    ready: list = field(default_factory=list)  # indices of the rows to predict
    plots: list = field(default_factory=list)
    posters: list = field(default_factory=list)
    titles: list = field(default_factory=list)


def prepare_rows(movies: list[Movie]) -> Prepared:
    """Validate the rows and decode their posters one by one, so a bad row never costs its batch-mates their
    prediction (and, run ahead in a thread, so decoding overlaps the previous window's compute)."""
    prepared = Prepared(results=[None] * len(movies))
    for i, movie in enumerate(movies):
        try:
            plot, image = row_inputs(movie)
        except (InvalidImageError, ValueError, OSError) as e:
            prepared.results[i] = {"error": str(e)}
            continue
        prepared.ready.append(i)
        prepared.plots.append(plot)
        prepared.posters.append(image)
        prepared.titles.append(movie.title)
    return prepared


def predict_prepared(predictor: Predictor, prepared: Prepared, by_modality: bool, explain: bool = False,
                     batch_size: Optional[int] = None) -> list[dict]:
    """One result per movie, in input order: the predictor's result, or `{"error": reason}`. The predictor runs the
    rows in batches of `batch_size` (default: all at once) of plots of similar length (`Predictor.predict_batch`
    sorts them: a batch is padded to its longest plot) and gives them back in input order."""
    results = list(prepared.results)
    if prepared.ready:
        size = batch_size or len(prepared.ready)
        predicted = _predicted(predictor, prepared.plots, prepared.posters, prepared.titles, by_modality, explain, size)
        for i, result in zip(prepared.ready, predicted):
            results[i] = result
    return results


def predict_rows(predictor: Predictor, movies: list[Movie], by_modality: bool, explain: bool = False,
                 batch_size: Optional[int] = None) -> list[dict]:
    """`prepare_rows` then `predict_prepared`: one result per movie, in order."""
    return predict_prepared(predictor, prepare_rows(movies), by_modality, explain, batch_size)


def _predicted(predictor: Predictor, plots: list, posters: list, titles: list, by_modality: bool,
               explain: bool, batch_size: int) -> list[dict]:
    options = {"by_modality": by_modality, **({"explain": True} if explain else {})}
    try:
        return predictor.predict_batch(plots, posters, batch_size=batch_size, titles=titles, **options)
    except (ValueError, TypeError) as e:
        if len(plots) == 1:
            return [{"error": str(e)}]
    # The predictor refused the batch for one of its rows (e.g. a plot given to a poster-only model): each row
    # alone, so the others are still predicted and the culprit gets the predictor's own message.
    return [_predicted(predictor, [p], [q], [t], by_modality, explain, 1)[0] for p, q, t in zip(plots, posters, titles)]


def prefetched(windows: Iterator[list[Movie]]) -> Iterator[tuple[list[Movie], Prepared]]:
    """Each window with its rows prepared, the next window read and prepared in a thread while the caller predicts
    this one (decoding a JPEG releases the GIL). At most two windows are held: memory stays flat."""
    def next_prepared():
        window = next(windows, None)
        return None if window is None else (window, prepare_rows(window))

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmgcs-read") as pool:
        ahead = pool.submit(next_prepared)
        try:
            while True:
                item = ahead.result()  # the reader's own errors (an unreadable input) surface here
                if item is None:
                    return
                ahead = pool.submit(next_prepared)
                yield item
        finally:
            ahead.cancel()


# ------------------------------------------------------------------------------------------------- outputs
def output_columns(labels: list[str], by_modality: bool, explain: bool) -> list[str]:
    views = [f"{VIEW_COLUMNS[v]}.{g}" for v in VIEW_COLUMNS for g in labels] if by_modality else []
    return ["id", "input_row", "genres", *labels, *views, *(["explanation"] if explain else []), "error"]


def output_record(movie_id: str, result: dict, columns: list[str], row: str = "") -> dict:
    """One output row: scores rounded to 6 decimals; None where there is nothing (an error, a missing input).
    `row` is where the movie is in the input (two rows of one id differ there)."""
    record = dict.fromkeys(columns)
    record["id"] = movie_id
    record["input_row"] = row
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
        self.rows = 0  # written by this run
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.format == ".parquet":
            self._open_parquet(resume)
            return
        keep = resume and path.is_file() and path.stat().st_size > 0
        self.started_empty = not keep  # created or emptied here: a run that writes no row leaves no file
        if keep:
            _drop_partial_line(path)
        self._file = open(path, "a" if keep else "w", newline="" if self.format == ".csv" else None, encoding="utf-8")
        if self.format == ".csv":
            self._csv = csv.DictWriter(self._file, fieldnames=columns)
            if not keep or path.stat().st_size == 0:
                self._csv.writeheader()

    def _open_parquet(self, resume: bool) -> None:
        text = ("id", "input_row", "explanation", "error")
        self.schema = pa.schema([pa.field(c, pa.list_(pa.string()) if c == "genres" else pa.string() if c in text
                                          else pa.float64()) for c in self.columns])
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
            self.rows += len(records)
            return
        for r in records:
            if self.format == ".csv":
                self._csv.writerow({**r, "genres": None if r["genres"] is None else GENRE_SEPARATOR.join(r["genres"])})
            else:
                self._file.write(json.dumps(r, ensure_ascii=False) + "\n")
        self._file.flush()  # a run stopped now keeps every batch written so far (what --resume continues)
        self.rows += len(records)

    def close(self) -> None:
        if self._parquet is not None:
            self._parquet.close()
            os.replace(self._tmp, self.path)
        else:
            self._file.close()

    def abandon(self, broken: bool = False) -> None:
        """Close after a failed or interrupted run: keep every row written (what --resume continues), but leave no
        output that holds none, which would only make the rerun ask for --overwrite. `broken`: writing failed, so
        a parquet file being written cannot be trusted and the previous output is kept as it was."""
        if self._parquet is not None:
            self._abandon_parquet(broken)
            return
        try:
            self._file.close()
        except OSError:  # the disk filled: what could be written is there; --resume cuts a half-written last line
            pass
        if self.started_empty and self.rows == 0 and self.path.is_file() and not self.path.is_symlink():
            self.path.unlink()

    def _abandon_parquet(self, broken: bool) -> None:
        """A parquet output holds the old rows and this run's only once its footer is written: keep it when it can
        be closed and has new rows, else leave the previous output as it was."""
        try:
            self._parquet.close()
            if self.rows and not broken:
                os.replace(self._tmp, self.path)
                return
        except OSError:
            pass
        self._tmp.unlink(missing_ok=True)


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


def written_ids(path: Path, columns: list[str]) -> Counter:
    """How many rows of each id an output file holds (what `--resume` skips); ValueError when its columns differ."""
    if not path.is_file() or path.stat().st_size == 0:
        return Counter()
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
    return Counter(str(i) for i in ids)


# ---------------------------------------------------------------------------------------------------- run
MAX_NAMED_DUPLICATES = 10  # ids a duplicate warning names; it counts the others


class OutputWriteError(Exception):
    """The output could not be written mid-run (e.g. the disk filled); the message says what was kept."""


@dataclass
class RunStats:
    written: int = 0
    errors: int = 0
    skipped: int = 0  # already in the output (--resume)
    seconds: float = 0.0
    duplicate_ids: int = 0  # ids met on more than one row of the input
    input_rows: int = 0  # rows of the whole input (a part's process reads them all)
    named_duplicates: list[str] = field(default_factory=list)  # the first MAX_NAMED_DUPLICATES of them

    @property
    def per_second(self) -> float:
        return self.written / self.seconds if self.seconds else 0.0


class SeenIds:
    """The ids a run has met, in about 8 bytes each (a set of the id strings took ~130 bytes an id: 130 MB over a
    million rows): their 64-bit hashes, the latest few thousand in a set, the others in a sorted array. Two ids
    share a hash with odds of about n²/2^65, which would only name as repeated an id that is not."""

    RECENT = 1 << 13  # hashes kept in the set before they move to the array

    def __init__(self):
        self.recent: set[int] = set()
        self.older = np.empty(0, dtype=np.uint64)

    def add(self, key: str) -> bool:
        """Note `key`; True when it was met before."""
        h = hash(key) & 0xFFFF_FFFF_FFFF_FFFF
        if h in self.recent:
            return True
        if self.older.size:
            i = int(self.older.searchsorted(np.uint64(h)))  # a plain int would cast the whole array
            if i < self.older.size and int(self.older[i]) == h:
                return True
        self.recent.add(h)
        if len(self.recent) >= self.RECENT:
            new = np.sort(np.fromiter(self.recent, dtype=np.uint64, count=len(self.recent)))
            self.older = np.insert(self.older, np.searchsorted(self.older, new), new)
            self.recent.clear()
        return False


def _batches(movies: Iterator[Movie], size: int, done: Counter, stats: RunStats,
             shard: Optional[Shard] = None) -> Iterator[list[Movie]]:
    """The movies not yet in the output (of `shard`'s rows, when given), in batches of `size`. `done` counts each
    id's rows already written: an id's first occurrences are the ones written (the input is read in the same
    order), so they are skipped (and counted) and its later ones predicted. Ids met twice in the whole input are
    counted in `stats`."""
    seen, repeated = SeenIds(), SeenIds()

    def pending() -> Iterator[Movie]:
        for row, movie in enumerate(movies):
            stats.input_rows = row + 1
            # a row without an id (the reader refused it) repeats nothing
            key = movie.key
            if key and seen.add(key) and not repeated.add(key):
                stats.duplicate_ids += 1
                if len(stats.named_duplicates) < MAX_NAMED_DUPLICATES:
                    stats.named_duplicates.append(key)
            if shard is not None and not shard.owns(row):
                continue
            if done[key] > 0:
                done[key] -= 1
                stats.skipped += 1
            else:
                yield row, movie

    if shard is None:
        return batched((movie for _, movie in pending()), size)
    # A part's batches are its blocks (what one process predicts together), also the rest of a block cut by a kill
    return ([movie for _, movie in group] for _, group in groupby(pending(), key=lambda x: shard.block_of(x[0])))


SORT_WINDOW_BATCHES = 8  # batches read and sorted by plot length together (see window_rows)


def window_rows(batch_size: int, batches: int = SORT_WINDOW_BATCHES) -> int:
    """Rows read, checked and sorted by length together: `batches` batches (--sort-window, default 8). Over tmdb5000's 4,048 plots in batches of 32,
    a batch in input order is padded to 1.82x the real tokens, sorted within 256 rows to 1.09x (512: 1.05x), and
    the text tower's time goes with the padded tokens. Two windows of decoded posters are held at most."""
    return batch_size * max(1, batches)


def predict_file(predictor: Predictor, source: str, out: Path, batch_size: int = 32, by_modality: bool = False,
                 resume: bool = False, split: str = "test", explain: bool = False, progress: Optional[bool] = None,
                 shard: Optional[Shard] = None, sort_window: int = SORT_WINDOW_BATCHES) -> RunStats:
    """Predict every movie of `source` into `out` (see the module docstring); returns the counts. A failure to
    write raises `OutputWriteError` saying what was kept; a failed run leaves no output without rows. `shard`:
    only that part's rows (`mmgcs.shards`), into `out` as the part file, each of its blocks predicted together
    (sorted by length, in batches of `batch_size`); else windows of `sort_window` batches.
    `progress`: None follows `mmgcs.progress` (a bar on the main process unless quiet), False none, True one."""
    labels = predictor.labels
    columns = output_columns(labels, by_modality, explain)
    done = written_ids(out, columns) if resume else Counter()
    movies = read_movies(source, split)
    total = movies.size
    if total is not None and shard is not None:
        total = shard.rows(total)
    stats, start = RunStats(), time.perf_counter()
    writer = OutputWriter(out, columns, resume)
    desc = "predict" if shard is None else f"predict (part {shard.index + 1} of {shard.count})"
    bar = progress_bar(total=None if total is None else max(total - sum(done.values()), 0), unit="movie",
                       desc=desc, enabled=False if progress is False else (True if progress else None))
    windows = prefetched(_batches(movies, window_rows(batch_size, sort_window), done, stats, shard))
    try:
        for window, prepared in windows:
            results = predict_prepared(predictor, prepared, by_modality, explain, batch_size)
            records = [output_record(m.key, r, columns, m.row) for m, r in zip(window, results)]
            _write(writer, records)
            stats.written += len(records)
            stats.errors += sum(r["error"] is not None for r in records)
            bar.update(len(records))
        _close(writer)
    except OutputWriteError:
        writer.abandon(broken=True)
        raise
    except BaseException:  # also Ctrl-C: the rows written stay for --resume
        writer.abandon()
        raise
    finally:
        windows.close()
        bar.close()
    stats.seconds = time.perf_counter() - start
    return stats


def _write(writer: OutputWriter, records: list[dict]) -> None:
    try:
        writer.write(records)
    except OSError as e:
        raise _write_failed(writer, e) from e


def _close(writer: OutputWriter) -> None:
    try:
        writer.close()
    except OSError as e:
        raise _write_failed(writer, e) from e


def _write_failed(writer: OutputWriter, e: OSError) -> OutputWriteError:
    reason = e.strerror or f"{type(e).__name__}: {e}"
    if writer.format == ".parquet":
        kept = (f"{writer.path} is as it was before this run (a parquet file is replaced only once complete; the "
                f"unfinished {writer.path.name}.partial is removed)")
    else:
        kept = (f"the {writer.rows:,} movies this run wrote before it are kept in {writer.path}" if writer.rows else
                "no movie of this run was written")
    return OutputWriteError(f"could not write {str(writer.path)!r} ({reason}): {kept}. Free space (or pick "
                            "another --out) and rerun the same command with --resume: it skips the movies already "
                            "written and predicts the rest")


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="model bundle folder (save_pretrained) or Hub model id")
    p.add_argument("--input", required=True, metavar="PATH",
                   help="CSV / JSONL (id, title, plot, poster_file | poster_path | poster_url), a folder of poster "
                        "images (id = file stem), or a built dataset (folder or Hub id; see --split)")
    p.add_argument("--out", default="predictions.csv", metavar="FILE",
                   help="output file: .csv, .jsonl or .parquet (default predictions.csv)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="movies per forward pass (default 32)")
    p.add_argument("--sort-window", type=int, default=SORT_WINDOW_BATCHES, metavar="B",
                   help="batches read, decoded and sorted by plot length together (a batch pads to its longest plot; "
                        "the posters of two windows are held at most); 1 predicts each batch as read. A process "
                        "of --num-processes predicts its blocks of --batch-size rows as read (default 8)")
    p.add_argument("--by-modality", action="store_true",
                   help="also the plot-only and poster-only scores (columns plot_only.<genre>, poster_only.<genre>)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run: skip ids already in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--split", default="test", help="split of a built dataset (default test)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda when available)")
    p.add_argument("--fast", action="store_true",
                   help="the predictor's fast encoders (mmgcs.fast_path: the text tower in ONNX Runtime, scores within "
                        "1e-4 of the eager towers, which serve whenever the fast one is unavailable); the default "
                        "unless MMGCS_FAST_PATH=0")
    p.add_argument("--eager", action="store_true",
                   help="the eager towers only (the scores of training and evaluation to the bit; slower on CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--num-processes", type=int, default=1, metavar="N",
                   help="predict in N processes (this one and N-1 it starts), each on its share of the cores (or "
                        "its own GPU) and writing its own part beside --out (resumable alone); the parts are merged "
                        "into --out at the end, in input order. Under `accelerate launch -m mmgcs predict` the launcher's processes share the input "
                        "the same way (default 1)")
    p.add_argument("--part", default=None, metavar="K/N", help=argparse.SUPPRESS)  # one process of a sharded run
    if explain_supported():
        p.add_argument("--explain", action="store_true",
                       help="add why each prediction (column `explanation`: the plot words and word pairs behind each "
                            "predicted genre, the plot/poster share, the poster occlusion map; JSON; slower)")


def options_problem(args) -> Optional[str]:
    """The problem with the options, or None."""
    out = Path(args.out)
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        return f"--out {args.out!r}: name a .csv, .jsonl or .parquet file (the format follows the extension)"
    if args.batch_size < 1:
        return "--batch-size must be at least 1"
    if getattr(args, "sort_window", 1) < 1:
        return "--sort-window must be at least 1 (batches)"
    if out.is_dir():
        return f"--out {args.out!r} is a folder; name a file inside it (e.g. {str(out / ('predictions' + out.suffix))!r})"
    if out.exists() and not (args.resume or args.overwrite):
        return f"{args.out!r} exists: pass --resume to continue it, --overwrite to replace it, or another --out"
    if args.resume and args.overwrite:
        return "--resume and --overwrite contradict each other; pick one"
    if getattr(args, "fast", False) and getattr(args, "eager", False):
        return "--fast and --eager contradict each other; pick one"
    try:
        fast_path_setting()
    except ValueError as e:
        return str(e)
    unwritable = unwritable_file(out)  # now, not after loading the model and predicting every movie
    return f"--out {args.out!r}: {unwritable}" if unwritable else None


def main(args) -> int:
    problem = options_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    predictor = load_predictor(args)
    startup = process_age()
    stats = None if predictor is None else run_predict(predictor, args, Path(args.out), args.resume)
    if stats is None:
        return 2
    print(f"{stats.written:,} movies written to {args.out} ({stats.errors:,} with an error"
          + (f", {stats.skipped:,} already there" if args.resume else "")
          + f") in {stats.seconds:.1f} s: {stats.per_second:,.1f} movies/s; start-up {startup:.1f} s (imports, "
          f"model load, {_encoders(predictor)})")
    if stats.duplicate_ids:
        print(duplicates_warning(stats), file=sys.stderr)
    return 0


def load_predictor(args, device: Optional[str] = None) -> Optional[Predictor]:
    """The predictor of --model on `device` (else --device, else cuda when available), its fast encoders built (the
    start-up, not the first batch, pays for them); None, with the error printed, when the model cannot be loaded."""
    try:
        model = load_model(args.model, device or args.device)
    except ModelNotFoundError as e:
        print(f"error: could not load the model from {args.model!r}: {e.cause}", file=sys.stderr)
        return None
    predictor = Predictor(model, fast=use_fast_path(args))
    warm_up(predictor)
    return predictor


def use_fast_path(args) -> bool:
    """--fast / --eager, else `MMGCS_FAST_PATH` (default 1: the text tower in ONNX Runtime and the fast image
    encoder, scores within 1e-4 of the eager towers; each falls back to its eager tower where it does not apply)."""
    if getattr(args, "eager", False):
        return False
    return bool(getattr(args, "fast", False)) or fast_path_setting()


def warm_up(predictor: Predictor) -> None:
    """One made-up movie through the one predict path: the fast encoders are exported, built and checked against
    the eager towers here (tens of seconds for mpnet's ONNX export), not inside the first window's time."""
    model = predictor.model
    plot = "A warm-up plot: a detective hunts a killer through the rain." if model.text_tower is not None else None
    poster = PIL.Image.new("RGB", (200, 300), (90, 90, 90)) if model.image_tower is not None else None
    if plot is not None or poster is not None:
        predictor.predict(plot=plot, poster=poster)


def process_age() -> float:
    """Seconds since this process started: its imports, the model load and the warm-up (the run's start-up)."""
    return max(0.0, time.time() - psutil.Process().create_time())


def run_predict(predictor: Predictor, args, out: Path, resume: bool, shard: Optional[Shard] = None,
                progress: Optional[bool] = None) -> Optional[RunStats]:
    """`predict_file` with the command's options into `out`; None, with the error printed, when it fails."""
    try:
        return predict_file(predictor, args.input, out, args.batch_size, args.by_modality, resume, args.split,
                            getattr(args, "explain", False), progress=False if args.no_progress else progress,
                            shard=shard, sort_window=getattr(args, "sort_window", SORT_WINDOW_BATCHES))
    except (OutputMismatch, OutputWriteError) as e:
        print(f"error: {e}", file=sys.stderr)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: cannot read --input {args.input!r}: {e}", file=sys.stderr)
    return None


def _encoders(predictor: Predictor) -> str:
    fast = predictor.fast
    if fast is None:
        return "eager towers"
    return f"text tower: {fast.text_kind()}, image tower: {fast.image_kind()}"


def duplicates_warning(stats: RunStats) -> str:
    named = ", ".join(map(repr, stats.named_duplicates))
    more = f" and {stats.duplicate_ids - len(stats.named_duplicates):,} more" if stats.duplicate_ids > len(stats.named_duplicates) else ""
    return (f"warning: {stats.duplicate_ids:,} id(s) occur on more than one row of the input ({named}{more}); each "
            "row is predicted on its own, and the column input_row says which input row each output row is")


__all__ = ["OutputWriteError", "OutputWriter", "RunStats", "add_arguments", "duplicates_warning",
           "explain_supported", "load_predictor", "main", "output_columns", "predict_file", "predict_rows",
           "run_predict", "written_ids"]
