"""Decision rules and ensembles (issue 13): which rule turns a trained model's scores into genres best, and what
averaging the probabilities of several runs buys.

    python benchmarks/bench_decision.py --runs runs/qa-seed-42,runs/qa-seed-43,runs/qa-seed-44
                                        [--heads runs/qa-head-gated,runs/qa-head-concat] [--data data/movies]

Each run folder is a finished training run (training/train_fusion.py). Its validation and test probabilities are
computed as the engine computes them (the bundle's head over the cached tower features, `engine.gather_predictions`)
and kept in RUN/decision_probs.npz; the test ones are checked against the run's own test_predictions.npz.

Every rule is fitted on validation only (the tuned per-genre thresholds are the engine's, `calibrate.thresholds`) and
scored on validation (in-sample), on validation by 5-fold cross-fit (fit on 4/5, decide the other 1/5: an honest
choice between rules that fit more or fewer numbers) and on test. Printed: rule x split, mean +- sd over the runs
of micro-F1, macro-F1 (all genres and genres with >= 50 movies, as benchmarks/bench_quality.py) and mAP (the same
for every rule), each rule's test gain over today's per-genre thresholds with a paired bootstrap interval, how many
test movies today's rule leaves without a genre; then the ensembles (the seeds; --heads: the first run with the
other fusion heads; all of them) against their members and against the --runs, and what one more head costs a
server that runs the towers anyway.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

MIN_MOVIES = 50
ROLES = ("validation", "test")
PROBS_FILE = "decision_probs.npz"


# ------------------------------------------------------------------------------------ probabilities of a run
def _gather(folder: Path) -> dict:
    """role -> {probs, labels} of a finished run's best bundle, over the cached features (as its engine did)."""
    from accelerate import Accelerator

    from mmgcs import engine, loaders
    from mmgcs.config import load_config
    from mmgcs.models.classifier import GenreClassifier

    cfg = load_config([folder / "config.yaml"])
    acc = Accelerator(cpu=True)
    try:
        splits, dataset_labels = loaders.load_splits(cfg, acc)
        model = GenreClassifier.from_pretrained(folder / "model").eval()
        data = loaders.prepare_splits(splits, dataset_labels, model)
        factory = loaders.LoaderFactory(data, cfg, acc)
        _, prepared = factory.for_epoch(model, cfg.train.epochs - 1)  # frozen towers: the cached features
        out = {}
        for role in ROLES:
            pred = engine.gather_predictions(acc, model, prepared[role], factory.take, data)
            out[role] = {"probs": pred["probs"], "labels": pred["labels"].astype(np.int64)}
        ids = {role: np.asarray(data.splits[role]["id"]) for role in ROLES}
    finally:
        engine.reset_accelerate_state()
    for role in ROLES:
        out[role]["ids"] = ids[role]
    return out


def run_probabilities(folder: Path) -> dict:
    """role -> {probs, labels, ids}, from RUN/decision_probs.npz when it is newer than the bundle."""
    cached = folder / PROBS_FILE
    if cached.is_file() and cached.stat().st_mtime > (folder / "model" / "model.safetensors").stat().st_mtime:
        with np.load(cached) as z:
            return {role: {k: z[f"{role}_{k}"] for k in ("probs", "labels", "ids")} for role in ROLES}
    out = _gather(folder)
    saved = np.load(folder / "test_predictions.npz")
    gap = float(np.abs(saved["probs"] - out["test"]["probs"]).max())
    if gap > 1e-5 or not np.array_equal(saved["labels"], out["test"]["labels"]):
        raise SystemExit(f"{folder}: the recomputed test probabilities differ from test_predictions.npz by {gap:.2e}; "
                         "the cache or the bundle changed since the run: train it again")
    np.savez_compressed(cached, **{f"{role}_{k}": v for role in ROLES for k, v in out[role].items()})
    return out


# ------------------------------------------------------------------------------------------------ the rules
def tuned_thresholds(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Today's per-genre thresholds, exactly as the engine tunes them (train.* defaults)."""
    from mmgcs import calibrate
    from mmgcs.config import ModelConfig, TrainConfig

    tcfg = TrainConfig()
    found = calibrate.thresholds({"probs": probs, "labels": labels}, "multilabel", tcfg.tune_thresholds,
                                 tcfg.threshold_min_positives, ModelConfig().threshold)
    return np.asarray(found)


# Finer grids at the low end: the default grid starts at 0.01, and a rare genre's probabilities often sit below it.
GRIDS = {
    "0.001 steps below 0.01": lambda: np.unique(np.concatenate([np.round(np.arange(0.001, 0.01, 0.001), 3),
                                                                _default_grid()])),
    "logit steps of 0.1": lambda: _sigmoid(np.arange(-9.0, 4.61, 0.1)),
    "0.01 steps + logit steps of 0.1 below 0.01": lambda: np.unique(np.concatenate([_sigmoid(np.arange(-9.0, -4.6, 0.1)),
                                                                                   _default_grid()])),
}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-np.round(x, 1)))


def _default_grid() -> np.ndarray:
    from mmgcs.metrics import DEFAULT_GRID

    return DEFAULT_GRID


def grid_thresholds(probs: np.ndarray, labels: np.ndarray, grid: str) -> np.ndarray:
    """Per-genre thresholds as the engine tunes them, over another grid of candidates."""
    from mmgcs.config import ModelConfig, TrainConfig
    from mmgcs.metrics import tune_thresholds

    return tune_thresholds(probs, labels, min_positives=TrainConfig().threshold_min_positives,
                           default=ModelConfig().threshold, grid=GRIDS[grid]())


def _fill_empty(probs: np.ndarray, preds: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Rows without any genre get the one with the highest ``key`` (first on ties)."""
    out = preds.copy()
    empty = ~out.any(axis=1)
    out[np.flatnonzero(empty), key[empty].argmax(axis=1)] = True
    return out


def _top_k(probs: np.ndarray, k: np.ndarray) -> np.ndarray:
    order = np.argsort(-probs, axis=1, kind="stable")
    ranks = np.empty_like(order)
    ranks[np.arange(len(probs))[:, None], order] = np.arange(probs.shape[1])[None, :]
    return ranks < k[:, None]


def _micro(preds: np.ndarray, labels: np.ndarray) -> float:
    tp = (preds & labels).sum()
    return float(2 * tp / max(2 * tp + (preds & ~labels).sum() + (~preds & labels).sum(), 1))


def joint_thresholds(probs: np.ndarray, labels: np.ndarray, start: np.ndarray, sweeps: int = 5) -> np.ndarray:
    """Coordinate ascent on micro-F1 from the per-genre thresholds: each genre's threshold in turn moved to the grid
    value maximizing micro-F1 over all genres, the others fixed; genres too rare to be tuned keep theirs."""
    from mmgcs.config import TrainConfig
    from mmgcs.metrics import DEFAULT_GRID

    truth = labels.astype(bool)
    thr = start.copy()
    tunable = np.flatnonzero(truth.sum(0) >= TrainConfig().threshold_min_positives)
    for _ in range(sweeps):
        changed = False
        for j in tunable:
            preds = probs >= thr
            others = np.delete(np.arange(probs.shape[1]), j)
            tp_o = (preds[:, others] & truth[:, others]).sum()
            err_o = (preds[:, others] ^ truth[:, others]).sum()
            grid_pred = probs[:, j][None, :] >= DEFAULT_GRID[:, None]
            tp = (grid_pred & truth[:, j]).sum(1)
            err = (grid_pred ^ truth[:, j]).sum(1)
            f1 = 2 * (tp_o + tp) / (2 * (tp_o + tp) + err_o + err)
            best = DEFAULT_GRID[np.flatnonzero(f1 >= f1.max() - 1e-12)]
            pick = best[np.abs(best - thr[j]).argmin()]  # of equal ones, the nearest: no drift on a plateau
            changed |= pick != thr[j]
            thr[j] = pick
        if not changed:
            break
    return thr


def _fit_k_scale(probs: np.ndarray, labels: np.ndarray, k_max: int) -> float:
    scales = np.round(np.arange(0.5, 2.01, 0.05), 2)
    scores = [_micro(_top_k(probs, np.clip(np.rint(s * probs.sum(1)), 1, k_max)), labels.astype(bool)) for s in scales]
    return float(scales[int(np.argmax(scores))])


def _fit_k_fixed(probs: np.ndarray, labels: np.ndarray, k_max: int) -> int:
    scores = [_micro(_top_k(probs, np.full(len(probs), k)), labels.astype(bool)) for k in range(1, k_max + 1)]
    return int(np.argmax(scores)) + 1


def _capped(probs: np.ndarray, thr: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Over-threshold genres, at most ``k`` of them: those furthest above their thresholds (score/threshold)."""
    return (probs >= thr) & _top_k(probs / np.maximum(thr, 1e-6), k)


def _fit_cap(probs: np.ndarray, labels: np.ndarray, k_max: int, by_count: bool) -> dict:
    """The cap maximizing validation micro-F1: one K, or K = round(s * sum p) with s tuned."""
    thr, truth = tuned_thresholds(probs, labels), labels.astype(bool)
    if by_count:
        caps = {s: np.clip(np.rint(s * probs.sum(1)), 1, k_max) for s in np.round(np.arange(0.5, 3.01, 0.1), 2)}
    else:
        caps = {k: np.full(len(probs), k) for k in range(1, k_max + 1)}
    best = max(caps, key=lambda c: (_micro(_capped(probs, thr, caps[c]), truth), c))  # ties: the looser cap
    return {"t": thr, "cap": best}


# name -> (fit(val probs, val labels) -> params, decide(probs, params) -> bool preds)
Rule = tuple[Callable[[np.ndarray, np.ndarray], dict], Callable[[np.ndarray, dict], np.ndarray]]


def _with_k_max(fit):
    return lambda p, y: {"k_max": int(y.sum(1).max()), **fit(p, y, int(y.sum(1).max()))}


RULES: dict[str, Rule] = {
    "thresholds": (lambda p, y: {"t": tuned_thresholds(p, y)}, lambda p, a: p >= a["t"]),
    **{f"thresholds, grid {g}": ((lambda g: lambda p, y: {"t": grid_thresholds(p, y, g)})(g), lambda p, a: p >= a["t"])
       for g in GRIDS},
    "at_least_one (top score)": (lambda p, y: {"t": tuned_thresholds(p, y)},
                                 lambda p, a: _fill_empty(p, p >= a["t"], p)),
    "at_least_one (score/threshold)": (lambda p, y: {"t": tuned_thresholds(p, y)},
                                       lambda p, a: _fill_empty(p, p >= a["t"], p / np.maximum(a["t"], 1e-6))),
    "top_k, k = round(sum p)": (_with_k_max(lambda p, y, m: {}),
                                lambda p, a: _top_k(p, np.clip(np.rint(p.sum(1)), 1, a["k_max"]))),
    "top_k, k = round(s * sum p), s tuned": (
        _with_k_max(lambda p, y, m: {"s": _fit_k_scale(p, y, m)}),
        lambda p, a: _top_k(p, np.clip(np.rint(a["s"] * p.sum(1)), 1, a["k_max"]))),
    "top_k, one k tuned": (_with_k_max(lambda p, y, m: {"k": _fit_k_fixed(p, y, m)}),
                           lambda p, a: _top_k(p, np.full(len(p), a["k"]))),
    "thresholds, at most K (K tuned)": (_with_k_max(lambda p, y, m: _fit_cap(p, y, m, by_count=False)),
                                        lambda p, a: _capped(p, a["t"], np.full(len(p), a["cap"]))),
    "thresholds, at most round(s * sum p) (s tuned)": (
        _with_k_max(lambda p, y, m: _fit_cap(p, y, m, by_count=True)),
        lambda p, a: _capped(p, a["t"], np.clip(np.rint(a["cap"] * p.sum(1)), 1, a["k_max"]))),
    "joint thresholds (micro-F1 ascent)": (
        lambda p, y: {"t": joint_thresholds(p, y, tuned_thresholds(p, y))}, lambda p, a: p >= a["t"]),
    "joint thresholds + at_least_one (score/threshold)": (
        lambda p, y: {"t": joint_thresholds(p, y, tuned_thresholds(p, y))},
        lambda p, a: _fill_empty(p, p >= a["t"], p / np.maximum(a["t"], 1e-6))),
}


# --------------------------------------------------------------------------------------------------- scoring
def scores(preds: np.ndarray, labels: np.ndarray, probs: np.ndarray, frequent: np.ndarray) -> dict:
    """micro/macro F1 as mmgcs.metrics.compute_metrics counts them (zero_division=0), macro over the frequent
    genres, mAP (does not depend on the rule) and how many genres a movie gets."""
    from mmgcs.metrics import _average_precisions, _f1_from_counts

    truth, preds = labels.astype(bool), preds.astype(bool)
    tp, fp, fn = (preds & truth).sum(0), (preds & ~truth).sum(0), (~preds & truth).sum(0)
    per_genre = _f1_from_counts(tp, fp, fn, empty=0.0)
    aps = [a for a in _average_precisions(probs, labels) if a is not None]
    return {"micro_f1": float(_f1_from_counts(tp.sum(), fp.sum(), fn.sum(), empty=0.0)),
            "macro_f1": float(per_genre.mean()), "macro50": float(per_genre[frequent].mean()),
            "mAP": float(np.mean(aps)), "empty": float((~preds.any(1)).mean()),
            "genres_per_movie": float(preds.sum(1).mean())}


def cross_fit(rule: Rule, probs: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Validation decisions of each fold by the rule fitted on the other folds."""
    fit, decide = rule
    order = np.random.default_rng(seed).permutation(len(probs))
    preds = np.zeros(probs.shape, dtype=bool)
    for part in np.array_split(order, folds):
        rest = np.setdiff1d(order, part)
        preds[part] = decide(probs[part], fit(probs[rest], labels[rest]))
    return preds


def rule_figures(pred: dict, frequent: np.ndarray, rules: dict = RULES) -> dict:
    """(rule, split) -> scores for one run's (or ensemble's) probabilities; split: val, val 5-fold, test."""
    val, test = pred["validation"], pred["test"]
    out = {}
    for name, rule in rules.items():
        fit, decide = rule
        params = fit(val["probs"], val["labels"])
        out[(name, "validation (in-sample)")] = scores(decide(val["probs"], params), val["labels"], val["probs"], frequent)
        out[(name, "validation (5-fold cross-fit)")] = scores(cross_fit(rule, val["probs"], val["labels"]),
                                                              val["labels"], val["probs"], frequent)
        out[(name, "test")] = scores(decide(test["probs"], params), test["labels"], test["probs"], frequent)
    return out


def paired_delta(preds_a: list, preds_b: list, labels: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict:
    """The 95% interval of the test micro/macro-F1 of decisions b minus decisions a (each averaged over its runs),
    by a paired bootstrap over the movies (the same resample for every run on both sides)."""
    from mmgcs.metrics import _f1_from_counts

    truth = labels.astype(bool)
    counts = [[(p & truth).astype(float), (p & ~truth).astype(float), (~p & truth).astype(float)]
              for p in (*preds_a, *preds_b)]
    rng = np.random.default_rng(seed)
    n, split = len(labels), len(preds_a)
    deltas = {"micro_f1": [], "macro_f1": []}
    for start in range(0, n_boot, 250):
        block = min(250, n_boot - start)
        w = np.stack([np.bincount(r, minlength=n) for r in rng.integers(0, n, size=(block, n))]).astype(float)
        micro, macro = [], []
        for tp, fp, fn in counts:
            g = (w @ tp, w @ fp, w @ fn)
            micro.append(_f1_from_counts(g[0].sum(1), g[1].sum(1), g[2].sum(1), empty=0.0))
            macro.append(_f1_from_counts(*g, empty=0.0).mean(1))
        for key, vals in (("micro_f1", micro), ("macro_f1", macro)):
            deltas[key].append(np.mean(vals[split:], axis=0) - np.mean(vals[:split], axis=0))
    return {k: [float(x) for x in np.percentile(np.concatenate(v), [2.5, 97.5])] for k, v in deltas.items()}


# --------------------------------------------------------------------------------------------------- report
def mean_sd(values: list) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def print_table(per_run: list[dict], title: str) -> None:
    print(f"\n## {title}\n")
    print("| rule | split | micro-F1 | macro-F1 | macro-F1 (>= 50 movies) | mAP | no genre | genres/movie |")
    print("|---|---|---|---|---|---|---|---|")
    for key in per_run[0]:
        figs = [r[key] for r in per_run]
        print(f"| {key[0]} | {key[1]} | " + " | ".join(
            mean_sd([f[k] for f in figs]) for k in ("micro_f1", "macro_f1", "macro50", "mAP")) + " | "
            + " | ".join(f"{np.mean([f[k] for f in figs]):.3f}" for k in ("empty", "genres_per_movie")) + " |")


def average(preds: list[dict]) -> dict:
    """The ensemble of runs: their probabilities averaged, row by row (the rows must be the same movies)."""
    out = {}
    for role in ROLES:
        ids = preds[0][role]["ids"]
        for p in preds[1:]:
            if not np.array_equal(p[role]["ids"], ids) or not np.array_equal(p[role]["labels"], preds[0][role]["labels"]):
                raise SystemExit(f"The runs' {role} rows differ; an ensemble needs runs on the same data")
        out[role] = {"probs": np.mean([p[role]["probs"] for p in preds], axis=0), "labels": preds[0][role]["labels"],
                     "ids": ids}
    return out


def serving_cost(folder: Path, movies: int = 64) -> dict:
    """What one more head costs a server that already runs the towers: parameters of each part, and the time of
    the towers vs the head (fusion + lexical) over the same test movies (plot and poster), one thread."""
    import torch

    from mmgcs import inference
    from mmgcs.data import load_movies
    from mmgcs.models.classifier import GenreClassifier

    torch.set_num_threads(1)
    model = GenreClassifier.from_pretrained(folder / "model").eval()
    cfg = json.loads((folder / "model" / "config.json").read_text())
    test = load_movies(json.loads((folder / "metrics.json").read_text())["dataset"])["test"]
    rows = [r for r in test.select(range(min(4 * movies, len(test)))) if r["plot"] and r["poster"] is not None][:movies]
    plots = inference.composed_plots(model, [r["plot"] for r in rows], [r.get("title") for r in rows])
    batch = inference.preprocess(model, plots, [r["poster"] for r in rows])
    with torch.inference_mode():
        start = time.perf_counter()
        features = inference._encode(model, batch)
        towers = time.perf_counter() - start
        features.update({k: batch[k] for k in (*inference.LEXICAL_INPUTS, "text_mask", "image_mask") if k in batch})
        start = time.perf_counter()
        for _ in range(10):
            inference._head_probs(model, features)
        head = (time.perf_counter() - start) / 10
    count = lambda m: sum(p.numel() for p in m.parameters()) if m is not None else 0  # noqa: E731
    return {"fusion": cfg["fusion"], "movies": len(rows), "towers_ms_per_movie": 1000 * towers / len(rows),
            "head_ms_per_movie": 1000 * head / len(rows), "tower_params": count(model.text_tower) + count(model.image_tower),
            "fusion_params": count(model.fusion), "lexical_params": count(model.lexical)}


def same_lexical(paths: list[Path]) -> bool:
    """Whether the runs' lexical branches (fitted in closed form before the head trains) are equal, so that an
    ensemble would share one besides the towers."""
    from safetensors.numpy import load_file

    tensors = [{k: v for k, v in load_file(p / "model" / "model.safetensors").items() if k.startswith("lexical.")}
               for p in paths]
    return all(t.keys() == tensors[0].keys() and all(np.array_equal(t[k], tensors[0][k]) for k in t) for t in tensors)


def empty_views(paths: list[Path]) -> dict:
    """view -> the share of test movies (mean over the runs) left without any genre by the run's own thresholds:
    fused, and the fused model given only the plot or only the poster (test_predictions.npz; a view over the
    movies that have its input)."""
    out: dict = {}
    for path in paths:
        saved = np.load(path / "test_predictions.npz")
        metrics = json.loads((path / "metrics.json").read_text())
        thr = np.array([metrics["thresholds"][g] for g in metrics["labels"]])
        views = {"fused": (saved["probs"], np.ones(len(saved["probs"]), bool)),
                 "plot only": (saved["probs_without_image"], saved["has_text"].astype(bool)),
                 "poster only": (saved["probs_without_text"], saved["has_image"].astype(bool))}
        for name, (probs, rows) in views.items():
            out.setdefault(name, []).append(float((~(probs[rows] >= thr).any(1)).mean()))
    return {name: float(np.mean(v)) for name, v in out.items()}


def frequent_genres(data: str, labels: list[str]) -> np.ndarray:
    """Which of the model's genres have >= MIN_MOVIES movies over all splits (bench_quality's macro50, counted by
    its genre_counts)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_quality", Path(__file__).resolve().parent / "bench_quality.py")
    bench_quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_quality)
    by_name = bench_quality.genre_counts(data)
    return np.array([by_name.get(g, 0) >= MIN_MOVIES for g in labels])


def folders(text: str) -> list[Path]:
    paths = [Path(p) for p in text.split(",") if p.strip()]
    for p in paths:
        if not (p / "COMPLETE").is_file():
            raise argparse.ArgumentTypeError(f"{p} is not a finished run (no COMPLETE); train it with training/train_fusion.py")
    return paths


def print_deltas(per_run_preds: dict, labels: np.ndarray, base: str = "thresholds") -> None:
    print(f"\n## Test: each rule minus `{base}`, mean over the runs, paired bootstrap 95% interval over the movies\n")
    print("| rule | micro-F1 delta [95%] | macro-F1 delta [95%] |")
    print("|---|---|---|")
    for name, preds in per_run_preds.items():
        if name == base:
            continue
        iv = paired_delta(per_run_preds[base], preds, labels)
        mean = {k: np.mean([_f1_delta(a, b, labels, k) for a, b in zip(per_run_preds[base], preds)])
                for k in ("micro_f1", "macro_f1")}
        print(f"| {name} | " + " | ".join(f"{mean[k]:+.4f} [{iv[k][0]:+.4f}, {iv[k][1]:+.4f}]"
                                          for k in ("micro_f1", "macro_f1")) + " |")


def _f1_delta(a: np.ndarray, b: np.ndarray, labels: np.ndarray, key: str) -> float:
    from sklearn.metrics import f1_score

    avg = key.split("_")[0]
    return float(f1_score(labels, b, average=avg, zero_division=0) - f1_score(labels, a, average=avg, zero_division=0))


def test_decisions(pred: dict, rule: str) -> np.ndarray:
    """The test decisions of ``rule`` fitted on the same run's validation split."""
    fit, decide = RULES[rule]
    return decide(pred["test"]["probs"], fit(pred["validation"]["probs"], pred["validation"]["labels"]))


def ensemble_rows(name: str, members: list[dict], default: list[dict], frequent: np.ndarray, rules: tuple) -> None:
    """The ensemble's rule figures against the mean of its members' own and of the default runs' (``default``:
    the --runs), with the paired bootstrap interval of its test gain over the default runs."""
    chosen = {r: RULES[r] for r in rules}
    single = [rule_figures(m, frequent, chosen) for m in members]
    base = [rule_figures(d, frequent, chosen) for d in default]
    ensemble = average(members)
    ens = rule_figures(ensemble, frequent, chosen)
    keys = ("micro_f1", "macro_f1", "mAP")
    print(f"\n## Ensemble: {name} ({len(members)} runs, probabilities averaged; the rule fitted again on the averaged "
          "validation probabilities)\n")
    print("| rule | split | " + " | ".join(f"{k}: members / ensemble / ensemble - default run" for k in keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for key in ens:
        if key[1] == "validation (in-sample)":
            continue
        cells = [f"{mean_sd([s[key][k] for s in single])} / {ens[key][k]:.4f} / "
                 f"{ens[key][k] - np.mean([b[key][k] for b in base]):+.4f}" for k in keys]
        print(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    labels = ensemble["test"]["labels"]
    for rule in rules:
        iv = paired_delta([test_decisions(d, rule) for d in default], [test_decisions(ensemble, rule)], labels)
        print(f"\n{rule}: ensemble - default run on test, paired bootstrap 95%: micro-F1 "
              f"[{iv['micro_f1'][0]:+.4f}, {iv['micro_f1'][1]:+.4f}], macro-F1 [{iv['macro_f1'][0]:+.4f}, "
              f"{iv['macro_f1'][1]:+.4f}]")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=folders, required=True, help="finished runs of one config, e.g. three seeds")
    parser.add_argument("--heads", type=folders, default=[], help="runs of other fusion heads on the same features "
                        "(the first --runs folder joins them in the heads' ensemble)")
    parser.add_argument("--data", default="data/movies")
    parser.add_argument("--ensemble-rules", default="thresholds,at_least_one (score/threshold)")
    parser.add_argument("--no-cost", action="store_true", help="skip the serving-cost timing")
    args = parser.parse_args(argv)
    preds = [run_probabilities(f) for f in args.runs]
    heads = [run_probabilities(f) for f in args.heads]
    labels = json.loads((args.runs[0] / "metrics.json").read_text())["labels"]
    frequent = frequent_genres(args.data, labels)
    print(f"runs: {', '.join(map(str, args.runs))}; {int(frequent.sum())} of {len(labels)} genres have >= {MIN_MOVIES} "
          f"movies; validation {len(preds[0]['validation']['ids'])} movies, test {len(preds[0]['test']['ids'])}")
    print_table([rule_figures(p, frequent) for p in preds], f"Rules: mean ± sd over {len(preds)} runs")
    print_deltas({r: [test_decisions(p, r) for p in preds] for r in RULES}, preds[0]["test"]["labels"])
    print("\nTest movies without any genre under the runs' own thresholds (what `at_least_one` would change): "
          + ", ".join(f"{view} {share:.2%}" for view, share in empty_views(args.runs).items()))
    rules = tuple(r.strip() for r in args.ensemble_rules.split(",") if r.strip())
    if len(preds) > 1:
        ensemble_rows("seeds", preds, preds, frequent, rules)
    if heads:
        ensemble_rows("fusion heads", [preds[0], *heads], preds, frequent, rules)
        ensemble_rows("seeds and heads", [*preds, *heads], preds, frequent, rules)
    if not args.no_cost:
        print("\n## Serving cost of one more member (towers shared; 1 thread, fp32 eager, movies with plot and poster)\n")
        print("| head | tower params | fusion params | lexical params | towers ms/movie | head ms/movie |")
        print("|---|---|---|---|---|---|")
        for folder in [args.runs[0], *args.heads]:
            c = serving_cost(folder)
            print(f"| {c['fusion']} | {c['tower_params']:,} | {c['fusion_params']:,} | {c['lexical_params']:,} | "
                  f"{c['towers_ms_per_movie']:.2f} | {c['head_ms_per_movie']:.3f} |")
        print(f"\nThe lexical branch is the same in every run (only its weight differs): "
              f"{'yes' if same_lexical([*args.runs, *args.heads]) else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
