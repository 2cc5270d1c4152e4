"""What the page's own handlers accept back from a client.

The Space's page sends a /predict answer back to its rendering handlers (the verdict and table, the explanation
view). Any client can call those handlers over raw HTTP with anything in place of that answer, so each one reads
it only through these checks: the shape /predict gives, over the served model's genres, every size bounded by
the model and the app's limits. A value that fails is a `PageInputError` (one line, safe to log), never an
exception deep in the rendering. Nothing here needs Gradio.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

MAX_GRID = 16  # the occlusion map is grid x grid (mmgcs.explain.DEFAULT_GRID is 7)
MAX_NOTES = 4
MAX_NOTE_CHARS = 300


class PageInputError(ValueError):
    """A value sent to a page handler does not have the shape of what /predict returns."""


def _score(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PageInputError(f"{where} is not a finite number")
    return float(value)


def _scores(value: Any, labels: Sequence[str], where: str) -> dict[str, float]:
    if not isinstance(value, dict) or not set(value) <= set(labels):
        raise PageInputError(f"{where} is not a dict over the model's genres")
    return {genre: _score(p, f"{where}[{genre!r}]") for genre, p in value.items()}


def checked_result(result: Any, labels: Sequence[str]) -> Optional[dict]:
    """`result` with /predict's shape (`scores` over `labels`, `genres` among them, optional `by_modality` views
    and `notes`), or None for an empty one; anything else raises `PageInputError`."""
    if not result:
        return None
    if not isinstance(result, dict):
        raise PageInputError(f"the result is a {type(result).__name__}, not a dict")
    scores = _scores(result.get("scores"), labels, "scores")
    if not scores:
        raise PageInputError("the result has no scores")
    genres = result.get("genres")
    if not isinstance(genres, list) or not all(isinstance(g, str) and g in scores for g in genres):
        raise PageInputError("genres is not a list of scored genres")
    views = result.get("by_modality") or {}
    if not isinstance(views, dict) or not set(views) <= {"text", "image", "fused"}:
        raise PageInputError("by_modality is not a dict of the text, image and fused views")
    notes = result.get("notes") or []
    if (not isinstance(notes, list) or len(notes) > MAX_NOTES
            or not all(isinstance(n, str) and len(n) <= MAX_NOTE_CHARS for n in notes)):
        raise PageInputError("notes is not a short list of short texts")
    return {"scores": scores, "genres": list(dict.fromkeys(genres)), "notes": notes,
            "by_modality": {view: _scores(v, labels, f"by_modality[{view!r}]") for view, v in views.items()}}


def checked_explanation(result: Any, labels: Sequence[str], max_text_chars: int) -> Optional[dict]:
    """The explanation in a /predict result, as `{"text": str | None, "genres": {genre: {"words": [(start, end,
    score)], "occlusion": grid x grid list | None}}}`, or None when the result has none; anything else raises
    `PageInputError`. Word spans lie inside the text; the text is at most `max_text_chars` long."""
    if not isinstance(result, dict) or not result.get("explanation"):
        if result and not isinstance(result, dict):
            raise PageInputError(f"the result is a {type(result).__name__}, not a dict")
        return None
    explanation = result["explanation"]
    if not isinstance(explanation, dict):
        raise PageInputError("explanation is not a dict")
    text = explanation.get("text")
    if text is not None and (not isinstance(text, str) or len(text) > max_text_chars):
        raise PageInputError(f"explanation.text is not a text of at most {max_text_chars:,} characters")
    entries = explanation.get("genres")
    if not isinstance(entries, dict) or not set(entries) <= set(labels):
        raise PageInputError("explanation.genres is not a dict over the model's genres")
    return {"text": text, "genres": {genre: _entry(entry, len(text or ""), f"explanation.genres[{genre!r}]")
                                     for genre, entry in entries.items()}}


def _entry(entry: Any, text_chars: int, where: str) -> dict:
    if not isinstance(entry, dict):
        raise PageInputError(f"{where} is not a dict")
    words = entry.get("words") or []
    if not isinstance(words, list) or len(words) > text_chars:
        raise PageInputError(f"{where}.words is not a list of word spans of the text")
    spans = []
    for span in words:
        if (not isinstance(span, (list, tuple)) or len(span) != 3
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in span[:2])
                or not 0 <= span[0] < span[1] <= text_chars):
            raise PageInputError(f"{where}.words has a span outside the text")
        spans.append((span[0], span[1], _score(span[2], f"{where}.words score")))
    grid = entry.get("occlusion")
    if grid is not None:
        if (not isinstance(grid, list) or not 0 < len(grid) <= MAX_GRID
                or not all(isinstance(row, list) and len(row) == len(grid) for row in grid)):
            raise PageInputError(f"{where}.occlusion is not a square grid of at most {MAX_GRID} x {MAX_GRID}")
        grid = [[_score(v, f"{where}.occlusion") for v in row] for row in grid]
    return {"words": spans, "occlusion": grid}


def checked_genre(genre: Any, explained: Sequence[str]) -> str:
    """The genre to show: `genre` when it is one of those explained, else the first of them."""
    return genre if isinstance(genre, str) and genre in explained else explained[0]


__all__ = ["PageInputError", "checked_explanation", "checked_genre", "checked_result"]
