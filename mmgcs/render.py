"""The /predict answer drawn for people: the verdict, the per-modality table, the highlighted plot and the poster's
heat map. Each page handler reads the answer it is sent only through `mmgcs.page_checks` (raw HTTP can send these
handlers anything); `space` is the served `mmgcs.space.Space` (its genres, thresholds, limits and thumbnails).
"""

from __future__ import annotations

import html
import logging
import re

import gradio as gr
import numpy as np
import PIL.Image

from mmgcs.page_checks import PageInputError, checked_explanation, checked_genre, checked_result
from mmgcs.request_checks import MAX_TITLE_CHARS, poster_pixels
from mmgcs.runtime import release_freed_memory
from mmgcs.uploads import UploadedPoster

log = logging.getLogger("mmgcs.app")

COLUMNS = ["Genre", "Plot only", "Poster only", "Both", "Threshold", "Predicted"]


def _md_text(text: str) -> str:
    """User text shown literally inside Markdown (no markup, no HTML)."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|~>])", r"\\\1", html.escape(text))


def _pct(p: float | None) -> str:
    return "—" if p is None else f"{p:.0%}"


def _page_input(check, *args):
    """What a page handler was sent, through its check (`mmgcs.page_checks`); None, logged as one line, when it
    does not have /predict's shape (raw HTTP can send these handlers anything)."""
    try:
        return check(*args)
    except PageInputError as e:
        log.warning("a page handler was sent a malformed result (%s)", e)
        return None


def render(result: dict | None, title: str | None, space):
    """The /predict JSON → (verdict Markdown, Label scores, per-modality table)."""
    result = _page_input(checked_result, result, space.labels)
    if not result:
        return "", None, None
    title = title if isinstance(title, str) and len(title) <= MAX_TITLE_CHARS else None
    scores: dict = result["scores"]
    genres: list = result["genres"]
    by_mod: dict = result.get("by_modality") or {}
    text, image = by_mod.get("text"), by_mod.get("image")
    fused = by_mod.get("fused") or scores
    lines = [f"### {_md_text(title.strip())}"] if title and title.strip() else []
    if genres:
        lines.append("**Predicted genres:** " + ", ".join(genres))
    else:
        best = max(scores, key=scores.get)
        lines.append(f"**No genre passed its threshold.** The closest is {best} ({_pct(scores[best])}).")
    used = "the plot and the poster" if text and image else "the plot only" if text else "the poster only"
    lines.append(f"From {used}. The table shows what each input says on its own.")
    lines += [f"*{_md_text(n)}*" for n in result.get("notes", [])]
    order = sorted(fused, key=fused.get, reverse=True)
    rows = [
        [
            g,
            _pct(text.get(g) if text else None),
            _pct(image.get(g) if image else None),
            _pct(fused.get(g)),
            _pct(space.thresholds.get(g)),
            "✓" if g in genres else "",
        ]
        for g in order
    ]
    return "\n\n".join(lines), scores, gr.Dataframe(value=rows, headers=COLUMNS)


def highlighted(text: str | None, words: list) -> list[tuple[str, float | None]] | None:
    """The plot as HighlightedText segments: each scored word with its share of the genre's lexical logit, scaled
    to [-1, 1] (positive: pushed the genre up), the text between words unscored."""
    if not text:
        return None
    top = max((abs(score) for _, _, score in words), default=0.0) or 1.0
    segments, at = [], 0
    for start, end, score in sorted(words):
        if start > at:
            segments.append((text[at:start], None))
        segments.append((text[start:end], round(score / top, 3)))
        at = end
    if at < len(text):
        segments.append((text[at:], None))
    return segments


def heat_map(poster: PIL.Image.Image | None, grid: list | None) -> PIL.Image.Image | None:
    """The poster with its occlusion map blended over it: red where a region raised the genre's score, purple where
    it lowered it (HighlightedText's colours), more opaque the stronger (the model sees the poster squashed to a
    square, so the grid spans it)."""
    if poster is None or not grid:
        return None
    values = np.asarray(grid, dtype=np.float32)
    scaled = values / (float(np.abs(values).max()) or 1.0)
    rgba = np.zeros(values.shape + (4,), dtype=np.uint8)
    rgba[..., :3] = np.where(scaled[..., None] > 0, np.array([239, 68, 60]), np.array([128, 90, 213]))
    rgba[..., 3] = (np.abs(scaled) * 170).astype(np.uint8)
    overlay = PIL.Image.fromarray(rgba, "RGBA").resize(poster.size, PIL.Image.Resampling.BILINEAR)
    return PIL.Image.alpha_composite(poster.convert("RGBA"), overlay).convert("RGB")


def explanation_view(result: dict | None, genre: str | None, poster: UploadedPoster | None, space):
    """(genre dropdown, highlighted plot, poster heat map) for `genre` (default: the first explained one). The heat
    map is drawn on the poster's thumbnail, kept when it was explained (decoded again only when it is not)."""
    max_text = space.limits.max_plot_chars + MAX_TITLE_CHARS + 2
    explanation = _page_input(checked_explanation, result, space.labels, max_text)
    if not explanation or not explanation["genres"]:
        return gr.Dropdown(choices=[], value=None), None, None
    genres = list(explanation["genres"])
    genre = checked_genre(genre, genres)
    entry = explanation["genres"][genre]
    image = poster_thumbnail(poster, space) if entry["occlusion"] else None
    return (gr.Dropdown(choices=genres, value=genre), highlighted(explanation["text"], entry["words"]),
            heat_map(image, entry["occlusion"]))


def poster_thumbnail(poster: UploadedPoster | None, space) -> PIL.Image.Image | None:
    """The poster's thumbnail: kept from its explained prediction, else decoded within the pixel budget."""
    if poster is None:
        return None
    thumbnail = space.thumbnails.get(poster.data)
    if thumbnail is None:
        with space.pixel_budget.reserve(poster_pixels(poster)):
            thumbnail = space.thumbnails.put(poster.data, space.decode(poster))
        release_freed_memory()  # the full poster's pages
    return thumbnail
