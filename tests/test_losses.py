"""The head's multi-label losses (mmgcs.models.losses): focal and asymmetric against BCE on hand-built logits and
targets, pos_weight on every loss, and the settings' checks naming the field."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmgcs.config import CHOICES
from mmgcs.models.losses import LOSSES, asymmetric_loss, check_loss_for_task, focal_loss, loss_options, multilabel_loss

LOGITS = torch.tensor([[2.0, -3.0, 0.0], [-1.0, 4.0, -6.0]])
TARGETS = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])


def _bce_terms(logits, targets):
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none")


def test_the_choices_table_names_every_loss():
    assert tuple(CHOICES["train.loss"]) == LOSSES
    assert "micro_macro_f1" in CHOICES["train.metric_for_best"]


def test_focal_with_gamma_zero_is_bce_and_otherwise_scales_each_term_by_one_minus_p_t():
    assert torch.allclose(focal_loss(LOGITS, TARGETS, gamma=0.0), F.binary_cross_entropy_with_logits(LOGITS, TARGETS))
    # By hand: p = sigmoid(logit); p_t = p for a positive, 1 - p for a negative.
    p = torch.sigmoid(LOGITS)
    p_t = torch.where(TARGETS > 0, p, 1 - p)
    expected = ((1 - p_t) ** 2 * _bce_terms(LOGITS, TARGETS)).mean()
    assert torch.allclose(focal_loss(LOGITS, TARGETS, gamma=2.0), expected)


def test_focal_shrinks_easy_terms_far_more_than_hard_ones():
    easy, hard = torch.tensor([[-6.0]]), torch.tensor([[0.0]])  # a negative at p = 0.0025 and one at p = 0.5
    zero = torch.zeros(1, 1)
    ratio_easy = focal_loss(easy, zero, 2.0) / F.binary_cross_entropy_with_logits(easy, zero)
    ratio_hard = focal_loss(hard, zero, 2.0) / F.binary_cross_entropy_with_logits(hard, zero)
    assert ratio_easy < 1e-4 and ratio_hard == pytest.approx(0.25)


def test_asymmetric_without_focusing_or_clip_is_bce():
    got = asymmetric_loss(LOGITS, TARGETS, gamma_neg=0.0, gamma_pos=0.0, clip=0.0)
    assert torch.allclose(got, F.binary_cross_entropy_with_logits(LOGITS, TARGETS))


def test_asymmetric_ignores_negatives_below_the_clip_and_keeps_positives():
    # Negative at p = sigmoid(-6) = 0.0025 < clip 0.05: no loss at all; the positive keeps its plain BCE term.
    logits, targets = torch.tensor([[-6.0, 1.0]]), torch.tensor([[0.0, 1.0]])
    got = asymmetric_loss(logits, targets, gamma_neg=4.0, gamma_pos=0.0, clip=0.05)
    assert got.item() == pytest.approx(-math.log(torch.sigmoid(torch.tensor(1.0)).item()) / 2, rel=1e-5)
    # A hard negative above the clip: -(p - clip)^4 * log(1 - (p - clip)).
    p = torch.sigmoid(torch.tensor(2.0)).item()
    got = asymmetric_loss(torch.tensor([[2.0]]), torch.zeros(1, 1), gamma_neg=4.0, clip=0.05)
    assert got.item() == pytest.approx(-((p - 0.05) ** 4) * math.log(1 - (p - 0.05)), rel=1e-5)


def test_pos_weight_scales_the_positive_terms_of_every_loss():
    logits, targets = torch.tensor([[0.5, -2.0, -2.0]]), torch.tensor([[1.0, 0.0, 0.0]])
    weight = torch.tensor([3.0, 1.0, 1.0])
    for kind in LOSSES:
        options = loss_options(kind, asl_clip=0.0)
        positive_term = multilabel_loss(logits[:, :1], targets[:, :1], options).item()  # the one positive alone
        plain = multilabel_loss(logits, targets, options).item()
        weighted = multilabel_loss(logits, targets, options, weight).item()
        # A mean over 3 entries: the positive's term counts 3 times instead of once.
        assert 3 * (weighted - plain) == pytest.approx(2 * positive_term, rel=1e-5), kind


def test_bad_loss_options_name_the_field():
    with pytest.raises(ValueError, match="train.loss"):
        loss_options("hinge")
    with pytest.raises(ValueError, match="train.asl_clip"):
        loss_options("asymmetric", asl_clip=1.0)
    with pytest.raises(ValueError, match="train.focal_gamma"):
        loss_options("focal", focal_gamma=-1.0)
    with pytest.raises(ValueError, match="Unknown multi-label loss 'hinge'"):
        multilabel_loss(LOGITS, TARGETS, {"kind": "hinge"})


def test_a_single_label_model_takes_only_bce():
    check_loss_for_task("singlelabel", "bce")
    check_loss_for_task("multilabel", "asymmetric")
    with pytest.raises(ValueError, match="set train.loss=bce"):
        check_loss_for_task("singlelabel", "focal")
