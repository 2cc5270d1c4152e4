"""Time `python -m mmgcs.data build` on the shared real data and print a table (movies, seconds, movies/s, peak RSS).

    .venv/bin/python benchmarks/bench_build.py [--source PATH ...] [--out DIR] [--limit N]

Defaults: ../shared/data/tmdb5000 + ../shared/data/tmdb-plots-extra into a temporary folder.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", action="append", help="default: the two shared TMDb sources")
    p.add_argument("--out", help="default: a temporary folder, removed afterwards")
    p.add_argument("--limit", type=int, help="rows per source")
    args = p.parse_args(argv)
    sources = args.source or [str(SHARED / "tmdb5000"), str(SHARED / "tmdb-plots-extra")]
    missing = [s for s in sources if not Path(s).exists()]
    if missing:
        print(f"error: source(s) not found: {missing}. Pass --source PATH.", file=sys.stderr)
        return 2

    start = time.perf_counter()
    import datasets  # noqa: F401  (imported here so the stage timings below exclude library import time)

    from mmgcs.data.build import BuildOptions, build

    import_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or Path(tmp) / "movies")
        t0 = time.perf_counter()
        result = build(BuildOptions(sources=sources, out=str(out), limit=args.limit, progress=False))
        seconds = time.perf_counter() - t0
        size_mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    t = result.report["totals"]
    posters = t["with_poster"]

    print("| sources | movies | with poster | build s | movies/s | posters/s (validate) | import s | peak RSS MB | output MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {', '.join(Path(s).name for s in sources)} | {t['kept']:,} | {posters:,} | {seconds:.2f} | "
          f"{t['kept'] / seconds:,.0f} | {posters / result.timings['posters'][0]:,.0f} | {import_s:.2f} | {peak_mb:,.0f} | {size_mb:,.1f} |")
    print()
    print("| stage | seconds | peak RSS MB at its end |")
    print("|---|---:|---:|")
    for stage, (s, rss) in result.timings.items():
        print(f"| {stage} | {s:.2f} | {rss:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
