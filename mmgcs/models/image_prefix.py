"""A timm EfficientNet image tower cut in two where its trainable stages begin: the frozen bottom (stem and the stages
below the cut) run once per poster, and the top (the trainable stages, `conv_head`/`bn2` and the pooling) run from the
bottom's cached feature map (the cached image prefix of partial fine-tuning, mmgcs/features/image_prefix.py), exactly
as the whole forward runs them (`forward_features` then `forward_head`).

Where the cut lies follows `set_finetune("partial", k)`: timm's coarse groups of an EfficientNet are the stem, then
one group per stage of `blocks`, with `conv_head`/`bn2` in the last; "partial" trains the last k groups, so the cut is
the input of stage `len(blocks) - k` (k=1: the last stage, whose input is 192 x 7 x 7 for Lite0 at 224 px). The cut is
found by comparing the trainable parameters with those of each candidate top, so another grouping is refused rather
than cut at the wrong place. These are functions of the tower (no state, nothing added to the bundle's weights).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
from timm.models.efficientnet import EfficientNet
from torch import nn

from mmgcs.models.image_fast import FastImageEncoder
from mmgcs.models.tower import weights_hash

# The backbone classes whose whole forward is conv_stem, bn1, blocks, conv_head, bn2, then forward_head.
CUT_BACKBONES = (EfficientNet,)


@dataclass(frozen=True)
class ImageCut:
    """An EfficientNet of `n_stages` stages cut before stage `first` (`n_stages`: only conv_head/bn2 train)."""

    n_stages: int
    first: int


def prefix_problem(tower: nn.Module) -> Optional[str]:
    """Why this image tower cannot train its top from a cached prefix (None when it can)."""
    backbone = getattr(tower, "backbone", None)
    if not isinstance(backbone, CUT_BACKBONES):
        name = type(backbone if backbone is not None else tower).__name__
        return (f"running the top stages from a cached feature map is implemented for timm's EfficientNet family "
                f"(tf_efficientnet_*, efficientnet_*), not {name}")
    for name in ("forward", "forward_features", "forward_head"):
        if getattr(type(backbone), name) is not getattr(EfficientNet, name):
            return f"{type(backbone).__name__} overrides EfficientNet.{name}"
    return None


def plan_cut(tower: nn.Module, trainable: int) -> ImageCut:
    """Where the tower is cut when its last `trainable` fine-tuning groups train; a ValueError says why it cannot be."""
    problem = prefix_problem(tower)
    if problem:
        raise ValueError(f"This image tower cannot run from a cached prefix: {problem}; set train.prefix_cache=false")
    if trainable < 1:
        raise ValueError(f"a cached image prefix needs at least one trainable block, got {trainable}")
    groups = tower.finetune_groups()
    wanted = {id(p) for group in groups[-trainable:] for p in group.parameters()}
    backbone = tower.backbone
    for first in range(len(backbone.blocks), -1, -1):
        if {id(p) for p in _top_modules(backbone, first).parameters()} == wanted:
            return ImageCut(len(backbone.blocks), first)
    raise ValueError(f"train.image_trainable_blocks={trainable} of {len(groups)} groups does not start at a stage of "
                     f"the backbone (the stem would train): lower it below {len(groups)}, or set "
                     "train.prefix_cache=false")


def image_cut(tower: nn.Module) -> ImageCut:
    """Where the tower is cut for its current "partial" setting (`set_finetune("partial", k)`)."""
    if getattr(tower, "finetune_mode", None) != "partial" or getattr(tower, "trainable_groups", 0) < 1:
        raise ValueError("A cached image prefix feeds the blocks a partially tuned tower trains: call "
                         "set_finetune('partial', k) with k >= 1 first (train.image_finetune=partial)")
    return plan_cut(tower, tower.trainable_groups)


def _top_modules(backbone: nn.Module, first: int) -> nn.ModuleList:
    return nn.ModuleList([*backbone.blocks[first:], backbone.conv_head, backbone.bn2])


class ImageBottom(nn.Module):
    """A private copy of the tower's frozen bottom: pixels (B, 3, S, S) → the feature map entering the first
    trainable stage, flattened to (B, out_dim) (the feature cache's shape; `map_shape` gives it back its (C, H, W)).
    A copy, so that putting it in eval mode or tracing it leaves the model alone."""

    def __init__(self, tower: nn.Module, cut: ImageCut, image_size: int):
        super().__init__()
        backbone = tower.backbone
        self.layers = copy.deepcopy(nn.Sequential(backbone.conv_stem, backbone.bn1, *backbone.blocks[: cut.first]))
        self.train(False)
        param = next(self.layers.parameters())
        with torch.no_grad():
            shape = self.layers(torch.zeros(1, 3, image_size, image_size, device=param.device, dtype=param.dtype)).shape
        self.map_shape = tuple(shape[1:])
        self.out_dim = int(torch.Size(self.map_shape).numel())

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.layers(pixels).flatten(1)

    def fast_encoder(self, sample: torch.Tensor) -> Optional[FastImageEncoder]:
        """The bottom traced, frozen and fused on CPU (checked against this module on `sample`), as the feature
        cache runs the whole frozen tower; None where that does not hold or apply."""
        encoder = FastImageEncoder(self, sample)
        return encoder if encoder.kind != "eager" else None


def forward_from_prefix(tower: nn.Module, feature_map: torch.Tensor) -> torch.Tensor:
    """The tower's features (B, out_dim) from the bottom's feature maps (B, C, H, W): the trainable stages,
    conv_head, bn2 and the backbone's own forward_head, as `tower(pixels)` runs them."""
    cut = image_cut(tower)
    backbone = tower.backbone
    x = feature_map
    for stage in backbone.blocks[cut.first :]:
        x = stage(x)
    return backbone.forward_head(backbone.bn2(backbone.conv_head(x)))


def features_from_prefix(tower: nn.Module, feature_map: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The tower's features of the rows with a poster (`mask`; None: every row) from their feature maps, and zeros for
    the others, which never run through the top: the feature cache's rule for a movie without a poster (zero
    features, masked out by the head), so the tuned BatchNorms' batch statistics come from real posters only (62% of
    the training movies have none)."""
    if mask is None:
        return forward_from_prefix(tower, feature_map)
    rows = mask.to(feature_map.device, torch.bool).nonzero(as_tuple=True)[0]
    out = feature_map.new_zeros(len(feature_map), tower.out_dim)
    if len(rows):
        return out.index_put((rows,), forward_from_prefix(tower, feature_map[rows]).to(out.dtype))
    if torch.is_grad_enabled() and tower.training:
        # A training batch without a poster: the tuned stages stay in the graph (DistributedDataParallel needs every
        # trained parameter in it), their output counting for nothing.
        return out + 0.0 * forward_from_prefix(tower, feature_map[:1]).sum()
    return out


def prefix_key(tower: nn.Module, cfg) -> dict:
    """What a cached image prefix depends on: the tower's key with the weights of the frozen bottom only (the top
    trains, its BatchNorm statistics move; the prefix never changes), and where the tower is cut."""
    cut = image_cut(tower)
    top = {id(t) for m in _top_modules(tower.backbone, cut.first) for t in (*m.parameters(), *m.buffers())}
    top_names = [n for n, t in (*tower.named_parameters(), *tower.named_buffers()) if id(t) in top]
    return {
        "backbone": tower._backbone_key(cfg),
        "weights": weights_hash(tower, exclude=top_names),
        "preprocessing": tower._preprocessing_key(cfg),
        "cut": {"stages": cut.n_stages, "first_trainable": cut.first},
    }


__all__ = ["CUT_BACKBONES", "ImageBottom", "ImageCut", "features_from_prefix", "forward_from_prefix", "image_cut",
           "plan_cut", "prefix_key", "prefix_problem"]
