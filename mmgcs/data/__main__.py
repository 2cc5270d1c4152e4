"""Command line: `python -m mmgcs.data build ...` and `python -m mmgcs.data push DIR REPO_ID`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mmgcs.data.build import BuildOptions, build, format_summary
from mmgcs.data.genres import parse_renames
from mmgcs.data.images import MAX_IMAGE_PIXELS
from mmgcs.data.publish import PushError, push_folder
from mmgcs.data.splits import parse_ratios


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mmgcs.data", description="Build and publish MMGCS movie datasets.")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="sources (jsonl+posters, MM-IMDb, CSV+poster URLs) -> Hub-layout DatasetDict folder")
    b.add_argument("--source", action="append", required=True, metavar="PATH", help="a source folder or file; repeat for several")
    b.add_argument("--format", action="append", dest="formats", metavar="NAME",
                   help="jsonl | mmimdb | csv; once for all sources or once per --source (default: detected)")
    b.add_argument("--out", required=True, metavar="DIR", help="output folder (data/*.parquet, README.md, build_report.json)")
    labels = b.add_mutually_exclusive_group()
    labels.add_argument("--min-genre-count", type=int, default=50, metavar="N",
                        help="keep every genre with at least N movies as a label (default 50)")
    labels.add_argument("--genres", metavar="A,B,C", help="use exactly these genres as labels, in this order")
    b.add_argument("--rename-genre", action="append", default=[], metavar="OLD=NEW",
                   help="map a source's genre name to another before anything else (e.g. Comdy=Comedy); repeatable")
    b.add_argument("--drop-unlabeled", action="store_true", help="drop movies left with no label (default: keep, reported)")
    b.add_argument("--seed", type=int, default=42, help="split seed (default 42)")
    b.add_argument("--split-ratios", default="0.8,0.1,0.1", metavar="TRAIN,VAL,TEST", help="default 0.8,0.1,0.1")
    b.add_argument("--limit", type=int, metavar="N", help="read at most N rows per source (quick trial builds)")
    b.add_argument("--download-posters", action=argparse.BooleanOptionalAction, default=None,
                   help="fetch poster URLs (default: yes for CSV sources, no for jsonl)")
    b.add_argument("--poster-cache", default=".cache/posters", metavar="DIR", help="download cache (default .cache/posters)")
    b.add_argument("--download-rate", type=float, default=5.0, metavar="PER_S", help="max requests per second (default 5)")
    b.add_argument("--download-timeout", type=float, default=10.0, metavar="S", help="per request (default 10)")
    b.add_argument("--download-retries", type=int, default=3, metavar="N", help="retries with exponential backoff (default 3)")
    b.add_argument("--allow-private-hosts", action="store_true",
                   help="also fetch posters from loopback, private and link-local addresses (a local mirror); "
                        "by default only public hosts are fetched")
    b.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS, metavar="N",
                   help=f"refuse larger posters as possible decompression bombs (default {MAX_IMAGE_PIXELS:,})")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the folder to this Hub dataset repo when built")
    b.add_argument("--private", action="store_true", help="create the Hub repo private")

    u = sub.add_parser("push", help="upload a built folder to a Hub dataset repo")
    u.add_argument("folder")
    u.add_argument("repo_id")
    u.add_argument("--private", action="store_true")
    return p


def _options(args):
    renames = parse_renames(args.rename_genre)
    genres = [g.strip() for g in args.genres.split(",") if g.strip()] if args.genres else None
    if args.min_genre_count < 1:
        raise ValueError("--min-genre-count must be at least 1.")
    return BuildOptions(
        sources=args.source, out=args.out, formats=args.formats, min_genre_count=args.min_genre_count,
        genres=genres, seed=args.seed, split_ratios=parse_ratios(args.split_ratios), limit=args.limit,
        download_posters=args.download_posters, poster_cache=args.poster_cache, download_rate=args.download_rate,
        download_timeout=args.download_timeout, download_retries=args.download_retries, rename_genres=renames,
        drop_unlabeled=args.drop_unlabeled, max_image_pixels=args.max_image_pixels, progress=not args.no_progress,
        allow_private_hosts=args.allow_private_hosts,
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "push":
        try:
            print(push_folder(args.folder, args.repo_id, private=args.private))
        except PushError as e:
            print(f"error: {e}", file=sys.stderr)
            return 3
        return 0

    try:
        opts = _options(args)
        start = time.perf_counter()
        result = build(opts)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    print(format_summary(result.report, Path(args.out)))
    print(f"{result.report['totals']['kept']:,} movies in {seconds:.1f} s")
    if args.push_to_hub:
        try:
            print(f"Pushed to {push_folder(args.out, args.push_to_hub, private=args.private)}")
        except PushError as e:
            print(f"error: {e}", file=sys.stderr)
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
