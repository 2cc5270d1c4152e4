"""mmgcs/models/image_prefix.py: an EfficientNet poster tower cut where its trainable stages begin. The top stages run
from the frozen bottom's cached feature maps give the whole forward's features and gradients (timm's
test_efficientnet and a random EfficientNet-Lite0, the default's TF-padded architecture); the cut follows the
trainable groups, and a tower it cannot cut is refused."""

from __future__ import annotations

import pytest
import timm
import torch

from mmgcs.models.image import TimmImageTower
from mmgcs.models.image_prefix import forward_from_prefix, image_cut, plan_cut
from mmgcs.testing import TINY_IMAGE_SIZE, tiny_model
from prefix_helpers import cached_maps, trainable_grads

TOL = 1e-5


@pytest.mark.parametrize("name, size, blocks", [("test_efficientnet", TINY_IMAGE_SIZE, b) for b in (1, 2, 5)]
                         + [("tf_efficientnet_lite0", 96, b) for b in (1, 2)])
def test_top_stages_from_the_prefix_give_the_whole_forwards_features_and_gradients(name, size, blocks):
    torch.manual_seed(0)
    tower = TimmImageTower(timm.create_model(name, pretrained=False, num_classes=0))
    tower.set_finetune("partial", blocks).train()  # the trainable BatchNorms use the batch's statistics
    pixels = torch.randn(4, 3, size, size)
    weights = torch.randn(4, tower.out_dim)

    whole = tower(pixels)
    expected = trainable_grads(tower, (whole * weights).sum())
    maps = cached_maps(tower, pixels, size)
    from_prefix = forward_from_prefix(tower, maps)
    got = trainable_grads(tower, (from_prefix * weights).sum())

    assert image_cut(tower).first == len(tower.backbone.blocks) - blocks
    torch.testing.assert_close(from_prefix, whole, atol=TOL, rtol=0)
    assert len(got) == len(expected) > 0 and any(g.abs().sum() > 0 for g in got)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0)


def test_the_cut_follows_the_trainable_groups_and_a_tower_it_cannot_cut_is_refused():
    tower = tiny_model(text=False).image_tower
    groups = len(tower.finetune_groups())  # the stem, then one per stage (conv_head/bn2 with the last)
    assert [plan_cut(tower, k).first for k in range(1, groups)] == list(range(groups - 2, -1, -1))
    with pytest.raises(ValueError, match="stem would train"):
        plan_cut(tower, groups)
    with pytest.raises(ValueError, match="set_finetune"):
        image_cut(tower.set_finetune("frozen"))
    with pytest.raises(ValueError, match="EfficientNet"):
        plan_cut(tiny_model(text=False, image_tower="simplecnn").image_tower, 1)
