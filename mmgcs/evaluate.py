"""Score a saved model on a held-out movie set: ``python -m mmgcs.evaluate --model DIR --data PATH [--split test]``.

``--data`` is either a dataset built by ``python -m mmgcs.data build`` (a folder in Hub layout, or a Hub id) or a
raw source folder in any format the data builder reads (``movies.jsonl`` + posters, MM-IMDb, CSV), so any movie
set can be scored without building it first (read by ``mmgcs.data.inputs.read_movies``, as ``mmgcs predict`` reads
movies). Genres are matched to the model's labels by name; genres the model does not know and every row that cannot be
scored are reported by id, never dropped silently.

The report (printed, and written whole with ``--out FILE``) holds: ``counts`` (rows == scored + skipped),
``skipped`` and ``bad_posters`` (by id, with the reason: also a line too long or nested too deeply to read and a
plot over the 10,000-character cap, ``mmgcs.data.records.MAX_PLOT_CHARS``), ``unknown_genres``,
``rows_without_model_genre``, ``duplicate_ids`` (ids scored on more than one row),
``metrics`` (:func:`mmgcs.metrics.compute_metrics` at the bundle's thresholds), ``intervals`` (bootstrap 95%),
``by_input`` (fused vs plot-only vs poster-only on the movies that have both) and, when the bundle has tuned
per-genre thresholds, ``metrics_at_global_threshold`` for comparison. ``--predictions FILE`` adds one JSON line
per movie. Both files are checked writable before the model loads.
"""

from __future__ import annotations

if __name__ == "__main__":  # `python -m mmgcs.evaluate`: the CPU policy, before anything loads torch
    from mmgcs.runtime import configure_cpu_policy

    configure_cpu_policy()

import argparse
import itertools
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np

from mmgcs.data.genres import canonical_genre, genre_key, parse_renames
from mmgcs.data.images import InvalidImageError
from mmgcs.data.inputs import Movie, Movies, batched, poster_image, read_movies
from mmgcs.data.outfiles import unwritable_file
from mmgcs.data.records import plot_too_long
from mmgcs.inference import Predictor
from mmgcs.metrics import bootstrap_intervals, compute_metrics, decide, decision_thresholds, resolve_thresholds
from mmgcs.models.load import ModelNotFoundError, load_model
from mmgcs.models.preprocessing import plot_present
from mmgcs.progress import progress as progress_bar
from mmgcs.progress import set_quiet
from mmgcs.report import format_metrics_table


# Duplicate ids the report names (it counts them all).
MAX_NAMED_DUPLICATES = 10

# The same genre under the TMDb and IMDb vocabularies, so a model trained on one scores on the other.
# Applied only when the data's name is not itself a model label, and reported.
CROSS_VOCABULARY_ALIASES = {"Sci-Fi": "Science Fiction", "Science Fiction": "Sci-Fi"}


class GenreMapper:
    """Maps data genre names to model label columns: exact name, a known spelling variant, or ``--rename-genre``."""

    def __init__(self, labels: Sequence[str], renames: Optional[dict[str, str]] = None):
        self.labels = list(labels)
        self.index = {name: i for i, name in enumerate(self.labels)}
        self.by_key = {genre_key(name): i for i, name in enumerate(self.labels)}
        self.renames = dict(renames or {})
        bad = {new for new in self.renames.values() if new not in self.index}
        if bad:
            raise ValueError(f"--rename-genre targets {sorted(bad)} are not labels of the model; its labels: {self.labels}")
        self.unknown: Counter = Counter()
        self.aliased: dict[str, str] = {}

    def column(self, name: str) -> Optional[int]:
        name = self.renames.get(name, name)
        canonical = canonical_genre(name)[0]
        for candidate in (name, canonical):
            if candidate in self.index:
                return self.index[candidate]
            if genre_key(candidate) in self.by_key:
                return self.by_key[genre_key(candidate)]
        alias = CROSS_VOCABULARY_ALIASES.get(canonical)
        if alias in self.index:
            self.aliased[name] = alias
            return self.index[alias]
        return None

    def encode(self, genres: Iterable[str]) -> np.ndarray:
        out = np.zeros(len(self.labels), dtype=np.int64)
        for g in genres:
            j = self.column(g)
            if j is None:
                self.unknown[g] += 1
            else:
                out[j] = 1
        return out


# ---------------------------------------------------------------- scoring


def _has_poster(poster: Any) -> bool:
    if poster is None:
        return False
    if isinstance(poster, dict):
        return bool(poster.get("bytes") or poster.get("path"))
    return True


def predict_probs(model, plots: list, posters: list, single_inputs: bool = False,
                  titles: Optional[list] = None) -> dict[str, np.ndarray]:
    """Probabilities (B, L) of a batch under ``"fused"``, computed as the model serves them (`mmgcs.inference`,
    the one predict path; the batch's rows in order, one batch).

    With ``single_inputs`` and a two-tower model, also ``"plot_only"`` and ``"poster_only"``: the same rows scored
    with the other modality withheld. The towers run once; only the cheap fusion head runs three times. A view is
    meaningful only for the rows that have its input (the fused scores stand in when no row of the batch has it).
    """
    probs, views = Predictor(model).probabilities(plots, posters, titles, by_modality=single_inputs)
    out = {"fused": probs.numpy()}
    if single_inputs:
        out["plot_only"] = views.get("text", (probs, None))[0].numpy()
        out["poster_only"] = views.get("image", (probs, None))[0].numpy()
    return out


def model_thresholds(model, override: Optional[float] = None) -> tuple[np.ndarray, str]:
    """The decision thresholds to use and where they came from."""
    if override is not None:
        return resolve_thresholds(float(override), len(model.config.labels)), "command line (--threshold)"
    tuned = bool(getattr(model.config, "thresholds", None))
    return decision_thresholds(model.config), "bundle (per-genre, tuned on validation)" if tuned else "bundle (global)"


@dataclass
class _Plan:
    """What the model and the options decide before any row is read."""

    labels: list
    mapper: "GenreMapper"
    modality: str
    use_text: bool
    use_image: bool
    thresholds: np.ndarray
    threshold_source: str
    reads_title: bool
    single_label: bool
    evaluated: list  # the label columns the data annotates

    @property
    def single_inputs(self) -> bool:  # plot vs poster on the movies that have both (cheap: towers run once)
        return self.use_text and self.use_image


@dataclass
class _Tally:
    """What scoring has seen so far, turned into the report at the end."""

    counts: Counter = field(default_factory=Counter)
    refused: list = field(default_factory=list)  # rows the reader could not read, as they are met
    skipped: list = field(default_factory=list)
    bad_posters: list = field(default_factory=list)
    without_model_genre: list = field(default_factory=list)
    probs: list = field(default_factory=list)
    targets: list = field(default_factory=list)
    ids: list = field(default_factory=list)
    alone: dict = field(default_factory=lambda: {"plot_only": [], "poster_only": []})
    has_both: list = field(default_factory=list)


def _plan(model, data: Movies, threshold: Optional[float], modality: str, renames: Optional[dict]) -> _Plan:
    if modality not in ("both", "text", "image"):
        raise ValueError(f"modality must be both, text or image; got {modality!r}")
    labels = list(model.config.labels)
    mapper = GenreMapper(labels, renames)
    use_text = modality in ("both", "text") and getattr(model, "text_tower", None) is not None
    use_image = modality in ("both", "image") and getattr(model, "image_tower", None) is not None
    if not (use_text or use_image):
        raise ValueError(f"The model has no tower for --modality {modality}; use --modality both")
    thresholds, threshold_source = model_thresholds(model, threshold)
    single_label = getattr(model.config, "task", "multilabel") == "singlelabel"
    if single_label:
        threshold_source = "none (single-label: the top genre)"
    # A built dataset's vocabulary says which model genres the data annotates; others cannot be judged here.
    evaluated = list(range(len(labels)))
    if data.vocabulary is not None:
        vocab = GenreMapper(labels, renames)
        annotated = {vocab.column(g) for g in data.vocabulary} - {None}
        evaluated = [j for j in range(len(labels)) if j in annotated]
        if not evaluated:
            raise ValueError(
                f"None of the model's genres {labels} is a label of the data ({data.vocabulary}); "
                "map names with --rename-genre DATA=MODEL"
            )
    # The text the tower reads, as in training (e.g. "{title}. {plot}"); a row without a title gets its plot alone.
    reads_title = "{title}" in getattr(model.config, "text_template", "{plot}")
    return _Plan(labels, mapper, modality, use_text, use_image, thresholds, threshold_source, reads_title, single_label,
                 evaluated)


def _row_inputs(row: Movie, target: np.ndarray, plan: _Plan, data: Movies, tally: _Tally) -> Optional[tuple]:
    """A row's (plot, poster image) to score, or None when it is skipped (recorded with the reason)."""
    if not row.genres and data.vocabulary is None:
        # A raw row without genres has no ground truth. (A built dataset's empty list means "none of the label
        # set", a real all-negative row, scored as training scores it.)
        tally.skipped.append({"id": row.id, "reason": "no genres", "detail": "the movie lists no genre"})
        return None
    if not target.any() and plan.single_label:
        # A single-label model has no right answer for it (training drops such rows too).
        tally.skipped.append({"id": row.id, "reason": "no genre known to the model", "detail": f"genres: {row.genres}"})
        return None
    too_long = plot_too_long(row.plot) if plan.use_text else None  # a built dataset's row (a source's reader refuses it)
    if too_long:
        tally.skipped.append({"id": row.id, "reason": "plot_too_long", "detail": too_long})
        return None
    plot = row.plot if plan.use_text and plot_present(row.plot) else None
    image = None
    if plan.use_image and _has_poster(row.poster):
        try:  # a source's poster path is read confined to its folder, as mmgcs predict and the builder read it
            image = poster_image(row)
        except (InvalidImageError, OSError) as e:
            tally.bad_posters.append({"id": row.id, "error": str(e)})
    if plot is None and image is None:
        wanted = {"both": "plot or poster", "text": "plot", "image": "poster"}[plan.modality]
        tally.skipped.append({"id": row.id, "reason": "no input", "detail": f"no usable {wanted}"})
        return None
    if not target.any():
        tally.without_model_genre.append(row.id)
    tally.counts["with_plot"] += plot is not None
    if plot is not None and plan.reads_title:
        tally.counts["plots_without_title"] += not plot_present(row.title)
    tally.counts["with_poster"] += image is not None
    return plot, image


def _score_chunk(model, chunk: list, plan: _Plan, data: Movies, mapper: GenreMapper, tally: _Tally,
                 pred_file) -> None:
    plots, posters, titles, keep = [], [], [], []
    for row in chunk:
        tally.counts["rows"] += 1
        target = mapper.encode(row.genres)
        inputs = _row_inputs(row, target, plan, data, tally)
        if inputs is not None:
            plots.append(inputs[0])
            posters.append(inputs[1])
            titles.append(row.title if isinstance(row.title, str) else None)  # as compose_text reads it
            keep.append((row, target))
    if not keep:
        return
    probs = predict_probs(model, plots, posters, single_inputs=plan.single_inputs,
                          titles=titles if plan.reads_title else None)
    if plan.single_inputs:
        for name in tally.alone:
            tally.alone[name].extend(probs[name])
    tally.has_both.extend(plot is not None and image is not None for plot, image in zip(plots, posters))
    for (row, target), p in zip(keep, probs["fused"]):
        tally.probs.append(p)
        tally.targets.append(target)
        tally.ids.append(row.id)
        if pred_file:
            pred_file.write(_prediction_record(row, p, target, plan))


class PredictionsWriteError(Exception):
    """--predictions could not be written (e.g. the disk filled); the message says so and what to do."""


class PredictionLines:
    """The --predictions file, one JSON line per scored movie; a failed write raises `PredictionsWriteError`."""

    def __init__(self, path: str | Path):
        self.path, self.lines = Path(path), 0
        try:
            self.file = open(self.path, "w", encoding="utf-8")
        except OSError as e:
            raise self._failed(e) from None

    def write(self, record: dict) -> None:
        try:
            self.file.write(json.dumps(record) + "\n")
        except OSError as e:
            raise self._failed(e) from None
        self.lines += 1

    def close(self) -> None:
        try:
            self.file.close()
        except OSError as e:
            raise self._failed(e) from None

    def _failed(self, e: OSError) -> PredictionsWriteError:
        return PredictionsWriteError(
            f"Could not write --predictions {str(self.path)!r} ({e.strerror or e}) after {self.lines:,} lines; it "
            "is incomplete. Free space (or pick another --predictions) and run the evaluation again.")


def evaluate(
    model,
    data: Movies,
    *,
    batch_size: int = 32,
    threshold: Optional[float] = None,
    modality: str = "both",
    renames: Optional[dict[str, str]] = None,
    limit: int = 0,
    predictions_path: Optional[str | Path] = None,
    progress: Optional[bool] = None,
    n_boot: int = 1000,
) -> dict:
    """Score ``model`` on ``data``; returns the report (counts, skipped rows, unknown genres, metrics).
    ``progress``: a bar of the movies scored (mmgcs.progress); None follows the process's policy."""
    plan = _plan(model, data, threshold, modality, renames)
    mapper = plan.mapper
    tally = _Tally()
    readable = _readable(data, tally)
    rows = itertools.islice(readable, limit) if limit else readable
    size = data.size if data.size is not None else len(data.rows) if hasattr(data.rows, "__len__") else None
    total = min(size, limit) if size is not None and limit else size
    pred_file = PredictionLines(predictions_path) if predictions_path else None
    bar = progress_bar(total=total, desc="scoring", unit="movies", enabled=progress)  # closed below, whatever fails
    try:
        for chunk in batched(rows, batch_size):
            _score_chunk(model, chunk, plan, data, mapper, tally, pred_file)
            bar.update(len(chunk))
    finally:
        bar.close()  # first: closing a file on a full disk raises
        if pred_file:
            pred_file.close()
    report = _base_report(plan, data, mapper, tally)
    if tally.ids:
        _add_metrics(report, plan, tally, model, threshold, n_boot)
    return report


def _readable(data: Movies, tally: _Tally) -> Iterator[Movie]:
    """The rows to score; each the reader refused goes to the report by id, with its reason, as it is met."""
    for movie in data:
        if movie.error is None:
            yield movie
        else:
            where = {"where": movie.row} if movie.row else {}
            tally.refused.append({"id": movie.id, "reason": movie.reason, "detail": movie.error, **where})


def _base_report(plan: _Plan, data: Movies, mapper: GenreMapper, tally: _Tally) -> dict:
    skipped = tally.refused + tally.skipped
    counts = tally.counts
    counts["rows"] += len(tally.refused)  # so that rows == scored + skipped
    counts["scored"] = len(tally.ids)
    counts["skipped"] = len(skipped)
    counts["bad_posters"] = len(tally.bad_posters)
    counts["without_model_genre"] = len(tally.without_model_genre)
    repeated = [i for i, n in Counter(tally.ids).items() if n > 1]
    if repeated:
        counts["duplicate_ids"] = len(repeated)
    counts.update(data.notes)
    labels = plan.labels
    return {
        "data_kind": data.kind,
        "labels": labels,
        "evaluated_labels": [labels[j] for j in plan.evaluated],
        "labels_not_in_data": [labels[j] for j in range(len(labels)) if j not in plan.evaluated],
        "modality": plan.modality,
        "threshold_source": plan.threshold_source,
        "counts": dict(counts),
        "unknown_genres": dict(mapper.unknown.most_common()),
        "genre_aliases": dict(mapper.aliased),
        "skipped": skipped,
        "bad_posters": tally.bad_posters,
        # Scored as all-negative rows: the right answer for them is "none of the model's genres".
        "rows_without_model_genre": tally.without_model_genre,
        # Ids scored on more than one row (each row counts as a movie of its own), the first MAX_NAMED_DUPLICATES.
        "duplicate_ids": repeated[:MAX_NAMED_DUPLICATES],
        "metrics": None,
    }


def _add_metrics(report: dict, plan: _Plan, tally: _Tally, model, threshold: Optional[float], n_boot: int) -> None:
    evaluated, single_label = plan.evaluated, plan.single_label
    probs = np.stack(tally.probs)[:, evaluated]
    targets = np.stack(tally.targets)[:, evaluated]
    names = report["evaluated_labels"]
    thr = plan.thresholds[evaluated]
    report["metrics"] = compute_metrics(probs, targets, names, thr, argmax=single_label)
    if n_boot:
        report["intervals"] = {
            "confidence": 0.95,
            "n_boot": n_boot,
            **bootstrap_intervals(probs, targets, thr, n_boot=n_boot, argmax=single_label),
        }
    both = np.asarray(tally.has_both, dtype=bool)
    if plan.single_inputs and both.any():
        by_input = {"movies": int(both.sum())}
        for name, p in (("fused", probs), *((k, np.stack(v)[:, evaluated]) for k, v in tally.alone.items())):
            m = compute_metrics(p[both], targets[both], names, thr, argmax=single_label)
            by_input[name] = {
                **{k: m[k] for k in ("micro_f1", "macro_f1", "samples_f1", "mAP")},
                "per_genre_f1": {g: v["f1"] for g, v in m["per_genre"].items()},
            }
        report["by_input"] = by_input
    if not single_label and threshold is None and getattr(model.config, "thresholds", None):
        # What the tuned thresholds bought, against the single global threshold.
        glob = compute_metrics(probs, targets, names, float(getattr(model.config, "threshold", 0.5)))
        report["metrics_at_global_threshold"] = {k: v for k, v in glob.items() if k != "per_genre"}


def _prediction_record(row: Movie, probs: np.ndarray, target: np.ndarray, plan: _Plan) -> dict:
    labels = plan.labels
    return {
        "id": row.id,
        "title": row.title,
        "true": [labels[j] for j in np.flatnonzero(target)],
        "predicted": decide(probs[None, :], labels, plan.thresholds, argmax=plan.single_label)[0],
        "scores": {labels[j]: round(float(probs[j]), 6) for j in range(len(labels))},
    }


# ---------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mmgcs.evaluate",
        description="Score a saved MMGCS model on a built dataset split or a raw movie source folder.",
    )
    p.add_argument("--model", required=True, help="model bundle folder (save_pretrained) or Hub model id")
    p.add_argument("--data", required=True, help="built dataset folder / Hub dataset id, or a raw source folder "
                   "(movies.jsonl + posters, MM-IMDb, CSV)")
    p.add_argument("--split", default="test", help="split to score (default: test): of a built dataset, or of a raw "
                   "source with official splits (MM-IMDb); other raw sources are scored whole")
    p.add_argument("--format", default=None, help="raw source format when it cannot be detected (jsonl, mmimdb, csv)")
    p.add_argument("--out", default=None, help="write the full report (metrics, counts, skipped rows) to this JSON file")
    p.add_argument("--predictions", default=None, help="write one JSON line per scored movie (true, predicted, scores)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threshold", type=float, default=None,
                   help="one global threshold instead of the bundle's (per-genre) thresholds")
    p.add_argument("--modality", choices=("both", "text", "image"), default="both",
                   help="score with the plot only, the poster only, or both (default)")
    p.add_argument("--rename-genre", action="append", default=[], metavar="DATA=MODEL",
                   help="map a data genre name to a model label, e.g. 'Sci-Fi=Science Fiction' (repeatable)")
    p.add_argument("--limit", type=int, default=0, help="score only the first N movies (0 = all)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="bootstrap resamples for 95%% intervals of micro/macro/samples F1 (0 = off)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (in a log, without it: a line every 30 s)")
    return p


def _summary(result: dict) -> str:
    c = result["counts"]
    lines = [
        f"model: {result['model']}",
        f"data: {result['data']} ({result['data_kind']}{', split ' + result['split'] if result['split'] else ''})",
        f"movies read: {c.get('rows', 0)}, scored: {c.get('scored', 0)}, skipped: {c.get('skipped', 0)}, "
        f"with plot: {c.get('with_plot', 0)}, with poster: {c.get('with_poster', 0)}, bad posters: {c.get('bad_posters', 0)}",
        f"thresholds: {result['threshold_source']}",
    ]
    if c.get("poster_url_not_fetched"):
        lines.append(f"posters given only as URLs (never downloaded here; scored without them): {c['poster_url_not_fetched']}")
    if c.get("rows_of_other_splits"):
        lines.append(f"movies of the source's other official splits (not scored): {c['rows_of_other_splits']}")
    if result["labels_not_in_data"]:
        lines.append(f"model genres the data does not annotate (not scored): {', '.join(result['labels_not_in_data'])}")
    if result["genre_aliases"]:
        lines.append("genres matched across vocabularies: " + ", ".join(f"{a} -> {b}" for a, b in result["genre_aliases"].items()))
    if result["unknown_genres"]:
        shown = ", ".join(f"{g} ({n})" for g, n in result["unknown_genres"].items())
        lines.append(f"data genres the model does not know (ignored; map with --rename-genre): {shown}")
    if c.get("duplicate_ids"):
        named = ", ".join(map(repr, result["duplicate_ids"]))
        lines.append(f"ids scored on more than one row (each row counts as a movie): {c['duplicate_ids']} ({named}"
                     + (", …)" if c["duplicate_ids"] > len(result["duplicate_ids"]) else ")"))
    if result["rows_without_model_genre"]:
        lines.append(f"movies with none of the model's genres (scored as all-negative): {len(result['rows_without_model_genre'])}")
    if result["skipped"]:
        by_reason = Counter(s["reason"] for s in result["skipped"])
        lines.append("skipped rows: " + ", ".join(f"{r} ({n})" for r, n in by_reason.items())
                     + (" — ids in the --out report" if not result.get("out") else f" — ids in {result['out']}"))
    return "\n".join(lines)


def _checked_renames(args: argparse.Namespace) -> dict[str, str]:
    """The options that need more than argparse's checks; SystemExit naming the fix."""
    try:
        renames = parse_renames(args.rename_genre, form="DATA_NAME=MODEL_NAME", example="Sci-Fi=Science Fiction")
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if args.batch_size < 1:
        raise SystemExit("--batch-size must be at least 1")
    if args.bootstrap < 0:
        raise SystemExit("--bootstrap must be 0 (off) or a number of resamples")
    if args.limit < 0:
        raise SystemExit("--limit must be 0 (every movie) or the number of movies to score")
    return renames


def _load_model(args: argparse.Namespace):
    try:
        return load_model(args.model, args.device)
    except ModelNotFoundError as e:
        raise SystemExit(f"Could not load the model from {args.model!r}: {e.cause}") from e.cause


def _print_metrics(result: dict) -> None:
    print()
    print(format_metrics_table(result["metrics"], markdown=False))
    if result.get("intervals"):
        iv = result["intervals"]
        print(f"\n{iv['confidence']:.0%} bootstrap intervals ({iv['n_boot']} resamples): " + ", ".join(
            f"{k} [{iv[k][0]:.3f}, {iv[k][1]:.3f}]" for k in ("micro_f1", "macro_f1", "samples_f1")))
    if result.get("by_input"):
        b = result["by_input"]
        print(f"\nOn the {b['movies']} movies with both a plot and a poster (micro F1 / macro F1 / mAP):")
        for name in ("fused", "plot_only", "poster_only"):
            mm = b[name]
            print(f"  {name:<12} {mm['micro_f1']:.3f} / {mm['macro_f1']:.3f} / "
                  + ("–" if mm["mAP"] is None else f"{mm['mAP']:.3f}"))


def _check_outputs(args: argparse.Namespace) -> None:
    """--out and --predictions writable, checked before any work (SystemExit naming the reason)."""
    for option, value in (("--out", args.out), ("--predictions", args.predictions)):
        problem = unwritable_file(Path(value)) if value else None
        if problem:
            raise SystemExit(f"{option} {value!r}: {problem}")


def _write_report(result: dict, out: str) -> None:
    try:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    except OSError as e:
        raise SystemExit(f"Could not write the report to --out {out!r} ({e.strerror or e}); the summary above is "
                         "complete. Free space (or pick another --out) and run the evaluation again.") from None


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.quiet:
        set_quiet()
    renames = _checked_renames(args)
    _check_outputs(args)
    try:
        # The data first: a wrong path fails in a second instead of after loading the model.
        data = read_movies(args.data, args.split, args.format, labelled=True, official_split=True)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"Cannot read --data {args.data!r}: {e}") from e
    model = _load_model(args)
    result = {"model": str(args.model), "data": str(args.data), "split": None, "out": args.out}
    try:
        result.update(evaluate(
            model, data, batch_size=args.batch_size, threshold=args.threshold, modality=args.modality,
            renames=renames, limit=args.limit, predictions_path=args.predictions,
            n_boot=args.bootstrap,
        ))
    except (FileNotFoundError, ValueError) as e:  # bad options or data, each message naming the remedy
        raise SystemExit(str(e)) from e
    except PredictionsWriteError as e:
        raise SystemExit(str(e)) from None
    result["split"] = data.split  # known once the rows are read (a raw source's official split)
    print(_summary(result))
    if result["metrics"] is not None:
        _print_metrics(result)
    else:
        print("No movie could be scored: see the skipped rows (reasons above).")
    if args.out:
        _write_report(result, args.out)
    return result


if __name__ == "__main__":
    main()
