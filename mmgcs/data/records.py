"""What a source reader yields (one raw movie) and the build report that records every drop and change."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The longest plot any entry point reads: the Space's limit (`mmgcs.serving.Limits.max_plot_chars`) and that of
# `mmgcs predict`, `evaluate` and `data build`. A longer plot is that row's error, never cut silently: the model
# reads a summary (TMDb overviews are under 1,000 characters), and a 147 MB "plot" once took the tokenizer to 7.5 GB
# and an abort.
MAX_PLOT_CHARS = 10_000

# The most a reader holds of one source row (a JSONL line, a CSV line or field): a longer one is that row's error
# and the rest of it is read past, never held. Far above any real row: a 10,000-character plot of emoji escaped as
# JSON (`\ud83c\udfac`, 12 bytes each) is 120 KB.
MAX_ROW_BYTES = 1 << 20


def plot_too_long(plot: Any) -> str | None:
    """The message for a plot over `MAX_PLOT_CHARS` (counted as the Space counts it, without surrounding
    whitespace), or None when it is within the limit or not text."""
    if not isinstance(plot, str) or len(plot) <= MAX_PLOT_CHARS:
        return None
    length = len(plot.strip())
    if length <= MAX_PLOT_CHARS:
        return None
    return (f"the plot is {length:,} characters long; the limit is {MAX_PLOT_CHARS:,}. Give a summary of a paragraph "
            "or two, like the plots the model was trained on")


# An id as a report shows it: longer ones are cut (a row is data; its id may be anything up to MAX_ROW_BYTES).
MAX_REPORTED_ID_CHARS = 100


def reportable_id(value: Any) -> Any:
    """A row's id as reports and outputs may hold it: a number or text (cut to `MAX_REPORTED_ID_CHARS`), else None.
    A nested list or object is never kept: printing a deeply nested one raises RecursionError, and it is content."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return value if len(value) <= MAX_REPORTED_ID_CHARS else value[:MAX_REPORTED_ID_CHARS] + "…"
    return None


@dataclass
class RawMovie:
    """One movie as read from a source, before validation. Readers fill what the source has."""

    source: str  # provenance name, e.g. "tmdb5000"
    where: str  # file and line (or file name) for messages, e.g. "movies.jsonl:12"
    id: Any
    title: str | None = None
    plot: str | None = None
    genres: list[str] = field(default_factory=list)
    poster_file: Path | None = None  # a local poster file
    poster_url: str | None = None  # a remote poster, fetched only when downloading is enabled
    split: str | None = None  # the source's official split (train/validation/test), if it has one


@dataclass
class BuildReport:
    """Counts and per-row events of one build; written as build_report.json."""

    events: list[dict] = field(default_factory=list)
    sources: dict[str, dict] = field(default_factory=dict)

    def dropped(self, source: str, id: Any, reason: str, detail: str, where: str | None = None) -> None:
        self._add("dropped", source, id, reason, detail, where)

    def changed(self, source: str, id: Any, reason: str, detail: str, where: str | None = None) -> None:
        self._add("changed", source, id, reason, detail, where)

    def _add(self, action: str, source: str, id: Any, reason: str, detail: str, where: str | None) -> None:
        event = {"action": action, "source": source, "id": reportable_id(id), "reason": reason, "detail": detail}
        if where:
            event["where"] = where
        self.events.append(event)

    def count(self, source: str, key: str, n: int = 1) -> None:
        self.sources.setdefault(source, Counter())[key] += n

    def reason_counts(self, action: str) -> Counter:
        return Counter(e["reason"] for e in self.events if e["action"] == action)
