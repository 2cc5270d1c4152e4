"""`make train` decides on the run's COMPLETE marker, not on the weights: an interrupted run (model/ saved, no
COMPLETE) is resumed instead of served unfinished."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from engine_helpers import REPO_ROOT


def _dry_run(data, run) -> str:
    # -o: the dataset counts as built and old, so only the train rule is judged.
    report = data / "build_report.json"
    proc = subprocess.run(["make", "-n", "-C", str(REPO_ROOT), f"DATA={data}", f"RUN={run}", "-o", str(report), "train"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_train_resumes_an_interrupted_run_and_skips_a_finished_one(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    (data / "build_report.json").write_text("{}")
    (run / "model").mkdir(parents=True)
    (run / "model" / "model.safetensors").write_bytes(b"weights of an unfinished run")
    assert f"training/train_fusion.py --resume data.path={data} train.output_dir={run}" in _dry_run(data, run)
    (run / "COMPLETE").write_text("{}")  # what a finished run writes last
    assert "train_fusion.py" not in _dry_run(data, run)
