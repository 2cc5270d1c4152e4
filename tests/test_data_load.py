"""mmgcs/data/load.py: `load_movies` reads a dataset folder in the builder's Hub layout (written here as parquet
shards of a tiny DatasetDict), and refuses with the remedy a missing folder, a folder without shards, a dataset
that is not a movie dataset, and a Hub id it cannot reach (offline in tests)."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest

from mmgcs.data.load import load_movies

LABELS = ["Comedy", "Drama", "Horror"]


def write_shards(folder: Path, splits=("train", "validation", "test"), genres=True) -> Path:
    columns = {"id": datasets.Value("int64"), "plot": datasets.Value("string")}
    if genres:
        columns["genres"] = datasets.Sequence(datasets.ClassLabel(names=LABELS))
    for i, split in enumerate(splits):
        rows = {"id": [10 * i, 10 * i + 1], "plot": [f"{split} plot", None]}
        if genres:
            rows["genres"] = [[0, 2], [1]]
        data = datasets.Dataset.from_dict(rows, features=datasets.Features(columns))
        (folder / "data").mkdir(parents=True, exist_ok=True)
        data.to_parquet(folder / "data" / f"{split}-00000-of-00001.parquet")
    return folder


def test_a_built_folder_loads_with_its_splits_and_genre_names(tmp_path):
    ds = load_movies(write_shards(tmp_path / "movies"))
    assert sorted(ds) == ["test", "train", "validation"]
    assert ds["train"].features["genres"].feature.names == LABELS
    assert ds["validation"]["id"] == [10, 11] and ds["test"][0] == {"id": 20, "plot": "test plot", "genres": [0, 2]}


def test_a_missing_folder_names_the_build_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No dataset folder at .*nowhere.*python -m mmgcs\.data build"):
        load_movies(tmp_path / "nowhere")


def test_a_folder_without_shards_is_not_a_built_dataset(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "movies.csv").write_text("id,plot\n1,a\n")
    with pytest.raises(FileNotFoundError, match=r"has no data/\*\.parquet shards: it is not a dataset built by mmgcs"):
        load_movies(tmp_path)


@pytest.mark.parametrize("splits, genres", [(("train", "test"), True), (("train", "validation", "test"), False)])
def test_a_dataset_without_the_splits_or_the_genre_labels_is_refused(tmp_path, splits, genres):
    with pytest.raises(ValueError, match=r"not an MMGCS movie dataset \(needs splits \['train', 'validation', 'test'\]"):
        load_movies(write_shards(tmp_path / "other", splits, genres))


def test_an_unreachable_hub_dataset_names_the_id_and_the_local_remedy():
    with pytest.raises(RuntimeError, match=r"Could not load the Hub dataset 'someone/no-such-movies'.*build it locally"):
        load_movies("someone/no-such-movies")
