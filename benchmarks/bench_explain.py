"""The extra CPU latency of `predict(..., explain=True)` over the default `predict` (mmgcs.explain).

    python benchmarks/bench_explain.py --model ../base/runs/fusion/model
    python benchmarks/bench_explain.py --model ../base/runs/fusion/model --n 20 --threads 2 --grids 0,4,7 --fast

Inputs are real movies (plot + poster from ../shared/data/tmdb5000) when present, generated ones otherwise. Each
movie is timed with the default call, `by_modality=True` (what the Space asks for), and `explain=True` at each
occlusion grid (0: words and plot/poster share only, no occlusion map), plot + poster and plot only, the cases
taking turns on each movie; the first movies are warm-up. Prints a markdown table (median and p95 per call, and
the extra over the default).
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the embedded backbones; no Hub retries

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_predict import movies  # noqa: E402  (benchmarks/ is not a package)

from mmgcs.explain import DEFAULT_GRID  # noqa: E402


def _time(cases: list, items: list, warmup: int) -> list[list[float]]:
    """Seconds per call, per case. The cases take turns on each movie (in a rotating order), so a slow spell of a
    shared CPU falls on all of them alike rather than on whichever case was running."""
    for item in items[:warmup]:
        for _, fn, _ in cases:
            fn(*item)
    out: list[list[float]] = [[] for _ in cases]
    for k, item in enumerate(items[warmup:]):
        for c in range(len(cases)):
            c = (c + k) % len(cases)
            start = time.perf_counter()
            cases[c][1](*item)
            out[c].append(time.perf_counter() - start)
    return out


def _cases(predictor, grids: list[int]) -> list[tuple[str, object, bool]]:
    """(name, fn(plot, poster), whether it reads the poster)."""
    cases = [
        ("predict (default)", lambda p, q: predictor.predict(p, q), True),
        ("predict by_modality", lambda p, q: predictor.predict(p, q, by_modality=True), True),
    ]
    for grid in grids:
        if grid == DEFAULT_GRID:  # what the API and the Space run
            cases.append(("predict by_modality explain=True (7x7)",
                          lambda p, q: predictor.predict(p, q, by_modality=True, explain=True), True))
            continue

        def explained(p, q, grid=grid):
            result = predictor.predict(p, q, by_modality=True)
            result["explanation"] = predictor.explain(p, q, genres=result["genres"] or None, grid=grid)
            return result
        cases.append((f"predict by_modality + explain, grid {grid}" if grid else
                      "predict by_modality + explain, no occlusion", explained, True))
    cases += [
        ("plot only: predict (default)", lambda p, q: predictor.predict(p), False),
        ("plot only: predict explain=True", lambda p, q: predictor.predict(p, explain=True), False),
    ]
    return cases


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/fusion/model")
    parser.add_argument("--n", type=int, default=12, help="movies timed per case (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--fast", action="store_true", help="Predictor(model, fast=True), as fp32 serving runs it")
    parser.add_argument("--grids", default="0,7", help="occlusion grids to time (7 is what explain=True uses)")
    args = parser.parse_args(argv)

    import torch

    from mmgcs import GenreClassifier
    from mmgcs.inference import Predictor

    if args.threads:
        torch.set_num_threads(args.threads)
    model = GenreClassifier.from_pretrained(args.model).eval()
    predictor = Predictor(model, fast=args.fast)
    plots, posters, source = movies(args.n + args.warmup)
    items = list(zip(plots, posters))
    print(f"model: {args.model} (lexical branch: {model.lexical is not None}); {source}; "
          f"torch threads: {torch.get_num_threads()}; {'fast' if args.fast else 'eager'} towers; "
          f"{len(items) - args.warmup} movies per case\n")
    print("| call | median ms | p95 ms | extra over the default (median) |")
    print("|---|---:|---:|---:|")
    baseline = {}
    cases = _cases(predictor, [int(g) for g in args.grids.split(",")])
    for (name, _, reads_poster), times in zip(cases, _time(cases, items, args.warmup)):
        times = sorted(times)
        median, p95 = statistics.median(times) * 1e3, times[min(len(times) - 1, int(0.95 * len(times)))] * 1e3
        key = "poster" if reads_poster else "plot"
        baseline.setdefault(key, median)
        extra = median - baseline[key]
        print(f"| {name} | {median:.1f} | {p95:.1f} | {'—' if not extra else f'{extra:+.1f} ms ({median / baseline[key]:.1f}×)'} |")

if __name__ == "__main__":
    main()
