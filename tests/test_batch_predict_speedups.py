"""`mmgcs predict` at speed (issue 20): windows sorted by plot length, the next window read in a thread, the fast
path built at start-up, the start-up reported apart, the progress bar's policy. Speed itself is measured by
benchmarks/bench_predict.py --rate-movies, never here."""

import json
import threading
import time
from pathlib import Path

import pytest

from mmgcs import batch_predict
from mmgcs.batch_predict import load_predictor, options_problem, predict_file, window_rows
from mmgcs.cli import build_parser
from mmgcs.inference import Predictor
from mmgcs.testing import tiny_model

GENRES = ["Action", "Comedy", "Drama"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("speed") / "model"
    tiny_model(GENRES, image=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """40 plots whose lengths go up and down, so batches in input order pad a lot."""
    path = tmp_path_factory.mktemp("movies") / "movies.jsonl"
    rows = [{"id": i, "title": f"Movie {i}", "plot": "spy " * (1 + (i * 7) % 11)}
            for i in range(40)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def args_of(*argv):
    return build_parser().parse_args(["predict", *map(str, argv)])


def padded_tokens(predictor: Predictor, monkeypatch) -> list:
    """Record the (rows, tokens) of every batch the predictor's towers run."""
    shapes, run = [], Predictor.run

    def spy(self, batch, by_modality=False):
        shapes.append(tuple(batch["input_ids"].shape))
        return run(self, batch, by_modality)

    monkeypatch.setattr(Predictor, "run", spy)
    return shapes


def test_windows_pad_less_and_keep_the_input_order(bundle, source, tmp_path, monkeypatch):
    predictor = Predictor(tiny_model(GENRES, image=False))
    shapes = padded_tokens(predictor, monkeypatch)
    outs = {}
    for window in (1, 4):
        shapes.clear()
        out = tmp_path / f"w{window}.jsonl"
        predict_file(predictor, str(source), out, batch_size=4, progress=False, sort_window=window)
        outs[window] = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
        assert all(rows <= 4 for rows, _ in shapes) and sum(rows for rows, _ in shapes) == 40
        outs[window, "tokens"] = sum(rows * tokens for rows, tokens in shapes)
    assert outs[4, "tokens"] < 0.8 * outs[1, "tokens"]  # sorted within 16 rows, the batches pad far less
    assert [r["id"] for r in outs[4]] == [r["id"] for r in outs[1]] == [str(i) for i in range(40)]
    for a, b in zip(outs[1], outs[4]):  # each row's own scores, whatever its batch-mates (float rounding apart)
        assert a["input_row"] == b["input_row"] and all(abs(a[g] - b[g]) <= 2e-6 for g in GENRES)
    assert window_rows(32) == 256 and window_rows(4, 1) == 4


def test_the_next_window_is_read_while_one_is_predicted(source, tmp_path, monkeypatch):
    events, real_inputs = [], batch_predict.row_inputs

    def inputs(movie):
        events.append(("read", movie.id, threading.current_thread().name))
        return real_inputs(movie)

    class Slow:
        labels = GENRES

        def __init__(self):
            self.predictor = Predictor(tiny_model(GENRES, image=False))

        def predict_batch(self, plots, posters, **options):
            time.sleep(0.3)  # the reader has time to read the next window meanwhile
            events.append(("predicted", len(plots), threading.current_thread().name))
            return self.predictor.predict_batch(plots, posters, **options)

    monkeypatch.setattr(batch_predict, "row_inputs", inputs)
    stats = predict_file(Slow(), str(source), tmp_path / "out.csv", batch_size=4, sort_window=2, progress=False)
    assert stats.written == 40
    assert all(name.startswith("mmgcs-read") for kind, _, name in events if kind == "read")
    # while the first window (8 rows) was predicted, the second was read, and never more: two windows at most
    first = next(i for i, e in enumerate(events) if e[0] == "predicted")
    assert sum(1 for e in events[:first] if e[0] == "read") == 16


def test_the_fast_path_is_the_default_and_built_at_start_up(bundle, source, monkeypatch):
    monkeypatch.delenv("MMGCS_FAST_PATH", raising=False)
    fast = load_predictor(args_of("--model", bundle, "--input", source, "--device", "cpu")).fast
    assert fast is not None and fast.text_kind() == "onnxruntime"  # exported and checked before any window
    assert load_predictor(args_of("--model", bundle, "--input", source, "--eager")).fast is None
    monkeypatch.setenv("MMGCS_FAST_PATH", "0")
    assert load_predictor(args_of("--model", bundle, "--input", source)).fast is None
    assert load_predictor(args_of("--model", bundle, "--input", source, "--fast")).fast is not None


def test_contradicting_or_bad_speed_options_are_refused(tmp_path, monkeypatch):
    out = tmp_path / "p.csv"
    assert "--fast and --eager" in options_problem(args_of("--model", "m", "--input", "i", "--out", out, "--fast",
                                                           "--eager"))
    assert "--sort-window must be at least 1" in options_problem(args_of("--model", "m", "--input", "i", "--out", out,
                                                                         "--sort-window", "0"))
    monkeypatch.setenv("MMGCS_FAST_PATH", "maybe")
    assert "MMGCS_FAST_PATH='maybe'" in options_problem(args_of("--model", "m", "--input", "i", "--out", out))


def test_the_run_line_reports_start_up_apart_and_the_bar_follows_the_policy(bundle, source, tmp_path, monkeypatch,
                                                                             capsys):
    monkeypatch.delenv("MMGCS_QUIET", raising=False)
    out = tmp_path / "p.csv"
    assert batch_predict.main(args_of("--model", bundle, "--input", source, "--out", out, "--batch-size", 4)) == 0
    captured = capsys.readouterr()
    assert "40 movies written" in captured.out and "movies/s; start-up" in captured.out
    assert "text tower: onnxruntime" in captured.out
    assert "predict: 40/40 movie" in captured.err  # stderr is not a terminal here: plain lines, rate and ETA
    monkeypatch.setenv("MMGCS_QUIET", "1")  # what --quiet sets
    assert batch_predict.main(args_of("--model", bundle, "--input", source, "--out", out, "--overwrite")) == 0
    assert "predict:" not in capsys.readouterr().err
