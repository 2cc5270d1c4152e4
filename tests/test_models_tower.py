"""mmgcs/models/tower.py: what every tower shares, on a tiny tower built here. Fine-tuning modes (frozen, the last n
groups, full; parameters a tower always keeps frozen; refused modes), train() keeping a frozen tower and frozen
BatchNorms in eval, the weights digest behind cache keys, `outputs_agree`, and a tower that does not say what its
features depend on refused by the cache with the remedy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmgcs.config import ModelConfig
from mmgcs.models.tower import FINETUNE_MODES, Tower, outputs_agree, weights_hash


class ThreeGroups(Tower):
    """Stem (with a BatchNorm), middle, top; `table` stands for a frozen GloVe table."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
        self.middle = nn.Linear(4, 4)
        self.top = nn.Linear(4, 3)
        self.table = nn.Parameter(torch.ones(2))
        self.out_dim = 3

    def finetune_groups(self):
        return [self.stem, self.middle, self.top]

    def always_frozen(self):
        return [self.table]

    def forward(self, x):
        return self.top(self.middle(self.stem(x)))


def trainable(tower: Tower) -> set[str]:
    return {name.split(".")[0] for name, p in tower.named_parameters() if p.requires_grad}


def test_the_modes_choose_what_trains():
    tower = ThreeGroups()
    assert trainable(tower.set_finetune("frozen")) == set() and tower.trainable_groups == 0
    assert trainable(tower.set_finetune("partial", 1)) == {"top"} and tower.trainable_groups == 1
    assert trainable(tower.set_finetune("partial", 2)) == {"middle", "top"}
    assert trainable(tower.set_finetune("partial", 9)) == {"stem", "middle", "top"} and tower.trainable_groups == 3
    assert trainable(tower.set_finetune("partial", 0)) == set() and tower.trainable_groups == 0
    assert trainable(tower.set_finetune("full")) == {"stem", "middle", "top"}  # never the always-frozen table
    assert tower.finetune_mode == "full" and FINETUNE_MODES == ("frozen", "partial", "full")


def test_bad_modes_are_refused_naming_the_choices():
    with pytest.raises(ValueError, match=r"Unknown finetune mode 'some'; available: \['frozen', 'partial', 'full'\]"):
        ThreeGroups().set_finetune("some")
    with pytest.raises(ValueError, match="n >= 0 trainable layers, got -1"):
        ThreeGroups().set_finetune("partial", -1)


def test_a_frozen_tower_and_its_frozen_batchnorms_stay_in_eval_mode():
    tower = ThreeGroups().set_finetune("frozen").train()
    assert not any(m.training for m in tower.modules())  # no dropout, no statistics drift
    x = torch.randn(8, 4)
    torch.testing.assert_close(tower(x), tower(x))
    tower.set_finetune("partial", 1).train()
    assert tower.top.training and not tower.stem[1].training  # the frozen BatchNorm keeps its running statistics
    assert tower.set_finetune("full").train().stem[1].training


def test_the_weights_digest_follows_the_weights_except_the_excluded_ones():
    tower = ThreeGroups()
    before = weights_hash(tower)
    assert len(before) == 32 and weights_hash(ThreeGroups()) == before  # same weights, same digest
    with torch.no_grad():
        tower.top.bias.add_(1e-3)
    assert weights_hash(tower) != before
    assert weights_hash(tower, exclude={"top.bias"}) == weights_hash(ThreeGroups(), exclude={"top.bias"})
    tower.stem[1].running_mean.add_(1.0)  # buffers count too
    assert weights_hash(tower, exclude={"top.bias"}) != weights_hash(ThreeGroups(), exclude={"top.bias"})


def test_outputs_agree_up_to_rounding_relative_to_the_largest_value():
    b = torch.tensor([[100.0, -50.0], [1.0, 0.0]])
    assert outputs_agree(b + 0.05, b) and not outputs_agree(b + 0.2, b)
    assert not outputs_agree(b[:1], b)  # another shape
    assert outputs_agree(torch.zeros(2), torch.zeros(2)) and not outputs_agree(torch.full((2,), 0.01), torch.zeros(2))


def test_a_tower_that_does_not_say_its_key_cannot_be_cached():
    with pytest.raises(NotImplementedError, match=r"ThreeGroups does not say what its features depend on.*"
                                                  r"train\.cache_features=false"):
        ThreeGroups().cache_key(ModelConfig())
    assert ThreeGroups().fast_encoder(torch.zeros(1, 4)) is None
