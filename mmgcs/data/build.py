"""`python -m mmgcs.data build`: sources → validated movies → labels → splits → Hub-layout folder + report.

Every row that is dropped or changed is recorded in build_report.json by id (or line) and reason; nothing is
lost silently, and no one row stops the build (a line too long or too deeply nested to read, a plot over
`MAX_PLOT_CHARS`: that row's report). The --out folder is checked writable before any source is read. The output is reproducible bit for bit for the same inputs, options and seed.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
from datasets.table import InMemoryTable
from tqdm.auto import tqdm

import mmgcs

from mmgcs.data.card import render_card
from mmgcs.data.confine import Refusal, read_confined, unidentified_image_detail
from mmgcs.data.genres import canonical_genre, select_labels
from mmgcs.data.images import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, InvalidImageError, PreparedPoster, prepare_poster
from mmgcs.data.download import PosterDownloader
from mmgcs.data.outfiles import unwritable_folder
from mmgcs.data.records import BuildReport, RawMovie
from mmgcs.data.sources import detect_format, get_format, source_name
from mmgcs.data.splits import SPLITS, stratified_split

DEFAULT_POSTER_CACHE = ".cache/posters"
MAX_SHARD_BYTES = 500 * 1024 * 1024  # the Hub's usual parquet shard size


@dataclass
class BuildOptions:
    sources: list[str]
    out: str
    formats: list[str] | None = None  # one for all sources, or one per source
    min_genre_count: int = 50
    genres: list[str] | None = None
    seed: int = 42
    split_ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    limit: int | None = None  # read at most this many rows per source (quick runs)
    download_posters: bool | None = None  # None: per format (CSV yes, jsonl no)
    poster_cache: str = DEFAULT_POSTER_CACHE
    download_rate: float = 5.0
    download_timeout: float = 10.0
    download_retries: int = 3
    rename_genres: dict[str, str] = field(default_factory=dict)
    drop_unlabeled: bool = False
    max_image_pixels: int = MAX_IMAGE_PIXELS
    progress: bool = True
    allow_private_hosts: bool = False  # let the downloader fetch from loopback/private addresses (local test servers)


@dataclass
class Movie:
    """A validated row, ready for the dataset."""

    id: int
    title: str | None
    plot: str | None
    genres: list[str]
    source: str
    where: str
    poster_file: Path | None = None
    poster_root: Path | None = None  # the folder poster_file must resolve inside (its source, or the download cache)
    poster_url: str | None = None
    split: str | None = None
    official_split: bool = False
    poster: bytes | None = None  # validated, embeddable bytes
    poster_format: str | None = None


@dataclass
class BuildResult:
    dataset: datasets.DatasetDict
    report: dict
    out: Path
    # stage -> (seconds, peak RSS MB so far); kept out of the report, which must be reproducible
    timings: dict[str, tuple[float, float]] = field(default_factory=dict)


def build(opts: BuildOptions) -> BuildResult:
    out = Path(opts.out)
    unwritable = unwritable_folder(out)  # now, not after reading every source and checking every poster
    if unwritable:
        raise ValueError(f"--out {opts.out!r}: {unwritable}")
    report = BuildReport()
    clock = _Clock()
    raw, source_info = _read_sources(opts, report)
    movies = _dedupe(raw, report)
    movies = [_clean(m, opts, report) for m in movies]
    clock.lap("read")
    _attach_posters(movies, source_info, opts, report)
    movies = _drop_empty(movies, report)
    clock.lap("posters")
    labels, removed = _choose_labels(movies, opts, report)
    if opts.drop_unlabeled:
        movies = [m for m in movies if m.genres or _drop(report, m, "no_label", "no genre left in the label set (--drop-unlabeled)")]
    _assign_splits(movies, labels, opts)
    clock.lap("labels+splits")
    dataset = _to_dataset(movies, labels)
    clock.lap("arrow")
    summary = _summarize(movies, labels, removed, source_info, opts, report)
    _write(dataset, summary, out)
    clock.lap("write")
    return BuildResult(dataset, summary, out, clock.laps)


class _Clock:
    """Seconds per stage and the peak RSS (MB) reached by the end of each, for benchmarks/bench_build.py."""

    def __init__(self):
        self.laps: dict[str, tuple[float, float]] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = (now - self._t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        self._t = now


# ---------------------------------------------------------------- reading


def _read_sources(opts: BuildOptions, report: BuildReport) -> tuple[list[Movie], dict[str, dict]]:
    if not opts.sources:
        raise ValueError("Give at least one --source PATH.")
    formats = opts.formats or []
    if len(formats) not in (0, 1, len(opts.sources)):
        raise ValueError(f"Give one --format for all sources or one per --source; got {len(formats)} for {len(opts.sources)} sources.")
    movies: list[Movie] = []
    info: dict[str, dict] = {}
    for i, src in enumerate(opts.sources):
        path = Path(src)
        fmt = get_format(formats[0] if len(formats) == 1 else formats[i]) if formats else detect_format(path)
        if not path.exists():
            raise FileNotFoundError(f"Source {src!r} does not exist. Check the --source path.")
        name = source_name(path)
        if name in info:  # two folders with the same name: keep provenance distinct
            name = f"{name}-{i}"
        info[name] = {"path": src, "format": fmt.name, "download": fmt.download_by_default if opts.download_posters is None else opts.download_posters}
        n = 0
        root = path if path.is_dir() else path.parent
        rows = fmt.read(path, name, report)
        for row in tqdm(rows, desc=f"reading {name}", unit=" rows", disable=not opts.progress, file=sys.stderr):
            if opts.limit is not None and n >= opts.limit:
                break
            movies.append(_movie(row, root))
            n += 1
        info[name]["read"] = n + sum(1 for e in report.events if e["source"] == name and e["action"] == "dropped")
    return movies, info


def _movie(row: RawMovie, root: Path) -> Movie:
    return Movie(
        id=row.id, title=row.title, plot=row.plot, genres=list(row.genres), source=row.source, where=row.where,
        poster_file=row.poster_file, poster_root=root, poster_url=row.poster_url, split=row.split,
        official_split=row.split is not None,
    )


def _dedupe(movies: list[Movie], report: BuildReport) -> list[Movie]:
    first: dict[int, Movie] = {}
    kept = []
    for m in movies:
        if m.id in first:
            f = first[m.id]
            report.dropped(m.source, m.id, "duplicate_id", f"id {m.id} already read from {f.source} ({f.where}); the first is kept", m.where)
            continue
        first[m.id] = m
        kept.append(m)
    return kept


def _clean(m: Movie, opts: BuildOptions, report: BuildReport) -> Movie:
    m.title = m.title.strip() or None if m.title else None
    plot = m.plot.strip() if isinstance(m.plot, str) else None
    if not plot:
        if m.plot is not None:
            report.changed(m.source, m.id, "empty_plot", "the plot is empty or whitespace only; stored as null", m.where)
        plot = None
    m.plot = plot
    genres: list[str] = []
    for g in m.genres:
        if g in opts.rename_genres:
            report.changed(m.source, m.id, "genre_renamed", f"genre {g!r} renamed to {opts.rename_genres[g]!r} (--rename-genre)", m.where)
            g = opts.rename_genres[g]
        name, note = canonical_genre(g)
        if note:
            reason = "unknown_genre" if note.startswith("unknown") else "genre_normalized"
            report.changed(m.source, m.id, reason, note, m.where)
        if name in genres:
            report.changed(m.source, m.id, "duplicate_genre", f"genre {name!r} listed twice; kept once", m.where)
            continue
        genres.append(name)
    m.genres = genres
    return m


# ---------------------------------------------------------------- posters


def _attach_posters(movies, source_info, opts: BuildOptions, report: BuildReport) -> None:
    to_fetch = [m for m in movies if m.poster_file is None and m.poster_url and source_info[m.source]["download"]]
    if to_fetch:
        downloader = PosterDownloader(opts.poster_cache, rate=opts.download_rate, timeout=opts.download_timeout,
                                      retries=opts.download_retries, allow_private_hosts=opts.allow_private_hosts)
        bar = tqdm(total=len({m.poster_url for m in to_fetch}), desc="downloading posters", unit=" posters", disable=not opts.progress, file=sys.stderr)
        results = downloader.fetch_many([m.poster_url for m in to_fetch], progress=lambda r: bar.update())
        bar.close()
        for m in to_fetch:
            r = results[m.poster_url]
            if r.path is not None:
                m.poster_file, m.poster_root = r.path, downloader.cache_dir
            else:
                report.changed(m.source, m.id, "poster_download_failed", f"{m.poster_url}: {r.error}; poster stored as null", m.where)
    with_file = [m for m in movies if m.poster_file is not None]
    # PIL decodes without the GIL: threads use every core; results come back in order, so the report is stable.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        checked = pool.map(lambda m: _check_poster(Path(m.poster_file), m.poster_root, opts.max_image_pixels), with_file)
        bar = tqdm(zip(with_file, checked), total=len(with_file), desc="checking posters", unit=" posters",
                   disable=not opts.progress, file=sys.stderr)
        for m, (prepared, reason, detail) in bar:
            if prepared is None:
                report.changed(m.source, m.id, reason, detail, m.where)
                continue
            if prepared.change:
                report.changed(m.source, m.id, "poster_normalized", f"{Path(m.poster_file).name}: {prepared.change}", m.where)
            m.poster, m.poster_format = prepared.data, prepared.format


def _check_poster(path: Path, root: Path, max_pixels: int) -> tuple[PreparedPoster | None, str | None, str | None]:
    """(prepared poster, None, None) or (None, reason, detail). Only a regular file inside `root` is read, and
    at most MAX_IMAGE_BYTES of it (confine.py); the detail never quotes the file."""
    data = read_confined(path, root, MAX_IMAGE_BYTES)
    if isinstance(data, Refusal):
        return None, data.reason, data.detail
    try:
        return prepare_poster(data, max_pixels=max_pixels, source=path.name), None, None
    except InvalidImageError as e:
        return None, "invalid_poster", unidentified_image_detail(path.name, data) or f"{e} Poster stored as null."


def _drop(report: BuildReport, m: Movie, reason: str, detail: str) -> bool:
    report.dropped(m.source, m.id, reason, detail, m.where)
    return False


def _drop_empty(movies: list[Movie], report: BuildReport) -> list[Movie]:
    return [
        m for m in movies
        if m.plot is not None or m.poster is not None
        or _drop(report, m, "no_plot_no_poster", "neither a plot nor a usable poster: nothing to learn from")
    ]


# ---------------------------------------------------------------- labels and splits


def _choose_labels(movies: list[Movie], opts: BuildOptions, report: BuildReport) -> tuple[list[str], dict[str, int]]:
    counts = Counter(g for m in movies for g in m.genres)
    wanted = [canonical_genre(g)[0] for g in opts.genres] if opts.genres else None  # "drama" means Drama
    labels, removed = select_labels(counts, opts.min_genre_count, wanted)
    keep = set(labels)
    why = "not in --genres" if opts.genres else f"fewer than {opts.min_genre_count} movies"
    for m in movies:
        gone = [g for g in m.genres if g not in keep]
        if gone:
            m.genres = [g for g in m.genres if g in keep]
            report.changed(m.source, m.id, "genres_removed", f"{gone} left out of the labels ({why})", m.where)
        if not m.genres:
            report.changed(m.source, m.id, "no_label", "no genre in the label set" + ("" if opts.drop_unlabeled else "; kept with an empty genre list"), m.where)
    return labels, removed


def _assign_splits(movies: list[Movie], labels: list[str], opts: BuildOptions) -> None:
    rest = [m for m in movies if m.split is None]
    index = {g: i for i, g in enumerate(labels)}
    # Besides the genres, stratify over the source and poster presence, so every split gets its share of
    # poster-less movies and of each source (evaluation by modality stays comparable across splits).
    strata = sorted({(m.source, m.poster is not None) for m in rest})
    extra = {k: len(labels) + i for i, k in enumerate(strata)} if len(strata) > 1 else {}
    y = np.zeros((len(rest), len(labels) + len(extra)), dtype=bool)
    for r, m in enumerate(rest):
        for g in m.genres:
            y[r, index[g]] = True
        if extra:
            y[r, extra[(m.source, m.poster is not None)]] = True
    assigned = stratified_split([m.id for m in rest], y, opts.split_ratios, opts.seed)
    for m in rest:
        m.split = assigned[m.id]
    sizes = Counter(m.split for m in movies)
    empty = [s for s in SPLITS if not sizes[s]]
    if empty:  # datasets cannot load a split with no rows
        raise ValueError(
            f"Split(s) {empty} would be empty: {len(movies)} movies are too few for ratios {list(opts.split_ratios)}. "
            "Add movies or change --split-ratios."
        )


# ---------------------------------------------------------------- dataset and files


def features_for(labels: list[str]):
    return datasets.Features(
        {
            "id": datasets.Value("int64"),
            "title": datasets.Value("string"),
            "plot": datasets.Value("string"),
            "poster": datasets.Image(),
            "genres": datasets.Sequence(datasets.ClassLabel(names=list(labels))),
            "source": datasets.Value("string"),
        }
    )


def _to_dataset(movies: list[Movie], labels: list[str]):
    """One in-memory Arrow table per split, built column by column with pyarrow: the poster bytes are copied
    once (Dataset.from_dict's row-wise encoding took ~5x the poster bytes in peak memory)."""
    features = features_for(labels)
    schema = features.arrow_schema
    index = {g: i for i, g in enumerate(labels)}
    ext = {"JPEG": "jpg", "PNG": "png"}
    splits = {}
    for split in SPLITS:
        rows = sorted((m for m in movies if m.split == split), key=lambda m: m.id)
        has = [m.poster is not None for m in rows]
        poster = pa.StructArray.from_arrays(
            [pa.array([m.poster for m in rows], pa.binary()),
             # the path is only a file-name hint (format); the bytes are what is stored
             pa.array([f"{m.id}.{ext[m.poster_format]}" if h else None for m, h in zip(rows, has)], pa.string())],
            fields=list(schema.field("poster").type),
            mask=pa.array([not h for h in has], pa.bool_()),
        )
        table = pa.Table.from_arrays(
            [pa.array([m.id for m in rows], pa.int64()),
             pa.array([m.title for m in rows], pa.string()),
             pa.array([m.plot for m in rows], pa.string()),
             poster,
             pa.array([[index[g] for g in m.genres] for m in rows], schema.field("genres").type),
             pa.array([m.source for m in rows], pa.string())],
            schema=schema,
        )
        info = datasets.DatasetInfo(features=features)
        splits[split] = datasets.Dataset(
            InMemoryTable(table), info=info, split=datasets.NamedSplit(split), fingerprint=_content_fingerprint(table)
        )
    return datasets.DatasetDict(splits)


def _content_fingerprint(table) -> str:
    """A fingerprint from the table's bytes: the same content always gets the same one (feature caches key on
    it), and hashing the Arrow buffers in place avoids datasets' default of pickling the whole table."""
    h = hashlib.sha256(str(table.schema).encode())
    for column in table.columns:
        for chunk in column.chunks:
            for buf in chunk.buffers():
                if buf is not None:
                    h.update(memoryview(buf))
    return h.hexdigest()[:32]


def _write(dataset, summary: dict, out: Path) -> None:
    # datasets' own per-step bars ("Map", "Creating parquet") would bury ours
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        _write_files(dataset, summary, out)
    except OSError as e:  # a full disk, or the folder made read-only since the check
        raise ValueError(
            f"Could not write the dataset to {str(out)!r} ({e.strerror or e}); what is there is incomplete and must "
            "not be used. Free space (or pick another --out) and run the build again."
        ) from None
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _write_files(dataset, summary: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    data_dir = out / "data"
    if data_dir.exists():  # stale shards of an earlier build would be loaded with the new ones
        for old in data_dir.glob("*.parquet"):
            old.unlink()
    data_dir.mkdir(exist_ok=True)
    split_bytes, download_size = {}, 0
    for split, ds in dataset.items():
        nbytes = ds.data.nbytes
        n_shards = max(1, -(-nbytes // MAX_SHARD_BYTES))
        for i in range(n_shards):
            shard = ds.shard(num_shards=n_shards, index=i, contiguous=True)
            path = data_dir / f"{split}-{i:05d}-of-{n_shards:05d}.parquet"
            shard.to_parquet(str(path))
            download_size += path.stat().st_size
        split_bytes[split] = nbytes
    (out / "README.md").write_text(render_card(dataset, split_bytes, download_size, summary), encoding="utf-8")
    (out / "build_report.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _summarize(movies, labels, removed, source_info, opts: BuildOptions, report: BuildReport) -> dict:
    sources = {}
    for name, info in source_info.items():
        mine = [m for m in movies if m.source == name]
        sources[name] = {
            **{k: v for k, v in info.items() if k != "download"},
            "kept": len(mine),
            "dropped": sum(1 for e in report.events if e["source"] == name and e["action"] == "dropped"),
            "with_poster": sum(m.poster is not None for m in mine),
            "without_poster": sum(m.poster is None for m in mine),
            "official_split": sum(m.official_split for m in mine),
            "changed_rows": len({e["id"] for e in report.events if e["source"] == name and e["action"] == "changed"}),
        }
    splits = {}
    for split in SPLITS:
        rows = [m for m in movies if m.split == split]
        per_genre = Counter(g for m in rows for g in m.genres)
        splits[split] = {
            "movies": len(rows),
            "with_poster": sum(m.poster is not None for m in rows),
            "with_plot": sum(m.plot is not None for m in rows),
            "without_label": sum(not m.genres for m in rows),
            "per_genre": {g: per_genre.get(g, 0) for g in labels},
        }
    all_counts = Counter(g for m in movies for g in m.genres)
    return {
        "mmgcs_version": mmgcs.__version__,
        "options": {
            "sources": list(opts.sources),
            "formats": {n: i["format"] for n, i in source_info.items()},
            "min_genre_count": opts.min_genre_count,
            "genres": opts.genres,
            "seed": opts.seed,
            "split_ratios": [round(r, 6) for r in opts.split_ratios],
            "limit": opts.limit,
            "max_image_pixels": opts.max_image_pixels,
            "rename_genres": opts.rename_genres,
            "drop_unlabeled": opts.drop_unlabeled,
        },
        "labels": labels,
        "removed_genres": removed,
        "totals": {
            "read": sum(s["read"] for s in sources.values()),
            "kept": len(movies),
            "dropped": sum(1 for e in report.events if e["action"] == "dropped"),
            "with_poster": sum(m.poster is not None for m in movies),
            "without_label": sum(not m.genres for m in movies),
        },
        "sources": sources,
        "splits": splits,
        "per_genre": {g: all_counts.get(g, 0) for g in labels},
        "dropped_by_reason": dict(sorted(report.reason_counts("dropped").items())),
        "changed_by_reason": dict(sorted(report.reason_counts("changed").items())),
        "events": report.events,
    }


def format_summary(summary: dict, out: Path) -> str:
    """The table printed when a build finishes."""
    t = summary["totals"]
    lines = [f"Built {out}: {t['kept']:,} movies kept of {t['read']:,} read, {t['dropped']:,} dropped, {t['with_poster']:,} with a poster.", ""]
    lines.append(f"{'source':<22}{'format':<8}{'read':>8}{'kept':>8}{'dropped':>9}{'poster':>8}{'changed':>9}")
    for name, s in summary["sources"].items():
        lines.append(f"{name:<22}{s['format']:<8}{s['read']:>8,}{s['kept']:>8,}{s['dropped']:>9,}{s['with_poster']:>8,}{s['changed_rows']:>9,}")
    lines += ["", f"{'split':<12}{'movies':>8}{'poster':>8}{'plot':>8}{'no label':>10}"]
    for name, s in summary["splits"].items():
        lines.append(f"{name:<12}{s['movies']:>8,}{s['with_poster']:>8,}{s['with_plot']:>8,}{s['without_label']:>10,}")
    lines += ["", f"{len(summary['labels'])} labels: " + ", ".join(f"{g} ({n})" for g, n in summary["per_genre"].items())]
    if summary["removed_genres"]:
        lines.append("left out: " + ", ".join(f"{g} ({n})" for g, n in summary["removed_genres"].items()))
    for action in ("dropped", "changed"):
        reasons = summary[f"{action}_by_reason"]
        if reasons:
            lines.append(f"{action}: " + ", ".join(f"{r} {n}" for r, n in reasons.items()))
    lines.append(f"Every dropped or changed row, by id and reason: {out / 'build_report.json'}")
    return "\n".join(lines)
