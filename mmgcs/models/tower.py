"""What every text and image tower shares: `out_dim`, and `set_finetune(mode, n)`."""

from torch import nn

FINETUNE_MODES = ("frozen", "partial", "full")


class Tower(nn.Module):
    """A backbone that maps one modality to a (B, out_dim) feature vector.

    Subclasses provide `out_dim`, `finetune_groups()` (modules from input to output; "partial" trains the last
    `n`) and `always_frozen()` (parameters "partial" never trains, e.g. a frozen GloVe table).
    """

    out_dim: int

    def __init__(self) -> None:
        super().__init__()
        self.finetune_mode = "full"

    def finetune_groups(self) -> list[nn.Module]:
        raise NotImplementedError

    def always_frozen(self) -> list[nn.Parameter]:
        return []

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
