"""The bundle swap survives a kill at any step: afterwards the folder holds the old bundle or the new one, never
none, and the next run (or --resume) repairs what the kill left."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine_helpers import REPO_ROOT, build_dataset, tiny_overrides

from mmgcs.runs import swap
from mmgcs.engine import main


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no handler on the way may swallow it."""


def _write(content: str):
    def write(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "model.safetensors").write_text(content)
        (tmp / "config.json").write_text(json.dumps({"v": content}))

    return write


def _steps(monkeypatch, kill_at=None) -> list:
    """Count the swap's disk changes (renames, removals, the completion marker); raise Killed at ``kill_at``."""
    seen = []

    def wrap(name, fn):
        def step(*args, **kwargs):
            seen.append(name)
            if kill_at is not None and len(seen) == kill_at:
                raise Killed(name)
            return fn(*args, **kwargs)

        monkeypatch.setattr(swap, name, step)

    for name in ("_rename", "_remove_tree", "_remove_file", "write_json_atomic"):
        wrap(name, getattr(swap, name))
    return seen


def _state(folder: Path) -> str:
    leftovers = sorted(p.name for p in folder.parent.iterdir() if p.name != folder.name)
    assert leftovers == [], leftovers
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    return (folder / "model.safetensors").read_text()


def _count_steps(tmp_path) -> int:
    folder = tmp_path / "count" / "model"
    folder.parent.mkdir()
    swap.replace_folder(folder, _write("old"))
    with pytest.MonkeyPatch.context() as mp:
        seen = _steps(mp)
        swap.replace_folder(folder, _write("new"))
    return len(seen)


def test_a_kill_at_every_step_of_the_swap_leaves_the_old_or_the_new_bundle(tmp_path, monkeypatch):
    total = _count_steps(tmp_path)
    assert total >= 6  # remove tmp, marker, old→aside, tmp→place, marker off, aside off (plus recovery's checks)
    outcomes = []
    for kill_at in range(1, total + 1):
        folder = tmp_path / f"kill-{kill_at}" / "model"
        folder.parent.mkdir()
        swap.replace_folder(folder, _write("old"))
        with pytest.MonkeyPatch.context() as mp:
            seen = _steps(mp, kill_at)
            with pytest.raises(Killed):
                swap.replace_folder(folder, _write("new"))
        marked = "write_json_atomic" in seen[:-1]  # the completion marker was on disk before the kill
        swap.recover_folder(folder)
        got = _state(folder)
        assert got == ("new" if marked else "old"), (kill_at, seen)
        outcomes.append(got)
    assert {"old", "new"} == set(outcomes)


def test_a_kill_while_writing_the_new_bundle_keeps_the_old_one_and_leaves_no_tmp(tmp_path):
    folder = tmp_path / "model"
    swap.replace_folder(folder, _write("old"))

    def half(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "model.safetensors").write_text("half")
        raise Killed

    with pytest.raises(Killed):
        swap.replace_folder(folder, half)
    assert _state(folder) == "old"


def test_recovery_of_the_reported_case_promotes_the_complete_tmp(tmp_path):
    """model/ already moved aside, the complete .model.tmp not yet renamed: the kill of the issue."""
    folder = tmp_path / "model"
    _write("new")(tmp_path / ".model.tmp")
    swap.write_json_atomic(tmp_path / ".model.complete", {"complete": ".model.tmp"})
    _write("old")(tmp_path / ".model.old")
    assert "finished saving" in swap.recover_folder(folder)
    assert _state(folder) == "new"
    # An incomplete tmp (no marker) is discarded, whatever it holds.
    _write("half")(tmp_path / ".model.tmp")
    assert "discarded" in swap.recover_folder(folder)
    assert _state(folder) == "new"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_dataset(tmp_path_factory.mktemp("swap-data"), n=30)


def test_a_run_killed_in_the_final_save_between_removing_model_and_renaming_tmp_resumes(tmp_path, data, monkeypatch):
    """The issue's reproduction through the engine: every --resume failed with "best model bundle ... is missing"."""
    out = tmp_path / "run"
    args = tiny_overrides(data, out, train__epochs=1, train__max_steps=1)
    import os

    real_rename = os.rename  # Path.rename goes through os.rename too
    renames = []

    def rename(src, dst, *a, **k):
        if Path(src).name == ".model.tmp":
            renames.append(src)
            if len(renames) == 2:  # the first is the epoch's best bundle, the second the final save
                raise Killed
        return real_rename(src, dst, *a, **k)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(Killed):
        main(args, default_config=REPO_ROOT / "configs" / "text.yaml")
    monkeypatch.undo()
    assert not (out / "model").exists() and (out / ".model.tmp").is_dir()  # the state the kill left
    assert not (out / "metrics.json").exists() and not (out / "COMPLETE").exists()

    metrics = main([*args, "--resume"], default_config=REPO_ROOT / "configs" / "text.yaml")
    assert metrics["epochs_run"] == 1 and (out / "model" / "model.safetensors").is_file()
    assert (out / "metrics.json").is_file() and (out / "COMPLETE").is_file()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".model")]
