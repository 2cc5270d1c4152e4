"""mmgcs/models/fusion.py on its own, every registered head on hand-made features (no towers): (B, labels) logits,
each row on its own, a missing modality's features never reach its row, a row with none present is finite, one
tower is enough, and the heads' own setting errors. Through whole models: tests/test_models_classifier_matrix.py."""

from __future__ import annotations

import pytest
import torch

from mmgcs.models.fusion import FUSIONS, FusionHead, create_fusion

DIMS = [6, 10]  # text first, then image
LABELS = 5


def head(name: str, dims=DIMS) -> FusionHead:
    torch.manual_seed(0)
    return create_fusion(name, dims, LABELS, fusion_dim=8, dropout=0.0, fusion_heads=2).eval()


def features(batch: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, d, generator=g) for d in DIMS]


def test_the_registry_holds_the_four_heads():
    assert sorted(FUSIONS.names()) == ["attention", "concat", "gated", "late"]


@pytest.mark.parametrize("name", FUSIONS.names())
def test_logits_per_row_and_independent_of_the_other_rows(name):
    fusion, x = head(name), features()
    masks = [torch.tensor([True, True, False, True]), torch.tensor([True, False, True, True])]
    with torch.no_grad():
        logits = fusion(x, masks)
        alone = fusion([f[2:3] for f in x], [m[2:3] for m in masks])
    assert isinstance(fusion, FusionHead) and logits.shape == (4, LABELS) and torch.isfinite(logits).all()
    torch.testing.assert_close(alone[0], logits[2], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", FUSIONS.names())
def test_a_missing_modalitys_features_never_reach_its_row(name):
    fusion, x = head(name), features()
    masks = [torch.tensor([True, False, True, False]), torch.tensor([False, True, True, False])]
    other = [f.clone() for f in x]
    other[0][1] += 100.0  # row 1 has no text: whatever its text features hold
    other[1][0] -= 100.0  # row 0 has no image
    other[0][3], other[1][3] = 7.0, -7.0  # row 3 has neither: the bias-only prediction
    with torch.no_grad():
        torch.testing.assert_close(fusion(other, masks), fusion(x, masks), atol=1e-5, rtol=0)
        changed = [f.clone() for f in x]
        changed[0][2] += 1.0  # a present input does count
        assert not torch.allclose(fusion(changed, masks)[2], fusion(x, masks)[2])


@pytest.mark.parametrize("name", FUSIONS.names())
def test_one_tower_is_enough_and_gradients_reach_it(name):
    fusion = head(name, dims=[6]).train()
    x = torch.randn(3, 6, requires_grad=True)
    logits = fusion([x], [torch.ones(3, dtype=torch.bool)])
    logits.sum().backward()
    assert logits.shape == (3, LABELS) and x.grad is not None and x.grad.abs().sum() > 0


def test_the_heads_settings_are_checked():
    with pytest.raises(ValueError, match="at least one tower"):
        create_fusion("concat", [], LABELS, fusion_dim=8, dropout=0.0)
    with pytest.raises(ValueError, match=r"fusion_dim \(10\) must be divisible by fusion_heads \(4\)"):
        create_fusion("attention", DIMS, LABELS, fusion_dim=10, dropout=0.0, fusion_heads=4)
    with pytest.raises(ValueError, match=r"Unknown fusion 'mlp'; available: \['attention', 'concat', 'gated', 'late'\]"):
        create_fusion("mlp", DIMS, LABELS, fusion_dim=8, dropout=0.0)
