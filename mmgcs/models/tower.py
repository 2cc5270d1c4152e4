"""What every text and image tower shares: `out_dim`, `set_finetune(mode, n)`, and `cache_key(cfg)`: what its
features depend on, so that the feature cache can store them without knowing the tower."""

import functools
import hashlib
from typing import Any, Collection, Optional

import torch
from torch import nn

from mmgcs.config import ModelConfig
from mmgcs.digest import tensors_digest

FINETUNE_MODES = ("frozen", "partial", "full")
# 32 hex digits: the weights part of every feature-cache key (and so of its file names) already on disk.
_KEY_HASH = functools.partial(hashlib.blake2b, digest_size=16)


def weights_hash(module: nn.Module, exclude: Collection[str] = ()) -> str:
    """A digest of every parameter and buffer (names, dtypes, shapes and bytes) of `module`, except the state-dict
    entries named in `exclude` (the layers a cached prefix does not depend on).

    Exact rather than clever: hashing MiniLM's 90 MB takes about 0.1 s, far less than one featurization pass.
    """
    skip = set(exclude)
    kept = {name: tensor for name, tensor in module.state_dict().items() if name not in skip}
    return tensors_digest(kept, _KEY_HASH)


def outputs_agree(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-3) -> bool:
    """Whether two encoders' outputs are the same features up to float rounding (relative to `b`'s largest value)."""
    return a.shape == b.shape and (a - b).abs().max().item() <= rtol * (b.abs().max().item() or 1.0)


class Tower(nn.Module):
    """A backbone that maps one modality to a (B, out_dim) feature vector.

    Subclasses provide `out_dim`, `finetune_groups()` (modules from input to output; "partial" trains the last
    `n`) and `always_frozen()` (parameters "partial" never trains, e.g. a frozen GloVe table). The text and image
    bases (`TextTower`, `ImageTower`) say what the features depend on (`_backbone_key`, `_preprocessing_key`).
    """

    out_dim: int

    def __init__(self) -> None:
        super().__init__()
        self.finetune_mode = "full"
        self.trainable_groups = 0  # "partial": how many of the last finetune_groups() train

    def finetune_groups(self) -> list[nn.Module]:
        raise NotImplementedError

    def always_frozen(self) -> list[nn.Parameter]:
        return []

    def cache_key(self, cfg: ModelConfig, tokenizer: Any = None) -> dict:
        """What this tower's features depend on besides the rows it reads, as a JSON-able dict: `backbone` (which
        tower, backbone and resolved backbone config), `weights` (a digest of the *current* weights: a tower
        fine-tuned and then frozen gets new features, never stale ones) and `preprocessing` (what turns a raw
        plot or poster into its input). `cfg` is the model's config; `tokenizer` the model's, for text towers."""
        return {
            "backbone": self._backbone_key(cfg),
            "weights": weights_hash(self),
            "preprocessing": self._preprocessing_key(cfg, tokenizer),
        }

    def _backbone_key(self, cfg: ModelConfig) -> dict:
        raise NotImplementedError(self._no_key())

    def _preprocessing_key(self, cfg: ModelConfig, tokenizer: Any) -> dict:
        raise NotImplementedError(self._no_key())

    def _no_key(self) -> str:
        return (
            f"{type(self).__name__} does not say what its features depend on, so they cannot be cached: subclass "
            "mmgcs.models.text.TextTower or mmgcs.models.image.ImageTower (or implement cache_key), or set "
            "train.cache_features=false"
        )

    def fast_encoder(self, sample: torch.Tensor) -> Optional[Any]:
        """A faster callable computing this tower's features for inputs like `sample` (checked against `forward`),
        or None when the tower has none (the default: run the tower itself)."""
        return None

    def set_finetune(self, mode: str, n: int = 2) -> "Tower":
        """frozen: no parameter trains; partial: the last `n` layers/blocks train; full: everything trains."""
        if mode not in FINETUNE_MODES:
            raise ValueError(f"Unknown finetune mode {mode!r}; available: {list(FINETUNE_MODES)}")
        if mode == "partial" and n < 0:
            raise ValueError(f"partial fine-tuning needs n >= 0 trainable layers, got {n}")
        for p in self.parameters():
            p.requires_grad_(mode == "full")
        if mode == "partial" and n > 0:
            for group in self.finetune_groups()[-n:]:
                for p in group.parameters():
                    p.requires_grad_(True)
        if mode != "frozen":
            for p in self.always_frozen():
                p.requires_grad_(False)
        self.finetune_mode = mode
        self.trainable_groups = min(n, len(self.finetune_groups())) if mode == "partial" and n > 0 else 0
        return self.train(self.training)

    def train(self, mode: bool = True) -> "Tower":
        super().train(mode)
        if mode and self.finetune_mode == "frozen":
            # A frozen tower is a fixed feature extractor: no dropout noise, no BatchNorm statistics drift,
            # and the same features the on-disk feature cache computed in eval mode.
            super().train(False)
        elif mode:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
                    m.eval()  # frozen BatchNorm keeps its running statistics
        return self
