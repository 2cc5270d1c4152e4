"""Grid search: every point trained once, a ranked CSV + Markdown table, finished points reused."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from engine_helpers import REPO_ROOT, build_dataset

from mmgcs.config import ConfigError
from mmgcs.sweep import grid_points, load_sweep, main, point_name, rank
from mmgcs.testing import tiny_text_backbone_dir


def write_sweep(tmp_path, grid, **extra):
    data = {
        "base": [str(REPO_ROOT / "configs" / "text.yaml")],
        "output_dir": str(tmp_path / "sweep"),
        "metric": "micro_f1",
        "overrides": {"model.text_backbone": tiny_text_backbone_dir(), "model.pretrained": False,
                      "model.max_text_length": 32, "model.fusion_dim": 16, "train.log_with": "none",
                      "train.cache_dir": str(tmp_path / "cache"), "train.batch_size": 8, "train.epochs": 1},
        "grid": grid,
        **extra,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_grid_points_and_names():
    points = grid_points({"model.dropout": [0.3, 0.5], "train.lr": ["1e-4", 3e-4]})
    assert len(points) == 4 and points[0] == {"model.dropout": 0.3, "train.lr": "1e-4"}
    assert point_name(points[0]) == "dropout=0.3,lr=1e-4"
    assert len({point_name(p) for p in points}) == 4


def test_ranking_is_on_validation_and_loss_ranks_ascending():
    rows = [{"val_micro_f1": 0.2, "test_micro_f1": 0.9}, {"val_micro_f1": 0.6, "test_micro_f1": 0.1}, {"val_micro_f1": None}]
    assert [r["val_micro_f1"] for r in rank(rows, "micro_f1")] == [0.6, 0.2, None]
    assert [r["val_loss"] for r in rank([{"val_loss": 0.5}, {"val_loss": 0.3}], "loss")] == [0.3, 0.5]


def test_sweep_runs_each_point_writes_ranked_tables_and_reuses_finished_points(tmp_path, capsys):
    data = build_dataset(tmp_path, n=30)
    sweep_file = write_sweep(tmp_path, {"train.lr": [1e-3, 3e-2], "model.dropout": [0.1]})
    rows = main(["--config", str(sweep_file), f"data.path={data}", "train.max_steps=2"])
    assert len(rows) == 2 and [r["rank"] for r in rows] == [1, 2]
    assert rows[0]["val_micro_f1"] >= rows[1]["val_micro_f1"]
    out = tmp_path / "sweep"
    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [float(r["train.lr"]) for r in table] == [float(r["train.lr"]) for r in rows]
    assert {"rank", "val_micro_f1", "test_micro_f1", "test_macro_f1", "test_mAP", "output_dir"} <= set(table[0])
    md = (out / "results.md").read_text()
    assert md.count("\n| ") == 3 and "ranked on validation" in md  # header + 2 rows
    assert "results" not in capsys.readouterr().err
    for r in rows:
        assert Path(r["output_dir"], "model", "model.safetensors").is_file()
    # A second invocation trains nothing: finished points are read back.
    again = main(["--config", str(sweep_file), f"data.path={data}", "train.max_steps=2"])
    assert [(r["train.lr"], r["val_micro_f1"]) for r in again] == [(r["train.lr"], r["val_micro_f1"]) for r in rows]


def test_bad_sweep_files_are_reported_before_any_training(tmp_path, capsys):
    bad_key = write_sweep(tmp_path, {"train.learning_rate": [1e-3]})
    with pytest.raises(SystemExit) as e:
        main(["--config", str(bad_key)])
    assert e.value.code == 2 and "train.learning_rate" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="non-empty list"):
        load_sweep(write_sweep(tmp_path, {"train.lr": 1e-3}))
    with pytest.raises(ConfigError, match="Unknown sweep key"):
        load_sweep(write_sweep(tmp_path, {"train.lr": [1e-3]}, grids={}))
    with pytest.raises(ConfigError, match="sweep.metric"):
        load_sweep(write_sweep(tmp_path, {"train.lr": [1e-3]}, metric="accuracy"))
