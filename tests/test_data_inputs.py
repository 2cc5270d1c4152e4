"""mmgcs/data/inputs.py: the movies `mmgcs evaluate`, `mmgcs predict` and the Space's examples read — a built
dataset's split, a raw source (JSONL, CSV, MM-IMDb) with the rows its reader refuses kept in their place by id, a
folder of poster images — streamed, with the size when it is known without reading everything."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import datasets
import pytest

from data_helpers import image_bytes, write_jsonl_source
from mmgcs.data import inputs
from mmgcs.data.inputs import Movie, Movies, batched, read_movies

LABELS = ["Action", "Comedy", "Drama"]


def _split(k: int, split: str, genres: bool = True) -> datasets.Dataset:
    features = {"id": datasets.Value("int64"), "title": datasets.Value("string"), "plot": datasets.Value("string"),
                "poster": datasets.Image()}
    rows = {"id": [10 * k + i for i in range(3)], "title": [f"{split} {i}" for i in range(3)],
            "plot": [f"a {split} plot {i}" for i in range(3)],
            "poster": [{"bytes": image_bytes(seed=i), "path": None} for i in range(3)]}
    if genres:
        features["genres"] = datasets.Sequence(datasets.ClassLabel(names=LABELS))
        rows["genres"] = [[0], [1, 2], []]
    return datasets.Dataset.from_dict(rows, features=datasets.Features(features))


def _built(folder: Path) -> Path:
    """A dataset in the layout `python -m mmgcs.data build` writes: each split's rows tagged by split."""
    (folder / "data").mkdir(parents=True)
    for k, split in enumerate(("train", "validation", "test")):
        _split(k, split).to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    return folder


def test_a_built_split_streams_its_rows_with_genres_size_and_vocabulary(tmp_path):
    movies = read_movies(_built(tmp_path / "built"), "validation")
    assert (movies.kind, movies.split, movies.size, movies.vocabulary) == ("dataset", "validation", 3, LABELS)
    rows = list(movies)
    assert [m.id for m in rows] == [10, 11, 12] and [m.key for m in rows] == ["10", "11", "12"]
    assert [m.row for m in rows] == ["validation[0]", "validation[1]", "validation[2]"]
    assert [m.genres for m in rows] == [["Action"], ["Comedy", "Drama"], []]
    assert rows[1].title == "validation 1" and rows[1].plot == "a validation plot 1" and rows[1].error is None
    # posters stay undecoded (a corrupt one fails on its own row, where the tool decodes it)
    assert rows[1].poster["bytes"] == image_bytes(seed=1)


def test_a_built_dataset_names_its_splits_and_the_columns_a_scorer_needs(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"has no split 'dev'; its splits: \['test', 'train', 'validation'\]. "
                                         "Pick one with --split"):
        read_movies(_built(tmp_path / "built"), "dev")
    # a split without genres (a dataset loaded from elsewhere; the builder always writes them)
    splits = datasets.DatasetDict({"train": _split(0, "train"), "test": _split(2, "test", genres=False)})
    monkeypatch.setattr(inputs, "load_movies", lambda source: splits)
    with pytest.raises(ValueError, match=r"Split 'test' of 'hub/movies' lacks columns \['genres'\]; rebuild it"):
        read_movies("hub/movies", "test", labelled=True)
    unlabelled = read_movies("hub/movies", "test")  # predicting needs no genres
    assert unlabelled.vocabulary is None and [m.genres for m in unlabelled] == [[], [], []]


def test_a_jsonl_source_keeps_each_refused_row_in_its_place_by_id(tmp_path):
    rows = [{"id": 1, "title": "One", "plot": "first plot", "genres": ["Drama"], "poster_file": "posters/1.jpg"},
            {"id": "x7", "plot": "an id that is no number", "genres": ["Drama"]},
            {"id": 3, "plot": "", "genres": ["Comedy"], "poster_url": "https://example.com/3.jpg"}]
    folder = write_jsonl_source(tmp_path / "src", rows, {"1.jpg": image_bytes()}, raw_lines=[b'{"id": 4, "plot'])
    movies = read_movies(folder)
    assert movies.kind == "source:jsonl" and movies.size is None  # a folder: not counted
    read = list(movies)
    assert [(m.key, m.row, m.reason) for m in read] == [
        ("1", "movies.jsonl:1", None), ("x7", "movies.jsonl:2", "bad_id"), ("3", "movies.jsonl:3", None),
        ("", "movies.jsonl:4", "malformed_line")]
    first, bad_id, url_only, malformed = read
    assert first.poster == folder / "posters" / "1.jpg" and first.root == folder and first.genres == ["Drama"]
    assert bad_id.error == "id 'x7' is missing or not an integer" and bad_id.plot is None
    assert malformed.id is None and "line 4 is not valid JSON" in malformed.error
    assert url_only.poster is None and url_only.poster_url and movies.notes == {"poster_url_not_fetched": 1}
    assert read_movies(folder / "movies.jsonl").size == 4  # a file: its lines, counted before reading


def test_a_csv_file_row_without_an_id_is_refused_where_it_is(tmp_path):
    file = tmp_path / "films.csv"
    file.write_text("id,title,plot,genres\n5,Five,a plot,Drama|Comedy\n,No id,a plot,Drama\n6,Six,another,Action\n")
    movies = read_movies(file)
    assert movies.kind == "source:csv" and movies.size is None
    read = list(movies)
    assert [m.key for m in read] == ["5", "", "6"] and read[0].genres == ["Drama", "Comedy"]
    assert (read[1].row, read[1].reason, read[1].error) == ("films.csv:3", "bad_id", "id '' is missing or not an integer")
    assert read[2].root == tmp_path


def _mmimdb(root: Path) -> Path:
    (root / "dataset").mkdir(parents=True)
    for stem in ("0000001", "0000002", "0000003", "0000004"):
        (root / "dataset" / f"{stem}.json").write_text(json.dumps({"title": stem, "plot": [f"plot {stem}"], "genres": ["Drama"]}))
    (root / "split.json").write_text(json.dumps({"train": ["0000001"], "dev": ["0000004"], "test": ["0000002", "0000003"]}))
    return root


def test_an_official_split_is_kept_only_when_asked(tmp_path):
    root = _mmimdb(tmp_path / "mmimdb")
    scored = read_movies(root, "test", official_split=True)
    assert scored.kind == "source:mmimdb" and scored.split is None  # known once a row says it has splits
    assert sorted(m.id for m in scored) == [2, 3]
    assert scored.split == "test" and scored.notes["rows_of_other_splits"] == 2
    every = read_movies(root, "test")  # mmgcs predict: every row of the source
    assert sorted(m.id for m in every) == [1, 2, 3, 4] and every.split is None and not every.notes


def test_a_poster_folder_is_one_movie_a_file(tmp_path):
    folder = tmp_path / "posters"
    folder.mkdir()
    for name in ("b.png", "a.JPG", ".hidden.jpg", "notes.txt"):
        (folder / name).write_bytes(image_bytes())
    movies = read_movies(folder)
    assert (movies.kind, movies.size) == ("posters", 2)
    assert [(m.id, m.row, m.poster, m.root, m.genres) for m in movies] == [
        ("a", "a.JPG", folder / "a.JPG", folder, []), ("b", "b.png", folder / "b.png", folder, [])]
    # a scorer needs genres: a folder that is no source is read as a dataset, whose loader says what one needs
    with pytest.raises(FileNotFoundError, match="no data/\\*.parquet shards"):
        read_movies(folder, labelled=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no movies.jsonl, CSV, MM-IMDb layout, built dataset or poster images"):
        read_movies(tmp_path / "empty")


def test_an_input_nothing_reads_is_named(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="Cannot tell the format of source .*notes.txt.*Name one with --format"):
        read_movies(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="No dataset folder at .*notes.txt"):
        read_movies(tmp_path / "notes.txt", labelled=True)
    with pytest.raises(FileNotFoundError, match="No dataset folder at .*absent"):
        read_movies(tmp_path / "absent")
    with pytest.raises(ValueError, match=r"Unknown source format 'xml'; available: \['csv', 'jsonl', 'mmimdb'\]"):
        read_movies(tmp_path, fmt="xml")


def test_a_format_can_be_named(tmp_path):
    rows = [{"id": 1, "plot": "from the JSONL file", "genres": ["Drama"]}]
    folder = write_jsonl_source(tmp_path / "both", rows)
    (folder / "films.csv").write_text("id,title,plot,genres\n5,Five,from the CSV file,Comedy\n")
    with pytest.raises(ValueError, match="matches several formats .*name one with --format"):
        read_movies(folder)
    assert [(m.id, m.genres) for m in read_movies(folder, fmt="csv")] == [(5, ["Comedy"])]
    assert [(m.id, m.genres) for m in read_movies(folder, fmt="jsonl")] == [(1, ["Drama"])]


def test_batched_reads_lazily_and_keeps_the_rest():
    assert list(batched(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(batched([], 3)) == []
    assert next(batched(itertools.count(), 2)) == [0, 1]  # an endless input: only what a batch needs is read


def test_movies_iterate_over_their_rows_and_a_movie_has_a_key():
    movies = Movies(rows=[Movie(id=7), Movie(id=None, error="bad")], kind="dataset")
    assert [m.key for m in movies] == ["7", ""] and movies.size is None and not movies.notes
