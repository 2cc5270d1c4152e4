"""The head's multi-label losses (train.loss): BCE, focal and asymmetric, and the checks of their settings.

Training chooses one with ``GenreClassifier.set_loss(loss_options(...))``; a single-label model trains with
cross-entropy. Not part of the bundle: a saved model predicts the same whatever loss trained it.
"""

from typing import Optional

import torch
import torch.nn.functional as F

LOSSES = ("bce", "focal", "asymmetric")  # train.loss (its choices in mmgcs.config.CHOICES)


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0,
               pos_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Binary focal loss (Lin et al. 2017), mean over rows x genres: BCE times (1 - p_t)^gamma, so the many easy
    negatives of a rare genre stop dominating its gradient. gamma=0 is BCE."""
    bce = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight, reduction="none")
    p = torch.sigmoid(logits)
    p_t = torch.where(targets > 0, p, 1.0 - p)
    return ((1.0 - p_t).pow(gamma) * bce).mean()


def asymmetric_loss(logits: torch.Tensor, targets: torch.Tensor, gamma_neg: float = 4.0, gamma_pos: float = 0.0,
                    clip: float = 0.05, pos_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Asymmetric loss (Ridnik et al. 2021), mean over rows x genres: negatives focus with gamma_neg on a probability
    shifted down by ``clip`` (a negative below ``clip`` adds nothing: the easiest ones are discarded), positives with
    gamma_pos. gamma_neg=gamma_pos=clip=0 is BCE."""
    p = torch.sigmoid(logits)
    p_neg = (p - clip).clamp_min(0.0) if clip > 0 else p
    # log(1 - p_neg) from the logits where no clip applies, for the same numerics as BCE.
    log_not = torch.log((1.0 - p_neg).clamp_min(1e-8)) if clip > 0 else F.logsigmoid(-logits)
    pos = F.logsigmoid(logits) * (1.0 - p).pow(gamma_pos)
    if pos_weight is not None:
        pos = pos * pos_weight
    neg = log_not * p_neg.pow(gamma_neg)
    return -(targets * pos + (1.0 - targets) * neg).mean()


def multilabel_loss(logits: torch.Tensor, targets: torch.Tensor, options: dict,
                    pos_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The head's multi-label loss named by ``options["kind"]`` (train.loss) with its parameters."""
    kind = options.get("kind", "bce")
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight)
    if kind == "focal":
        return focal_loss(logits, targets, options.get("gamma", 2.0), pos_weight)
    if kind == "asymmetric":
        return asymmetric_loss(logits, targets, options.get("gamma_neg", 4.0), options.get("gamma_pos", 0.0),
                               options.get("clip", 0.05), pos_weight)
    raise ValueError(f"Unknown multi-label loss {kind!r}; choose one of {list(LOSSES)} (train.loss)")


def check_loss_for_task(task: str, kind: str) -> None:
    """A ValueError when a multi-label loss is asked of a single-label model (which trains with cross-entropy)."""
    if task != "multilabel" and kind != "bce":
        raise ValueError(f"train.loss={kind!r} is a multi-label loss; a singlelabel model trains with cross-entropy: "
                         f"set train.loss=bce")


def loss_options(kind: str = "bce", focal_gamma: float = 2.0, asl_gamma_neg: float = 4.0, asl_gamma_pos: float = 0.0,
                 asl_clip: float = 0.05) -> dict:
    """train.loss and its parameters → the options ``GenreClassifier.set_loss`` takes; a bad value names the field."""
    if kind not in LOSSES:
        raise ValueError(f"train.loss: {kind!r} is not a loss; choose one of {list(LOSSES)}")
    if min(focal_gamma, asl_gamma_neg, asl_gamma_pos) < 0:
        raise ValueError("train.focal_gamma, train.asl_gamma_neg and train.asl_gamma_pos must be >= 0")
    if not 0.0 <= asl_clip < 1.0:
        raise ValueError(f"train.asl_clip must lie in [0, 1) (a probability shift), got {asl_clip}")
    return {"kind": kind, "gamma": float(focal_gamma), "gamma_neg": float(asl_gamma_neg),
            "gamma_pos": float(asl_gamma_pos), "clip": float(asl_clip)}


__all__ = ["LOSSES", "asymmetric_loss", "check_loss_for_task", "focal_loss", "loss_options", "multilabel_loss"]
