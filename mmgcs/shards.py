"""A sharded `mmgcs predict` on disk: which input rows each process predicts, its part file and state, and the
merge of the parts into the one output.

Rows are dealt in blocks of the batch size: after the `start` rows the output already holds (an earlier run,
`--resume`), block b goes to part b mod N. Each process therefore predicts exactly the batches one process would
(the same rows side by side, so the same scores to the bit), and the merge restores input order by taking the
blocks back in turn, without reading the input again.

Part i of N of `preds.csv` is `preds.part-0000i-of-0000N.csv` (the output's format, resumed like the output), with
`preds.part-0000i-of-0000N.state.json` beside it: written when the part starts (start, block) and again when it
is complete (its rows, the input's rows, the run's counts). The merge takes the output's `start` rows, then the
parts' blocks in turn, into `<out>.merging`, which replaces the output only once complete; the parts are removed
after that. A part that is missing, unfinished or of the wrong length stops the merge with its name and the
remedy (rerun with `--resume`), and the parts stay.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq

STATE_VERSION = 1
PARQUET_ROWS = 4096  # rows a merged parquet row group holds


class PartsIncomplete(ValueError):
    """A part cannot be merged (missing, unfinished, of another run); the message names it and the remedy."""


@dataclass(frozen=True)
class Shard:
    """Part `index` of `count`: the rows after `start`, dealt in blocks of `block`, whose block number is `index`
    modulo `count`."""

    index: int
    count: int
    start: int = 0
    block: int = 32

    def owns(self, row: int) -> bool:
        return row >= self.start and self.block_of(row) % self.count == self.index

    def block_of(self, row: int) -> int:
        return (row - self.start) // self.block

    def rows(self, input_rows: int) -> int:
        """How many of `input_rows` rows are this part's."""
        return part_rows(input_rows - self.start, self.block, self.count, self.index)


def part_rows(rows: int, block: int, count: int, index: int) -> int:
    full, rest = divmod(max(rows, 0), block)
    blocks = full // count + (index < full % count)
    return blocks * block + (rest if full % count == index else 0)


@dataclass
class PartState:
    """What a part's process wrote of it (`<part>.state.json`)."""

    index: int
    count: int
    start: int
    block: int
    complete: bool = False
    rows: int = 0  # rows in the part file
    input_rows: int = 0  # rows of the whole input (every process reads it all)
    written: int = 0  # predicted by this process's last run
    errors: int = 0
    skipped: int = 0  # already in the part (--resume)
    seconds: float = 0.0  # predicting
    startup_seconds: float = 0.0  # from the process's start to the model ready
    ready_at: float = 0.0  # when the model was ready (time.time())
    duplicate_ids: int = 0
    named_duplicates: list[str] = field(default_factory=list)
    version: int = STATE_VERSION


# ---------------------------------------------------------------------------------------------- names
def part_name(out: Path, index: int, count: int) -> str:
    return f"{out.stem}.part-{index:05d}-of-{count:05d}"


def part_path(out: Path, index: int, count: int) -> Path:
    return out.with_name(part_name(out, index, count) + out.suffix)


def state_path(out: Path, index: int, count: int) -> Path:
    return out.with_name(part_name(out, index, count) + ".state.json")


def parts_on_disk(out: Path) -> dict[int, list[Path]]:
    """The part and state files beside `out`, by the process count of the run that made them."""
    suffixes = re.escape(out.suffix) + r"|\.state\.json"
    pattern = re.compile(re.escape(out.stem) + r"\.part-(\d{5})-of-(\d{5})(" + suffixes + ")$")
    found: dict[int, list[Path]] = {}
    for path in sorted(out.parent.glob(glob.escape(out.stem) + ".part-*")):
        match = pattern.match(path.name)
        if match:
            found.setdefault(int(match.group(2)), []).append(path)
    return found


def read_state(out: Path, index: int, count: int) -> Optional[PartState]:
    """The part's state, or None when it has none (or an unreadable one: the part is then started again)."""
    try:
        data = json.loads(state_path(out, index, count).read_text(encoding="utf-8"))
        state = PartState(**data)
    except (OSError, ValueError, TypeError):
        return None
    return state if (state.index, state.count, state.version) == (index, count, STATE_VERSION) else None


def write_state(out: Path, state: PartState) -> None:
    """Atomically (a kill leaves the old state or the new one)."""
    path = state_path(out, state.index, state.count)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(asdict(state)), encoding="utf-8")
    os.replace(tmp, path)


def remove_parts(out: Path, counts: Optional[list[int]] = None) -> None:
    """Remove the parts (and states) of the runs with these process counts (all when None)."""
    for count, paths in parts_on_disk(out).items():
        if counts is None or count in counts:
            for path in paths:
                path.unlink(missing_ok=True)


def parts_problem(out: Path, count: int, resume: bool, overwrite: bool, block: int) -> tuple[Optional[str], list[str]]:
    """(why the run cannot start, or None; warnings), from the parts beside `out` before any process writes."""
    found = parts_on_disk(out)
    if not found or overwrite:
        return None, []
    if not resume:
        names = ", ".join(p.name for paths in found.values() for p in paths[:2])
        return (f"parts of an unfinished sharded run are beside {str(out)!r} ({names}): pass --resume to continue "
                "them, --overwrite to start again, or another --out"), []
    for index in range(count):
        state = read_state(out, index, count)
        if state is not None and state.block != block:
            return (f"{part_path(out, index, count).name} was started with --batch-size {state.block}: resume with "
                    f"--batch-size {state.block} (a part's rows are dealt in blocks of it), or --overwrite"), []
    others = sorted(set(found) - {count})
    return None, [f"warning: parts of a run with {n} processes are beside {str(out)!r} ({found[n][0].name}, ...): "
                  f"not used by this run with {count}; rerun with {n} processes to continue them, or delete them"
                  for n in others]


# ---------------------------------------------------------------------------------------------- merge
@dataclass
class Merged:
    rows: int
    states: list[PartState]


def merge_parts(out: Path, count: int) -> Merged:
    """Merge the `count` complete parts beside `out` (after the `start` rows it already holds) into `out`,
    atomically, then remove the parts. Raises PartsIncomplete, with nothing changed, when a part cannot be merged."""
    states = checked_states(out, count)
    start, block, input_rows = states[0].start, states[0].block, states[0].input_rows
    fmt = FORMATS[out.suffix.lower()]
    parts = [_Rows(fmt, part_path(out, i, count), f"part {i + 1} of {count} ({part_path(out, i, count).name})")
             for i in range(count)]
    kept = [_Rows(fmt, out, f"{out.name} (the rows it held before)")] if start else []
    for rows in kept + parts[1:]:
        if rows.header != parts[0].header:
            raise PartsIncomplete(f"{rows.name} has other columns than {parts[0].name}: the parts and the output "
                                  "must come from one model with the same options; rerun with --overwrite")
    tmp = out.with_name(out.name + ".merging")
    try:
        with fmt.writer(tmp, parts[0].header) as write:
            if kept:
                kept[0].copy(start, write)  # what follows them in that file is a half-written line, if anything
            for b, first in enumerate(range(start, input_rows, block)):
                parts[b % count].copy(min(block, input_rows - first), write)
            for rows in parts:
                rows.finish()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        for rows in kept + parts:
            rows.close()
    remove_parts(out, [count])
    return Merged(input_rows, states)


def checked_states(out: Path, count: int) -> list[PartState]:
    """Every part's final state, all of one run; PartsIncomplete naming the first part that is not."""
    remedy = ("rerun the same command with --resume: it predicts what each unfinished part lacks, then merges (on "
              "several machines, --out must be in a folder they all see)")
    states: list[PartState] = []
    for index in range(count):
        part, state = part_path(out, index, count), read_state(out, index, count)
        if not part.is_file():
            raise PartsIncomplete(f"part {index + 1} of {count} is missing ({part}): {remedy}")
        if state is None or not state.complete:
            raise PartsIncomplete(f"part {index + 1} of {count} ({part}) is unfinished (its process stopped before "
                                  f"the end): {remedy}")
        first = states[0] if states else state
        if (state.start, state.block, state.input_rows) != (first.start, first.block, first.input_rows):
            raise PartsIncomplete(f"part {index + 1} of {count} ({part}) comes from another run than part 1 (another "
                                  "input, --batch-size or earlier output): rerun with --overwrite")
        expected = Shard(index, count, state.start, state.block).rows(state.input_rows)
        if state.rows != expected:
            raise PartsIncomplete(f"part {index + 1} of {count} ({part}) holds {state.rows:,} rows, not the "
                                  f"{expected:,} of its share: rerun with --overwrite")
        states.append(state)
    return states


_END = object()


class _Rows:
    """The rows of one file, as written (JSONL lines, CSV cells, parquet records), taken in order."""

    def __init__(self, fmt: "_Format", path: Path, name: str):
        self.name, self.taken = name, 0
        try:
            self.header, self.rows, self.close = fmt.read(path)
        except (csv.Error, ValueError, OSError, pa.ArrowException) as e:
            raise PartsIncomplete(f"{name} cannot be read ({type(e).__name__}): rerun with --overwrite") from e

    def copy(self, n: int, write) -> None:
        for _ in range(n):
            row = self._next()
            if row is _END:
                raise PartsIncomplete(f"{self.name} ends after {self.taken:,} rows, short of its share: rerun with "
                                      "--overwrite (a part is written only by its own process)")
            write(row)
            self.taken += 1

    def finish(self) -> None:
        if self._next() is not _END:
            raise PartsIncomplete(f"{self.name} holds more than its {self.taken:,} rows: rerun with --overwrite")

    def _next(self):
        try:
            return next(self.rows, _END)
        except (csv.Error, ValueError, OSError, pa.ArrowException) as e:
            raise PartsIncomplete(f"{self.name} cannot be read after {self.taken:,} rows ({type(e).__name__}): "
                                  "rerun with --overwrite") from e


@dataclass
class _Format:
    read: Any  # path -> (header, iterator of rows, close)
    writer: Any  # (tmp path, header) -> a context manager giving write(row)


def _read_jsonl(path: Path):
    f = open(path, "rb")
    # a half-written last line (an interrupted run) has no newline and is not a row
    return None, (line for line in f if line.endswith(b"\n")), f.close


@contextlib.contextmanager
def _jsonl_writer(tmp: Path, header) -> Iterator:
    with open(tmp, "wb") as f:
        yield f.write
        _sync(f)


def _read_csv(path: Path):
    f = open(path, newline="", encoding="utf-8")
    reader = csv.reader(f)
    return next(reader, None), reader, f.close


@contextlib.contextmanager
def _csv_writer(tmp: Path, header) -> Iterator:
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)  # the parts' DictWriter's dialect: the same cells give the same bytes
        if header is not None:
            writer.writerow(header)
        yield writer.writerow
        _sync(f)


def _read_parquet(path: Path):
    file = pq.ParquetFile(path)
    rows = (record for batch in file.iter_batches(batch_size=PARQUET_ROWS) for record in batch.to_pylist())
    return file.schema_arrow, rows, file.close


@contextlib.contextmanager
def _parquet_writer(tmp: Path, schema) -> Iterator:
    pending: list[dict] = []
    with pq.ParquetWriter(tmp, schema) as writer:
        def write(record: dict) -> None:
            pending.append(record)
            if len(pending) >= PARQUET_ROWS:
                writer.write_table(pa.Table.from_pylist(pending, schema=schema))
                pending.clear()
        yield write
        if pending:
            writer.write_table(pa.Table.from_pylist(pending, schema=schema))


def _sync(f) -> None:
    f.flush()
    os.fsync(f.fileno())


FORMATS = {".jsonl": _Format(_read_jsonl, _jsonl_writer), ".csv": _Format(_read_csv, _csv_writer),
           ".parquet": _Format(_read_parquet, _parquet_writer)}

__all__ = ["Merged", "PartState", "PartsIncomplete", "Shard", "merge_parts", "part_path", "parts_on_disk",
           "parts_problem", "read_state", "remove_parts", "state_path", "write_state"]
