"""Why the trained head loses macro-F1 to a linear model of its own inputs (issue 13): train the default fused
model (configs/fusion.yaml) under each candidate's overrides and seeds, then print candidate x mean ± sd of test
micro-F1 / macro-F1 / mAP and validation micro-F1 / macro-F1 over the seeds, read from each run's metrics.json.

    python benchmarks/bench_macro.py [--candidates default,macro-select] [--seeds 42,43,44] [--reuse] [--list]

Each (candidate, seed) trains in its own process, niced and on one thread (the machine's 2 cores are shared), into
runs/qb-<candidate>-<seed> (its log: runs/qb-logs/<candidate>-<seed>.log). `--reuse` reports the runs that have
finished and trains only the missing ones; `--report` trains nothing and reports what is there. A finished run's
checkpoints/ are deleted (`--keep-checkpoints` keeps them): the table needs only metrics.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "runs"

# name -> config overrides on top of configs/fusion.yaml (the default has none).
CANDIDATES: dict[str, list[str]] = {
    "default": [],
    "select-macro": ["train.metric_for_best=macro_f1"],
    "select-mAP": ["train.metric_for_best=mAP"],
    "select-micro+macro": ["train.metric_for_best=micro_macro_f1"],
    "pos-sqrt": ["train.pos_weight=sqrt"],
    "gated": ["model.fusion=gated"],
    "concat": ["model.fusion=concat"],
    "late": ["model.fusion=late"],
    "dropout-0.5": ["model.dropout=0.5"],
    "lr-3e-4": ["train.lr=3e-4"],
    "wd-0.1": ["train.weight_decay=0.1"],
    "patience-8": ["train.early_stopping_patience=8", "train.epochs=40"],
    "prior-once": ["train.lexical_prior_once=true"],
    "prior-once+select-micro+macro": ["train.lexical_prior_once=true", "train.metric_for_best=micro_macro_f1"],
    "prior-once+pos-sqrt": ["train.lexical_prior_once=true", "train.pos_weight=sqrt"],
    "prior-once+focal-1": ["train.lexical_prior_once=true", "train.loss=focal", "train.focal_gamma=1"],
    "prior-once+focal-2": ["train.lexical_prior_once=true", "train.loss=focal", "train.focal_gamma=2"],
    "prior-once+asl": ["train.lexical_prior_once=true", "train.loss=asymmetric"],
    "prior-once+asl-mild": ["train.lexical_prior_once=true", "train.loss=asymmetric", "train.asl_gamma_neg=2",
                            "train.asl_clip=0"],
    "prior-once+patience-8": ["train.lexical_prior_once=true", "train.early_stopping_patience=8", "train.epochs=40"],
    "prior-once+lr-3e-4": ["train.lexical_prior_once=true", "train.lr=3e-4"],
    "prior-once+wd-0.1": ["train.lexical_prior_once=true", "train.weight_decay=0.1"],
    "prior-once+lexical-c-1": ["train.lexical_prior_once=true", "model.lexical_c=1"],
    "prior-once+lexical-c-16": ["train.lexical_prior_once=true", "model.lexical_c=16"],
    "prior-once+modality-dropout-0": ["train.lexical_prior_once=true", "model.modality_dropout=0"],
    "prior-once+batch-128": ["train.lexical_prior_once=true", "train.batch_size=128"],
    "prior-once+batch-128+lr-2e-3": ["train.lexical_prior_once=true", "train.batch_size=128", "train.lr=2e-3"],
    "prior-once+lexical-c-64": ["train.lexical_prior_once=true", "model.lexical_c=64"],
    "prior-once+lexical-c-16+focal-1": ["train.lexical_prior_once=true", "model.lexical_c=16", "train.loss=focal",
                                        "train.focal_gamma=1"],
    "lexical-c-16": ["model.lexical_c=16"],
    "focal-2": ["train.loss=focal", "train.focal_gamma=2"],
    "asl": ["train.loss=asymmetric"],
}


def _bench_quality():
    """benchmarks/bench_quality.py's helpers (seed_list, mean_sd), imported read-only: it is not a package."""
    spec = importlib.util.spec_from_file_location("bench_quality", REPO / "benchmarks" / "bench_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def folder_of(name: str, seed: int) -> Path:
    return RUNS / f"qb-{name}-{seed}"


def command(name: str, seed: int) -> list[str]:
    """The one training command of a (candidate, seed): the brief's, so a run can be repeated by hand."""
    out = folder_of(name, seed).relative_to(REPO)
    return ["nice", "-n", "5", str(REPO / ".venv" / "bin" / "python"), "training/train_fusion.py",
            f"train.output_dir={out}", f"train.seed={seed}", *CANDIDATES[name]]


def train(name: str, seed: int, keep_checkpoints: bool = False) -> bool:
    """Train one run (a leftover unfinished folder is removed first: the engine wants a fresh one); its checkpoints
    are removed once it has finished unless ``keep_checkpoints``."""
    folder = folder_of(name, seed)
    if folder.exists():
        shutil.rmtree(folder)
    log = RUNS / "qb-logs" / f"{name}-{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    print("$ OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 " + " ".join(command(name, seed)), flush=True)
    with log.open("w") as handle:
        done = subprocess.run(command(name, seed), cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode:
        print(f"  failed (exit {done.returncode}); see {log}", flush=True)
    elif not keep_checkpoints:
        # ~260 MB a run (best + latest epoch states); the table reads metrics.json only, and the disk is shared.
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    return done.returncode == 0


def finished(name: str, seed: int) -> dict | None:
    path = folder_of(name, seed) / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() and (path.parent / "COMPLETE").is_file() else None


RARE = 5  # the genres with the fewest test movies (TV Movie, Western, Documentary, Music, War on data/movies)


def rare_f1(split: dict) -> float:
    """Mean F1 of the RARE genres with the fewest positives in ``split``: where the macro-F1 gap lives."""
    per_genre = sorted(split["per_genre"].values(), key=lambda g: g["support"])
    return float(np.mean([g["f1"] for g in per_genre[:RARE]]))


def figures(metrics: dict) -> dict:
    """The numbers of one run the table shows."""
    test, val = metrics["test"], metrics["validation"]
    return {"test_micro": test["micro_f1"], "test_macro": test["macro_f1"], "test_mAP": test["mAP"],
            "rare_f1": rare_f1(test), "val_micro": val["micro_f1"], "val_macro": val["macro_f1"],
            "epoch": metrics["best_epoch"],
            "lexical": (metrics.get("lexical") or {}).get("weight")}


def table(rows: dict[str, list[dict]], seeds: list[int], mean_sd) -> str:
    keys = ("test_micro", "test_macro", "test_mAP", "rare_f1", "val_micro", "val_macro")
    lines = [f"| candidate | seeds | test micro-F1 | test macro-F1 | test mAP | test F1 of the {RARE} rarest genres "
             "| val micro-F1 | val macro-F1 | best epoch | lexical weight |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, runs in rows.items():
        if not runs:
            continue
        cells = [mean_sd([r[k] for r in runs]) for k in keys]
        extra = [", ".join(str(r[k]) for r in runs) for k in ("epoch", "lexical")]
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells + extra) + " |")
    return "\n".join(lines)


def names_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown candidate(s) {unknown}; choose among {list(CANDIDATES)} (see --list)")
    return names


def main(argv=None) -> int:
    helpers = _bench_quality()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", type=names_list, default=list(CANDIDATES))
    parser.add_argument("--seeds", type=helpers.seed_list, default=[42, 43, 44])
    parser.add_argument("--reuse", action="store_true", help="keep finished runs; train only the missing ones")
    parser.add_argument("--report", action="store_true", help="train nothing; report the finished runs")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep each finished run's checkpoints/")
    parser.add_argument("--list", action="store_true", help="print the candidates and their overrides")
    args = parser.parse_args(argv)
    if args.list:
        for name, overrides in CANDIDATES.items():
            print(f"{name}: {' '.join(overrides) or '(configs/fusion.yaml as is)'}")
        return 0
    rows: dict[str, list[dict]] = {}
    for name in args.candidates:
        for seed in args.seeds:
            metrics = finished(name, seed)
            if metrics is None and not args.report or (metrics is not None and not (args.reuse or args.report)):
                metrics = finished(name, seed) if train(name, seed, args.keep_checkpoints) else None
            if metrics is not None:
                rows.setdefault(name, []).append(figures(metrics))
    print(f"\n## Test and validation splits of data/movies: mean ± sd over the seeds {args.seeds} that finished\n")
    print(table(rows, args.seeds, helpers.mean_sd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
