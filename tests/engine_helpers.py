"""Tiny movie datasets and tiny model bundles for the engine's tests (built in code; never the shared posters)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image

REPO_ROOT = Path(__file__).resolve().parents[1]
GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance"]
# Words and poster colours that go with each genre, so a few steps of training have a signal to find.
_WORDS = {
    "Action": "fight battle soldier mission agent escape",
    "Comedy": "friends wedding dog band game dance",
    "Drama": "family mother father son daughter life",
    "Horror": "ghost vampire zombie monster dark night",
    "Romance": "love wife husband princess meets heart",
}
_COLOURS = {"Action": (200, 40, 30), "Comedy": (240, 220, 40), "Drama": (60, 60, 160), "Horror": (10, 10, 10),
            "Romance": (230, 120, 180)}


def _poster(genre: str, rng: np.random.RandomState) -> bytes:
    base = np.array(_COLOURS[genre], dtype=np.int16)
    pixels = np.clip(base + rng.randint(-30, 30, size=(30, 20, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_source(root: Path, n: int = 60, seed: int = 0, poster_every: int = 1, plot_every: int = 1) -> Path:
    """A jsonl source in the tmdb5000 layout; every `poster_every`-th movie has a poster and every
    `plot_every`-th a plot (the others miss it, like real data)."""
    rng = np.random.RandomState(seed)
    (root / "posters").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        mid = 1000 + i
        first = GENRES[i % len(GENRES)]
        genres = [first] + ([GENRES[(i + 2) % len(GENRES)]] if i % 3 == 0 else [])
        words = " ".join(_WORDS[g] for g in genres).split()
        rng.shuffle(words)
        row = {"id": mid, "title": f"Movie {mid}", "genres": genres}
        row["plot"] = f"The story of movie {mid}: " + " ".join(words) + "." if i % plot_every == 0 else None
        if i % poster_every == 0:
            (root / "posters" / f"{mid}.jpg").write_bytes(_poster(first, rng))
            row["poster_file"] = f"posters/{mid}.jpg"
        lines.append(json.dumps(row))
    (root / "movies.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def build_dataset(tmp: Path, n: int = 60, **source_kwargs) -> Path:
    """A dataset folder in Hub layout made by the data stream's own builder (what `data.path` points at)."""
    from mmgcs.data.build import BuildOptions, build

    src = write_source(tmp / "source", n=n, **source_kwargs)
    out = tmp / "movies"
    build(BuildOptions(sources=[str(src)], out=str(out), min_genre_count=1, progress=False))
    return out


def split_sizes(path: Path) -> dict[str, int]:
    from mmgcs.data import load_movies

    return {k: len(v) for k, v in load_movies(path).items()}


def tiny_bundle(folder: Path, text: bool = True, image: bool = True, labels=GENRES, **overrides) -> Path:
    """A tiny random GenreClassifier saved as a bundle: runs start from it with `train.init_from=FOLDER`."""
    from mmgcs.testing import tiny_model

    tiny_model(labels=list(labels), text=text, image=image, **overrides).save_pretrained(folder)
    return folder


def small_run_overrides(settings: dict, data: Path, out: Path, **extra) -> list[str]:
    """`settings` plus what every seconds-long test run shares: small batches, no trackers, a private feature
    cache; `extra` keys use `__` for `.` (train__epochs=1)."""
    settings = {
        **settings,
        "data.path": data,
        "train.output_dir": out,
        "train.batch_size": 8,
        "train.eval_batch_size": 16,
        "train.log_with": "none",
        "train.cache_dir": out.parent / f"{out.name}-cache",
        "train.lr": 0.01,
    }
    settings.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in settings.items()]


# Settings that turn any shipped config into a seconds-long run on tiny random towers (no pretrained weights).
TINY_TOWERS = {
    "model.image_backbone": "test_efficientnet",
    "model.image_size": 64,
    "model.max_text_length": 32,
    "model.fusion_dim": 32,
    "model.pretrained": "false",
    "model.lexical_features": 2048,  # the shipped configs' lexical branch, small
}


def tiny_overrides(data: Path, out: Path, **extra) -> list[str]:
    """`small_run_overrides` on tiny towers (a tiny BERT and timm's test_efficientnet), for the shipped configs."""
    from mmgcs.testing import tiny_text_backbone_dir

    return small_run_overrides({**TINY_TOWERS, "model.text_backbone": tiny_text_backbone_dir()}, data, out, **extra)


def quick_overrides(data: Path, bundle: Path, out: Path, **extra) -> list[str]:
    """Overrides for a seconds-long run starting from a tiny bundle."""
    return small_run_overrides({"train.init_from": bundle, "train.epochs": 2}, data, out, **extra)


def subprocess_env() -> dict:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        ACCELERATE_USE_CPU="true",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p),
    )
    return env


def run_script(script: str, args: list[str], timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "training" / script), *args],
        env=subprocess_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, **kwargs,
    )


def corrupt_posters(dataset: Path, out: Path, per_split: int = 1) -> dict[str, list[int]]:
    """A copy of the built `dataset` at `out` whose first `per_split` posters in each split are truncated JPEGs:
    what a dataset put together by other tools may hold (mmgcs's own builder refuses them). Returns the ids
    corrupted, per split."""
    from mmgcs.data import load_movies

    corrupted = {}
    (out / "data").mkdir(parents=True, exist_ok=True)
    for name, split in load_movies(dataset).items():
        from datasets import Image

        split = split.cast_column("poster", Image(decode=False))
        ids = [row["id"] for row in split if row["poster"] is not None][:per_split]

        def truncate(row):
            if row["id"] in ids:
                row["poster"] = {"bytes": row["poster"]["bytes"][:200], "path": None}
            return row

        split.map(truncate).cast_column("poster", Image()).to_parquet(str(out / "data" / f"{name}-00000-of-00001.parquet"))
        corrupted[name] = ids
    return corrupted
