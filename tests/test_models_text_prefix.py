"""mmgcs/models/text_prefix.py: a text encoder cut in two. The top layers run from the frozen bottom's cached output
give the whole forward's features and gradients (BERT-style and MPNet-style encoders built in code, every pooling),
keep their dropout in training, and a prefix cut elsewhere is refused with the remedy."""

from __future__ import annotations

import pytest
import torch

from mmgcs.models.text import POOLINGS, HFTextTower
from mmgcs.prefix_loaders import collate_prefix
from prefix_helpers import ARCHS, LAYERS, TOL, padded_batch, prefix_rows, tiny_backbone, trainable_grads


@pytest.mark.parametrize("trainable", [1, 2, LAYERS])
@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("arch", ARCHS)
def test_top_layers_from_the_prefix_give_the_whole_forwards_features_and_gradients(arch, pooling, trainable):
    torch.manual_seed(0)
    tower = HFTextTower(tiny_backbone(arch), pooling).set_finetune("partial", trainable).train()
    ids, attn = padded_batch(pad=tower.backbone.config.pad_token_id)
    weights = torch.randn(len(ids), tower.out_dim)

    whole = tower(ids, attn)
    expected = trainable_grads(tower, (whole * weights).sum())
    batch = collate_prefix(prefix_rows(tower, ids, attn))
    assert batch["text_hidden"].shape[1] == 12  # padded to the longest row, not to the raw batch's 16 columns
    from_prefix = tower.forward_from_prefix(batch["text_hidden"], batch["attention_mask"],
                                            batch.get("text_frozen_means"))
    got = trainable_grads(tower, (from_prefix * weights).sum())

    torch.testing.assert_close(from_prefix, whole, atol=TOL, rtol=0)
    assert len(got) == len(expected) > 0 and any(g.abs().sum() > 0 for g in got)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0)


def test_the_trainable_layers_keep_their_dropout_in_train_mode():
    torch.manual_seed(0)
    tower = HFTextTower(tiny_backbone("bert", dropout=0.5), "mean").set_finetune("partial", 1)
    ids, attn = padded_batch()
    batch = collate_prefix(prefix_rows(tower, ids, attn))
    run = lambda: tower.forward_from_prefix(batch["text_hidden"], batch["attention_mask"])  # noqa: E731
    tower.train()
    assert not torch.allclose(run(), run())
    tower.eval()
    torch.testing.assert_close(run(), tower(ids, attn), atol=TOL, rtol=0)


def test_a_prefix_for_another_cut_is_refused_with_the_remedy():
    tower = HFTextTower(tiny_backbone("bert"), "mean4").set_finetune("partial", 1)
    ids, attn = padded_batch()
    batch = collate_prefix(prefix_rows(tower, ids, attn))  # 3 frozen layers' means
    tower.set_finetune("partial", 2)
    with pytest.raises(ValueError, match="text_trainable_layers"):
        tower.forward_from_prefix(batch["text_hidden"], batch["attention_mask"], batch["text_frozen_means"])
    with pytest.raises(ValueError, match="set_finetune"):
        tower.set_finetune("frozen").forward_from_prefix(batch["text_hidden"], batch["attention_mask"])
