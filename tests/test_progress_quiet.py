"""Progress on the long steps beyond featurizing (issue 20): `mmgcs evaluate`'s scoring and the prefix cache report
through mmgcs.progress (a bar with rate and ETA on a terminal, a line per interval in a log), and every command that
runs long steps takes `--quiet`, which silences the policy for the process and those it starts."""

from __future__ import annotations

import io
import json
import os
import re
import sys

import pytest

import mmgcs.progress as P
from mmgcs import cli, engine, sweep
from mmgcs import evaluate as evaluation
from mmgcs.data.inputs import Movie, Movies
from mmgcs.testing import tiny_model

LABELS = ["Action", "Comedy", "Drama"]
N_MOVIES = 8


class Terminal(io.StringIO):
    """stderr as a terminal (a TTY): tqdm redraws the bar in place."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def policy(monkeypatch):
    """The default policy (bars on), restored after the test whatever `--quiet` set."""
    monkeypatch.setenv(P.QUIET_ENV, "0")
    monkeypatch.delenv("LOCAL_RANK", raising=False)


@pytest.fixture(scope="module")
def model():
    return tiny_model(LABELS, image=False)


def _data() -> Movies:
    rows = [Movie(id=i, plot=f"plot {i}: a heist and a ghost", poster=None, genres=[LABELS[i % 3]])
            for i in range(N_MOVIES)]
    return Movies(rows=rows, kind="dataset", vocabulary=LABELS)


def test_scoring_on_a_terminal_draws_a_bar_with_rate_and_eta(policy, monkeypatch, model):
    monkeypatch.setattr(sys, "stderr", Terminal())
    evaluation.evaluate(model, _data(), batch_size=2, n_boot=0)
    out = sys.stderr.getvalue()
    assert "\r" in out  # redrawn in place
    last = out.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("scoring") and f"{N_MOVIES}/{N_MOVIES}" in last
    assert re.search(r"\d\d:\d\d<\d\d:\d\d", last), last  # elapsed < remaining (the ETA)
    assert re.search(r"movies/s|s/movies", last), last  # the rate


@pytest.mark.parametrize("interval, most_lines", [(0.0, N_MOVIES // 2 + 2), (3600.0, 2)])
def test_scoring_in_a_log_prints_one_plain_line_per_interval(policy, monkeypatch, model, interval, most_lines):
    monkeypatch.setattr(P, "LOG_INTERVAL_S", interval)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a TTY: a log
    evaluation.evaluate(model, _data(), batch_size=2, n_boot=0)
    lines = sys.stderr.getvalue().splitlines()
    assert "\r" not in sys.stderr.getvalue()
    assert all(line.startswith("scoring: ") and "movies/s" in line for line in lines), lines
    # a line when the bar opens and when it closes, and one per interval between: each chunk with no interval
    assert 2 <= len(lines) <= most_lines, lines
    assert f"{N_MOVIES}/{N_MOVIES} movies" in lines[-1]


def test_mmgcs_evaluate_quiet_prints_no_bar(policy, model, tmp_path, capsys):
    bundle, source = tmp_path / "model", tmp_path / "movies"
    model.save_pretrained(bundle)
    source.mkdir()
    rows = [{"id": i, "plot": f"plot {i}: a heist", "genres": [LABELS[i % 3]]} for i in range(N_MOVIES)]
    (source / "movies.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    argv = ["evaluate", "--model", str(bundle), "--data", str(source), "--bootstrap", "0"]
    cli.main(argv)
    assert f"scoring: {N_MOVIES}" in capsys.readouterr().err  # a log (pytest's stderr): the plain line
    cli.main([*argv, "--quiet"])
    captured = capsys.readouterr()
    assert "scoring" not in captured.err and "Drama" in captured.out  # the report (its genre table), no bar
    assert not P.progress_enabled()


def test_the_prefix_cache_reports_its_rows(policy, capsys):
    from prefix_helpers import text_model, tiny_split

    from mmgcs.features.prefix import compute_prefix

    split = tiny_split()
    compute_prefix(text_model("bert"), split, batch_size=3)
    assert f"caching the text prefix: {len(split)}/{len(split)} plots" in capsys.readouterr().err
    P.set_quiet()
    compute_prefix(text_model("bert"), split, batch_size=3)
    assert "caching" not in capsys.readouterr().err


def test_mmgcs_predict_quiet_reaches_the_policy_and_the_parts_it_starts(policy, monkeypatch):
    seen = {}

    def fake_main(args):
        seen.update(quiet=os.environ.get(P.QUIET_ENV), no_progress=args.no_progress)
        return 0

    monkeypatch.setattr(cli.batch_predict, "main", fake_main)
    monkeypatch.setattr(cli.sharded_predict, "sharded", lambda args: False)
    assert cli.main(["predict", "--model", "m", "--input", "in.csv"]) == 0
    assert seen == {"quiet": "0", "no_progress": False}
    assert cli.main(["predict", "--model", "m", "--input", "in.csv", "--quiet"]) == 0
    # the environment variable: what the processes a sharded predict starts inherit
    assert seen == {"quiet": "1", "no_progress": True}


def test_the_training_scripts_and_the_sweep_take_quiet(policy, tmp_path):
    assert engine.build_parser().parse_intermixed_args(["--quiet", "data.path=x"]).quiet
    assert not engine.build_parser().parse_intermixed_args([]).quiet
    with pytest.raises(SystemExit):  # the sweep file is missing: the flag was applied before that
        sweep.main(["--config", str(tmp_path / "missing.yaml"), "--quiet"])
    assert not P.progress_enabled()
