"""Tower, fusion and pooling names are read from their registries when a config is checked (config.py copies none),
with the config's own message: `model.fusion: 'x' is not a valid choice; choose one of [...]`."""

import pytest

from mmgcs.config import ConfigError, ModelConfig, load_config
from mmgcs.models.choices import check_model_choices, model_choices
from mmgcs.models.fusion import FUSIONS
from mmgcs.models.image import IMAGE_TOWERS
from mmgcs.models.text import POOLINGS, TEXT_TOWERS


def test_the_choices_are_the_registries():
    assert model_choices() == {
        "text_tower": [*TEXT_TOWERS.names(), "none"],
        "image_tower": [*IMAGE_TOWERS.names(), "none"],
        "fusion": FUSIONS.names(),
        "text_pooling": list(POOLINGS),
    }
    check_model_choices(ModelConfig())  # the defaults are valid


@pytest.mark.parametrize(
    "field, value, listed",
    [
        ("fusion", "sum", "['attention', 'concat', 'gated', 'late']"),
        ("text_tower", "gru", "'bilstm', 'hf', 'none'"),
        ("image_tower", "vgg", "'simplecnn', 'timm', 'none'"),
        ("text_pooling", "max", "'mean', 'cls', 'mean4'"),
    ],
)
def test_an_unknown_name_lists_the_choices(field, value, listed):
    cfg = load_config(overrides=[f"model.{field}={value}"])  # config.py cannot know registry names
    with pytest.raises(ConfigError) as err:
        check_model_choices(cfg.model)
    assert str(err.value).startswith(f"model.{field}: {value!r} is not a valid choice; choose one of [")
    assert listed in str(err.value)


def test_a_fusion_registered_later_is_a_valid_choice(monkeypatch):
    monkeypatch.setattr(FUSIONS, "_builders", {**FUSIONS._builders, "sum": FUSIONS.get("late")})
    check_model_choices(ModelConfig(fusion="sum"))


def test_a_run_with_an_unknown_fusion_stops_before_it_builds_or_writes_anything(tmp_path):
    from mmgcs.engine import run

    out = tmp_path / "run"
    cfg = load_config(overrides=["model.fusion=sum", f"train.output_dir={out}", f"data.path={tmp_path / 'none'}"])
    with pytest.raises(ConfigError, match=r"model\.fusion: 'sum' is not a valid choice"):
        run(cfg)
    assert not out.exists()
