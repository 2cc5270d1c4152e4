"""Quality benchmark: train the default fused model and its text-only and poster-only counterparts the same way
(the embedded towers, CPU), then print test micro/macro F1 and mAP side by side.

    python benchmarks/bench_quality.py [--data data/movies] [--out runs/bench-quality] [--reuse] [section.key=value ...]

Bars (from the issue): fused micro-F1 >= 0.68 and macro-F1 >= 0.60 over genres with >= 50 movies; the fused model
beats the best single modality; the fused model given only the plot is within 0.02 micro-F1 of the text-only model.
`--reuse` reports finished runs in OUT without training again. Overrides apply to all three runs.
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


def train(name: str, out: Path, data: str, overrides: list[str], reuse: bool) -> tuple[dict, float]:
    from mmgcs.config import load_config
    from mmgcs.engine import run

    folder = out / name
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


def macro_over(metrics: dict, genres: list[str]) -> float:
    per = metrics["per_genre"]
    return float(np.mean([per[g]["f1"] for g in genres if g in per]))


def scores_on_rows(folder: Path, rows_by_id: set, label_names: list[str]) -> dict:
    """Re-score a run's saved test predictions on a subset of movies, with that run's tuned thresholds."""
    from mmgcs.metrics import compute_metrics

    saved = np.load(folder / "test_predictions.npz")
    metrics = json.loads((folder / "metrics.json").read_text())
    keep = np.array([int(i) in rows_by_id for i in saved["ids"]])
    thr = metrics.get("thresholds")
    thr = [thr[g] for g in label_names] if thr else None
    return compute_metrics(saved["probs"][keep], saved["labels"][keep], label_names, thresholds=thr)


def fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.4f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/movies")
    parser.add_argument("--out", default="runs/bench-quality")
    parser.add_argument("--reuse", action="store_true", help="report finished runs in --out instead of training")
    parser.add_argument("--only", choices=sorted(MODELS), action="append", help="train only these (repeatable)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_intermixed_args(argv)
    import logging

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    out = Path(args.out)
    results, seconds = {}, {}
    for name in MODELS:
        if args.only and name not in args.only and not (out / name / "metrics.json").is_file():
            continue
        reuse = args.reuse or bool(args.only and name not in args.only)
        results[name], seconds[name] = train(name, out, args.data, args.overrides, reuse)

    counts = genre_counts(args.data)
    labels = next(iter(results.values()))["labels"]
    frequent = [g for g in labels if counts.get(g, 0) >= MIN_MOVIES]
    print(f"\n## Test split of {args.data} ({len(frequent)} of {len(labels)} genres have >= {MIN_MOVIES} movies)\n")
    print("| model | test movies | micro-F1 | macro-F1 | macro-F1 (>= 50 movies) | mAP | best epoch | train s | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, m in results.items():
        t = m["test"]
        print(f"| {name} | {t['n_samples']} | {fmt(t['micro_f1'])} | {fmt(t['macro_f1'])} | "
              f"{fmt(macro_over(t, frequent))} | {fmt(t['mAP'])} | {m['best_epoch']} | {m['train_time_s']} | "
              f"{fmt(seconds[name]) if not np.isnan(seconds[name]) else 'reused'} |")

    fused = results.get("fusion")
    verdicts = []
    if fused:
        ft = fused["test"]
        verdicts.append(("fused micro-F1 >= 0.68", ft["micro_f1"] >= 0.68, fmt(ft["micro_f1"])))
        mf = macro_over(ft, frequent)
        verdicts.append((f"fused macro-F1 >= 0.60 (genres >= {MIN_MOVIES} movies)", mf >= 0.60, fmt(mf)))

    if fused and "text" in results and "image" in results:
        # Same movies for all three: the test rows with a plot and a poster.
        preds = {n: np.load(out / n / "test_predictions.npz") for n in results}
        f = preds["fusion"]
        both = {int(i) for i, t, p in zip(f["ids"], f["has_text"], f["has_image"]) if t and p}
        print(f"\n## The {len(both)} test movies with a plot and a poster\n")
        print("| model | micro-F1 | macro-F1 | mAP |")
        print("|---|---|---|---|")
        same = {n: scores_on_rows(out / n, both, labels) for n in results}
        for n, m in same.items():
            print(f"| {n} | {fmt(m['micro_f1'])} | {fmt(m['macro_f1'])} | {fmt(m['mAP'])} |")
        best_single = max(results["text"]["test"]["micro_f1"], same["image"]["micro_f1"])
        verdicts.append(("fused beats the best single modality (micro-F1, all test movies)",
                         fused["test"]["micro_f1"] > results["text"]["test"]["micro_f1"],
                         f"{fmt(fused['test']['micro_f1'])} vs text {fmt(results['text']['test']['micro_f1'])}"))
        verdicts.append(("fused beats the best single modality (micro-F1, movies with both inputs)",
                         same["fusion"]["micro_f1"] > max(same["text"]["micro_f1"], same["image"]["micro_f1"]),
                         f"{fmt(same['fusion']['micro_f1'])} vs text {fmt(same['text']['micro_f1'])}, "
                         f"poster {fmt(same['image']['micro_f1'])}"))
        _ = best_single
        plot_only = fused.get("test_single_input", {}).get("text_only")
        if plot_only:
            gap = results["text"]["test"]["micro_f1"] - plot_only["micro_f1"]
            print("\n## Fused model given only the plot (poster hidden) vs the text-only model\n")
            print("| model | test movies | micro-F1 | macro-F1 | mAP |")
            print("|---|---|---|---|---|")
            print(f"| fused, plot only | {plot_only['n_samples']} | {fmt(plot_only['micro_f1'])} | "
                  f"{fmt(plot_only['macro_f1'])} | {fmt(plot_only['mAP'])} |")
            tt = results["text"]["test"]
            print(f"| text-only | {tt['n_samples']} | {fmt(tt['micro_f1'])} | {fmt(tt['macro_f1'])} | {fmt(tt['mAP'])} |")
            verdicts.append(("fused given only the plot within 0.02 micro-F1 of text-only", gap <= 0.02,
                             f"gap {gap:+.4f}"))
        poster_only = fused.get("test_single_input", {}).get("image_only")
        if poster_only:
            print(f"| fused, poster only | {poster_only['n_samples']} | {fmt(poster_only['micro_f1'])} | "
                  f"{fmt(poster_only['macro_f1'])} | {fmt(poster_only['mAP'])} |")

    if verdicts:
        print("\n## Bars\n")
        print("| bar | met | value |")
        print("|---|---|---|")
        for text, ok, value in verdicts:
            print(f"| {text} | {'yes' if ok else 'NO'} | {value} |")
    print("\nTimings are wall-clock on a shared 2-core machine (other jobs running); treat them as rough.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
