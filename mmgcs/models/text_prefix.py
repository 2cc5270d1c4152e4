"""A transformers encoder split in two at layer `first`: the frozen bottom (embeddings and layers below `first`) run
once per plot, and the top layers run from the bottom's cached output (the cached prefix path of partial
fine-tuning, mmgcs/features/prefix.py), exactly as the whole forward runs them.

What the top layers need besides the hidden states is rebuilt here per batch, the way the model's own forward builds
it: the attention mask in the form the model's attention implementation takes (``create_bidirectional_mask``) and,
for MPNet, the relative position bias its encoder computes once for all layers. Right padding is assumed nowhere:
the cache holds each plot's valid tokens only, and neither the mask nor a relative bias depends on where a batch
puts its padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask

# Model types whose layers are called as layer(hidden_states, attention_mask) by their encoder.
MASK_ONLY_LAYERS = ("bert", "roberta", "xlm-roberta", "camembert", "electra")
# Model types whose encoder computes a relative position bias once and passes it to every layer after the mask.
POSITION_BIAS_LAYERS = ("mpnet",)


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


@dataclass(frozen=True)
class PrefixLayers:
    """Where an encoder of `n_layers` layers is cut when its last `trainable` layers train: the top starts at layer
    `first`; `pooled` are the frozen layers whose outputs the pooling reads (their masked means are cached)."""

    n_layers: int
    first: int
    pooled: tuple[int, ...]

    @classmethod
    def plan(cls, n_layers: int, trainable: int, pooled_last: int) -> "PrefixLayers":
        """`pooled_last`: how many of the last layers the pooling averages (1 for "mean"/"cls", 4 for "mean4")."""
        if trainable < 1:
            raise ValueError(f"a cached prefix needs at least one trainable layer, got {trainable}")
        first = n_layers - min(trainable, n_layers)
        read_from = n_layers - min(pooled_last, n_layers)
        return cls(n_layers, first, tuple(range(read_from, first)))


def prefix_problem(backbone: nn.Module, stack: Optional[nn.ModuleList], tail: nn.ModuleList) -> Optional[str]:
    """Why this encoder cannot run from a cached prefix (None when it can)."""
    model_type = getattr(getattr(backbone, "config", None), "model_type", None)
    if model_type not in MASK_ONLY_LAYERS + POSITION_BIAS_LAYERS:
        return (f"running the top layers from cached hidden states is implemented for the model types "
                f"{sorted(MASK_ONLY_LAYERS + POSITION_BIAS_LAYERS)}, not {model_type!r}")
    if stack is None:
        return "the encoder's layer stack was not found"
    if len(tail):
        return "the encoder has modules after its last layer"
    if getattr(backbone.config, "is_decoder", False):
        return "the encoder is configured as a decoder (causal attention)"
    return None


class _BottomDone(Exception):
    """Raised by a pre-hook on the first top layer: the bottom has run, the rest of the forward is not needed."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden


def _layer_output(out):
    return out[0] if isinstance(out, tuple) else out


def run_bottom(backbone: nn.Module, stack: nn.ModuleList, layers: PrefixLayers, input_ids: torch.Tensor,
               attention_mask: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(the hidden states entering layer `layers.first` (B, T, H), the masked means of the `layers.pooled` layers'
    outputs (B, P, H) or None). The model's own forward runs and is stopped where the top begins: the embeddings and
    the bottom layers run exactly as in a whole forward, and the top layers not at all."""
    means: dict[int, torch.Tensor] = {}

    def keep_mean(index: int):
        return lambda module, args, out: means.__setitem__(index, masked_mean(_layer_output(out), attention_mask))

    def stop(module, args, kwargs):
        raise _BottomDone(args[0] if args else kwargs["hidden_states"])

    handles = [stack[i].register_forward_hook(keep_mean(i)) for i in layers.pooled]
    handles.append(stack[layers.first].register_forward_pre_hook(stop, with_kwargs=True))
    try:
        backbone(input_ids=input_ids, attention_mask=attention_mask)
    except _BottomDone as done:
        hidden = done.hidden
    else:
        raise RuntimeError(f"the encoder's forward never reached layer {layers.first}")
    finally:
        for handle in handles:
            handle.remove()
    pooled = torch.stack([means[i] for i in layers.pooled], 1) if layers.pooled else None
    return hidden, pooled


def run_top(backbone: nn.Module, top: list[nn.Module], hidden: torch.Tensor,
            attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """Each top layer's output (B, T, H), from the hidden states entering the first of them."""
    mask = create_bidirectional_mask(config=backbone.config, inputs_embeds=hidden, attention_mask=attention_mask)
    extra = ()
    if backbone.config.model_type in POSITION_BIAS_LAYERS:
        extra = (backbone.encoder.compute_position_bias(hidden),)
    outputs = []
    for layer in top:
        hidden = _layer_output(layer(hidden, mask, *extra))
        outputs.append(hidden)
    return outputs


def pool_layers(pooling: str, outputs: list[torch.Tensor], attention_mask: torch.Tensor,
                frozen_means: Optional[torch.Tensor], pooled_last: int) -> torch.Tensor:
    """The tower's pooling over the layer outputs it reads: `outputs` the last layers' (B, T, H), `frozen_means` the
    cached masked means (B, P, H) of the frozen layers before them that the pooling also reads."""
    if pooling == "cls":
        return outputs[-1][:, 0]
    if pooling == "mean":
        return masked_mean(outputs[-1], attention_mask)
    frozen = list(frozen_means.unbind(1)) if frozen_means is not None else []
    top = [masked_mean(h, attention_mask) for h in outputs[len(outputs) - (pooled_last - len(frozen)):]]
    return torch.stack(frozen + top).mean(0)


__all__ = ["MASK_ONLY_LAYERS", "POSITION_BIAS_LAYERS", "PrefixLayers", "masked_mean", "pool_layers",
           "prefix_problem", "run_bottom", "run_top"]
