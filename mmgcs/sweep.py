"""Grid search over training settings: every point is one `engine.run`, ranked on the validation metric.

A sweep file (YAML)::

    base: [seeds/resnet50-poster.yaml]   # config files every point starts from (relative to the sweep file)
    output_dir: runs/sweep-resnet50      # each point trains in OUTPUT_DIR/<point name>/
    metric: micro_f1                     # ranking key: the best validation value of each run
    overrides: {train.epochs: 10}        # fixed settings for every point
    grid:                                # every combination of these values is one point
      model.dropout: [0.3, 0.5]
      train.lr: [1e-4, 3e-4]

Results: OUTPUT_DIR/results.csv and results.md (ranked; test metrics shown next to the ranking metric, never used
for it). A point whose run finished is not trained again; an interrupted one is resumed from its checkpoint.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from mmgcs import engine
from mmgcs.config import CHOICES, ConfigError, load_config, parse_overrides, read_yaml_mapping
from mmgcs.progress import set_quiet
from mmgcs.runs import TrainingError, latest_checkpoint
from mmgcs.runtime import setup_logging

logger = logging.getLogger(__name__)

SWEEP_KEYS = ("base", "output_dir", "metric", "overrides", "grid")
TEST_COLUMNS = ("micro_f1", "macro_f1", "mAP")


@dataclass
class Sweep:
    base: list[Path]
    output_dir: Path
    metric: str
    grid: dict[str, list]
    overrides: dict[str, Any] = field(default_factory=dict)


def load_sweep(path: str | Path) -> Sweep:
    path = Path(path)
    raw = read_yaml_mapping(path, kind="Sweep", expected=f"a mapping with keys {list(SWEEP_KEYS)}",
                            remedy="pass one with --config (e.g. configs/sweep.yaml)")
    unknown = sorted(set(raw) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(f"Unknown sweep key(s) {unknown}; valid keys: {list(SWEEP_KEYS)}")
    base = raw.get("base") or []
    base = [base] if isinstance(base, str) else list(base)
    grid = raw.get("grid") or {}
    if not isinstance(grid, dict) or not grid:
        raise ConfigError("sweep.grid: give a mapping of section.key -> list of values, e.g. {train.lr: [1e-4, 3e-4]}")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep.grid.{key}: expected a non-empty list of values, got {values!r}")
        seen = [json.dumps(v, sort_keys=True, default=str) for v in values]
        repeated = [v for i, v in enumerate(values) if seen[i] in seen[:i]]
        if repeated:
            raise ConfigError(f"sweep.grid.{key}: {repeated} listed more than once; list each value once")
    metric = str(raw.get("metric", "micro_f1"))
    if metric not in CHOICES["train.metric_for_best"]:
        raise ConfigError(f"sweep.metric: {metric!r} is not a valid choice; choose one of {list(CHOICES['train.metric_for_best'])}")
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ConfigError("sweep.overrides: expected a mapping of section.key -> value")
    return Sweep(
        base=[(path.parent / b).resolve() for b in base],
        output_dir=Path(raw.get("output_dir", f"runs/{path.stem}")),
        metric=metric,
        grid={str(k): list(v) for k, v in grid.items()},
        overrides={str(k): v for k, v in overrides.items()},
    )


def _fmt(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


MAX_NAME = 120  # folder names stay well under the file systems' 255-byte limit


def point_name(point: dict[str, Any], full_keys: frozenset = frozenset()) -> str:
    """A folder name that says what the point is: `dropout=0.3,lr=0.0001` (keys in `full_keys` are written in
    full, e.g. `model.pos_weight` next to `train.pos_weight`). Not unique on its own: see `point_names`."""
    parts = [f"{k if k in full_keys else k.split('.')[-1]}={_fmt(v)}" for k, v in point.items()]
    return re.sub(r"[^A-Za-z0-9=.,_+-]", "_", ",".join(parts))


def _digest(point: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(point, sort_keys=True, default=str).encode()).hexdigest()[:8]


def point_names(points: list[dict[str, Any]]) -> list[str]:
    """One distinct folder name per point. Readable names (`point_name`) are kept where they are unique; a name
    shared by several points (values that differ only in characters a folder name cannot hold, like `org/model`
    and `org_model`) or too long gets a digest of the exact point, so two points never share (and overwrite)
    one output folder, and a point keeps its folder from one invocation to the next."""
    keys = list(dict.fromkeys(k for p in points for k in p))
    short = [k.split(".")[-1] for k in keys]
    full_keys = frozenset(k for k, s in zip(keys, short) if short.count(s) > 1)
    names = [point_name(p, full_keys) for p in points]
    out = []
    for point, name in zip(points, names):
        if names.count(name) > 1 or len(name) > MAX_NAME:
            name = f"{name[:MAX_NAME - 9]}~{_digest(point)}"
        out.append(name)
    return out


def grid_points(grid: dict[str, list]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def point_overrides(sweep: Sweep, point: dict[str, Any], extra: Sequence[str], out: Path) -> list[str]:
    fixed = [f"{k}={_fmt(v)}" for k, v in sweep.overrides.items()]
    varied = [f"{k}={_fmt(v)}" for k, v in point.items()]
    return [*fixed, *varied, *extra, f"train.output_dir={out}", f"train.metric_for_best={sweep.metric}"]


def run_sweep(sweep: Sweep, extra: Sequence[str] = (), fast: bool = False) -> list[dict]:
    """Train every point (in this process, one after the other) and write the ranked tables."""
    points = grid_points(sweep.grid)
    # Fail on a bad grid key or value before hours of training, not at the point that uses it.
    configs = []
    for point, name in zip(points, point_names(points)):
        out = sweep.output_dir / name
        cfg = load_config(sweep.base, point_overrides(sweep, point, extra, out), fast=fast)
        configs.append((point, out, cfg))
    rows = []
    for i, (point, out, cfg) in enumerate(configs, 1):
        logger.info("Sweep point %d/%d: %s", i, len(configs), point)
        metrics = finished_metrics(out / "metrics.json")
        if metrics is None:
            cfg.train.resume = latest_checkpoint(out) is not None
            metrics = engine.run(cfg)  # looked up at call time: tests replace it
        rows.append(result_row(point, out, metrics, sweep.metric))
        write_results(rank(rows, sweep.metric), sweep.output_dir)  # a partial table survives a crash
    ranked = rank(rows, sweep.metric)
    write_results(ranked, sweep.output_dir)
    return ranked


def finished_metrics(metrics_file: Path) -> Optional[dict]:
    """The metrics of a point that already ran, or None when it must (re)run.

    A metrics.json that cannot be read is moved aside (`metrics.json.corrupt`, nothing deleted) with a warning, and
    the point reruns: it resumes from its last checkpoint, so a run that had finished is only re-evaluated.
    """
    if not metrics_file.is_file():
        return None
    try:
        metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
        problem = None if isinstance(metrics, dict) else f"holds a JSON {type(metrics).__name__}, not an object"
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        problem = f"is not valid JSON ({e})"
    if problem is None:
        logger.info("  already done (%s); reusing its results", metrics_file)
        return metrics
    aside = metrics_file.with_name(metrics_file.name + ".corrupt")
    metrics_file.replace(aside)
    logger.warning("  %s %s; moved it to %s and rerunning this point (it resumes from its last checkpoint)",
                   metrics_file, problem, aside.name)
    return None


def result_row(point: dict, out: Path, metrics: dict, metric: str) -> dict:
    row: dict[str, Any] = dict(point)
    row[f"val_{metric}"] = metrics.get(f"best_val_{metric}")
    for key in TEST_COLUMNS:
        row[f"test_{key}"] = metrics.get("test", {}).get(key)
    row["best_epoch"] = metrics.get("best_epoch")
    row["train_time_s"] = metrics.get("train_time_s")
    row["output_dir"] = str(out)
    return row


def rank(rows: list[dict], metric: str) -> list[dict]:
    lower_is_better = metric == "loss"
    key = f"val_{metric}"

    def sort_key(r):
        v = r.get(key)
        missing = v is None
        return (missing, v if lower_is_better or missing else -v)

    ranked = sorted(rows, key=sort_key)
    return [{"rank": i, **r} for i, r in enumerate(ranked, 1)]


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "" if v is None else str(v)


def write_results(rows: list[dict], output_dir: Path) -> tuple[Path, Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    csv_path = output_dir / "results.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r.get(k) for k in columns})
    md_path = output_dir / "results.md"
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(k)) for k in columns) + " |" for r in rows]
    md_path.write_text("# Sweep results (ranked on validation)\n\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return csv_path, md_path


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description="Grid search: train every combination in a sweep file and write a ranked results table."
    )
    parser.add_argument("--config", required=True, metavar="SWEEP_FILE", help="e.g. configs/sweep.yaml")
    parser.add_argument("--fast", action="store_true", help="the --fast profile for every point")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="applied to every point")
    args = parser.parse_intermixed_args(argv)
    if args.quiet:
        set_quiet()
    setup_logging()
    try:
        parse_overrides(args.overrides)
        sweep = load_sweep(args.config)
        rows = run_sweep(sweep, args.overrides, fast=args.fast)
    except (ConfigError, TrainingError) as e:
        parser.exit(2, f"error: {e}\n")
    print((sweep.output_dir / "results.md").read_text(encoding="utf-8"))
    return rows


__all__ = [
    "Sweep", "finished_metrics", "grid_points", "load_sweep", "main", "point_name", "point_names", "rank", "run_sweep",
    "write_results",
]
