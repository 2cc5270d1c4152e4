"""Quality benchmark: train the default fused model and its text-only and poster-only counterparts the same way
(the embedded towers, CPU), then print test micro/macro F1 and mAP side by side, as mean ± sd over seeds.

    python benchmarks/bench_quality.py [--data data/movies] [--out runs/bench-quality] [--seeds 42,43,44]
                                       [--reuse] [--only fusion] [section.key=value ...]

Bars (from the issue): fused micro-F1 >= 0.68 and macro-F1 >= 0.60 over genres with >= 50 movies; the fused model
beats the best single modality; the fused model given only the plot is within 0.02 micro-F1 of the text-only model.
Each (model, seed) trains into OUT/<model>/seed-<S>; `--reuse` reports finished runs without training again.
Overrides apply to every run. The bars are judged on the means.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODELS = {"fusion": "fusion.yaml", "text": "text.yaml", "image": "image.yaml"}
MIN_MOVIES = 50
SCORES = ("micro_f1", "macro_f1", "macro50", "mAP")


def train(name: str, folder: Path, data: str, overrides: list[str], reuse: bool) -> tuple[dict, float]:
    from mmgcs.config import load_config
    from mmgcs.engine import run

    if reuse and (folder / "metrics.json").is_file():
        return json.loads((folder / "metrics.json").read_text()), float("nan")
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    cfg = load_config([REPO / "configs" / MODELS[name]], [f"data.path={data}", f"train.output_dir={folder}", *overrides])
    start = time.time()
    metrics = run(cfg)
    return metrics, time.time() - start


def genre_counts(data: str) -> dict[str, int]:
    from mmgcs.data import load_movies

    dsd = load_movies(data)
    names = dsd["train"].features["genres"].feature.names
    counts = np.zeros(len(names), dtype=int)
    for split in dsd.values():
        for ids in split["genres"]:
            counts[list(ids)] += 1
    return dict(zip(names, counts.tolist()))


def summary(metrics: dict, frequent: list[str]) -> dict:
    """The four headline scores of one metrics dict; macro50 = macro-F1 over the genres with >= MIN_MOVIES movies."""
    frequent_f1 = [metrics["per_genre"][g]["f1"] for g in frequent if g in metrics["per_genre"]]
    return {"micro_f1": metrics["micro_f1"], "macro_f1": metrics["macro_f1"], "mAP": metrics["mAP"],
            "macro50": float(np.mean(frequent_f1)) if frequent_f1 else float("nan"), "n": metrics["n_samples"]}


def scores_on_rows(folder: Path, rows_by_id: set, label_names: list[str]) -> dict:
    """Re-score a run's saved test predictions on a subset of movies, with that run's tuned thresholds."""
    from mmgcs.metrics import compute_metrics

    saved = np.load(folder / "test_predictions.npz")
    metrics = json.loads((folder / "metrics.json").read_text())
    keep = np.array([int(i) in rows_by_id for i in saved["ids"]])
    thr = metrics.get("thresholds")
    thr = [thr[g] for g in label_names] if thr else None
    return compute_metrics(saved["probs"][keep], saved["labels"][keep], label_names, thresholds=thr)


def seed_figures(out: Path, seed: int, results: dict, frequent: list[str], labels: list[str]) -> dict:
    """Every figure of one seed: row -> scores (rows: each model on its test split, each on the movies with both
    inputs, and the fused model given one input)."""
    rows = {name: summary(m["test"], frequent) for name, m in results.items()}
    fused = results.get("fusion")
    if fused and "text" in results and "image" in results:
        f = np.load(out / "fusion" / f"seed-{seed}" / "test_predictions.npz")
        both = {int(i) for i, t, p in zip(f["ids"], f["has_text"], f["has_image"]) if t and p}
        for name in results:
            rows[f"{name}, movies with both inputs"] = summary(
                scores_on_rows(out / name / f"seed-{seed}", both, labels), frequent)
    for kind, label in (("text_only", "fusion given only the plot"), ("image_only", "fusion given only the poster")):
        single = (fused or {}).get("test_single_input", {}).get(kind)
        if single:
            rows[label] = summary(single, frequent)
    return rows


def seed_list(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes whole numbers separated by commas, e.g. 42,43,44; got {text!r}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds needs distinct seeds, e.g. 42,43,44; got {text!r}")
    return seeds


def mean_sd(values: list[float]) -> str:
    values = [v for v in values if v is not None and not np.isnan(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/movies")
    parser.add_argument("--out", default="runs/bench-quality")
    parser.add_argument("--seeds", type=seed_list, default=[42], help="train.seed of each repeat, e.g. 42,43,44 (default: 42)")
    parser.add_argument("--reuse", action="store_true", help="report finished runs in --out instead of training")
    parser.add_argument("--only", choices=sorted(MODELS), action="append", help="train only these (repeatable)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_intermixed_args(argv)
    import logging

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    out = Path(args.out)
    per_seed, seconds, extras = {}, {}, {}
    counts = genre_counts(args.data)
    for seed in args.seeds:
        results = {}
        for name in MODELS:
            folder = out / name / f"seed-{seed}"
            if args.only and name not in args.only and not (folder / "metrics.json").is_file():
                continue
            reuse = args.reuse or bool(args.only and name not in args.only)
            results[name], took = train(name, folder, args.data, [*args.overrides, f"train.seed={seed}"], reuse)
            seconds.setdefault(name, []).append(took)
            extras.setdefault(name, []).append(results[name])
        labels = next(iter(results.values()))["labels"]
        frequent = [g for g in labels if counts.get(g, 0) >= MIN_MOVIES]
        per_seed[seed] = seed_figures(out, seed, results, frequent, labels)

    rows = list(dict.fromkeys(r for figures in per_seed.values() for r in figures))
    n_seeds = len(args.seeds)
    print(f"\n## Test split of {args.data}: {len(frequent)} of {len(labels)} genres have >= {MIN_MOVIES} movies; "
          f"mean ± sd over {n_seeds} seed(s) {args.seeds}\n")
    print("| model | test movies | micro-F1 | macro-F1 | macro-F1 (>= 50 movies) | mAP |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        figs = [per_seed[s][row] for s in args.seeds if row in per_seed[s]]
        print(f"| {row} | {figs[0]['n']} | " + " | ".join(mean_sd([f[k] for f in figs]) for k in
                                                        ("micro_f1", "macro_f1", "macro50", "mAP")) + " |")
    print("\n| model | best epoch | train s (engine) | wall s | lexical weight |")
    print("|---|---|---|---|---|")
    for name, runs in extras.items():
        weights = [str(m.get("lexical", {}).get("weight", "-")) for m in runs]
        walls = [f"{s:.0f}" if not np.isnan(s) else "reused" for s in seconds[name]]
        print(f"| {name} | {', '.join(str(m['best_epoch']) for m in runs)} | "
              f"{', '.join(str(m['train_time_s']) for m in runs)} | {', '.join(walls)} | {', '.join(weights)} |")

    def mean(row: str, key: str) -> float:
        vals = [per_seed[s][row][key] for s in args.seeds if row in per_seed[s]]
        return float(np.mean(vals)) if vals else float("nan")

    verdicts = []
    if "fusion" in rows:
        verdicts.append(("fused micro-F1 >= 0.68", mean("fusion", "micro_f1") >= 0.68, f"{mean('fusion', 'micro_f1'):.4f}"))
        verdicts.append((f"fused macro-F1 >= 0.60 (genres >= {MIN_MOVIES} movies)", mean("fusion", "macro50") >= 0.60,
                         f"{mean('fusion', 'macro50'):.4f}"))
    if {"fusion", "text"} <= set(rows):
        verdicts.append(("fused beats the plot-only model (micro-F1, all test movies)",
                         mean("fusion", "micro_f1") > mean("text", "micro_f1"),
                         f"{mean('fusion', 'micro_f1'):.4f} vs {mean('text', 'micro_f1'):.4f}"))
    both = [f"{n}, movies with both inputs" for n in ("fusion", "text", "image")]
    if set(both) <= set(rows):
        best = max(mean(both[1], "micro_f1"), mean(both[2], "micro_f1"))
        verdicts.append(("fused beats the best single modality (micro-F1, movies with both inputs)",
                         mean(both[0], "micro_f1") > best, f"{mean(both[0], 'micro_f1'):.4f} vs {best:.4f}"))
    if {"fusion given only the plot", "text"} <= set(rows):
        gap = mean("text", "micro_f1") - mean("fusion given only the plot", "micro_f1")
        verdicts.append(("fused given only the plot within 0.02 micro-F1 of plot-only", gap <= 0.02, f"gap {gap:+.4f}"))
    if verdicts:
        print("\n## Bars (on the means)\n")
        print("| bar | met | value |")
        print("|---|---|---|")
        for text, ok, value in verdicts:
            print(f"| {text} | {'yes' if ok else 'NO'} | {value} |")
    print("\nWall times are on a 2-core machine; other jobs may have been running.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
