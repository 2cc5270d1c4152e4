"""How fast frozen towers turn posters and plots into features, and what the feature cache buys a training epoch.

    .venv/bin/python benchmarks/bench_featurize.py                      # default sizes, ~5 min on 2 cores
    .venv/bin/python benchmarks/bench_featurize.py --posters 512 --plots 1024 --epoch-rows 256 --repeat 1
    .venv/bin/python benchmarks/bench_featurize.py --profile            # + where the time goes (cProfile, torch ops)

Prints one table. Posters are read from JPEG files (../shared/data/tmdb5000/posters, or --posters-dir) through
the default image tower (`mmgcs.create_model(...)`: EfficientNet-Lite0 with its ImageNet weights); plots come
from the same source through the default text tower (all-MiniLM-L6-v2). "naive" is the obvious loop in the main
process: `model.preprocess` + `model.encode_image`/`encode_text`, batches of 64 in row order. The head-training
epoch uses the built dataset (data/movies, or --data) and the engine's own batching code: raw rows through
`model.preprocess` and the frozen towers, versus cached features.

Timings on a shared machine are noisy: every row reports the best and the median of --repeat runs, and the
load average seen during the run is printed.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

CORES = os.cpu_count() or 1
MODES = ("workers-optimized", "workers-eager", "main-optimized", "main-eager")
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def _load() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (DataLoader workers are joined when done)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn, repeat: int) -> list[tuple[float, float]]:
    """(wall seconds, CPU seconds incl. worker processes) per run."""
    out = []
    for _ in range(repeat):
        start, cpu = time.perf_counter(), _cpu_seconds()
        fn()
        out.append((time.perf_counter() - start, _cpu_seconds() - cpu))
    return out


class Table:
    def __init__(self):
        self.rows: list[tuple] = []

    def add(self, what: str, items: int, unit: str, runs: list[tuple[float, float]], note: str = ""):
        walls = [w for w, _ in runs]
        best, median = min(walls), statistics.median(walls)
        cpu = min(c for _, c in runs)
        self.rows.append((
            what, items, f"{items / best:,.1f} {unit}/s", f"{items / median:,.1f}", f"{best:.2f}",
            f"{items / cpu:,.1f}" if cpu > 0 else "-", f"{items / cpu * CORES:,.0f}" if cpu > 0 else "-",
            _load(), note,
        ))
        print(f"  {what}: {items / best:,.1f} {unit}/s wall, {items / cpu:,.1f} per CPU-s (load {_load()})", flush=True)

    def print(self):
        head = ("measurement", "items", "wall best", "wall median", "best s", "per CPU-s", "idle est.", "load 1/5/15", "note")
        widths = [max(len(str(r[i])) for r in [head, *self.rows]) for i in range(len(head))]
        line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
        print()
        print(line(head))
        print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for r in self.rows:
            print(line(r))


def poster_split(posters_dir: Path, n: int):
    """A datasets split of `n` JPEG files (paths only: the bytes are read and decoded by the featurizer)."""
    from datasets import Dataset, Image

    files = sorted(posters_dir.glob("*.jpg"), key=lambda p: p.name)[:n]
    if len(files) < n:
        print(f"  (only {len(files)} posters in {posters_dir})")
    ids = [int(p.stem) if p.stem.isdigit() else i for i, p in enumerate(files)]
    return Dataset.from_dict({"id": ids, "poster": [str(p) for p in files]}).cast_column("poster", Image())


def plot_split(source: Path, n: int):
    from datasets import Dataset

    plots = []
    for path in (source / "tmdb5000" / "movies.jsonl", source / "tmdb-plots-extra" / "movies.jsonl"):
        if path.is_file():
            with open(path, encoding="utf-8") as f:
                plots.extend(json.loads(line)["plot"] for line in f if line.strip())
    plots = [p for p in plots if p][:n]
    return Dataset.from_dict({"id": list(range(len(plots))), "plot": plots})


def naive_images(model, split, batch_size=64):
    from datasets import Image

    from mmgcs.processor import GenreProcessor

    posters = split.cast_column("poster", Image(decode=False))["poster"]
    processor = GenreProcessor.from_model(model)
    with torch.inference_mode():
        for s in range(0, len(posters), batch_size):
            model.encode_image(processor(posters=posters[s : s + batch_size])["pixel_values"])


def naive_texts(model, split, batch_size=64):
    from mmgcs.processor import GenreProcessor

    plots = split["plot"]
    processor = GenreProcessor.from_model(model)
    with torch.inference_mode():
        for s in range(0, len(plots), batch_size):
            b = processor(plots=plots[s : s + batch_size])
            model.encode_text(b["input_ids"], b["attention_mask"])


def bench_posters(args, model, table: Table):
    import mmgcs.features as F
    import mmgcs.features.workers as W  # the tuning constants are read from here at call time

    split = poster_split(args.posters_dir, args.posters)
    n = len(split)
    print(f"Posters: {n} JPEG files from {args.posters_dir}; torch threads {torch.get_num_threads()}")
    if not args.skip_naive:
        table.add("posters: naive loop (main process, NCHW, batch 64)", n, "posters",
                  timed(lambda: naive_images(model, split), args.repeat))
    for forward_batch in args.forward_batch[1:]:
        W.CPU_FORWARD_BATCH = forward_batch
        table.add(f"posters: featurizer, default settings but batch {forward_batch}", n, "posters",
                  timed(lambda: F.compute_image_features(model, split, batch_size=64), args.repeat))
    W.CPU_FORWARD_BATCH = args.forward_batch[0]
    for workers in args.workers:
        for in_workers in (False, True):
            for optimize in (False, True):
                if f"{'workers' if in_workers else 'main'}-{'optimized' if optimize else 'eager'}" not in args.modes:
                    continue
                W.MIN_POSTERS_TO_OPTIMIZE = 0 if optimize else 10**12
                where = "decode+encode in workers" if in_workers else "decode in workers, encode in main"
                what = (f"posters: featurizer, {workers} worker(s), {where}, "
                        f"{'optimized' if optimize else 'eager'}, batch {W.CPU_FORWARD_BATCH}")
                run = lambda: F.compute_image_features(  # noqa: E731
                    model, split, batch_size=64, num_workers=workers, encode_in_workers=in_workers
                )
                table.add(what, n, "posters", timed(run, args.repeat))
    W.MIN_POSTERS_TO_OPTIMIZE = 256
    return split


def bench_plots(args, model, table: Table):
    import mmgcs.features as F

    split = plot_split(args.source, args.plots)
    n = len(split)
    print(f"Plots: {n} from {args.source}")
    if not args.skip_naive:
        table.add("plots: naive loop (row order, batch 64)", n, "plots", timed(lambda: naive_texts(model, split), args.repeat))
    table.add("plots: featurizer, length-sorted batches of 64, main process", n, "plots",
              timed(lambda: F.compute_text_features(model, split, batch_size=64, num_workers=0), args.repeat))
    for workers in args.workers:
        table.add(f"plots: featurizer, length-sorted batches of 64, {workers} worker(s) encoding", n, "plots",
                  timed(lambda: F.compute_text_features(model, split, batch_size=64, num_workers=workers), args.repeat))
    return split


def bench_epoch(args, model, table: Table):
    """One head-training epoch over frozen towers: raw rows (engine's RowCollator) vs cached features."""
    import numpy as np
    from torch.utils.data import DataLoader

    from mmgcs.batching import RowCollator, feature_dataset, label_map, label_names, limit_rows, select_inputs
    from mmgcs.data import load_movies
    from mmgcs.features import FeatureCache

    ds = load_movies(str(args.data))
    split = limit_rows(ds["train"], args.epoch_rows)
    split = select_inputs(split, True, True)
    names = label_names(split)
    mapping = label_map(names, model.labels)
    n, n_labels = len(split), len(model.labels)
    print(f"Head epoch: {n} training rows of {args.data} (train split has {len(ds['train'])})")
    for tower in (model.text_tower, model.image_tower):
        tower.set_finetune("frozen")
    model.train()
    head = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(head, lr=1e-3)

    def run(loader):
        for batch in loader:
            out = model(**batch)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()

    raw = DataLoader(split, batch_size=32, shuffle=True, num_workers=args.epoch_workers,
                     collate_fn=RowCollator(model.preprocess, mapping, n_labels, model.config.task, train=True))
    table.add(f"epoch, uncached: raw rows → frozen towers → head ({args.epoch_workers} workers)", n, "rows",
              timed(lambda: run(raw), args.repeat), note=f"{len(ds['train'])} rows: ×{len(ds['train']) / n:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        cache = FeatureCache(tmp)
        build = timed(lambda: [cache.get_or_compute(model, split, m, batch_size=64, num_workers=args.epoch_workers)
                               for m in ("text", "image")], 1)
        table.add("feature cache: first run (compute + store, both towers)", n, "rows", build)
        feats = {}
        load = timed(lambda: feats.update({m: cache.get_or_compute(model, split, m) for m in ("text", "image")}), args.repeat)
        assert cache.misses == 2 and cache.hits == 2 * args.repeat
        table.add("feature cache: later run (hit: load both files)", n, "rows", load)
        cached = DataLoader(feature_dataset(split, feats, mapping, n_labels, model.config.task), batch_size=32, shuffle=True)
        table.add("epoch, cached: features → head", n, "rows", timed(lambda: run(cached), args.repeat))


def profile_posters(model, split, workers: int):
    """Where the time goes: the main process (cProfile) and the tower's ops (torch profiler)."""
    import mmgcs.features as F
    import mmgcs.features.workers as W

    print(f"\n== cProfile of compute_image_features ({len(split)} posters, {workers} workers), top 20 by own time ==")
    prof = cProfile.Profile()
    prof.enable()
    F.compute_image_features(model, split, batch_size=64, num_workers=workers)
    prof.disable()
    pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(20)

    print("== One poster's preprocessing, by step (main process, 1 thread) ==")
    from datasets import Image

    from mmgcs.data.images import load_image
    from mmgcs.processor import GenreProcessor

    raw = split.cast_column("poster", Image(decode=False))["poster"][:200]
    transform = GenreProcessor.from_model(model).image_transform(False)
    steps = {"read+decode (load_image)": lambda r: load_image(r)}
    decoded = [load_image(r) for r in raw]
    with torch.inference_mode():
        t0 = time.perf_counter()
        for r in raw:
            load_image(r)
        t1 = time.perf_counter()
        for im in decoded:
            transform(im)
        t2 = time.perf_counter()
    print(f"  read+decode {1000 * (t1 - t0) / len(raw):.2f} ms, resize+to-tensor+normalize {1000 * (t2 - t1) / len(raw):.2f} ms")
    del steps

    print("\n== torch profiler: 16 batches of 4 posters through the optimized tower on one thread, as in a worker; "
          "top 12 ops by CPU time (LlgaPartition_*: oneDNN-fused groups) ==")
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(4, 3, model.config.image_size, model.config.image_size).contiguous(memory_format=torch.channels_last)
    with W._main_threads(1):
        with torch.inference_mode(False), torch.no_grad():
            enc = F.FastImageEncoder(model.eval(), x[:2].clone())
        with torch.inference_mode():
            for _ in range(3):  # the fused graph runs after the profiling runs
                enc(x)
            with profile(activities=[ProfilerActivity.CPU]) as p:
                for _ in range(16):
                    enc(x)
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", type=Path, default=SHARED, help="folder holding tmdb5000/ (and tmdb-plots-extra/)")
    ap.add_argument("--posters-dir", type=Path, default=None, help="JPEG posters (default: SOURCE/tmdb5000/posters)")
    ap.add_argument("--data", type=Path, default=REPO / "data" / "movies", help="built dataset for the epoch benchmark")
    ap.add_argument("--posters", type=int, default=1024)
    ap.add_argument("--plots", type=int, default=2048)
    ap.add_argument("--epoch-rows", type=int, default=512, help="training rows for the epoch benchmark (0: all)")
    ap.add_argument("--epoch-workers", type=int, default=2)
    ap.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[2],
                    help="decode-worker counts to try, comma-separated")
    ap.add_argument("--forward-batch", type=lambda s: [int(x) for x in s.split(",")], default=[4],
                    help="CPU forward batch sizes: the first is used throughout, the others get one extra row each")
    ap.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES),
                    help=f"featurizer modes to time, comma-separated, from {','.join(MODES)} (where the tower runs: "
                         "in the decode workers or in the main process; traced+optimized or eager)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: posters,plots,epoch")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    args.posters_dir = args.posters_dir or args.source / "tmdb5000" / "posters"
    skip = set(filter(None, args.skip.split(",")))

    warnings.filterwarnings("ignore", category=UserWarning)
    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    import mmgcs

    labels = ["Action", "Adventure", "Animation", "Comedy", "Crime", "Drama", "Family", "Fantasy", "Horror", "Romance",
              "Science Fiction", "Thriller"]
    with io.StringIO() as quiet, _redirect(quiet):
        model = mmgcs.create_model(labels=labels)
    model.eval()
    print(f"Model: {model.config.text_backbone} + {model.config.image_backbone} ({model.config.backbone_weights.get('image')})")
    print(f"CPU cores: {os.cpu_count()}, torch threads: {torch.get_num_threads()}, load average at start: {_load()}")
    table = Table()
    split = None
    if "posters" not in skip:
        split = bench_posters(args, model, table)
    if "plots" not in skip:
        bench_plots(args, model, table)
    if "epoch" not in skip:
        if (args.data / "data").is_dir():
            bench_epoch(args, model, table)
        else:
            print(f"(no built dataset at {args.data}: epoch benchmark skipped; build it with python -m mmgcs.data build)")
    table.print()
    print(f"\nload average at end: {_load()} (2 cores: anything above 2 means other work shared the CPU)")
    if args.profile:
        profile_posters(model, split if split is not None else poster_split(args.posters_dir, 256), max(args.workers))


class _redirect:
    """Silence transformers' load report on stdout/stderr while building the model."""

    def __init__(self, sink):
        self.sink = sink

    def __enter__(self):
        self.saved = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = self.sink

    def __exit__(self, *exc):
        sys.stdout, sys.stderr = self.saved


if __name__ == "__main__":
    main()
