"""CPU speed of `predict`: single-movie latency (p50/p95) and `predict_batch` throughput, eager vs the fast path.

    python benchmarks/bench_predict.py                          # the default fused model (MiniLM + EfficientNet-Lite0)
    python benchmarks/bench_predict.py --model runs/fusion/model --threads 1 --by-modality
    python benchmarks/bench_predict.py --inputs plot,poster,both --batch-sizes 1,8,32 --paths eager,fast
    python benchmarks/bench_predict.py --model runs/fusion/model --threads 1 --by-modality --profile
    python benchmarks/bench_predict.py --model runs/fusion/model --exactness ../base/data/movies
    python benchmarks/bench_predict.py --model runs/fusion/model --rate-movies 1000 --inputs ""   # mmgcs predict

Inputs are real movies (plot + poster from ../shared/data/tmdb5000) when present, generated ones otherwise.
Latency covers the whole call: poster decode + resize, tokenization, forward, thresholding. The first calls are
warm-up and not counted. Each path (`eager`: today's towers; `fast`: `Predictor(model, fast=True)`, mmgcs.fast_path)
is timed in the same run. The FLOPs of one call are counted (torch.utils.flop_counter) and compared with this
machine's one-thread fp32 matmul rate: `× arithmetic` = time / (FLOPs / rate), 1.0 being the compute ceiling.
Prints markdown tables.

`--rate-movies N`: `mmgcs predict` over the first N tmdb5000 movies (plot + poster, copied to a temporary folder),
in processes of its own, before (`--eager --sort-window 1`: the eager towers, each batch as read, as the command ran
until issue 20) and after (the defaults: the fast path, windows of 8 batches sorted by plot length), side by side
in one run: start-up (imports, model load, fast encoders built), steady movies/s, peak RSS, RSS at the end, the
largest score difference between the two outputs, the load average and the all-core fp32 matmul rate.
"""

import argparse
import csv
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the embedded backbones; no 20-50 s of Hub retries

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_profile  # noqa: E402  (benchmarks/ is not a package)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MMGCS_SHARED_DATA", REPO.parent / "shared" / "data"))
DEFAULT_LABELS = ["Drama", "Comedy", "Thriller", "Action", "Romance", "Adventure", "Crime", "Science Fiction", "Horror",
                  "Family", "Fantasy", "Mystery", "Animation", "History", "Music", "War", "Documentary", "Western"]


def movies(n: int) -> tuple[list[str], list, str]:
    source = SHARED / "tmdb5000" / "movies.jsonl"
    if source.is_file():
        rows = []
        with source.open(encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                poster = source.parent / row["poster_file"]
                if row.get("plot") and poster.is_file():
                    rows.append((row["plot"], poster.read_bytes()))
                if len(rows) >= n:
                    break
        return [r[0] for r in rows], [r[1] for r in rows], f"real TMDb movies from {source.parent}"
    import numpy as np
    import PIL.Image

    rng = np.random.default_rng(0)
    plots, posters = [], []
    for i in range(n):
        buf = io.BytesIO()
        PIL.Image.fromarray(rng.integers(0, 255, (300, 200, 3), dtype=np.uint8)).save(buf, format="JPEG")
        posters.append(buf.getvalue())
        plots.append(f"Movie {i}: a young detective must stop a gang of thieves before the city falls. " * 2)
    return plots, posters, "generated movies (../shared/data not found)"


def pick(kind: str, plots: list, posters: list) -> tuple[list, list]:
    if kind == "plot":
        return plots, [None] * len(plots)
    if kind == "poster":
        return [None] * len(posters), posters
    return plots, posters


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def time_single(predictor, kp, kq, args) -> list[float]:
    for i in range(args.warmup):
        predictor.predict(plot=kp[i], poster=kq[i], by_modality=args.by_modality)
    times = []
    for i in range(args.warmup, args.warmup + args.repeats):
        start = time.perf_counter()
        predictor.predict(plot=kp[i], poster=kq[i], by_modality=args.by_modality)
        times.append((time.perf_counter() - start) * 1000)
    return times


def time_batches(predictor, kp, kq, size: int, args) -> list[float]:
    predictor.predict_batch(kp[:size], kq[:size], batch_size=size, by_modality=args.by_modality)  # warm-up
    elapsed = []
    for b in range(1, args.batches + 1):
        chunk = slice(b * size, (b + 1) * size)
        start = time.perf_counter()
        predictor.predict_batch(kp[chunk], kq[chunk], batch_size=size, by_modality=args.by_modality)
        elapsed.append(time.perf_counter() - start)
    return elapsed


def speed_rows(model, paths: list[str], plots, posters, sizes, rate: float, args) -> list[tuple]:
    from mmgcs.inference import Predictor

    rows = []
    for kind in [k for k in args.inputs.split(",") if k]:
        kp, kq = pick(kind, plots, posters)
        gflop = bench_profile.count_flops(Predictor(model), kp[0], kq[0], args.by_modality) / 1e9
        for path in paths:
            predictor = Predictor(model, fast=path == "fast")
            times = time_single(predictor, kp, kq, args)
            p50 = statistics.median(times)
            rows.append((f"predict ({kind})", path, 1, f"{p50:.1f}", f"{pct(times, 0.95):.1f}",
                         f"{1000 / statistics.mean(times):.1f}", f"{gflop:.2f}", f"{p50 / (gflop * 1e9 / rate * 1000):.2f}"))
            for size in sizes:
                elapsed = time_batches(predictor, kp, kq, size, args)
                per_batch = [e * 1000 for e in elapsed]
                rows.append((f"predict_batch ({kind})", path, size, f"{statistics.median(per_batch):.1f}",
                             f"{pct(per_batch, 0.95):.1f}", f"{size * len(elapsed) / sum(elapsed):.1f}", "", ""))
    return rows


def print_table(header: list[str], rows: list[tuple]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")


# ------------------------------------------------------------------------------------------ mmgcs predict
PREDICT_CONFIGS = [("before: eager, each batch as read", ["--eager", "--sort-window", "1"]),
                   ("after: defaults (fast path, sorted windows)", [])]
RUN_LINE = re.compile(r"in ([\d.]+) s: ([\d.,]+) movies/s; start-up ([\d.]+) s \(imports, model load, (.*)\)")


def subset(n: int, folder: Path) -> Path:
    """The first `n` tmdb5000 movies with their posters, copied into `folder` (posters are read inside the input's
    folder only)."""
    source = SHARED / "tmdb5000"
    (folder / "posters").mkdir(parents=True, exist_ok=True)
    with open(source / "movies.jsonl", encoding="utf-8") as f, open(folder / "movies.jsonl", "w", encoding="utf-8") as g:
        for i, line in enumerate(f):
            if i >= n:
                break
            poster = json.loads(line).get("poster_file")
            if poster and (source / poster).is_file():
                shutil.copyfile(source / poster, folder / poster)
            g.write(line)
    return folder / "movies.jsonl"


def run_predict_process(model: str, source: Path, out: Path, options: list[str]) -> dict:
    """One `mmgcs predict` in a process of its own: its run line's figures, its peak RSS (wait4) and its RSS at
    the end (sampled each second: flat memory shows as an end close to the peak)."""
    import psutil

    command = [sys.executable, "-m", "mmgcs", "predict", "--model", model, "--input", str(source), "--out", str(out),
               "--overwrite", "--no-progress", *options]
    began, load = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True, cwd=REPO)
        samples, watched = [], psutil.Process(proc.pid)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            try:
                rss = watched.memory_info().rss
                if rss:  # 0 once it has exited (a zombie until wait4 reaps it)
                    samples.append(rss)
            except psutil.Error:
                pass
            time.sleep(1.0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0), stderr.seek(0)
        said, errors = stdout.read(), stderr.read()
    match = RUN_LINE.search(said)
    if proc.returncode or not match:
        raise RuntimeError(f"mmgcs predict failed ({proc.returncode}): {said[-500:]} {errors[-2000:]}")
    return {"wall": time.perf_counter() - began, "predicting": float(match[1]), "rate": float(match[2].replace(",", "")),
            "startup": float(match[3]), "towers": match[4], "peak_mb": usage.ru_maxrss / 1024,
            "end_mb": samples[-1] / 2**20 if samples else float("nan"), "load": (load, os.getloadavg()[0])}


def max_difference(a: Path, b: Path) -> float:
    with open(a, newline="", encoding="utf-8") as f, open(b, newline="", encoding="utf-8") as g:
        rows = list(zip(csv.DictReader(f), csv.DictReader(g)))
    skip = {"id", "input_row", "genres", "error"}
    return max((abs(float(x[k]) - float(y[k])) for x, y in rows for k in x if k not in skip and x[k] and y[k]),
               default=0.0)


def predict_rates(model: str, n: int, rate: float) -> None:
    print(f"\n`mmgcs predict` over the first {n:,} tmdb5000 movies (plot + poster), a process each; all-core fp32 "
          f"matmul {rate / 1e9:.0f} GFLOP/s on {os.cpu_count()} cores; start-up = imports + model load + fast "
          "encoders built; steady = movies / predicting time\n")
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as folder:
        source = subset(n, Path(folder) / "movies")
        rows, outs = [], []
        for name, options in PREDICT_CONFIGS:
            out = Path(folder) / f"out-{len(outs)}.csv"
            r = run_predict_process(model, source, out, options)
            outs.append(out)
            rows.append((name, f"{r['startup']:.1f}", f"{r['predicting']:.1f}", f"{r['rate']:.2f}", f"{r['wall']:.1f}",
                         f"{r['peak_mb']:,.0f}", f"{r['end_mb']:,.0f}", f"{r['load'][0]:.1f} → {r['load'][1]:.1f}",
                         r["towers"]))
        print_table(["run", "start-up s", "predicting s", "steady movies/s", "wall s", "peak RSS MB", "RSS at end MB",
                     "load average (1 min)", "towers"], rows)
        print(f"\nlargest score difference after vs before: {max_difference(outs[0], outs[1]):.2g} "
              "(the fast path's bound: 1e-4)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="bundle folder or Hub id (default: a new default fused model)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--repeats", type=int, default=40, help="single-movie calls per input kind")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--inputs", default="both,plot,poster")
    parser.add_argument("--batch-sizes", default="8,32")
    parser.add_argument("--batches", type=int, default=3, help="timed batches per batch size")
    parser.add_argument("--paths", default="eager,fast", help="predict paths to time side by side: eager, fast")
    parser.add_argument("--by-modality", action="store_true",
                        help="also score each modality on its own (by_modality=True), as the Space does")
    parser.add_argument("--profile", action="store_true", help="print where one movie's time goes, per stage")
    parser.add_argument("--exactness", default="", metavar="DATASET",
                        help="a built dataset folder: print max |fast - eager| score over its test split")
    parser.add_argument("--rate-movies", type=int, default=0, metavar="N",
                        help="also time `mmgcs predict` before/after issue 20 over the first N tmdb5000 movies")
    args = parser.parse_args(argv)

    import torch

    from mmgcs import GenreClassifier, create_model

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = GenreClassifier.from_pretrained(args.model) if args.model else create_model(labels=DEFAULT_LABELS).eval()
    load_s = time.perf_counter() - t0
    sizes = [int(s) for s in args.batch_sizes.split(",") if s]
    plots, posters, origin = movies(max([args.repeats + args.warmup] + [b * (args.batches + 1) for b in sizes]))
    cfg = model.config
    print(f"model: {args.model or 'create_model() default'} — text {cfg.text_tower}:{cfg.text_backbone}, "
          f"image {cfg.image_tower}:{cfg.image_backbone} @ {cfg.image_size}px, fusion {cfg.fusion}, {len(cfg.labels)} genres")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    rate = bench_profile.matmul_rate(torch.get_num_threads())
    print(f"build/load {load_s:.1f} s; torch threads {torch.get_num_threads()} on {os.cpu_count()} cores "
          f"(load average {load}: other processes slow every number); inputs: {origin}; "
          f"by_modality={args.by_modality}; fp32 matmul {rate / 1e9:.0f} GFLOP/s on "
          f"{torch.get_num_threads()} thread(s)\n")
    paths = [p for p in args.paths.split(",") if p]
    print_table(["call", "path", "batch", "p50 ms", "p95 ms", "movies/s", "GFLOP", "× arithmetic"],
                speed_rows(model, paths, plots, posters, sizes, rate, args))
    if args.profile:
        for path in paths:
            print(f"\nprofile of one movie (plot + poster, by_modality={args.by_modality}), path {path}, "
                  f"median of {args.repeats} calls:\n")
            print_table(["stage", "calls", "ms", "share"],
                        bench_profile.profile(model, path == "fast", plots, posters, args.repeats, args.by_modality))
    if args.exactness:
        print("\n" + bench_profile.exactness(model, args.exactness))
    if args.rate_movies:
        predict_rates(args.model or str(REPO / "runs" / "fusion" / "model"), args.rate_movies,
                      bench_profile.matmul_rate(os.cpu_count() or 1))


if __name__ == "__main__":
    main()
