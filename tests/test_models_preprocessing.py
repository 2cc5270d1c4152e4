"""mmgcs/models/preprocessing.py: the text template (a missing plot stays missing, a missing title is left out), plot
checks, tokenization at the bundle's maximum length, and the poster transform from the bundle's image settings
(size, mean, std, crop; refused when unresolved; training's one random, evaluation's one fixed)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoTokenizer

from mmgcs.config import ModelConfig
from mmgcs.models.preprocessing import check_plot, compose_text, image_transform, plot_present, tokenize
from mmgcs.testing import tiny_text_backbone_dir

TEMPLATE = "{title}. {plot}"


def test_the_template_adds_a_title_and_keeps_a_missing_plot_missing():
    assert compose_text(TEMPLATE, "A dog saves the town.", " Lassie ") == "Lassie. A dog saves the town."
    assert compose_text("{plot}", "A dog saves the town.", "Lassie") == "A dog saves the town."
    assert compose_text(TEMPLATE, "A dog saves the town.", None) == "A dog saves the town."
    assert compose_text(TEMPLATE, "A dog saves the town.", "   ") == "A dog saves the town."
    assert compose_text(TEMPLATE, None, "Lassie") is None and compose_text(TEMPLATE, "  ", "Lassie") == "  "


def test_plot_checks():
    assert plot_present("a plot") and not plot_present("  \n") and not plot_present(None) and not plot_present(3)
    check_plot(None, 0)
    check_plot("a plot", 1)
    with pytest.raises(TypeError, match="plot #4 must be a string or None, got list"):
        check_plot(["a plot"], 4)


def test_tokenize_pads_to_the_longest_truncates_at_the_maximum_and_reads_none_as_empty():
    tokenizer = AutoTokenizer.from_pretrained(tiny_text_backbone_dir())
    cfg = ModelConfig(max_text_length=8)
    long_plot = " ".join(["word"] * 50)
    out = tokenize(tokenizer, cfg, ["a", None, long_plot])
    assert set(out) == {"input_ids", "attention_mask"} and out["input_ids"].shape == (3, 8)
    assert out["attention_mask"][2].tolist() == [1] * 8  # truncated at max_text_length
    assert out["attention_mask"][1].sum() == len(tokenizer("")["input_ids"])  # None is read as ""
    short = tokenize(tokenizer, cfg, ["a"])
    assert short["input_ids"].shape[1] == int(out["attention_mask"][0].sum()) < 8  # padded to the longest only


def image_cfg(**changes) -> ModelConfig:
    settings = dict(image_size=32, image_mean=[0.5, 0.25, 0.0], image_std=[0.5, 0.25, 1.0], interpolation="bilinear")
    return ModelConfig(**{**settings, **changes})


def test_the_eval_transform_resizes_and_normalizes_with_the_bundles_settings():
    gray = PIL.Image.fromarray(np.full((90, 60, 3), 255, dtype=np.uint8))  # a white 2:3 poster
    pixels = image_transform(image_cfg())(gray)
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
    expected = torch.tensor([(1 - 0.5) / 0.5, (1 - 0.25) / 0.25, (1 - 0.0) / 1.0])
    torch.testing.assert_close(pixels.mean(dim=(1, 2)), expected)
    poster = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 60, 3), dtype=np.uint8))
    assert torch.equal(image_transform(image_cfg())(poster), image_transform(image_cfg())(poster))


def test_the_crop_mode_changes_what_is_kept():
    poster = np.zeros((90, 60, 3), dtype=np.uint8)
    poster[:10] = 255  # a white title band at the top
    image = PIL.Image.fromarray(poster)
    squash = image_transform(image_cfg(image_crop_mode="squash"))(image)
    center = image_transform(image_cfg(image_crop_mode="center"))(image)
    assert squash[0, 0].mean() > 0.9 and center[0, 0].mean() < -0.99  # the centre crop cuts the title away


def test_the_training_transform_is_random_and_the_same_shape():
    poster = PIL.Image.fromarray(np.random.default_rng(1).integers(0, 256, (90, 60, 3), dtype=np.uint8))
    transform = image_transform(image_cfg(), train=True)
    torch.manual_seed(0)
    views = [transform(poster) for _ in range(4)]
    assert all(v.shape == (3, 32, 32) for v in views)
    assert any(not torch.equal(views[0], v) for v in views[1:])


def test_unresolved_image_settings_are_refused_with_the_remedy():
    with pytest.raises(ValueError, match=r"no resolved image preprocessing.*create_model.*from_pretrained"):
        image_transform(ModelConfig())
