"""`make demo` / `make train` away from ../shared/data: one message saying what data is needed, within seconds,
before anything is installed or built (scripts/demo_data.py decides where the movies come from)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest

from engine_helpers import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import demo_data  # noqa: E402


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("goal", ["demo", "train"])
def test_without_data_make_stops_at_once_with_the_remedy(tmp_path, goal):
    data, run = tmp_path / "data", tmp_path / "run"
    start = time.monotonic()
    proc = subprocess.run(
        ["make", "-C", str(REPO_ROOT), goal, f"SHARED={tmp_path / 'nowhere'}", f"DATA={data}", f"RUN={run}",
         "HF_HUB_OFFLINE=1"], capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0
    assert time.monotonic() - start < 15
    assert "no movie data" in proc.stderr and "make demo SHARED=" in proc.stderr and "tmdb5000/movies.jsonl" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "pip install" not in proc.stdout and not data.exists() and not run.exists()  # nothing installed or built


def test_the_check_names_the_source(tmp_path, capsys, monkeypatch):
    assert demo_data.readme_dataset_id(REPO_ROOT / "README.md") == "mmgcs/tmdb-movie-genres"
    (tmp_path / "tmdb5000").mkdir()
    (tmp_path / "tmdb5000" / "movies.jsonl").write_text("{}\n")
    assert demo_data.check(tmp_path, REPO_ROOT / "README.md") == 0
    assert capsys.readouterr().out.strip() == "shared"
    monkeypatch.setattr(demo_data, "hub_answers", lambda timeout=3.0: True)  # elsewhere, with a Hub that answers
    assert demo_data.check(tmp_path / "nowhere", REPO_ROOT / "README.md") == 0
    assert capsys.readouterr().out.strip() == "hub:mmgcs/tmdb-movie-genres"
    monkeypatch.undo()  # the real probe again, told to stay offline
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert demo_data.check(tmp_path / "nowhere", REPO_ROOT / "README.md") == 2
    assert "HF_HUB_OFFLINE=0" in capsys.readouterr().err
