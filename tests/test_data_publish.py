"""Pushing a built dataset folder: the upload goes through huggingface_hub, an offline push fails at once."""

import time

import pytest

import mmgcs.hub.ids
from mmgcs.data.publish import PushError, push_folder


@pytest.fixture
def built(tmp_path):
    """What push_folder needs of a built dataset: the card and the parquet shards."""
    folder = tmp_path / "movies"
    (folder / "data").mkdir(parents=True)
    (folder / "README.md").write_text("---\nlicense: other\n---\n# movies\n", encoding="utf-8")
    (folder / "data" / "train-00000-of-00001.parquet").write_bytes(b"PAR1")
    return folder


class FakeApi:
    calls: list = []

    def __init__(self, token=None):
        pass

    def create_repo(self, repo_id, **kw):
        FakeApi.calls.append(("create_repo", repo_id, kw))

    def upload_folder(self, **kw):
        FakeApi.calls.append(("upload_folder", kw["repo_id"], kw))
        return type("Info", (), {"commit_url": f"https://hub/{kw['repo_id']}/commit/1"})()


@pytest.fixture
def fake_api(monkeypatch):
    import huggingface_hub

    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    return FakeApi.calls


def test_push_uploads_the_whole_folder_as_a_dataset_repo(built, fake_api, monkeypatch):
    monkeypatch.setattr(mmgcs.hub.ids, "hub_reachable", lambda: True)
    assert push_folder(built, "me/movies") == "https://hub/me/movies/commit/1"
    (_, _, create), (_, _, upload) = fake_api
    assert create["repo_type"] == "dataset" and create["exist_ok"]
    assert upload["repo_type"] == "dataset" and upload["folder_path"] == str(built)
    assert upload["delete_patterns"] == ["data/*.parquet"]  # stale shards on the Hub are replaced


def test_offline_push_fails_at_once_without_calling_the_client(built, fake_api, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(PushError) as e:
        push_folder(built, "me/movies")
    assert time.perf_counter() - start < 5  # no client retries
    assert fake_api == []
    message = str(e.value)
    assert "Hub is unreachable" in message and "HF_HUB_OFFLINE" in message
    assert str(built) in message and f"python -m mmgcs.data push {built} me/movies" in message
    assert (built / "data" / "train-00000-of-00001.parquet").read_bytes() == b"PAR1"  # untouched


def test_an_unreachable_hub_is_detected_with_the_model_push_probe(built, fake_api, monkeypatch):
    """Not offline by setting, but no route to the Hub: the same probe the model push uses says so."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(mmgcs.hub.ids, "hub_offline", lambda: False)
    monkeypatch.setattr(mmgcs.hub.ids, "_probe_hub", lambda endpoint, timeout: False)
    with pytest.raises(PushError, match="Hub is unreachable"):
        push_folder(built, "me/movies")
    assert fake_api == []


def test_client_failures_keep_the_remedy(built, monkeypatch):
    import huggingface_hub

    class Refusing(FakeApi):
        def create_repo(self, repo_id, **kw):
            raise PermissionError("403 Forbidden: no write access")

    monkeypatch.setattr(mmgcs.hub.ids, "hub_reachable", lambda: True)
    monkeypatch.setattr(huggingface_hub, "HfApi", Refusing)
    with pytest.raises(PushError, match="(?s)PermissionError: 403 Forbidden.*Nothing is lost"):
        push_folder(built, "me/movies")


def test_a_folder_that_is_not_a_built_dataset_is_refused(tmp_path, fake_api):
    with pytest.raises(PushError, match="not a built dataset.*mmgcs.data build"):
        push_folder(tmp_path, "me/movies")
    assert fake_api == []


def test_one_push_error_for_models_and_datasets():
    import mmgcs.hub

    assert PushError is mmgcs.hub.PushError


def test_cli_push_offline_exits_3_with_the_message(built, capsys, monkeypatch):
    from mmgcs.data.__main__ import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["push", str(built), "me/movies"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: Cannot push") and "python -m mmgcs.data push" in err
