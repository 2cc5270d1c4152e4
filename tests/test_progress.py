"""Progress on long steps (mmgcs.progress): a bar with rate and ETA, one line per interval in a log, silent under
MMGCS_QUIET and on every process but a node's first; featurizing plots and posters reports through it."""

from __future__ import annotations

import io

import pytest

import mmgcs.progress as P
from mmgcs.features import compute_features
from mmgcs.testing import tiny_model
from test_features_store import _posters, make_split


def _run(bar_updates, **kwargs) -> str:
    stream = io.StringIO()  # not a TTY: the log format
    with P.progress(total=sum(bar_updates), desc="featurizing plots", unit="plots", stream=stream, **kwargs) as bar:
        for n in bar_updates:
            bar.update(n)
    return stream.getvalue()


def test_log_output_is_plain_lines_with_count_and_rate(monkeypatch):
    monkeypatch.delenv(P.QUIET_ENV, raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    out = _run([3, 4, 5])
    assert "\r" not in out
    lines = out.splitlines()
    assert lines and all(line.startswith("featurizing plots: ") for line in lines)
    assert "12/12 plots" in lines[-1] and "plots/s" in lines[-1]


@pytest.mark.parametrize("env", [{P.QUIET_ENV: "1"}, {P.QUIET_ENV: "true"}, {"LOCAL_RANK": "1"}])
def test_quiet_and_other_ranks_print_nothing(monkeypatch, env):
    monkeypatch.delenv(P.QUIET_ENV, raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert not P.progress_enabled()
    assert _run([2, 2]) == ""


def test_set_quiet_round_trip(monkeypatch):
    monkeypatch.delenv(P.QUIET_ENV, raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    P.set_quiet(True)
    assert not P.progress_enabled()
    P.set_quiet(False)
    assert P.progress_enabled()
    assert P.progress_enabled({"LOCAL_RANK": "0", P.QUIET_ENV: "0"})


@pytest.mark.filterwarnings("ignore::mmgcs.features.FeatureCacheWarning")  # the corrupt poster
@pytest.mark.parametrize("modality, what", [("text", "plots"), ("image", "posters")])
def test_featurizing_reports_every_row(monkeypatch, capsys, modality, what):
    monkeypatch.delenv(P.QUIET_ENV, raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    split = make_split()
    _, mask = compute_features(tiny_model(), split, modality, batch_size=2, num_workers=0)
    err = capsys.readouterr().err
    # every row with an input is counted, undecodable posters included (they were looked at)
    tried = int(mask.sum()) if modality == "text" else sum(p is not None for p in _posters())
    assert f"featurizing {what}: {tried}/{tried} {what}" in err


def test_featurizing_is_silent_when_quiet(monkeypatch, capsys):
    monkeypatch.setenv(P.QUIET_ENV, "1")
    compute_features(tiny_model(), make_split(), "text", batch_size=2, num_workers=0)
    assert "featurizing" not in capsys.readouterr().err
