"""`mmgcs predict` over a CSV streams it: the first batch is predicted while most of the file is still unread, the
reader holds a few buffers rather than the file, and bad rows, resume and every reading rule (BOM, bytes that are not
UTF-8, quoted newlines, the line numbers in messages) are those of the whole-file reader it replaced."""

from __future__ import annotations

import csv
import json
import os
import random
import tracemalloc
from pathlib import Path

import pytest

from mmgcs.batch_predict import predict_file, window_rows
from mmgcs.data import sources
from mmgcs.data.records import BuildReport
from mmgcs.inference import Predictor
from mmgcs.testing import tiny_model

GENRES = ["Action", "Comedy", "Drama"]


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor(tiny_model(GENRES, image=False))


class SpyPredictor:
    """The real predictor, noting how far into `watched` the process has read at each batch (via /proc)."""

    def __init__(self, predictor: Predictor, watched: Path):
        self.predictor, self.watched, self.labels = predictor, watched.resolve(), predictor.labels
        self.batches: list[list[str]] = []
        self.options: list[dict] = []
        self.read_at: list[int | None] = []  # file offset of the open reader, None when no reader has it open

    def predict_batch(self, plots, posters, **options):
        self.batches.append(list(plots))
        self.options.append(options)
        self.read_at.append(_open_offset(self.watched))
        return self.predictor.predict_batch(plots, posters, **options)


def _open_offset(path: Path) -> int | None:
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target == str(path):
                return int(Path(f"/proc/self/fdinfo/{fd}").read_text().split("pos:")[1].split()[0])
        except OSError:  # an fd closed while listing
            continue
    return None


def write_movies(path: Path, n: int, bad: dict[int, str] | None = None) -> list[str]:
    """A CSV of `n` plot-only movies (a few quoted plots with a newline inside); `bad` replaces row i's id."""
    bad = bad or {}
    ids = [bad.get(i, str(i)) for i in range(n)]
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "title", "plot"])
        for i, movie_id in enumerate(ids):
            plot = f"a detective hunts a killer {i}" + ("\nin the rain, at night" if i % 7 == 0 else "")
            w.writerow([movie_id, f"Movie {i}", plot])
    return ids


needs_proc = pytest.mark.skipif(not Path("/proc/self/fdinfo").is_dir(), reason="needs Linux /proc to see the offset")


@needs_proc
def test_the_first_batch_is_predicted_before_most_of_the_csv_is_read(predictor, tmp_path):
    source = tmp_path / "movies.csv"
    write_movies(source, 4000)  # ~200 KB: many read buffers
    size = source.stat().st_size
    spy = SpyPredictor(predictor, source)
    stats = predict_file(spy, str(source), tmp_path / "out.csv", batch_size=16, progress=False)
    # one predictor call a window of 8 batches (read, decoded and sorted by length together), in batches of 16
    assert stats.written == 4000 and len(spy.batches) == -(-4000 // window_rows(16)) == 32
    assert {options["batch_size"] for options in spy.options} == {16}
    first = spy.read_at[0]
    assert first is not None, "the CSV was not open while predicting: it was read whole before the first batch"
    assert first < size / 10, (first, size)
    # read on as windows went by (the next window is read while one is predicted: the file is closed, read to its
    # end, while the last one or two are predicted)
    later = [offset for offset in spy.read_at[1:] if offset is not None]
    assert later and max(later) > first and spy.read_at.index(None) >= len(spy.read_at) - 2


def test_reading_a_csv_holds_buffers_not_the_file(tmp_path):
    source = tmp_path / "movies.csv"
    write_movies(source, 40_000)  # ~2 MB
    size = source.stat().st_size
    report = BuildReport()
    rows = sources.read_csv(source, "movies", report)
    tracemalloc.start()
    try:
        count = sum(1 for _ in rows)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 40_000 and not report.events
    assert peak < size / 8, (peak, size)  # the whole-file reader held the bytes, the text and its lines (~3x)


def test_bad_rows_come_out_by_id_or_line_and_are_never_dropped(predictor, tmp_path):
    source = tmp_path / "movies.csv"
    ids = write_movies(source, 100, bad={5: "x5", 70: ""})
    out = tmp_path / "out.jsonl"
    stats = predict_file(predictor, str(source), out, batch_size=16, progress=False)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == ids and (stats.written, stats.errors) == (100, 2)
    # where a row ends: the header, 70 rows before row 70 of which 10 span two lines (a quoted newline), its own 2
    assert rows[5]["error"] == "id 'x5' is missing or not an integer (movies.csv:8)"
    assert rows[70]["error"] == "id '' is missing or not an integer (movies.csv:83)"  # no id: the line names it
    assert all(r["error"] is None and r["genres"] is not None for i, r in enumerate(rows) if i not in (5, 70))


def test_resume_over_a_csv_predicts_only_the_rows_not_written(predictor, tmp_path):
    source = tmp_path / "movies.csv"
    write_movies(source, 200, bad={3: "bad"})
    full, part = tmp_path / "full.csv", tmp_path / "part.csv"
    predict_file(predictor, str(source), full, batch_size=32, progress=False)
    lines = full.read_text(encoding="utf-8").splitlines(keepends=True)
    part.write_text("".join(lines[:1 + 90]) + lines[91][:15], encoding="utf-8")  # header, 90 rows, a cut one
    spy = SpyPredictor(predictor, source)
    stats = predict_file(spy, str(source), part, batch_size=32, resume=True, progress=False)
    assert (stats.skipped, stats.written) == (90, 110)
    assert sum(map(len, spy.batches)) == 110  # the rows already written are not predicted again
    assert part.read_text(encoding="utf-8") == full.read_text(encoding="utf-8")


# ------------------------------------------------------------------ the same rows as the whole-file reader
def whole_file_reader(path: Path, source: str, report: BuildReport) -> list:
    """How read_csv read before it streamed: the file's bytes decoded at once, then `splitlines(keepends=True)`."""
    text, bad_bytes = sources._decode(path.read_bytes(), first=True)
    if bad_bytes:
        report.changed(source, None, "invalid_utf8", f"{path.name} has bytes that are not UTF-8; replaced with U+FFFD",
                       path.name)
    csv.field_size_limit(16 * 1024 * 1024)
    return list(sources._csv_movies(path, text.splitlines(keepends=True), source, report))


# pieces that test the decoder and the line splitting: quotes, each line ending, the separators only splitlines
# knows, bytes that are not UTF-8 (one alone, a cut sequence), multi-byte characters that a buffer may cut
PIECES = [b"a", b"b ", b",", b'"', b'""', b"\n", b"\r\n", b"\r", b"\xe2\x80\xa8", b"\x0c", b"\xc2\x85", b"\xff",
          b"\xe2\x82", b"\xc3\xa9", b"\xf0\x9f\x8e\xac", b"12", b"tt7", b"x"]


def _random_csv(rng: random.Random, size: int) -> bytes:
    head = (b"\xef\xbb\xbf" if rng.random() < 0.5 else b"") + b"id,title,plot,genres,poster_path\n"
    body = bytearray()
    while len(body) < size:
        cells = [rng.choice([b"1", b"22", b"x", b""]) + b"".join(rng.choices(PIECES[15:], k=rng.randint(0, 2)))]
        cells += [b"".join(rng.choices(PIECES, k=rng.randint(0, 6))) for _ in range(rng.randint(1, 5))]
        body += b",".join(cells) + rng.choice([b"\n", b"\r\n", b"\r"])
    return head + bytes(body)


def _same_as_whole_file(path: Path) -> None:
    old_report, new_report = BuildReport(), BuildReport()
    try:
        expected = whole_file_reader(path, "s", old_report)
    except ValueError as e:
        with pytest.raises(ValueError) as raised:
            list(sources.read_csv(path, "s", new_report))
        assert str(raised.value) == str(e)
        return
    got = list(sources.read_csv(path, "s", new_report))
    assert got == expected
    assert new_report.events == old_report.events


@pytest.mark.parametrize("seed", range(12))
def test_streaming_reads_what_the_whole_file_reader_read(tmp_path, seed):
    path = tmp_path / "movies.csv"
    path.write_bytes(_random_csv(random.Random(seed), 30_000))  # several of the text reader's 8 KB buffers
    _same_as_whole_file(path)


@pytest.mark.parametrize("cut, ids", [(b"\r\n", [1, 2, 3]), (b"\xe2\x80\xa8", [1, 2, 3]), (b"\xc3\xa9", [1]),
                                     (b"\xf0\x9f\x8e\xac", [1])])
def test_a_line_ending_or_character_cut_by_the_read_buffer_reads_the_same(tmp_path, cut, ids):
    path = tmp_path / "movies.csv"
    head = b"\xef\xbb\xbfid,title,plot\n"
    for shift in range(-4, 4):  # the piece straddles the 8 KB buffer boundary at every offset
        filler = 8192 - len(head) - len(b'1,T,"') + shift
        path.write_bytes(head + b'1,T,"' + b"p" * filler + cut + b'q"' + cut + b"2,U,plot" + cut + b"3,V,w\xff\n")
        _same_as_whole_file(path)
    rows = list(sources.read_csv(path, "s", BuildReport()))
    assert [r.id for r in rows] == ids  # U+2028 ends a line, as splitlines did; é and 🎬 stay in the plot
