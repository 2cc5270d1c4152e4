"""Fusion heads: the towers' features (one per modality) → genre logits. A registry.

Every head takes `features` (a list of (B, D_m) tensors, one per tower, text first) and `masks` (a list of
(B,) bool tensors, False where that row's modality is missing) and returns (B, num_labels) logits. A missing
modality never contributes: its features are zeroed or masked out, so the output for a row does not depend on
what its missing input held. A row with every modality missing gets the bias-only prediction (no NaN).
"""

import torch
from torch import nn

from mmgcs.models.registry import Registry

FUSIONS: Registry = Registry("fusion")


class FusionHead(nn.Module):
    def __init__(self, in_dims: list[int], num_labels: int, fusion_dim: int, dropout: float, **kwargs):
        super().__init__()
        if not in_dims:
            raise ValueError("A model needs at least one tower: set text_tower or image_tower (not both 'none')")
        self.in_dims = list(in_dims)
        self.num_labels = num_labels

    def forward(self, features: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


def _zero_missing(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x * mask.unsqueeze(-1).to(x.dtype)


@FUSIONS.register("late")
class LateFusion(FusionHead):
    """Each tower's own genre logits, projected to 128 and concatenated, then a classifier (the seeds'
    `MultiModalClassifier2`)."""

    PROJ = 128

    def __init__(self, in_dims, num_labels, fusion_dim, dropout, **kwargs):
        super().__init__(in_dims, num_labels, fusion_dim, dropout)
        self.tower_heads = nn.ModuleList(nn.Sequential(nn.Dropout(dropout), nn.Linear(d, num_labels)) for d in in_dims)
        self.projections = nn.ModuleList(nn.Sequential(nn.Linear(num_labels, self.PROJ), nn.ReLU()) for _ in in_dims)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.PROJ * len(in_dims), num_labels))

    def forward(self, features, masks):
        parts = [_zero_missing(proj(head(x)), m) for x, m, head, proj in zip(features, masks, self.tower_heads, self.projections)]
        return self.classifier(torch.cat(parts, dim=-1))


@FUSIONS.register("concat")
class ConcatFusion(FusionHead):
    """An MLP over the joined features plus one presence flag per modality (a zero vector alone would be
    ambiguous)."""

    def __init__(self, in_dims, num_labels, fusion_dim, dropout, **kwargs):
        super().__init__(in_dims, num_labels, fusion_dim, dropout)
        self.mlp = nn.Sequential(
            nn.LayerNorm(sum(in_dims) + len(in_dims)),
            nn.Dropout(dropout),
            nn.Linear(sum(in_dims) + len(in_dims), fusion_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(fusion_dim, num_labels),
        )

    def forward(self, features, masks):
        flags = torch.stack([m.to(features[0].dtype) for m in masks], dim=-1)
        joined = torch.cat([_zero_missing(x, m) for x, m in zip(features, masks)] + [flags], dim=-1)
        return self.mlp(joined)


@FUSIONS.register("gated")
class GatedFusion(FusionHead):
    """The Gated Multimodal Unit (Arevalo et al. 2017, the MM-IMDb paper): h_m = tanh(W_m x_m),
    z = gate([x_1, ..., x_M]), h = Σ_m z_m ⊙ h_m, then a classifier.

    The gates are a softmax over modalities per hidden unit; with two modalities that equals the paper's
    sigmoid gate z ⊙ h_text + (1 - z) ⊙ h_image. A missing modality's gate is masked to zero, so the present
    one gets all the weight.
    """

    def __init__(self, in_dims, num_labels, fusion_dim, dropout, **kwargs):
        super().__init__(in_dims, num_labels, fusion_dim, dropout)
        self.hidden = nn.ModuleList(nn.Sequential(nn.Dropout(dropout), nn.Linear(d, fusion_dim), nn.Tanh()) for d in in_dims)
        # One modality: nothing to choose between, the unit is just tanh(W x) (a gate would get no gradient).
        self.gate = nn.Linear(sum(in_dims), fusion_dim * len(in_dims)) if len(in_dims) > 1 else None
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(fusion_dim, num_labels))
        self.fusion_dim = fusion_dim

    def forward(self, features, masks):
        if self.gate is None:
            return self.classifier(_zero_missing(self.hidden[0](features[0]), masks[0]))
        joined = torch.cat([_zero_missing(x, m) for x, m in zip(features, masks)], dim=-1)
        gate_logits = self.gate(joined).view(joined.shape[0], len(features), self.fusion_dim)
        present = torch.stack(masks, dim=1).unsqueeze(-1)  # (B, M, 1)
        gate_logits = gate_logits.masked_fill(~present, torch.finfo(gate_logits.dtype).min)
        z = torch.softmax(gate_logits, dim=1) * present  # all-missing rows: zero weights, not NaN
        h = torch.stack([layer(x) for x, layer in zip(features, self.hidden)], dim=1)
        return self.classifier((z * h).sum(1))


@FUSIONS.register("attention")
class AttentionFusion(FusionHead):
    """Cross-modal attention: each tower output becomes a token (projection + modality embedding); a
    transformer layer lets a learned fusion token and the modality tokens attend to each other; missing
    modalities are masked out of the attention; the fusion token is classified."""

    def __init__(self, in_dims, num_labels, fusion_dim, dropout, fusion_heads: int = 4, **kwargs):
        super().__init__(in_dims, num_labels, fusion_dim, dropout)
        if fusion_dim % fusion_heads:
            raise ValueError(f"fusion_dim ({fusion_dim}) must be divisible by fusion_heads ({fusion_heads})")
        self.projections = nn.ModuleList(nn.Sequential(nn.Linear(d, fusion_dim), nn.LayerNorm(fusion_dim)) for d in in_dims)
        self.modality_embedding = nn.Parameter(torch.zeros(len(in_dims), fusion_dim))
        self.fusion_token = nn.Parameter(torch.zeros(1, 1, fusion_dim))
        nn.init.normal_(self.modality_embedding, std=0.02)
        nn.init.normal_(self.fusion_token, std=0.02)
        self.encoder = nn.TransformerEncoderLayer(
            fusion_dim, fusion_heads, dim_feedforward=2 * fusion_dim, dropout=dropout, batch_first=True, norm_first=True
        )
        self.norm = nn.LayerNorm(fusion_dim)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(fusion_dim, num_labels))

    def forward(self, features, masks):
        tokens = torch.stack([proj(x) for x, proj in zip(features, self.projections)], dim=1) + self.modality_embedding
        tokens = torch.cat([self.fusion_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        present = torch.stack(masks, dim=1)
        # key_padding_mask: True = ignore. The fusion token is always attended, so no row is fully masked.
        ignore = torch.cat([torch.zeros_like(present[:, :1]), ~present], dim=1)
        out = self.encoder(tokens, src_key_padding_mask=ignore)
        return self.classifier(self.norm(out[:, 0]))


def create_fusion(name: str, in_dims: list[int], num_labels: int, fusion_dim: int, dropout: float, **kwargs) -> FusionHead:
    return FUSIONS.get(name)(in_dims, num_labels, fusion_dim, dropout, **kwargs)
