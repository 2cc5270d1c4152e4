"""Tampered and incomplete bundles (issue 9): every one is refused with one BundleError naming the culprit,
before anything is built or allocated; real bundles still load."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmgcs import GenreClassifier, create_model
from mmgcs.config import ConfigError, load_config
from mmgcs.hub import BundleError
from mmgcs.models.text import HFTextTower
from mmgcs.testing import tiny_model

LABELS = ["Action", "Comedy", "Drama"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bundle")
    tiny_model(LABELS, fusion="gated").save_pretrained(folder)
    return folder


def tampered(bundle, tmp_path, name="bad", **changes):
    """A copy of the bundle whose config.json has `changes` applied (nested dicts are merged)."""
    dest = tmp_path / name
    shutil.copytree(bundle, dest)
    config = json.loads((dest / "config.json").read_text())
    for key, value in changes.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) and isinstance(config.get(key), dict) else value
    (dest / "config.json").write_text(json.dumps(config))
    return dest


# ------------------------------------------------------------------------------------------------- files
def test_the_saved_tokenizer_files_are_recorded(bundle):
    meta = json.loads((bundle / "config.json").read_text())["mmgcs_bundle"]
    assert "tokenizer.json" in meta["tokenizer_files"]
    assert all((bundle / name).is_file() for name in meta["tokenizer_files"])


def test_a_missing_tokenizer_json_is_refused_not_a_five_token_vocabulary(bundle, tmp_path):
    bad = tampered(bundle, tmp_path)
    (bad / "tokenizer.json").unlink()  # tokenizer_config.json stays: transformers would build 5 special tokens
    with pytest.raises(BundleError, match=r"has no tokenizer\.json, which its config\.json needs.*Re-download"):
        GenreClassifier.from_pretrained(bad)


def test_a_legacy_bundle_without_the_record_still_needs_its_tokenizer(bundle, tmp_path):
    config = json.loads((bundle / "config.json").read_text())
    legacy = tampered(bundle, tmp_path, mmgcs_bundle={"format": 1, "mmgcs_version": "0.1.0"})
    assert GenreClassifier.from_pretrained(legacy).predict(plot="A soldier returns home.")["scores"].keys() == set(LABELS)
    (legacy / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match=r"has no tokenizer\.json"):
        GenreClassifier.from_pretrained(legacy)
    assert config["mmgcs_bundle"]["tokenizer_files"]  # the fresh bundle did carry the record


def test_a_tokenizer_of_special_tokens_only_is_refused(bundle, tmp_path):
    # The record itself lost (say, hand-edited): the loaded tokenizer is still checked against the tower.
    bad = tampered(bundle, tmp_path, mmgcs_bundle={"format": 1, "tokenizer_files": ["tokenizer_config.json"]})
    (bad / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="only its 5 special tokens"):
        GenreClassifier.from_pretrained(bad)


def test_every_missing_file_is_named_in_one_error(bundle, tmp_path):
    bad = tampered(bundle, tmp_path)
    (bad / "tokenizer.json").unlink()
    (bad / "model.safetensors").unlink()
    with pytest.raises(BundleError, match=r"has no model\.safetensors, tokenizer\.json.*never pickle"):
        GenreClassifier.from_pretrained(bad)


# ------------------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("changes,field", [
    ({"fusion_dim": 10_000_000}, "fusion_dim=10000000"),  # a 15 GB gate matrix
    ({"text_backbone_config": {"vocab_size": 2**34}}, f"text_backbone_config.vocab_size={2**34}"),  # 26 TB
    ({"text_backbone_config": {"hidden_size": 1_000_000}}, "text_backbone_config.hidden_size=1000000"),
    ({"text_backbone_config": {"hidden_size": -4}}, "text_backbone_config.hidden_size=-4"),
    ({"text_backbone_config": {"num_hidden_layers": 100_000}}, "text_backbone_config.num_hidden_layers=100000"),
    ({"text_backbone_config": {"num_attention_heads": 65_536}}, "text_backbone_config.num_attention_heads=65536"),
    ({"text_backbone_config": {"intermediate_size": 2**30}}, f"text_backbone_config.intermediate_size={2**30}"),
    ({"text_backbone_config": {"max_position_embeddings": 2**31}}, "max_position_embeddings"),
    ({"text_backbone_config": {"some_window": 2**40}}, f"text_backbone_config.some_window={2**40}"),
    ({"image_size": 1_000_000}, "image_size=1000000"),
    ({"max_text_length": 10**9}, "max_text_length=1000000000"),
    ({"fusion_heads": 0}, "fusion_heads=0"),
    ({"labels": [f"g{i}" for i in range(5000)], "thresholds": None}, "labels has 5000 entries"),
    ({"lexical_features": 2**40}, f"lexical_features={2**40}"),
])
def test_sizes_are_bounded_before_any_allocation(bundle, tmp_path, changes, field):
    bad = tampered(bundle, tmp_path, **changes)
    with pytest.raises(BundleError, match=rf"config\.json: .*{field}.*(bound|integer)"):
        GenreClassifier.from_pretrained(bad)


def test_bounded_fields_that_multiply_past_the_parameter_bound_are_refused(bundle, tmp_path):
    # Each field is within its bound, but 2**24 hash buckets x 200 genres is 3.4e9 lexical weights (13 GB).
    labels = [f"g{i}" for i in range(200)]
    bad = tampered(bundle, tmp_path, labels=labels, thresholds=None, lexical=True, lexical_features=2**24)
    with pytest.raises(BundleError, match=r"3,3\d\d,\d{3},\d{3} parameters, above the bound of 2,000,000,000 "
                                          r"\(largest tensor: lexical\.weight"):
        GenreClassifier.from_pretrained(bad)


def test_a_config_the_towers_cannot_build_is_a_bundle_error(bundle, tmp_path):
    bad = tampered(bundle, tmp_path, text_backbone_config={"model_type": "no-such-model"})
    with pytest.raises(BundleError, match="cannot be built"):
        GenreClassifier.from_pretrained(bad)


# ------------------------------------------------------------------------------------------ backbone kwargs
def test_image_kwargs_outside_the_allowlist_never_reach_timm(bundle, tmp_path):
    victim = tmp_path / "not-a-checkpoint.pth"
    victim.write_bytes(b"\x80\x04K\x01.")  # a pickle: today timm would open and unpickle it
    bad = tampered(bundle, tmp_path, image_backbone_kwargs={"checkpoint_path": str(victim)})
    with pytest.raises(BundleError, match=r"image_backbone_kwargs: 'checkpoint_path' is not allowed.*allowed keys"):
        GenreClassifier.from_pretrained(bad)
    wrong = tampered(bundle, tmp_path, "wrong", image_backbone_kwargs={"drop_rate": 5})
    with pytest.raises(BundleError, match=r"image_backbone_kwargs\.drop_rate: expected a rate in \[0, 1\), got 5"):
        GenreClassifier.from_pretrained(wrong)


def test_allowlisted_image_kwargs_still_build_and_load(tmp_path):
    model = tiny_model(LABELS, image_backbone_kwargs={"drop_rate": 0.1, "drop_path_rate": 0.05}).eval()
    model.save_pretrained(tmp_path)
    loaded = GenreClassifier.from_pretrained(tmp_path)
    assert loaded.config.image_backbone_kwargs == {"drop_rate": 0.1, "drop_path_rate": 0.05}


def test_refused_image_kwargs_are_a_config_error_at_training_time(tmp_path):
    with pytest.raises(ValueError, match="'checkpoint_path' is not allowed"):
        tiny_model(LABELS, image_backbone_kwargs={"checkpoint_path": str(tmp_path / "x.pth")})
    with pytest.raises(ConfigError, match=r"model\.image_backbone_kwargs: 'pretrained_cfg_overlay' is not allowed"):
        load_config(overrides=["model.image_backbone_kwargs={pretrained_cfg_overlay: {file: /etc/passwd}}"])
    assert load_config(overrides=["model.image_backbone_kwargs={drop_path_rate: 0.1}"]).model.image_backbone_kwargs


@pytest.fixture
def no_hub(monkeypatch):
    """Any Hub download timm attempts fails the test."""
    import timm.models._hub as timm_hub

    def refuse(*args, **kwargs):
        raise AssertionError(f"a bundle load reached for the Hub: {args}")

    monkeypatch.setattr(timm_hub, "hf_hub_download", refuse)


@pytest.mark.parametrize("prefix", ["hf-hub:timm/", "local-dir:/nonexistent/"])
def test_prefixed_image_backbones_rebuild_from_the_stored_architecture(bundle, tmp_path, no_hub, prefix):
    ok = tampered(bundle, tmp_path, "ok", image_backbone=prefix + "test_efficientnet")
    assert GenreClassifier.from_pretrained(ok).config.image_backbone.startswith(prefix)
    bad = tampered(bundle, tmp_path, image_backbone=prefix + "test_efficientnet",
                   image_backbone_config={"architecture": None})
    with pytest.raises(BundleError, match="would fetch its architecture from the Hub or a folder"):
        GenreClassifier.from_pretrained(bad)


@pytest.mark.parametrize("changes,message", [
    ({"auto_map": {"AutoModel": "evil.Model"}}, "text_backbone_config.auto_map is set"),
    ({"trust_remote_code": True}, "text_backbone_config.trust_remote_code is set"),
    ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quantization_config is set"),
    ({"attn_implementation": "kernels-community/flash-attn"}, "attn_implementation='kernels-community/flash-attn'"),
])
def test_text_configs_never_select_remote_code(bundle, tmp_path, changes, message):
    bad = tampered(bundle, tmp_path, text_backbone_config=changes)
    with pytest.raises(BundleError, match=message):
        GenreClassifier.from_pretrained(bad)
    config = json.loads((bad / "config.json").read_text())
    from mmgcs.config import model_config_from_dict

    cfg = model_config_from_dict({k: v for k, v in config.items() if k != "mmgcs_bundle"})
    with pytest.raises(ValueError, match=message):  # the tower refuses it too (init_from, resumed runs)
        HFTextTower.from_config(cfg)


# ------------------------------------------------------------------------------------------------ weights
def test_non_finite_weights_are_refused_naming_the_tensors(bundle, tmp_path):
    bad = tampered(bundle, tmp_path)
    state = load_file(bad / "model.safetensors")
    nan_key, inf_key = sorted(k for k in state if k.startswith("fusion.") and state[k].is_floating_point())[:2]
    state[nan_key] = state[nan_key].clone().fill_(float("nan"))
    state[inf_key] = state[inf_key].clone()
    state[inf_key].view(-1)[0] = float("inf")
    save_file(state, bad / "model.safetensors")
    named = ", ".join(sorted([nan_key, inf_key]))
    with pytest.raises(BundleError, match=rf"NaN or infinite values in {named}: .*Re-download"):
        GenreClassifier.from_pretrained(bad)


def test_integer_tensors_are_not_checked_and_real_bundles_load(bundle):
    state = load_file(bundle / "model.safetensors")
    assert any(not t.is_floating_point() for t in state.values())  # BatchNorm's num_batches_tracked
    loaded = GenreClassifier.from_pretrained(bundle)
    assert all(torch.isfinite(p).all() for p in loaded.parameters())


def test_the_default_towers_load_within_the_bounds(tmp_path):
    """MiniLM + EfficientNet-Lite0 (the default; random weights here, same shapes), and the bilstm tower."""
    model = create_model(labels=LABELS, pretrained=False, lexical=True)
    model.save_pretrained(tmp_path / "default")
    assert GenreClassifier.from_pretrained(tmp_path / "default").config == model.config
    bilstm = tiny_model(LABELS, text_tower="bilstm")
    bilstm.save_pretrained(tmp_path / "bilstm")
    GenreClassifier.from_pretrained(tmp_path / "bilstm")
