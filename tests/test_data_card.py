"""mmgcs/data/card.py: the dataset card a build writes, on a tiny DatasetDict and report built here. The Hub's
metadata (splits, features, data files, size category, licence by source), the per-split and per-genre tables, the
genres left out, and the terms: TMDb's attribution for TMDb sources, the MM-IMDb citation for MM-IMDb rows. The
card of a real build: tests/test_data_build.py."""

from __future__ import annotations

import datasets
import pytest
import yaml

from mmgcs.data.card import MMIMDB_CITATION, TMDB_ATTRIBUTION, TMDB_TERMS_URL, render_card, size_category

SPLITS = ("train", "validation", "test")
LABELS = ["Comedy", "Drama"]


def tiny_dataset() -> datasets.DatasetDict:
    features = datasets.Features({"id": datasets.Value("int64"), "plot": datasets.Value("string"),
                                  "genres": datasets.Sequence(datasets.ClassLabel(names=LABELS))})
    rows = {"train": 3, "validation": 1, "test": 2}
    return datasets.DatasetDict({s: datasets.Dataset.from_dict(
        {"id": list(range(n)), "plot": ["a plot"] * n, "genres": [[0]] * n}, features=features) for s, n in rows.items()})


def report(formats: dict[str, str], removed: dict | None = None, official: str | None = None) -> dict:
    split = lambda n, d: {"movies": n, "with_poster": n - 1, "with_plot": n, "per_genre": {"Comedy": n, "Drama": d}}  # noqa: E731
    return {
        "sources": {name: {"format": fmt, "read": 10, "kept": 6, "with_poster": 3, "official_split": int(name == official)}
                    for name, fmt in formats.items()},
        "splits": {"train": split(3, 2), "validation": split(1, 1), "test": split(2, 0)},
        "options": {"split_ratios": "0.8,0.1,0.1", "seed": 42, "min_genre_count": 5, "genres": None},
        "removed_genres": removed or {},
    }


def card(rep: dict) -> tuple[dict, str]:
    text = render_card(tiny_dataset(), {s: 1000 for s in SPLITS}, 2500, rep)
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def test_size_categories_follow_the_hubs_bounds():
    assert [size_category(n) for n in (0, 999, 1_000, 99_999, 100_000, 5_000_000)] == [
        "n<1K", "n<1K", "1K<n<10K", "10K<n<100K", "100K<n<1M", "1M<n<10M"]


def test_the_metadata_describes_the_splits_and_features_for_the_hub():
    meta, _ = card(report({"tmdb5000": "tmdb5000"}))
    assert {s["name"]: s["num_examples"] for s in meta["dataset_info"]["splits"]} == {"train": 3, "validation": 1, "test": 2}
    assert meta["dataset_info"]["dataset_size"] == 3000 and meta["dataset_info"]["download_size"] == 2500
    genres = next(f for f in meta["dataset_info"]["features"] if f["name"] == "genres")
    assert list(genres["list"]["class_label"]["names"].values()) == LABELS
    assert meta["configs"][0]["data_files"] == [{"split": s, "path": f"data/{s}-*"} for s in SPLITS]
    assert meta["size_categories"] == ["n<1K"] and "multi-label-classification" in meta["task_ids"]


def test_the_body_has_the_tables_and_the_genres_left_out():
    _, body = card(report({"tmdb5000": "tmdb5000"}, removed={"Western": 2}, official="tmdb5000"))
    assert "| train | 3 | 2 | 3 |" in body and "| test | 2 | 1 | 2 |" in body
    assert "| Drama | 2 | 1 | 0 |" in body and "2 genres with at least 5 movies" in body
    assert "Genres left out of the labels (too rare or not requested): Western (2)." in body
    assert "ratios 0.8,0.1,0.1, seed 42" in body and "Rows of tmdb5000 keep their source's official split." in body
    assert "| tmdb5000 | tmdb5000 | 10 | 6 | 3 |" in body


@pytest.mark.parametrize("formats, tmdb, mmimdb", [
    ({"tmdb5000": "tmdb5000"}, True, False),
    ({"mmimdb": "mmimdb"}, False, True),
    ({"tmdb5000": "tmdb5000", "mmimdb": "mmimdb"}, True, True),
])
def test_the_licence_and_terms_follow_the_sources(formats, tmdb, mmimdb):
    meta, body = card(report(formats))
    assert meta["license"] == "other"
    assert meta["license_name"] == ("tmdb-terms-of-use" if tmdb else "mm-imdb")
    assert (meta.get("license_link") == TMDB_TERMS_URL) is tmdb
    assert (TMDB_ATTRIBUTION in body) is tmdb and (MMIMDB_CITATION in body) is mmimdb
    assert "Official split" not in body and "keep their source's official split" not in body
