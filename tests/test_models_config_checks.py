"""The model's own config checks (mmgcs/models/config_checks.py), directly on ModelConfig values: a sound config
passes, and each broken field is named with its fix (the constructor, create_model and every bundle load run them)."""

import dataclasses

import pytest

from mmgcs.config import ModelConfig
from mmgcs.models.config_checks import TASKS, check_model_config

SOUND = ModelConfig(labels=["Drama", "Comedy", "Horror"])


@pytest.mark.parametrize("changes, message", [
    ({"labels": []}, "config.labels is empty"),
    ({"labels": ["Drama", "Drama"]}, r"config.labels has duplicates: \['Drama'\]"),
    ({"labels": ["Drama", ""]}, "config.labels must be non-empty strings"),
    ({"task": "regression"}, "Unknown task 'regression'"),
    ({"text_tower": "none", "image_tower": "none", "lexical": False}, "a model needs at least one tower"),
    ({"thresholds": [0.5, 0.5]}, "config.thresholds has 2 values for 3 labels"),
    ({"thresholds": [0.5, 0.5, 1.5]}, r"config.thresholds must lie in \[0, 1\]"),
    ({"threshold": float("nan")}, r"config.threshold must lie in \[0, 1\], got nan"),
    ({"image_crop_mode": "zoom"}, "Unknown image_crop_mode 'zoom'"),
    ({"lexical": True, "text_tower": "none"}, "config.lexical reads the plot text"),
    ({"text_tower": "hf", "text_backbone_config": {"max_position_embeddings": 16}, "max_text_length": 64},
     "max_text_length=64 exceeds the text backbone's 16 positions"),
])
def test_each_broken_field_is_named(changes, message):
    with pytest.raises(ValueError, match=message):
        check_model_config(dataclasses.replace(SOUND, **changes))


def test_a_sound_config_passes_and_single_label_needs_two_labels():
    check_model_config(SOUND)
    assert "singlelabel" in TASKS
    check_model_config(dataclasses.replace(SOUND, task="singlelabel", lexical=False))
    with pytest.raises(ValueError, match="A singlelabel task needs at least 2 labels"):
        check_model_config(dataclasses.replace(SOUND, task="singlelabel", labels=["Drama"], lexical=False))
