"""One rule for "is this a Hub repo id?", shared by model loading (hub), serving and dataset loading."""

import pytest

from mmgcs.hub import BundleError, HubUnavailableError, is_hub_id


@pytest.mark.parametrize("name", ["owner/name", "Org-1/movie_genres.v2", "me/mmgcs-fusion"])
def test_owner_slash_name_is_a_hub_id(name):
    assert is_hub_id(name)


@pytest.mark.parametrize("name", [
    "bare-name",  # no owner: taken for a (missing) local folder
    "runs/fusion/model",  # two slashes: a path
    "./owner/name", "/abs/path", "~/models", "owner/", "/name",
    "owner/na me", "owner/name.git", "owner/na--me", "owner/..", ".hidden/name",
    "owner/" + "x" * 100,  # longer than the Hub allows
    "C:\\models\\bundle",
])
def test_paths_and_malformed_ids_are_not_hub_ids(name):
    assert not is_hub_id(name)


def test_a_path_object_is_never_a_hub_id(tmp_path):
    from pathlib import Path

    assert not is_hub_id(Path("owner/name"))


def test_model_loading_uses_the_rule(tmp_path, monkeypatch):
    from mmgcs import GenreClassifier

    monkeypatch.chdir(tmp_path)
    with pytest.raises(BundleError, match="not a model folder.*owner/name"):
        GenreClassifier.from_pretrained("bare-name")  # a missing folder, not a Hub lookup
    with pytest.raises(HubUnavailableError, match="Hub is unreachable"):
        GenreClassifier.from_pretrained("someone/model")  # HF_HUB_OFFLINE=1 (conftest)


def test_serving_uses_the_rule(tmp_path, monkeypatch):
    from mmgcs.serving import ModelNotFoundError, load_model

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match="No model at 'bare-name'"):
        load_model("bare-name")
    with pytest.raises(ModelNotFoundError, match="Could not load the model 'someone/model'.*HubUnavailableError"):
        load_model("someone/model")


def test_dataset_loading_uses_the_rule(tmp_path, monkeypatch):
    from mmgcs.data.load import load_movies

    monkeypatch.chdir(tmp_path)
    for local in ("bare-name", "runs/data/movies", "./owner/name"):
        with pytest.raises(FileNotFoundError, match="No dataset folder"):
            load_movies(local)
    (tmp_path / "owner" / "name").mkdir(parents=True)  # a local folder wins over the id it looks like
    with pytest.raises(FileNotFoundError, match="has no data/\\*.parquet"):
        load_movies("owner/name")


def test_import_mmgcs_hub_stays_light():
    """The data CLI imports the errors and is_hub_id from mmgcs.hub: the bundle code (torch) loads on first use."""
    import subprocess
    import sys

    code = ("import sys, mmgcs.hub as h; print('torch' in sys.modules); h.is_hub_id('a/b'); h.HubUnavailableError; "
            "print('torch' in sys.modules); h.load_bundle; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False", "True"]
