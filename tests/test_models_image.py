"""mmgcs/models/image.py: the registered poster towers built offline (pretrained=False): (B, 3, S, S) → (B, out_dim),
the config's preprocessing and backbone fields filled at build and kept when set, a bundle's tower rebuilt from its
config alone, the fine-tuning groups from input to output, what the cache key holds, and an unknown timm model named
with the way to list the choices."""

from __future__ import annotations

import pytest
import torch

from mmgcs.config import ModelConfig
from mmgcs.models.image import IMAGE_TOWERS, SimpleCNNTower, TimmImageTower, create_image_tower, image_tower_from_config
from mmgcs.testing import TINY_IMAGE_BACKBONE, TINY_IMAGE_SIZE


def cfg(**changes) -> ModelConfig:
    return ModelConfig(**{"image_backbone": TINY_IMAGE_BACKBONE, "image_size": TINY_IMAGE_SIZE, "pretrained": False,
                          **changes})


def test_the_registry_holds_timm_and_simplecnn():
    assert {"timm", "simplecnn"} <= set(IMAGE_TOWERS.names())


def test_a_timm_tower_fills_the_config_and_is_rebuilt_from_it_alone():
    config = cfg()
    torch.manual_seed(0)
    tower = create_image_tower(config)
    assert isinstance(tower, TimmImageTower)
    pixels = torch.randn(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    assert tower.eval()(pixels).shape == (2, tower.out_dim) and tower.out_dim == tower.backbone.num_features
    assert config.image_backbone_config["architecture"] == TINY_IMAGE_BACKBONE
    assert len(config.image_mean) == len(config.image_std) == 3 and config.interpolation
    assert config.backbone_weights["image"] == f"random init ({TINY_IMAGE_BACKBONE})"
    again = image_tower_from_config(config)
    assert again.state_dict().keys() == tower.state_dict().keys()
    again.load_state_dict(tower.state_dict())
    torch.testing.assert_close(again.eval()(pixels), tower(pixels))


def test_preprocessing_already_set_is_kept():
    config = cfg(image_mean=[0.1, 0.2, 0.3], image_std=[1.0, 1.0, 1.0], interpolation="nearest")
    create_image_tower(config)
    assert (config.image_mean, config.image_std, config.interpolation) == ([0.1, 0.2, 0.3], [1.0, 1.0, 1.0], "nearest")


def test_the_simple_cnn_is_four_blocks_to_256_features():
    config = cfg(image_tower="simplecnn")
    tower = create_image_tower(config)
    assert isinstance(tower, SimpleCNNTower) and len(tower.finetune_groups()) == 4
    assert tower.eval()(torch.randn(3, 3, 32, 32)).shape == (3, 256)
    assert config.interpolation == "bilinear" and config.image_backbone_config["architecture"] == "simplecnn"
    assert "no pretrained weights" in config.backbone_weights["image"]
    assert isinstance(image_tower_from_config(config), SimpleCNNTower)


def test_timms_groups_go_from_the_stem_to_the_head():
    tower = create_image_tower(cfg())
    groups = tower.finetune_groups()
    assert len(groups) > 2 and tower.backbone.conv_stem in list(groups[0])
    every = {id(p) for g in groups for p in g.parameters()}
    assert every == {id(p) for p in tower.parameters()}  # each parameter in some group
    tower.set_finetune("partial", 1)
    assert not tower.backbone.conv_stem.weight.requires_grad and tower.backbone.conv_head.weight.requires_grad


def test_the_cache_key_holds_the_backbone_and_the_transform():
    config = cfg()
    tower = create_image_tower(config)
    key = tower.cache_key(config)
    assert key["backbone"]["name"] == TINY_IMAGE_BACKBONE and key["backbone"]["tower"] == "timm"
    assert key["preprocessing"]["image_size"] == TINY_IMAGE_SIZE and "Normalize" in key["preprocessing"]["transform"]
    config.image_crop_mode = "center"
    assert tower.cache_key(config)["preprocessing"] != key["preprocessing"]


def test_an_unknown_timm_model_names_how_to_list_the_choices():
    with pytest.raises(ValueError, match=r"Unknown timm model 'no_such_net'.*timm\.list_models"):
        create_image_tower(cfg(image_backbone="no_such_net"))
