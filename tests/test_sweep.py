"""Sweep bookkeeping: distinct folder names per point, unreadable results of a finished point rerun it.

Training itself is replaced by a recorder here (tests/test_sweep_grid.py trains real points).
"""

import json
import logging

import pytest
import yaml

import mmgcs.engine
from mmgcs.config import ConfigError
from mmgcs.sweep import MAX_NAME, finished_metrics, grid_points, load_sweep, point_name, point_names, run_sweep


def test_names_are_readable_when_already_distinct():
    points = grid_points({"model.dropout": [0.3, 0.5], "train.lr": [1e-4]})
    assert point_names(points) == ["dropout=0.3,lr=0.0001", "dropout=0.5,lr=0.0001"]
    assert point_names(points) == [point_name(p) for p in points]  # folders of earlier sweeps are still found


def test_values_that_sanitize_alike_get_distinct_stable_names():
    points = grid_points({"model.text_backbone": ["org/model", "org_model", "other"]})
    names = point_names(points)
    assert len(set(names)) == 3
    assert names[0].startswith("text_backbone=org_model~") and names[1].startswith("text_backbone=org_model~")
    assert names[2] == "text_backbone=other"
    assert point_names(points) == names  # the same point keeps its folder on the next invocation
    assert point_names(list(reversed(points))) == list(reversed(names))  # whatever the order


def test_keys_sharing_their_last_part_are_written_in_full():
    points = grid_points({"train.pos_weight": ["none", "sqrt"], "model.pos_weight": [[1.0, 2.0]]})
    names = point_names(points)
    assert names[0] == "train.pos_weight=none,model.pos_weight=_1.0,_2.0_"
    assert len(set(names)) == 2


def test_long_names_are_shortened_with_a_digest():
    points = grid_points({"model.text_backbone": ["x" * 200, "x" * 199 + "y"]})
    names = point_names(points)
    assert len(set(names)) == 2 and all(len(n) <= MAX_NAME for n in names)


def write_sweep(tmp_path, grid):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "sweep"), "grid": grid}), encoding="utf-8")
    return path


def test_a_value_listed_twice_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"sweep.grid.train.lr: \[0.001\] listed more than once"):
        load_sweep(write_sweep(tmp_path, {"train.lr": [1e-3, 3e-3, 1e-3]}))
    load_sweep(write_sweep(tmp_path, {"model.pretrained": [True, 1]}))  # different YAML values, not a repeat


@pytest.fixture
def recorded_runs(monkeypatch):
    """engine.run replaced by a recorder that writes metrics.json as a finished run does."""
    calls = []

    def fake_run(cfg):
        calls.append(cfg)
        metrics = {"best_val_micro_f1": 0.5 + 0.1 * len(calls), "best_epoch": 1, "test": {"micro_f1": 0.4}}
        out = mmgcs.engine.Path(cfg.train.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
        return metrics

    monkeypatch.setattr(mmgcs.engine, "run", fake_run)
    return calls


def test_points_whose_names_collide_train_in_separate_folders(tmp_path, recorded_runs):
    sweep = load_sweep(write_sweep(tmp_path, {"model.text_backbone": ["org/model", "org_model"]}))
    rows = run_sweep(sweep)
    folders = {c.train.output_dir for c in recorded_runs}
    assert len(recorded_runs) == 2 and len(folders) == 2
    assert {r["model.text_backbone"] for r in rows} == {"org/model", "org_model"}
    assert {r["output_dir"] for r in rows} == folders


def test_a_corrupt_metrics_file_is_set_aside_and_its_point_reruns(tmp_path, recorded_runs, caplog):
    sweep = load_sweep(write_sweep(tmp_path, {"train.lr": [1e-3, 3e-3]}))
    run_sweep(sweep)
    assert len(recorded_runs) == 2
    broken = tmp_path / "sweep" / "lr=0.003" / "metrics.json"
    broken.write_text('{"best_val_micro_f1": 0.7, "te', encoding="utf-8")  # cut off mid-write
    with caplog.at_level(logging.WARNING, logger="mmgcs.sweep"):
        rows = run_sweep(sweep)
    assert [c.train.output_dir for c in recorded_runs[2:]] == [str(broken.parent)]  # only that point reran
    assert "not valid JSON" in caplog.text and str(broken) in caplog.text and "rerunning this point" in caplog.text
    assert (broken.parent / "metrics.json.corrupt").read_text().endswith('"te')  # kept, not deleted
    assert json.loads(broken.read_text())["best_val_micro_f1"] == rows[0]["val_micro_f1"]  # rewritten, ranked first


def test_finished_metrics_reads_objects_only(tmp_path, caplog):
    file = tmp_path / "metrics.json"
    assert finished_metrics(file) is None  # not run yet
    file.write_text('{"best_val_micro_f1": 0.5}')
    assert finished_metrics(file) == {"best_val_micro_f1": 0.5}
    file.write_text("[0.5]")
    with caplog.at_level(logging.WARNING, logger="mmgcs.sweep"):
        assert finished_metrics(file) is None
    assert "holds a JSON list" in caplog.text and not file.exists()
    file.write_bytes(b"\xff\xfe garbage")
    assert finished_metrics(file) is None
