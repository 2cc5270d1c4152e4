"""The dataset builder on small sources made in the test: bad input, labels, splits, Hub layout, card, CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import datasets
import PIL.Image
import pytest
import yaml

from data_helpers import GENRES, animated_gif, balanced_rows, bomb_png, image_bytes, write_jsonl_source
from mmgcs.data import load_movies
from mmgcs.data.__main__ import main
from mmgcs.data.build import BuildOptions, build
from mmgcs.data.card import TMDB_ATTRIBUTION

TMDB_LINE = "This product uses the TMDb API but is not endorsed or certified by TMDb"


def _opts(sources, out, **kw) -> BuildOptions:
    kw.setdefault("min_genre_count", 3)
    kw.setdefault("progress", False)
    return BuildOptions(sources=[str(s) for s in sources], out=str(out), **kw)


def _events(report, reason):
    return [e for e in report["events"] if e["reason"] == reason]


def _bad_source(root: Path) -> Path:
    rows, posters = balanced_rows(30)
    jpeg = image_bytes("JPEG", size=(60, 90), seed=7)
    posters.update({
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "png.png": image_bytes("PNG", "RGB", seed=1),
        "cmyk.jpg": image_bytes("JPEG", "CMYK", seed=2),
        "gray.jpg": image_bytes("JPEG", "L", seed=3),
        "rgba.png": image_bytes("PNG", "RGBA", seed=4),
        "anim.gif": animated_gif(),
        "bomb.png": bomb_png(),
        "ok.jpg": image_bytes("JPEG", seed=5),
        "html.jpg": b"<html>not a poster</html>",
    })

    def row(i, **kw):
        base = {"id": i, "title": f"T{i}", "plot": f"Plot {i}.", "genres": ["Drama"]}
        base.update(kw)
        return base

    rows += [
        row(1, poster_file="posters/missing.jpg"),
        row(2, poster_file="posters/truncated.jpg"),
        row(3, poster_file="posters/png.png"),
        row(4, poster_file="posters/cmyk.jpg"),
        row(5, poster_file="posters/gray.jpg"),
        row(6, poster_file="posters/rgba.png"),
        row(7, poster_file="posters/anim.gif"),
        row(8, poster_file="posters/bomb.png"),
        row(9, plot="", poster_file=None),  # empty plot, no poster: dropped
        row(10, plot="   \n\t", poster_file="posters/missing.jpg"),  # whitespace plot, missing poster: dropped
        row(11, plot="  ", poster_file="posters/ok.jpg"),  # no plot but a poster: kept, plot null
        row(12, genres=["Comdy", "drama", "Drama"]),  # misspelled, wrong case, repeated
        row(13, title="first of 13"),
        row(13, title="second of 13"),  # duplicate id: the first wins
        row(14, poster_url="https://image.tmdb.org/t/p/w500/x.jpg"),  # plot-only row: kept without poster
        row(15, genres=["Western"]),  # rare genre: removed, movie left with no label
        row(16, poster_file="posters/html.jpg"),
        {"title": "no id", "plot": "x", "genres": ["Drama"]},
    ]
    raw = [
        b'{"id": 17, "title": "Caf\xe9 latin-1", "plot": "Bytes that are not UTF-8.", "genres": ["Comedy"]}',
        b'{"id": 18, "title": "broken", "plot": ',  # malformed line
        b"",  # blank lines are not rows
    ]
    return write_jsonl_source(root, rows, posters, raw_lines=raw)


@pytest.fixture(scope="module")
def bad_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    src = _bad_source(root / "src")
    return build(_opts([src], root / "out"))


def test_every_bad_row_is_kept_or_reported_by_id_and_reason(bad_build):
    ds, report = bad_build.dataset, bad_build.report
    kept = {r["id"]: r for split in ds.values() for r in split}
    dropped = {(e["id"], e["reason"]) for e in report["events"] if e["action"] == "dropped"}
    assert (9, "no_plot_no_poster") in dropped and (10, "no_plot_no_poster") in dropped
    assert (13, "duplicate_id") in dropped and kept[13]["title"] == "first of 13"
    assert (None, "bad_id") in dropped
    malformed = _events(report, "malformed_line")
    assert len(malformed) == 1 and malformed[0]["where"].endswith(":50") and "line 50" in malformed[0]["detail"]
    # 30 good + ids 1..17 minus 9, 10 and the duplicate 13
    assert set(kept) == set(range(1000, 1030)) | (set(range(1, 18)) - {9, 10})
    assert report["totals"]["kept"] == len(kept) == 45
    assert report["totals"]["dropped"] == 5 and report["sources"]["src"]["read"] == 50


def test_poster_problems_keep_the_movie_without_poster(bad_build):
    ds, report = bad_build.dataset, bad_build.report
    kept = {r["id"]: r for split in ds.values() for r in split}
    for movie_id, reason, text in [(1, "missing_poster_file", "not found"), (2, "invalid_poster", "truncated"),
                                   (8, "invalid_poster", "decompression bomb"), (16, "invalid_poster", "not a recognised image")]:
        assert kept[movie_id]["poster"] is None and kept[movie_id]["plot"]
        [event] = [e for e in _events(report, reason) if e["id"] == movie_id]
        assert text in event["detail"]
    assert kept[14]["poster"] is None and not [e for e in report["events"] if e["id"] == 14]


def test_odd_posters_are_normalized_to_rgb(bad_build):
    ds, report = bad_build.dataset, bad_build.report
    kept = {r["id"]: r for split in ds.values() for r in split}
    normalized = {e["id"]: e["detail"] for e in _events(report, "poster_normalized")}
    assert set(normalized) == {3, 4, 5, 6, 7}
    assert "CMYK" in normalized[4] and "animated" in normalized[7]
    for movie_id in (3, 4, 5, 6, 7, 11, 1000):
        assert isinstance(kept[movie_id]["poster"], PIL.Image.Image) and kept[movie_id]["poster"].mode == "RGB"
    assert kept[7]["poster"].getpixel((3, 3)) == (255, 0, 0)  # first frame


def test_rgb_jpeg_bytes_are_embedded_unchanged(bad_build, tmp_path):
    raw = bad_build.dataset.cast_column("poster", datasets.Image(decode=False))
    stored = {r["id"]: r["poster"] for split in raw.values() for r in split}
    original = image_bytes(seed=0)  # movie 1000's poster
    assert stored[1000]["bytes"] == original and stored[1000]["path"] == "1000.jpg"


def test_plot_genre_and_text_fixes_are_reported(bad_build):
    ds, report = bad_build.dataset, bad_build.report
    kept = {r["id"]: r for split in ds.values() for r in split}
    names = ds["train"].features["genres"].feature.names
    assert kept[11]["plot"] is None and [e["id"] for e in _events(report, "empty_plot")] == [9, 10, 11]
    assert [names[g] for g in kept[12]["genres"]] == ["Drama"]
    [unknown] = _events(report, "unknown_genre")
    assert unknown["id"] == 12 and "did you mean 'Comedy'" in unknown["detail"]
    assert [e["id"] for e in _events(report, "genre_normalized")] == [12]
    assert [e["id"] for e in _events(report, "duplicate_genre")] == [12]
    assert "\ufffd" in kept[17]["title"] and [e["id"] for e in _events(report, "invalid_utf8")] == [17]


def test_rare_genres_leave_the_labels_and_unlabeled_movies_are_reported(bad_build):
    ds, report = bad_build.dataset, bad_build.report
    kept = {r["id"]: r for split in ds.values() for r in split}
    assert report["labels"] == sorted(GENRES) == ds["train"].features["genres"].feature.names
    assert report["removed_genres"] == {"Comdy": 1, "Western": 1}
    assert kept[15]["genres"] == []
    assert {e["id"] for e in _events(report, "no_label")} == {15}
    assert {e["id"] for e in _events(report, "genres_removed")} == {12, 15}


def test_explicit_genres_and_bad_label_options(tmp_path):
    rows, posters = balanced_rows(20, with_posters=False)
    src = write_jsonl_source(tmp_path / "src", rows, posters)
    result = build(_opts([src], tmp_path / "out", genres=["Romance", "action"]))
    assert result.dataset["train"].features["genres"].feature.names == ["Romance", "Action"]
    with pytest.raises(ValueError, match="no movie has them.*Drama"):
        build(_opts([src], tmp_path / "o2", genres=["Musical"]))
    with pytest.raises(ValueError, match="Lower --min-genre-count"):
        build(_opts([src], tmp_path / "o3", min_genre_count=1000))
    dropped = build(_opts([src], tmp_path / "o4", genres=["Action"], drop_unlabeled=True))
    n_action = sum("Action" in r["genres"] for r in rows)
    assert sum(len(d) for d in dropped.dataset.values()) == n_action
    assert dropped.report["dropped_by_reason"] == {"no_label": 20 - n_action}


def test_splits_are_stratified_disjoint_and_reproducible(tmp_path):
    rows, _ = balanced_rows(200, with_posters=False)
    src = write_jsonl_source(tmp_path / "src", rows)
    a = build(_opts([src], tmp_path / "a", seed=7))
    build(_opts([src], tmp_path / "b", seed=7))
    c = build(_opts([src], tmp_path / "c", seed=8))
    ids = {s: set(a.dataset[s]["id"]) for s in a.dataset}
    assert not ids["train"] & ids["validation"] and not ids["train"] & ids["test"] and not ids["validation"] & ids["test"]
    assert sum(map(len, ids.values())) == 200
    assert all(abs(len(ids[s]) - n) <= 2 for s, n in (("train", 160), ("validation", 20), ("test", 20)))
    for g in range(len(GENRES)):  # each genre's share is the same in every split (within one movie)
        counts = [sum(g in gs for gs in a.dataset[s]["genres"]) for s in ("train", "validation", "test")]
        assert abs(counts[1] - counts[0] / 8) <= 1 and abs(counts[2] - counts[0] / 8) <= 1, counts
    assert _tree_hash(tmp_path / "a") == _tree_hash(tmp_path / "b")
    assert {s: set(c.dataset[s]["id"]) for s in c.dataset} != ids


def test_split_does_not_depend_on_source_order(tmp_path):
    rows, posters = balanced_rows(60)
    s1 = write_jsonl_source(tmp_path / "one", rows[:30], {k: v for k, v in posters.items() if int(k[:4]) < 1030})
    s2 = write_jsonl_source(tmp_path / "two", rows[30:], {k: v for k, v in posters.items() if int(k[:4]) >= 1030})
    a = build(_opts([s1, s2], tmp_path / "a"))
    b = build(_opts([s2, s1], tmp_path / "b"))
    assert {s: a.dataset[s]["id"] for s in a.dataset} == {s: b.dataset[s]["id"] for s in b.dataset}


def _tree_hash(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_hub_layout_loads_back_identically(bad_build, tmp_path):
    out = bad_build.out
    assert sorted(p.name for p in (out / "data").iterdir()) == [
        "test-00000-of-00001.parquet", "train-00000-of-00001.parquet", "validation-00000-of-00001.parquet"]
    loaded = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "cache"))
    also = load_movies(out, cache_dir=str(tmp_path / "cache"))
    mem = bad_build.dataset
    assert list(loaded) == list(mem) == ["train", "validation", "test"]
    for split in mem:
        assert loaded[split].features == mem[split].features == also[split].features
        raw_loaded = loaded[split].cast_column("poster", datasets.Image(decode=False)).to_list()
        raw_mem = mem[split].cast_column("poster", datasets.Image(decode=False)).to_list()
        assert raw_loaded == raw_mem
    # bytes, not paths, are in the shards
    import pyarrow.parquet as pq
    table = pq.read_table(out / "data" / "train-00000-of-00001.parquet")
    posters = [p for p in table.column("poster").to_pylist() if p is not None]
    assert posters and all(p["bytes"] for p in posters)


def test_dataset_card_has_hub_metadata_and_attribution(bad_build):
    text = (bad_build.out / "README.md").read_text(encoding="utf-8")
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["configs"] == [{"config_name": "default", "data_files": [
        {"split": s, "path": f"data/{s}-*"} for s in ("train", "validation", "test")]}]
    splits = {s["name"]: s["num_examples"] for s in meta["dataset_info"]["splits"]}
    assert splits == {s: len(d) for s, d in bad_build.dataset.items()}
    genres = next(f for f in meta["dataset_info"]["features"] if f["name"] == "genres")
    assert list(genres["list"]["class_label"]["names"].values()) == sorted(GENRES)
    assert {"text-classification", "image-classification"} <= set(meta["task_categories"])
    assert meta["size_categories"] == ["n<1K"] and meta["license"] == "other"
    assert TMDB_ATTRIBUTION == TMDB_LINE and TMDB_LINE in text
    assert datasets.load_dataset_builder(str(bad_build.out)).info.features == bad_build.dataset["train"].features


def test_report_file_lists_counts_and_events(bad_build):
    on_disk = json.loads((bad_build.out / "build_report.json").read_text(encoding="utf-8"))
    assert on_disk == json.loads(json.dumps(bad_build.report))
    assert set(on_disk["splits"]) == {"train", "validation", "test"}
    assert sum(on_disk["splits"][s]["movies"] for s in on_disk["splits"]) == on_disk["totals"]["kept"]
    assert on_disk["per_genre"]["Drama"] > 0 and on_disk["sources"]["src"]["with_poster"] == 36


def test_rebuild_replaces_stale_shards(tmp_path):
    rows, _ = balanced_rows(40, with_posters=False)
    src = write_jsonl_source(tmp_path / "src", rows)
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    (out / "data" / "train-00000-of-00002.parquet").write_bytes(b"stale")
    build(_opts([src], out))
    assert not (out / "data" / "train-00000-of-00002.parquet").exists()


def _mmimdb(root: Path) -> Path:
    """The published MM-IMDb layout: mmimdb/dataset/<id>.json + <id>.jpeg, mmimdb/split.json."""
    d = root / "mmimdb" / "dataset"
    d.mkdir(parents=True)
    genres = [["Drama"], ["Comedy", "Romance"], ["Sci-Fi", "Action"], ["Drama", "Comedy"]]
    ids = [f"{i:07d}" for i in range(8, 48)]
    for k, mid in enumerate(ids):
        meta = {"title": f"IMDb {mid}", "plot": ["Short.", f"A much longer plot of {mid}, the one to keep."],
                "genres": genres[k % 4], "imdb_id": mid, "year": 1990 + k}
        (d / f"{mid}.json").write_text(json.dumps(meta), encoding="utf-8")
        (d / f"{mid}.jpeg").write_bytes(image_bytes(seed=k))
    split = {"train": ids[:20], "dev": ids[20:25], "test": ids[25:35]}  # ids[35:] have no official split
    (root / "mmimdb" / "split.json").write_text(json.dumps(split), encoding="utf-8")
    return root / "mmimdb"


def test_mmimdb_layout_keeps_its_official_split(tmp_path):
    src = _mmimdb(tmp_path)
    result = build(_opts([src], tmp_path / "out"))
    ds = result.dataset
    assert ds["train"].features["genres"].feature.names == ["Action", "Comedy", "Drama", "Romance", "Sci-Fi"]
    ids = {s: set(ds[s]["id"]) for s in ds}
    assert set(range(8, 28)) <= ids["train"] and set(range(28, 33)) <= ids["validation"] and set(range(33, 43)) <= ids["test"]
    assert sum(map(len, ids.values())) == 40 and result.report["sources"]["mmimdb"]["official_split"] == 35
    row = ds["train"][0]
    assert row["id"] == 8 and row["plot"].startswith("A much longer plot") and row["poster"].mode == "RGB"
    assert "MM-IMDb" in (tmp_path / "out" / "README.md").read_text(encoding="utf-8")


def test_cli_builds_prints_summary_and_offline_push_fails_after_saving(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    rows, posters = balanced_rows(30)
    src = write_jsonl_source(tmp_path / "src", rows, posters)
    out = tmp_path / "out"
    code = main(["build", "--source", str(src), "--out", str(out), "--min-genre-count", "5", "--seed", "3",
                 "--no-progress", "--push-to-hub", "someone/movies"])
    captured = capsys.readouterr()
    assert code == 3
    assert "30 movies kept of 30 read" in captured.out and "train" in captured.out
    assert "someone/movies" in captured.err and "Nothing is lost" in captured.err and "python -m mmgcs.data push" in captured.err
    loaded = load_movies(out, cache_dir=str(tmp_path / "cache"))
    assert sum(len(d) for d in loaded.values()) == 30 and len(loaded["train"]) >= 20


def test_cli_reports_bad_arguments_without_a_traceback(tmp_path, capsys):
    assert main(["build", "--source", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "odd").mkdir()
    assert main(["build", "--source", str(tmp_path / "odd"), "--out", str(tmp_path / "o")]) == 2
    assert "Cannot tell the format" in capsys.readouterr().err and "--format" in capsys.readouterr().err + "--format"
    assert main(["build", "--source", str(tmp_path / "odd"), "--format", "parquet", "--out", str(tmp_path / "o")]) == 2
    assert "available: ['csv', 'jsonl', 'mmimdb']" in capsys.readouterr().err
    assert main(["build", "--source", str(tmp_path / "odd"), "--split-ratios", "0.8,0.2", "--out", str(tmp_path / "o")]) == 2
    assert "three positive numbers" in capsys.readouterr().err
    rows, _ = balanced_rows(2, with_posters=False)  # 3 movies is the least that fills three splits
    src = write_jsonl_source(tmp_path / "two", rows)
    assert main(["build", "--source", str(src), "--min-genre-count", "1", "--out", str(tmp_path / "o")]) == 2
    assert "would be empty: 2 movies are too few" in capsys.readouterr().err


def test_load_movies_names_the_remedy(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m mmgcs.data build"):
        load_movies(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no data/\\*.parquet"):
        load_movies(tmp_path / "empty")


def test_tiny_datasets_still_get_three_non_empty_splits(tmp_path):
    rows, _ = balanced_rows(4, with_posters=False)
    src = write_jsonl_source(tmp_path / "src", rows)
    result = build(_opts([src], tmp_path / "out", min_genre_count=1))
    assert sorted(len(d) for d in result.dataset.values()) == [1, 1, 2]


def test_rename_genre_fixes_a_misspelling_before_labels_are_chosen(tmp_path):
    rows, _ = balanced_rows(20, with_posters=False)
    rows[0]["genres"] = ["Comdy"]
    src = write_jsonl_source(tmp_path / "src", rows)
    result = build(_opts([src], tmp_path / "out", rename_genres={"Comdy": "Comedy"}))
    kept = {r["id"]: r for split in result.dataset.values() for r in split}
    names = result.dataset["train"].features["genres"].feature.names
    assert [names[g] for g in kept[1000]["genres"]] == ["Comedy"]
    assert [e["reason"] for e in result.report["events"]] == ["genre_renamed"]


def test_non_text_plot_is_reported_not_silently_emptied(tmp_path):
    rows, posters = balanced_rows(12)
    rows[0]["plot"] = 42  # has a poster: kept without plot
    rows[1]["plot"] = ["a", "list"]
    rows[1].pop("poster_file")  # and no poster: dropped
    src = write_jsonl_source(tmp_path / "src", rows, posters)
    report = build(_opts([src], tmp_path / "out", min_genre_count=1)).report
    assert [(e["id"], e["reason"]) for e in report["events"] if e["reason"] in ("bad_plot_field", "no_plot_no_poster")] == [
        (1000, "bad_plot_field"), (1001, "bad_plot_field"), (1001, "no_plot_no_poster")]


def test_python_dash_m_entry_point(tmp_path):
    import subprocess
    import sys

    rows, _ = balanced_rows(12, with_posters=False)
    src = write_jsonl_source(tmp_path / "src", rows)
    done = subprocess.run([sys.executable, "-m", "mmgcs.data", "build", "--source", str(src), "--out", str(tmp_path / "out"),
                           "--min-genre-count", "2"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "12 movies kept of 12 read" in done.stdout and "reading src" in done.stderr  # summary + progress bar
    assert (tmp_path / "out" / "build_report.json").is_file()
