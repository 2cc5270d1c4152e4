"""mmgcs/models/load.py: the one model loader of `mmgcs evaluate`, `mmgcs predict` and the server — a bundle folder
(or `~/...`) or a Hub id, in eval mode on the device asked for, and a `ModelNotFoundError` that names the remedy and
keeps the loader's own error as `cause` (the command-line tools print that after their own words)."""

from __future__ import annotations

import pytest
import torch

from mmgcs import serving
from mmgcs.hub.errors import BundleError, BundleMemoryError, HubUnavailableError
from mmgcs.models.classifier import GenreClassifier
from mmgcs.models.load import MODEL_REMEDY, ModelNotFoundError, load_model
from mmgcs.testing import tiny_model

LABELS = ["Action", "Comedy", "Drama"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bundle")
    model = tiny_model(LABELS, image=False)
    model.save_pretrained(folder)
    return folder, model


def test_a_bundle_loads_in_eval_mode_on_the_device_asked_for(bundle):
    folder, saved = bundle
    model = load_model(str(folder), device="cpu")
    assert isinstance(model, GenreClassifier) and not model.training
    assert model.config.labels == LABELS and model.device.type == "cpu"
    for name, tensor in saved.state_dict().items():
        assert torch.equal(model.state_dict()[name].cpu(), tensor.cpu()), name


def test_the_default_device_is_cuda_only_when_there_is_one(bundle, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert load_model(str(bundle[0])).device.type == "cpu"


def test_a_home_relative_folder_is_found(bundle, monkeypatch):
    folder = bundle[0]
    monkeypatch.setenv("HOME", str(folder.parent))
    assert load_model(f"~/{folder.name}", device="cpu").config.labels == LABELS


def test_nothing_at_the_path_names_how_to_get_a_model(tmp_path):
    with pytest.raises(ModelNotFoundError) as info:
        load_model(str(tmp_path / "no-such-run" / "model"))
    assert str(info.value) == f"No model at {str(tmp_path / 'no-such-run' / 'model')!r}. {MODEL_REMEDY}"
    assert isinstance(info.value.cause, BundleError)  # what evaluate and predict print after their own words
    assert "is not a model folder" in str(info.value.cause)


def test_a_broken_bundle_names_the_loader_error_and_the_remedy(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelNotFoundError) as info:
        load_model(str(tmp_path))
    message = str(info.value)
    assert message.startswith(f"Could not load the model {str(tmp_path)!r} (") and message.endswith(MODEL_REMEDY)
    assert type(info.value.cause).__name__ in message and str(info.value.cause) in message


def test_an_unreachable_hub_id_is_not_taken_for_a_missing_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # HF_HUB_OFFLINE=1 (conftest)
    with pytest.raises(ModelNotFoundError, match="Could not load the model 'someone/model' .HubUnavailableError") as info:
        load_model("someone/model")
    assert isinstance(info.value.cause, HubUnavailableError)


def test_out_of_memory_names_memory_not_training(bundle, monkeypatch):
    def no_memory(*args, **kwargs):
        raise BundleMemoryError("Out of memory while loading the model: it needs about 160 MB; free memory")

    monkeypatch.setattr(GenreClassifier, "from_pretrained", no_memory)
    with pytest.raises(ModelNotFoundError) as info:
        load_model(str(bundle[0]))
    assert str(info.value) == f"Could not load the model {str(bundle[0])!r}: {info.value.cause}"
    assert isinstance(info.value.cause, BundleMemoryError) and MODEL_REMEDY not in str(info.value)


def test_the_server_loads_through_it():
    assert serving.load_model is load_model and serving.ModelNotFoundError is ModelNotFoundError
