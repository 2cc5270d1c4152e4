"""Config values that loaded and then gave NaN scores or failed every prediction (issue 18): each is refused when
the bundle loads, by a BundleError naming the field, what is wrong with its value and the remedy; every field of
ModelConfig has a rule, and every real bundle passes them."""

import dataclasses

import pytest
from PIL import Image
from bundle_helpers import tampered

from mmgcs import GenreClassifier, create_model
from mmgcs.config import ModelConfig
from mmgcs.hub import BundleError
from mmgcs.hub.config_values import FIELD_RULES, field_problem
from mmgcs.models.preprocessing import CROP_MODES, INTERPOLATIONS
from mmgcs.testing import tiny_model

LABELS = ["Action", "Comedy", "Drama"]
NAN, INF = float("nan"), float("inf")
REMEDY = r"Fix that value in config\.json, or re-save the model with model\.save_pretrained"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bundle")
    tiny_model(LABELS, fusion="gated", lexical=True, lexical_features=64, thresholds=[0.4, 0.5, 0.6]).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("changes,message", [
    # the reproductions: every score NaN (or 1.0), or every prediction failing
    ({"lexical_weight": NAN}, r"lexical_weight is NaN; it must be a number in \[0, 100\]"),
    ({"lexical_weight": 1e308}, r"lexical_weight is 1e\+308, outside \[0, 100\]"),
    ({"lexical_weight": INF}, r"lexical_weight is inf, outside \[0, 100\]"),
    ({"lexical_weight": -1}, r"lexical_weight is -1, outside \[0, 100\]"),
    ({"image_mean": [NAN, NAN, NAN]}, r"image_mean\[0\] is NaN; it must be a number in \[0, 1\]"),
    ({"image_mean": [0.5, 0.5]}, r"image_mean has 2 values for 3 channels"),
    ({"image_mean": None}, r"image_mean is missing \(null\); a model with an image tower needs it"),
    ({"image_std": [0.2, 0.0, 0.2]}, r"image_std\[1\] is 0, outside \[0\.001, 100\]"),
    ({"image_crop_pct": NAN}, r"image_crop_pct is NaN; it must be a number in \[0\.5, 1\.5\]"),
    ({"image_crop_pct": 1e-9}, r"image_crop_pct is 1e-09, outside \[0\.5, 1\.5\]"),
    ({"threshold": NAN, "thresholds": None}, r"threshold is NaN; it must be a number in \[0, 1\]"),
    ({"threshold": 1.5}, r"threshold is 1\.5, outside \[0, 1\] \(a decision threshold is a probability\)"),
    ({"thresholds": [0.5, NAN, 0.5]}, r"thresholds\[1\] is NaN"),
    ({"thresholds": [0.5, -0.1, 0.5]}, r"thresholds\[1\] is -0\.1, outside \[0, 1\]"),
    ({"thresholds": [0.5, 0.5]}, r"thresholds has 2 values for 3 labels; give one per label or null"),
    ({"interpolation": "nonsense"}, r"Unknown interpolation 'nonsense'; available: \['bicubic', 'bilinear'"),
    ({"image_crop_mode": "zoom"}, r"Unknown image_crop_mode 'zoom'; available: \['squash', 'center', 'border'\]"),
    # every other field of ModelConfig with a domain
    ({"task": "regression"}, r"Unknown task 'regression'; available: \['multilabel', 'singlelabel'\]"),
    ({"text_pooling": "max"}, r"Unknown text_pooling 'max'; available: \['mean', 'cls', 'mean4'\]"),
    ({"text_tower": "gpt"}, r"Unknown text_tower 'gpt'; available: \[.*'hf'.*'none'\]"),
    ({"image_tower": "vit"}, r"Unknown image_tower 'vit'; available: \[.*'timm'.*'none'\]"),
    ({"dropout": 1.0}, r"dropout is 1, outside \[0, 1\) \(a rate\)"),
    ({"modality_dropout": NAN}, r"modality_dropout is NaN"),
    ({"pos_weight": [0.0, 1.0, 1.0]}, r"pos_weight\[0\] is 0, outside \(0, 10000\]"),
    ({"lexical_c": 0}, r"lexical_c is 0, outside \(0, 1e\+06\]"),
    ({"lexical_min_df": 0}, r"lexical_min_df is 0, outside \[1, 1e\+09\] \(a count of training texts\)"),
    ({"labels": ["Action", "Action", "Drama"]}, r"labels has duplicates: \['Action'\]"),
    ({"labels": ["Action", " ", "Drama"]}, r"labels must all be non-empty strings"),
    ({"text_template": "{genre}"}, r"text_template: '\{genre\}' must contain \{plot\}"),
    ({"max_text_length": 0}, r"max_text_length=0 is outside the bound \[1, 65536\]"),
    ({"text_backbone": "x" * 5000}, r"text_backbone is 5,000 characters, above the bound of 4,096"),
    # numbers nested in the backbone configs: finite and of a sane magnitude
    ({"text_backbone_config": {"layer_norm_eps": NAN}}, r"text_backbone_config\.layer_norm_eps is NaN; every number"),
    ({"image_backbone_config": {"crop_pct": 1e300}}, r"image_backbone_config\.crop_pct is 1e\+300, beyond \+-1e\+12"),
    ({"lexical_weight": 10**400}, r"lexical_weight is an integer of 401 digits; no model setting is that large"),  # no float holds it
    ({"lexical_min_df": 10**20}, r"lexical_min_df is a huge integer, outside \[1, "),
])
def test_a_value_that_breaks_predictions_is_refused_at_load(bundle, tmp_path, changes, message):
    bad = tampered(bundle, tmp_path, **changes)
    with pytest.raises(BundleError, match=rf"config\.json: {message}.*{REMEDY}") as err:
        GenreClassifier.from_pretrained(bad)
    assert "cannot be built" not in str(err.value)


def test_an_integer_too_long_for_python_is_invalid_json_not_a_crash(bundle, tmp_path):
    bad = tampered(bundle, tmp_path)
    text = (bad / "config.json").read_text()
    (bad / "config.json").write_text(text.replace('"lexical_weight": 1.0', '"lexical_weight": ' + "9" * 5000))
    with pytest.raises(BundleError, match=r"config\.json is not valid JSON \(Exceeds the limit \(4300 digits\)"):
        GenreClassifier.from_pretrained(bad)


def test_a_long_bad_name_is_not_echoed_whole(bundle, tmp_path):
    bad = tampered(bundle, tmp_path, interpolation="nonsense-" + "y" * 500)
    with pytest.raises(BundleError, match=r"Unknown interpolation 'nonsense-y+\.\.\.; available") as err:
        GenreClassifier.from_pretrained(bad)
    assert "y" * 100 not in str(err.value)


def test_every_model_config_field_has_a_rule():
    assert set(FIELD_RULES) == {f.name for f in dataclasses.fields(ModelConfig)}


def test_the_named_choices_are_the_ones_timm_takes():
    from timm.data import create_transform
    from timm.data.transforms import str_to_interp_mode

    for name in INTERPOLATIONS:
        str_to_interp_mode(name)
    for mode in CROP_MODES:
        create_transform(input_size=(3, 32, 32), interpolation="bicubic", crop_mode=mode, crop_pct=1.0)
    with pytest.raises(KeyError):
        str_to_interp_mode("nonsense")  # what every prediction used to fail with


@pytest.mark.parametrize("overrides", [
    {}, {"text_tower": "bilstm"}, {"image_tower": "simplecnn"}, {"task": "singlelabel"}, {"fusion": "attention"},
    {"lexical": True, "thresholds": [0.01, 0.99, 0.5]}, {"text": False}, {"image": False},
])
def test_real_configs_pass_every_rule(overrides):
    assert field_problem(tiny_model(LABELS, **overrides).config) is None


def test_the_default_model_config_passes_every_rule():
    assert field_problem(create_model(labels=LABELS, pretrained=False, lexical=True).config) is None


def test_thresholds_of_zero_and_one_still_load(bundle, tmp_path):
    # The decision rule (mmgcs.decisions) accepts [0, 1]: 0 always predicts a genre, 1 (almost) never.
    ok = tampered(bundle, tmp_path, thresholds=[0.0, 1.0, 0.5])
    assert GenreClassifier.from_pretrained(ok).config.thresholds == [0.0, 1.0, 0.5]


def test_load_time_overrides_are_held_to_the_same_rules(bundle):
    with pytest.raises(TypeError, match=r"from_pretrained: threshold is NaN"):
        GenreClassifier.from_pretrained(bundle, threshold=NAN)
    with pytest.raises(TypeError, match=r"from_pretrained: thresholds has 1 values for 3 labels"):
        GenreClassifier.from_pretrained(bundle, thresholds=[0.5])
    assert GenreClassifier.from_pretrained(bundle, threshold=0.3).config.threshold == 0.3


def test_a_new_model_refuses_the_same_names_and_threshold():
    with pytest.raises(ValueError, match=r"Unknown interpolation 'nonsense'; available"):
        tiny_model(LABELS, interpolation="nonsense")
    with pytest.raises(ValueError, match=r"config\.threshold must lie in \[0, 1\], got nan"):
        tiny_model(LABELS, threshold=NAN)


def test_a_refused_bundle_loaded_before_would_have_given_nan(bundle, tmp_path):
    """What the check prevents: the same weights with image_mean NaN give NaN scores for any poster."""
    model = GenreClassifier.from_pretrained(bundle)
    model.config.image_mean = [NAN, NAN, NAN]
    poster = Image.new("RGB", (40, 60), (120, 30, 200))
    scores = model.predict(poster=poster)["scores"]
    assert all(s != s for s in scores.values())  # NaN
