"""Tiny data fixtures for the data stream's tests: real image files made with PIL, never the shared posters."""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path

import numpy as np
import PIL.Image

GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance"]


def image_bytes(fmt: str = "JPEG", mode: str = "RGB", size=(20, 30), seed: int = 0, **save_kwargs) -> bytes:
    rng = np.random.RandomState(seed)
    img = PIL.Image.fromarray(rng.randint(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save_kwargs)
    return buf.getvalue()


def animated_gif(size=(20, 30)) -> bytes:
    frames = [PIL.Image.new("RGB", size, c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


@functools.lru_cache(maxsize=2)
def bomb_png(side: int = 20000) -> bytes:
    """A 1-bit PNG of side x side pixels: a few KB on disk, 400 MP once decoded (made once, it takes ~1 s)."""
    buf = io.BytesIO()
    PIL.Image.new("1", (side, side)).save(buf, format="PNG")
    return buf.getvalue()


def write_jsonl_source(root: Path, rows: list[dict], posters: dict[str, bytes] | None = None, raw_lines: list[bytes] | None = None) -> Path:
    """A folder in the tmdb5000 layout: movies.jsonl + posters/. `raw_lines` are appended verbatim (bad input)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "posters").mkdir(exist_ok=True)
    for name, data in (posters or {}).items():
        (root / "posters" / name).write_bytes(data)
    with open(root / "movies.jsonl", "wb") as f:
        for row in rows:
            f.write(json.dumps(row).encode() + b"\n")
        for line in raw_lines or []:
            f.write(line + b"\n")
    return root


def balanced_rows(n: int, start_id: int = 1000, with_posters: bool = True) -> tuple[list[dict], dict[str, bytes]]:
    """n movies cycling over GENRES (each with 1-2 genres), each with a distinct small JPEG poster."""
    rows, posters = [], {}
    for i in range(n):
        mid = start_id + i
        genres = [GENRES[i % len(GENRES)]] + ([GENRES[(i + 2) % len(GENRES)]] if i % 3 == 0 else [])
        row = {"id": mid, "title": f"Movie {mid}", "plot": f"A plot about movie number {mid}.", "genres": genres}
        if with_posters:
            row["poster_file"] = f"posters/{mid}.jpg"
            posters[f"{mid}.jpg"] = image_bytes(seed=i)
        rows.append(row)
    return rows, posters
