"""What a source reader yields (one raw movie) and the build report that records every drop and change."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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
        event = {"action": action, "source": source, "id": id, "reason": reason, "detail": detail}
        if where:
            event["where"] = where
        self.events.append(event)

    def count(self, source: str, key: str, n: int = 1) -> None:
        self.sources.setdefault(source, Counter())[key] += n

    def reason_counts(self, action: str) -> Counter:
        return Counter(e["reason"] for e in self.events if e["action"] == action)
