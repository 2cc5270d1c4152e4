"""`mmgcs predict` under hostile input and outputs (issue 18), in process on a tiny text model: one bad row (nested
100,000 deep, a 20 MB CSV field, a plot over the cap) is that row's error and every other row is predicted; an
--out that cannot be written is refused before the model loads; a write that fails mid-run says what was kept and
leaves no empty output to block the rerun; duplicate ids are told apart by `input_row` and warned of."""

from __future__ import annotations

import errno
import json
import os
from argparse import Namespace
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mmgcs import batch_predict
from mmgcs.batch_predict import OutputWriteError, predict_file, predict_rows
from mmgcs.data.inputs import Movie
from mmgcs.data.records import MAX_PLOT_CHARS
from mmgcs.inference import Predictor
from mmgcs.models.classifier import GenreClassifier
from mmgcs.testing import tiny_model

GENRES = ["Action", "Comedy", "Drama"]
DEEP = "[" * 100_000 + "]" * 100_000


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor(tiny_model(GENRES, image=False))


def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("batch_size", [1, 32])
def test_a_deeply_nested_line_is_its_rows_error_and_the_rest_are_predicted(predictor, tmp_path, batch_size):
    source = _jsonl(tmp_path / "movies.jsonl", [json.dumps({"id": 1, "plot": "a heist in the city"}),
                                                '{"id": 2, "plot": ' + DEEP + "}",
                                                json.dumps({"id": 3, "plot": "a ghost in the house"})])
    out = tmp_path / "out.jsonl"
    stats = predict_file(predictor, str(source), out, batch_size=batch_size, progress=False)
    rows = _rows(out)
    assert (stats.written, stats.errors) == (3, 1)
    assert [(r["id"], r["input_row"]) for r in rows] == [("1", "movies.jsonl:1"), ("2", "movies.jsonl:2"),
                                                        ("3", "movies.jsonl:3")]
    assert "nests too deeply" in rows[1]["error"] and rows[1]["genres"] is None
    assert rows[0]["error"] is None and rows[2]["error"] is None and rows[2]["genres"] is not None


def test_a_20_mb_csv_field_and_an_over_cap_plot_are_their_rows_errors(predictor, tmp_path):
    source = tmp_path / "movies.csv"
    with open(source, "w", encoding="utf-8", newline="") as f:
        f.write("id,title,plot\n1,A,a heist in the city\n")
        f.write("2,B," + "x" * (20 * 2**20) + "\n")
        f.write(f"3,C,{'y' * (MAX_PLOT_CHARS + 1)}\n4,D,{'z' * MAX_PLOT_CHARS}\n")
    out = tmp_path / "out.csv"
    stats = predict_file(predictor, str(source), out, batch_size=32, progress=False)
    rows = {r["id"]: r for r in _rows_csv(out)}
    assert list(rows) == ["1", "2", "3", "4"] and (stats.written, stats.errors) == (4, 2)
    assert "line 3 is 20.0 MB long" in rows["2"]["error"]
    assert "the plot is 10,001 characters long; the limit is 10,000" in rows["3"]["error"]
    assert rows["1"]["error"] == rows["4"]["error"] == "" and rows["4"]["genres"]


def _rows_csv(path: Path) -> list[dict]:
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_a_built_datasets_over_cap_plot_is_refused_before_the_tokenizer(predictor):
    movies = [Movie(id="1", plot="w" * (MAX_PLOT_CHARS + 1)), Movie(id="2", plot="a short plot")]
    long, short = predict_rows(predictor, movies, by_modality=False)
    assert long == {"error": "the plot is 10,001 characters long; the limit is 10,000. Give a summary of a paragraph "
                             "or two, like the plots the model was trained on"}
    assert "scores" in short


def test_duplicate_ids_are_told_apart_warned_of_and_resumed_exactly(predictor, tmp_path, capsys):
    plots = ["a heist", "a ghost", "a wedding", "a war", "a dog"]
    source = _jsonl(tmp_path / "movies.jsonl", [json.dumps({"id": i, "plot": p})
                                                for i, p in zip([7, 8, 7, 9, 7], plots)])
    full = tmp_path / "full.jsonl"
    stats = predict_file(predictor, str(source), full, batch_size=2, progress=False)
    rows = _rows(full)
    assert [(r["id"], r["input_row"]) for r in rows][::2] == [("7", "movies.jsonl:1"), ("7", "movies.jsonl:3"),
                                                              ("7", "movies.jsonl:5")]
    assert rows[0]["Action"] != rows[2]["Action"]  # different plots, different scores: input_row says which
    assert (stats.duplicate_ids, stats.named_duplicates) == (1, ["7"])
    assert "1 id(s) occur on more than one row of the input ('7')" in batch_predict.duplicates_warning(stats)
    # Resuming after the first 3 rows predicts the 4th and 5th, including the third 7 (its id is already there).
    part = tmp_path / "part.jsonl"
    part.write_text("".join(line + "\n" for line in full.read_text(encoding="utf-8").splitlines()[:3]))
    stats = predict_file(predictor, str(source), part, batch_size=2, resume=True, progress=False)
    assert (stats.skipped, stats.written) == (3, 2)
    assert _rows(part) == rows


def test_seen_ids_finds_every_repeat_in_its_set_and_its_sorted_array():
    seen = batch_predict.SeenIds()
    seen.RECENT = 64  # many moves from the set to the array
    ids = [f"tt{i:07d}" for i in range(1000)] + [str(i) for i in range(1000)]
    assert not any(seen.add(i) for i in ids)
    assert seen.older.size > 1900 and bool((seen.older[1:] > seen.older[:-1]).all())
    assert all(seen.add(i) for i in reversed(ids))
    assert not seen.add("never met")


def test_the_duplicate_warning_names_a_bounded_list():
    stats = batch_predict.RunStats(duplicate_ids=25, named_duplicates=[str(i) for i in range(10)])
    warning = batch_predict.duplicates_warning(stats)
    assert "'9'" in warning and "and 15 more" in warning and "input_row" in warning


# ------------------------------------------------------------------------------------------- the output
def _args(out: Path, **kw) -> Namespace:
    base = dict(model="unused", input="unused", out=str(out), batch_size=32, by_modality=False, resume=False,
                overwrite=False, split="test", device="cpu", fast=False, no_progress=True)
    return Namespace(**{**base, **kw})


def test_an_unwritable_out_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(GenreClassifier, "from_pretrained",
                        lambda *a, **k: pytest.fail("the model was loaded before --out was checked"))
    (tmp_path / "folder.csv").mkdir()
    (tmp_path / "file").write_text("x")
    cases = [(tmp_path / "folder.csv", "is a folder; name a file inside it"),
             (tmp_path / "file" / "p.parquet", "is a file, not a folder")]
    for out, expected in cases:
        assert batch_predict.main(_args(out, overwrite=True)) == 2
        assert expected in capsys.readouterr().err
    assert not (tmp_path / "file" / "p.parquet.partial").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(GenreClassifier, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert batch_predict.main(_args(folder / "p.csv")) == 2
    finally:
        folder.chmod(0o755)
    assert "Permission denied" in capsys.readouterr().err


def test_a_full_disk_probe_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(GenreClassifier, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    real_fsync = os.fsync

    def full(fd):  # what a write to a full disk raises, for the probe file alone
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    assert batch_predict.main(_args(tmp_path / "p.csv")) == 2
    monkeypatch.setattr(os, "fsync", real_fsync)
    err = capsys.readouterr().err
    assert "No space left on device" in err and "free space" in err
    assert list(tmp_path.iterdir()) == []  # the probe is removed


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_disk_that_fills_mid_run_says_what_was_kept_and_how_to_resume(predictor, tmp_path):
    source = _jsonl(tmp_path / "movies.jsonl", [json.dumps({"id": i, "plot": "a heist"}) for i in range(5)])
    out = tmp_path / "full.csv"
    out.symlink_to("/dev/full")  # every write fails with ENOSPC
    with pytest.raises(OutputWriteError) as raised:
        predict_file(predictor, str(source), out, batch_size=2, progress=False)
    message = str(raised.value)
    assert "No space left on device" in message and "--resume" in message and "no movie of this run" in message
    assert out.is_symlink() and Path("/dev/full").exists()  # nothing but our own empty output is ever removed


def test_a_parquet_write_failure_keeps_the_previous_output(predictor, tmp_path, monkeypatch):
    # 40 rows: after the 2 kept, 38 in windows of 16 rows (8 batches of 2), so a later window's write fails
    source = _jsonl(tmp_path / "movies.jsonl", [json.dumps({"id": i, "plot": "a heist"}) for i in range(40)])
    out = tmp_path / "p.parquet"
    predict_file(predictor, str(source), out, batch_size=2, progress=False)
    before = pq.read_table(out).slice(0, 2)
    pq.write_table(before, out)
    calls = []

    def fail_on_the_second(self, table, *a, **k):
        calls.append(1)
        if len(calls) == 3:  # the copied rows, the first new window, then the disk fills
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, table, *a, **k)

    real = pq.ParquetWriter.write_table
    monkeypatch.setattr(pq.ParquetWriter, "write_table", fail_on_the_second)
    with pytest.raises(OutputWriteError, match="is as it was before this run"):
        predict_file(predictor, str(source), out, batch_size=2, resume=True, progress=False)
    monkeypatch.undo()
    assert pq.read_table(out).equals(before) and not out.with_name(out.name + ".partial").exists()


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_a_run_that_fails_before_any_row_leaves_no_output_to_block_the_rerun(predictor, tmp_path, suffix):
    source = _jsonl(tmp_path / "movies.jsonl", [json.dumps({"id": 1, "plot": "a heist"})])

    class Broken:
        labels = predictor.labels

        def predict_batch(self, *a, **k):
            raise RuntimeError("the device went away")

    out = tmp_path / f"p{suffix}"
    with pytest.raises(RuntimeError):
        predict_file(Broken(), str(source), out, progress=False)
    assert list(tmp_path.iterdir()) == [source]  # a rerun needs no --overwrite
    stats = predict_file(predictor, str(source), out, progress=False)
    assert stats.written == 1 and out.is_file()
