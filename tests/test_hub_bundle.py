"""The bundle: save → load round trip, strict loading, tampering, offline push (its model card: tests/test_hub_card.py)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmgcs import GenreClassifier
from mmgcs.config import ModelConfig
from mmgcs.hub import BundleError, HubUnavailableError, push_bundle
from mmgcs.testing import tiny_model
from mmgcs.processor import GenreProcessor

LABELS = ["Action", "Comedy", "Drama"]
PLOTS = ["A soldier returns home from the war.", "A family dog saves the town."]


def sample_batch(model):
    posters = [torch.rand(90, 60, 3).mul(255).byte().numpy(), None]
    return GenreProcessor.from_model(model)(PLOTS, posters)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_model(LABELS, fusion="attention", thresholds=[0.4, 0.5, 0.6]).eval()
    folder = tmp_path_factory.mktemp("bundle")
    model.save_pretrained(folder)
    return model, folder


def test_bundle_files(saved):
    _, folder = saved
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "README.md", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)
    config = json.loads((folder / "config.json").read_text())
    assert config["labels"] == LABELS and config["thresholds"] == [0.4, 0.5, 0.6]
    assert config["text_backbone_config"]["model_type"] == "bert"
    assert config["image_backbone_config"]["architecture"] == "test_efficientnet"
    assert config["image_size"] == 64 and len(config["image_mean"]) == 3 and config["interpolation"]
    assert config["mmgcs_bundle"]["format"] == 1


def test_round_trip_identical_logits_and_config_type(saved):
    model, folder = saved
    loaded = GenreClassifier.from_pretrained(folder)
    assert type(loaded.config) is ModelConfig
    assert loaded.config == model.config
    assert not loaded.training
    batch = sample_batch(model)
    assert torch.equal(GenreProcessor.from_model(loaded)(PLOTS, [None, None])["input_ids"], GenreProcessor.from_model(model)(PLOTS, [None, None])["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch)["logits"], model(**batch)["logits"], rtol=0, atol=0)
    # a second save of the loaded model is byte-identical in weights and config
    again = folder.parent / "again"
    loaded.save_pretrained(again)
    assert json.loads((again / "config.json").read_text()) == json.loads((folder / "config.json").read_text())
    a, b = load_file(folder / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("text,image,extra", [
    (True, False, {"text_tower": "bilstm"}), (False, True, {"image_tower": "simplecnn"}), (True, True, {"fusion": "late"}),
])
def test_round_trip_other_towers(tmp_path, text, image, extra):
    model = tiny_model(LABELS, text=text, image=image, **extra).eval()
    model.save_pretrained(tmp_path)
    loaded = GenreClassifier.from_pretrained(tmp_path)
    batch = GenreProcessor.from_model(model)(PLOTS if text else None, [torch.rand(70, 50, 3).mul(255).byte().numpy()] * 2 if image else None)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch)["logits"], model(**batch)["logits"], rtol=0, atol=0)


def test_load_needs_no_backbone_source(tmp_path):
    model = tiny_model(LABELS, fusion="gated")
    model.config.text_backbone = str(tmp_path / "deleted-backbone")  # the folder it came from is gone
    model.save_pretrained(tmp_path / "b")
    loaded = GenreClassifier.from_pretrained(tmp_path / "b")
    assert loaded.predict(plot=PLOTS[0])["scores"].keys() == set(LABELS)


def copy_bundle(folder, dest):
    dest.mkdir()
    for p in folder.iterdir():
        (dest / p.name).write_bytes(p.read_bytes())
    return dest


def test_truncated_weights_fail_clearly(saved, tmp_path):
    bad = copy_bundle(saved[1], tmp_path / "bad")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="model.safetensors is corrupt or truncated.*re-save or re-download"):
        GenreClassifier.from_pretrained(bad)


def test_missing_extra_and_misshaped_tensors_fail_clearly(saved, tmp_path):
    folder = saved[1]
    state = load_file(folder / "model.safetensors")
    victim = next(k for k in state if k.startswith("fusion."))

    missing = copy_bundle(folder, tmp_path / "missing")
    save_file({k: v for k, v in state.items() if k != victim}, missing / "model.safetensors")
    with pytest.raises(BundleError, match=f"missing tensors: {victim}"):
        GenreClassifier.from_pretrained(missing)

    extra = copy_bundle(folder, tmp_path / "extra")
    save_file({**state, "fusion.rogue": torch.zeros(2)}, extra / "model.safetensors")
    with pytest.raises(BundleError, match="unexpected tensors: fusion.rogue"):
        GenreClassifier.from_pretrained(extra)

    shaped = copy_bundle(folder, tmp_path / "shaped")
    save_file({**state, victim: torch.zeros(*[s + 1 for s in state[victim].shape])}, shaped / "model.safetensors")
    with pytest.raises(BundleError, match=f"mis-shaped tensors: {victim}"):
        GenreClassifier.from_pretrained(shaped)


def test_tampered_config_fails_clearly(saved, tmp_path):
    folder = saved[1]
    config = json.loads((folder / "config.json").read_text())

    more_labels = copy_bundle(folder, tmp_path / "labels")
    (more_labels / "config.json").write_text(json.dumps({**config, "labels": LABELS + ["Horror"], "thresholds": None}))
    with pytest.raises(BundleError, match="mis-shaped tensors"):
        GenreClassifier.from_pretrained(more_labels)

    unknown = copy_bundle(folder, tmp_path / "unknown")
    (unknown / "config.json").write_text(json.dumps({**config, "fuson": "late"}))
    with pytest.raises(BundleError, match="Unknown config key 'fuson'"):
        GenreClassifier.from_pretrained(unknown)

    wrong_type = copy_bundle(folder, tmp_path / "type")
    (wrong_type / "config.json").write_text(json.dumps({**config, "image_size": "big"}))
    with pytest.raises(BundleError, match="image_size: expected int"):
        GenreClassifier.from_pretrained(wrong_type)

    fusion = copy_bundle(folder, tmp_path / "fusion")
    (fusion / "config.json").write_text(json.dumps({**config, "fusion": "magic"}))
    with pytest.raises(BundleError, match="Unknown fusion 'magic'; available"):
        GenreClassifier.from_pretrained(fusion)

    broken = copy_bundle(folder, tmp_path / "broken")
    (broken / "config.json").write_text((folder / "config.json").read_text()[:-20])
    with pytest.raises(BundleError, match="not valid JSON"):
        GenreClassifier.from_pretrained(broken)

    foreign = copy_bundle(folder, tmp_path / "foreign")
    (foreign / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "mmgcs_bundle"}))
    with pytest.raises(BundleError, match="not written by MMGCS"):
        GenreClassifier.from_pretrained(foreign)


def test_missing_files_and_bad_paths(saved, tmp_path):
    no_weights = copy_bundle(saved[1], tmp_path / "nw")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(BundleError, match="has no model.safetensors"):
        GenreClassifier.from_pretrained(no_weights)
    with pytest.raises(BundleError, match="is not a model folder"):
        GenreClassifier.from_pretrained(tmp_path / "does-not-exist")
    with pytest.raises(HubUnavailableError, match="Hub is unreachable"):
        GenreClassifier.from_pretrained("someone/unknown-model")


def test_load_time_overrides_are_limited(saved):
    loaded = GenreClassifier.from_pretrained(saved[1], thresholds=[0.1, 0.1, 0.1])
    assert loaded.config.thresholds == [0.1, 0.1, 0.1]
    with pytest.raises(TypeError, match="cannot change"):
        GenreClassifier.from_pretrained(saved[1], fusion="late")


def test_offline_push_saves_then_fails_clearly(tmp_path, monkeypatch):
    model = tiny_model(LABELS)
    folder = tmp_path / "push"
    with pytest.raises(HubUnavailableError, match=f"bundle is saved at {folder.resolve()}") as err:
        model.push_to_hub("me/genres", save_directory=folder)
    assert "hf upload me/genres" in str(err.value)
    assert GenreClassifier.from_pretrained(folder).config.labels == LABELS
    with pytest.raises(HubUnavailableError, match="unreachable"):
        push_bundle(folder, "me/genres")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(HubUnavailableError):
        model.push_to_hub("me/genres")  # default folder: ./mmgcs-bundles/me--genres
    assert (tmp_path / "mmgcs-bundles" / "me--genres" / "model.safetensors").is_file()
    with pytest.raises(BundleError, match="has no config.json"):
        push_bundle(tmp_path / "empty", "me/genres")


def test_repo_id_loads_from_the_local_hub_cache(saved, tmp_path):
    """The Hub code path (repo id → snapshot_download), served by a cache laid out as the Hub client writes it."""
    model, folder = saved
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--me--genres"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for p in folder.iterdir():
        (snapshot / p.name).write_bytes(p.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    loaded = GenreClassifier.from_pretrained("me/genres", cache_dir=tmp_path)
    batch = sample_batch(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch)["logits"], model(**batch)["logits"], rtol=0, atol=0)
