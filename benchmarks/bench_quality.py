"""Quality benchmark: every candidate default side by side. Each candidate trains its fused model and its plot-only
counterpart the same way (frozen embedded towers, cached features, CPU); the poster-only model is shared (both use
EfficientNet-Lite0). Prints test micro/macro F1 and mAP as mean ± sd over seeds, training time cold and warm, and
the bars judged on the means.

    python benchmarks/bench_quality.py [--data data/movies] [--out runs/bench-quality] [--seeds 42,43,44]
                                       [--candidates quality,fast] [--models fusion,text,image] [--cold] [--reuse]
                                       [section.key=value ...]

Candidates (CANDIDATES): "quality" = configs/fusion.yaml (all-mpnet-base-v2 + EfficientNet-Lite0, the default),
"fast" = configs/fast-fusion.yaml (all-MiniLM-L6-v2 + EfficientNet-Lite0); "<profile>-top<k>" = the profile with
configs/tuned-text.yaml over it: its plot encoder's top k layers (1, 2 or 4) fine-tuned from the cached output of the
frozen layers below (train.prefix_cache); "<candidate>-img<b>" (b = 1 or 2, over "quality", "fast" and each of their
"-top<k>") = that candidate with configs/tuned-image.yaml over its fused model: the poster encoder's last b stages
(and conv_head) fine-tuned from the cached feature map entering them, the plot-only model unchanged.
`--models fusion` trains the fused models only (no bars then). Each run writes stages.json: seconds computing the
text and image prefixes and the tower features, the other setup, each epoch, and calibration + test + saving,
printed as a table. Bars (from the issue): fused micro-F1
>= 0.68, macro-F1 >= 0.60 over genres with >= 50 movies, mAP >= 0.66; the fused model beats the best single
modality on movies with both inputs; given only the plot it is within 0.02 micro-F1 of the plot-only model.
Each run trains into OUT/<candidate>/<model>/seed-<S> (the shared poster model: OUT/image/seed-<S>); `--reuse`
reports finished runs without training again. `--cold` trains the first seed of each model with an empty feature
cache of its own (OUT/cold-cache, removed first), so its wall time includes featurization: the cold time; the
other seeds use the shared cache (warm). Overrides apply to every run, after the candidate's own.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
MPNET = "sentence-transformers/all-mpnet-base-v2"
# Layered over a profile: its plot encoder's top layers tuned from the cached prefix (train.text_trainable_layers).
TUNED = "tuned-text.yaml"
# Layered over a candidate's fused model: its poster encoder's last stages tuned from the cached image prefix.
TUNED_IMAGE = "tuned-image.yaml"


def tuned(profile: dict, layers: int) -> dict:
    """`profile`'s models with the top `layers` text layers tuned (configs/tuned-text.yaml over each one's config;
    the profile's own stopping rule gives way to the tuned config's)."""
    out = {}
    for model, (configs, overrides) in profile.items():
        files = (configs,) if isinstance(configs, str) else tuple(configs)
        kept = [o for o in overrides if not o.startswith("train.early_stopping_patience=")]
        out[model] = ((*files, TUNED), [*kept, f"train.text_trainable_layers={layers}"])
    return out


# candidate -> model -> (config file(s), overrides); the plot-only model reads the candidate's plot encoder.
CANDIDATES = {
    "quality": {"fusion": ("fusion.yaml", []), "text": ("text.yaml", [])},
    # The plot-only model with the fast profile's encoder and stopping rule (configs/fast-fusion.yaml's).
    "fast": {"fusion": ("fast-fusion.yaml", []),
             "text": ("text.yaml", [f"model.text_backbone={MINILM}", "train.early_stopping_patience=4"])},
}
CANDIDATES.update({f"{name}-top{k}": tuned(CANDIDATES[name], k) for name in ("quality", "fast") for k in (1, 2, 4)})


def tuned_image(candidate: dict, blocks: int) -> dict:
    """`candidate` with its fused model's last `blocks` poster-encoder stages tuned (configs/tuned-image.yaml over
    its config); its plot-only model is the candidate's own (it has no poster encoder)."""
    configs, overrides = candidate["fusion"]
    files = (configs,) if isinstance(configs, str) else tuple(configs)
    return {**candidate, "fusion": ((*files, TUNED_IMAGE), [*overrides, f"train.image_trainable_blocks={blocks}"])}


CANDIDATES.update({f"{name}-img{b}": tuned_image(CANDIDATES[name], b) for name in list(CANDIDATES) for b in (1, 2)})
DEFAULT_CANDIDATES = ("quality", "fast")
IMAGE = ("image.yaml", [])
MODELS = ("fusion", "text", "image")
MIN_MOVIES = 50
SCORES = ("micro_f1", "macro_f1", "macro50", "mAP")


def train(spec: tuple[str, list], folder: Path, data: str, overrides: list[str], reuse: bool,
          cold_cache: Path | None = None) -> tuple[dict, float]:
    """One run of `spec` (config file, its overrides) into `folder`; (metrics, wall seconds, nan when reused).
    With `cold_cache` the run featurizes into that emptied cache folder."""
    import shutil

    from mmgcs.config import load_config
    from mmgcs.engine import run

    if reuse and (folder / "metrics.json").is_file():
        return json.loads((folder / "metrics.json").read_text()), float("nan")
    if folder.exists():
        shutil.rmtree(folder)
    extra = []
    if cold_cache is not None:
        shutil.rmtree(cold_cache, ignore_errors=True)
        extra = [f"train.cache_dir={cold_cache}"]
    configs, own = spec
    files = [REPO / "configs" / c for c in ((configs,) if isinstance(configs, str) else configs)]
    cfg = load_config(files, [*own, f"data.path={data}", f"train.output_dir={folder}", *overrides, *extra])
    start = time.time()
    with StageTimes() as stages:
        metrics = run(cfg)
    wall = time.time() - start
    write_stages(folder, metrics, stages, wall)
    return metrics, wall


class StageTimes(logging.Handler):
    """Listens to a run's log for the seconds its caches spent computing (the text and image prefixes, tower
    features)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.prefix_s = self.features_s = 0.0

    def emit(self, record: logging.LogRecord) -> None:
        message = str(record.msg)
        if message.startswith(("Cached the text prefix", "Cached the image prefix")):
            self.prefix_s += float(record.args[1])
        elif message.startswith("Stored") and "features" in message:
            self.features_s += float(record.args[-2])

    def __enter__(self) -> "StageTimes":
        logging.getLogger("mmgcs").addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("mmgcs").removeHandler(self)


def write_stages(folder: Path, metrics: dict, stages: StageTimes, wall: float) -> None:
    """stages.json beside the run: the seconds of each stage (caches computed, each epoch, the rest of the setup,
    and what follows the epochs: calibration, the test split, saving)."""
    history = json.loads((folder / "history.json").read_text())
    epochs = [h["time_s"] for h in history]
    caches = stages.prefix_s + stages.features_s
    out = {"prefix_s": round(stages.prefix_s, 1), "features_s": round(stages.features_s, 1), "epochs_s": epochs,
           "other_setup_s": round(metrics["train_time_s"] - sum(epochs) - caches, 1),
           "calibration_test_save_s": round(wall - metrics["train_time_s"], 1), "wall_s": round(wall, 1)}
    (folder / "stages.json").write_text(json.dumps(out, indent=1))


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


ROW_NAMES = {"fusion": "fused", "text": "plot only", "image": "poster only"}


def candidate_figures(candidate: str, runs: dict, frequent: list[str], labels: list[str]) -> dict:
    """Every figure of one candidate and seed: row -> scores. `runs`: model -> (metrics, folder). Rows: each model
    on its test split, each on the movies with both inputs, and the fused model given one input."""
    name = {m: ("" if m == "image" else f"{candidate} ") + ROW_NAMES[m] for m in runs}
    rows = {name[m]: summary(metrics["test"], frequent) for m, (metrics, _) in runs.items()}
    if set(MODELS) <= set(runs):
        f = np.load(runs["fusion"][1] / "test_predictions.npz")
        both = {int(i) for i, t, p in zip(f["ids"], f["has_text"], f["has_image"]) if t and p}
        for m, (_, folder) in runs.items():
            rows[f"{name[m]}, movies with both inputs"] = summary(scores_on_rows(folder, both, labels), frequent)
    single_inputs = runs["fusion"][0].get("test_single_input", {}) if "fusion" in runs else {}
    for kind, label in (("text_only", "given only the plot"), ("image_only", "given only the poster")):
        if single_inputs.get(kind):
            rows[f"{candidate} fused {label}"] = summary(single_inputs[kind], frequent)
    return rows


def bars(candidate: str, mean) -> list[tuple[str, bool, str]]:
    """The issue's bars for one candidate, on the means (`mean(row, key)`; nan when the row is missing)."""
    fused, text = f"{candidate} fused", f"{candidate} plot only"
    verdicts = []
    for key, bar, label in (("micro_f1", 0.68, "micro-F1"), ("macro50", 0.60, f"macro-F1 (genres >= {MIN_MOVIES} movies)"),
                            ("mAP", 0.66, "mAP")):
        if not np.isnan(mean(fused, key)):
            verdicts.append((f"{fused} {label} >= {bar:.2f}", mean(fused, key) >= bar, f"{mean(fused, key):.4f}"))
    both = [f"{r}, movies with both inputs" for r in (fused, text, "poster only")]
    if not any(np.isnan(mean(r, "micro_f1")) for r in both):
        best = max(mean(both[1], "micro_f1"), mean(both[2], "micro_f1"))
        verdicts.append((f"{fused} beats the best single modality (micro-F1, movies with both inputs)",
                         mean(both[0], "micro_f1") > best, f"{mean(both[0], 'micro_f1'):.4f} vs {best:.4f}"))
    only_plot = f"{fused} given only the plot"
    if not np.isnan(mean(only_plot, "micro_f1")) and not np.isnan(mean(text, "micro_f1")):
        gap = mean(text, "micro_f1") - mean(only_plot, "micro_f1")
        verdicts.append((f"{fused} given only the plot within 0.02 micro-F1 of plot-only", gap <= 0.02, f"gap {gap:+.4f}"))
    return verdicts


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


def candidate_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in CANDIDATES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"--candidates takes names from {list(CANDIDATES)}, comma-separated; got {text!r}")
    return list(dict.fromkeys(names))


def model_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if "fusion" not in names or any(n not in MODELS for n in names):
        raise argparse.ArgumentTypeError(f"--models takes names from {list(MODELS)} including fusion; got {text!r}")
    return [m for m in MODELS if m in names]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/movies")
    parser.add_argument("--out", default="runs/bench-quality")
    parser.add_argument("--seeds", type=seed_list, default=[42], help="train.seed of each repeat, e.g. 42,43,44 (default: 42)")
    parser.add_argument("--candidates", type=candidate_list, default=list(DEFAULT_CANDIDATES),
                        help=f"which candidate defaults, comma-separated, from {', '.join(CANDIDATES)} "
                             f"(default: {','.join(DEFAULT_CANDIDATES)})")
    parser.add_argument("--models", type=model_list, default=list(MODELS),
                        help="which models of each candidate to train, comma-separated; fusion is always one of them "
                             "(default: fusion,text,image; the bars need all three)")
    parser.add_argument("--cold", action="store_true", help="first seed of each model from an empty feature cache")
    parser.add_argument("--reuse", action="store_true", help="report finished runs in --out instead of training")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    return parser.parse_intermixed_args(argv)


def train_all(args, out: Path) -> tuple[dict, dict]:
    """Every (candidate, model, seed) run: (candidate -> seed -> model -> (metrics, folder), run key -> walls)."""
    runs, walls, shared = {}, {}, {}
    for seed in args.seeds:
        for candidate in args.candidates:
            for model in args.models:
                spec = IMAGE if model == "image" else CANDIDATES[candidate][model]
                folder = out / "image" / f"seed-{seed}" if model == "image" else out / candidate / model / f"seed-{seed}"
                key = "poster only" if model == "image" else f"{candidate} {ROW_NAMES[model]}"
                if (key, seed) not in shared:
                    cold = out / "cold-cache" if args.cold and seed == args.seeds[0] else None
                    metrics, took = train(spec, folder, args.data, [*args.overrides, f"train.seed={seed}"], args.reuse, cold)
                    shared[key, seed] = (metrics, folder)
                    walls.setdefault(key, []).append((took, cold is not None, metrics, folder))
                runs.setdefault(candidate, {}).setdefault(seed, {})[model] = shared[key, seed]
    return runs, walls


def print_times(walls: dict) -> None:
    print("\n| model | best epoch | train s (engine) | wall s (cold = empty feature cache) | lexical weight |")
    print("|---|---|---|---|---|")
    for key, entries in walls.items():
        epochs = ", ".join(str(m["best_epoch"]) for _, _, m, _ in entries)
        engine = ", ".join(str(m["train_time_s"]) for _, _, m, _ in entries)
        wall = ", ".join("reused" if np.isnan(t) else f"{t:.0f}" + (" (cold)" if cold else "") for t, cold, _, _ in entries)
        weights = ", ".join(str(m.get("lexical", {}).get("weight", "-")) for _, _, m, _ in entries)
        print(f"| {key} | {epochs} | {engine} | {wall} | {weights} |")
    print("\n| model (run) | prefix s | features s | other setup s | epochs s (each) | calibration + test + save s |")
    print("|---|---|---|---|---|---|")
    for key, entries in walls.items():
        for i, (_, cold, _, folder) in enumerate(entries):
            stages_file = folder / "stages.json"
            if not stages_file.is_file():
                continue
            st = json.loads(stages_file.read_text())
            each = ", ".join(f"{t:.0f}" for t in st["epochs_s"])
            print(f"| {key} (run {i + 1}{', cold' if cold else ''}) | {st['prefix_s']:.0f} | {st['features_s']:.0f} | "
                  f"{st['other_setup_s']:.0f} | {sum(st['epochs_s']):.0f} ({each}) | {st['calibration_test_save_s']:.0f} |")


def main(argv=None) -> int:
    args = parse_args(argv)
    import logging

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    out = Path(args.out)
    counts = genre_counts(args.data)
    runs, walls = train_all(args, out)
    per_seed = {}
    for candidate, seeds in runs.items():
        for seed, models in seeds.items():
            labels = models["fusion"][0]["labels"]
            frequent = [g for g in labels if counts.get(g, 0) >= MIN_MOVIES]
            per_seed.setdefault(seed, {}).update(candidate_figures(candidate, models, frequent, labels))
    rows = list(dict.fromkeys(r for figures in per_seed.values() for r in figures))
    print(f"\n## Test split of {args.data}: {len(frequent)} of {len(labels)} genres have >= {MIN_MOVIES} movies; "
          f"mean ± sd over {len(args.seeds)} seed(s) {args.seeds}\n")
    print("| model | test movies | micro-F1 | macro-F1 | macro-F1 (>= 50 movies) | mAP |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        figs = [per_seed[s][row] for s in args.seeds if row in per_seed[s]]
        print(f"| {row} | {figs[0]['n']} | " + " | ".join(mean_sd([f[k] for f in figs]) for k in
                                                        ("micro_f1", "macro_f1", "macro50", "mAP")) + " |")
    print_times(walls)

    def mean(row: str, key: str) -> float:
        vals = [per_seed[s][row][key] for s in args.seeds if row in per_seed[s]]
        return float(np.mean(vals)) if vals else float("nan")

    print("\n## Bars (on the means)\n")
    print("| bar | met | value |")
    print("|---|---|---|")
    for candidate in args.candidates:
        for text, ok, value in bars(candidate, mean):
            print(f"| {text} | {'yes' if ok else 'NO'} | {value} |")
    print("\nWall times are on a 2-core machine; other jobs may have been running.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
