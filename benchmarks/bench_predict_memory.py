"""`mmgcs predict`'s memory over many rows: peak RSS after a small run and after a run N/small times larger, in one
process, on generated plot-only movies through a tiny text model (offline). Memory that grew with the rows
(results kept, a reader holding the file) would show as a peak that climbs with N.

    python benchmarks/bench_predict_memory.py --rows 100000 [--small 10000] [--format jsonl|csv] [--out-format csv]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mmgcs.batch_predict import predict_file  # noqa: E402
from mmgcs.inference import Predictor  # noqa: E402
from mmgcs.testing import _WORDS, tiny_model  # noqa: E402


def write_rows(path: Path, n: int, fmt: str, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8", newline="") as f:
        if fmt == "csv":
            f.write("id,title,plot\n")
        for i in range(n):
            plot = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 40)))
            if fmt == "csv":
                f.write(f"{i},Movie {i},{plot}\n")
            else:
                f.write(json.dumps({"id": i, "title": f"Movie {i}", "plot": plot}) + "\n")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--small", type=int, default=10_000)
    p.add_argument("--format", choices=("jsonl", "csv"), default="jsonl", help="input format")
    p.add_argument("--out-format", choices=("csv", "jsonl", "parquet"), default="csv")
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)
    predictor = Predictor(tiny_model(("Action", "Comedy", "Drama"), image=False))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (args.small, args.rows):
            source, out = Path(tmp) / f"in-{n}.{args.format}", Path(tmp) / f"out-{n}.{args.out_format}"
            write_rows(source, n, args.format)
            start = time.perf_counter()
            stats = predict_file(predictor, str(source), out, batch_size=args.batch_size, progress=False)
            results[n] = {"rows": stats.written, "seconds": time.perf_counter() - start, "peak_rss_mb": peak_mb()}
    print(f"| rows | input | output | movies/s | peak RSS (MB) |\n|---|---|---|---|---|")
    for n, r in results.items():
        print(f"| {r['rows']:,} | {args.format} | {args.out_format} | {r['rows'] / r['seconds']:,.0f} | {r['peak_rss_mb']:.0f} |")
    print(json.dumps({str(n): r for n, r in results.items()}), file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
