"""The serving path's fast tower calls: the same numbers as the eager towers, less CPU time (issue 12).

    predictor = Predictor(model, fast=True)     # mmgcs.inference: the image tower runs through a FastPath

`FastPath(model).encode_image(pixels)` runs the image tower through its fast encoder (`tower.fast_encoder`:
static SAME padding, BatchNorm folded by TorchScript freezing, oneDNN fusion; mmgcs.models.image_fast), built on
the first batch of each poster size and checked there against the eager tower. Where no fast encoder applies
(GPU, an untraceable or non-timm tower) or building one fails, the eager tower runs and the server log gets one
line saying why: a missing backend is never an error for the user.

The encoder is a snapshot of the tower's weights when it is built: use a FastPath only over a frozen model
(serving, evaluation), never one that is still being trained.

The text tower stays eager: at batch 1 a ~70-token MiniLM call is matmul-bound already (see
benchmarks/bench_predict.py --profile), and tokenization pads each batch to its longest plot only.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Optional

import torch

from mmgcs.models.tower import outputs_agree

logger = logging.getLogger(__name__)

# The fast encoder's features may differ from eager ones by float rounding only; checked on the first batch
# (relative to its largest feature), as FastImageEncoder does, but 10x tighter: scores must stay within 1e-4.
FEATURE_RTOL = 1e-4


class FastPath:
    """A model's fast tower calls for frozen inference; each falls back to the eager tower (logged once)."""

    def __init__(self, model, enabled: bool = True):
        self.model = model
        self.enabled = enabled
        self._image: dict[tuple, Optional[Any]] = {}  # poster tensor shape (C, H, W) -> fast encoder or None (eager)
        self._lock = threading.Lock()

    def image_kind(self) -> str:
        """What runs the image tower: the fast encoder's kind once one is in use, else "eager"."""
        kinds = {getattr(e, "kind", "eager") for e in self._image.values() if e is not None}
        return kinds.pop() if len(kinds) == 1 else "eager"

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        encoder = self._image_encoder(pixels) if self.enabled else None
        if encoder is None:
            if pixels.device.type == "cpu":
                # channels-last input runs CPU convolutions ~10-25 % faster (same numbers to ~1e-6)
                pixels = pixels.contiguous(memory_format=torch.channels_last)
            return self.model.encode_image(pixels)
        return encoder(pixels)

    def _image_encoder(self, pixels: torch.Tensor) -> Optional[Any]:
        key = tuple(pixels.shape[1:])
        if key not in self._image:
            with self._lock:
                if key not in self._image:
                    self._image[key] = self._build_image(pixels)
        return self._image[key]

    def _build_image(self, sample: torch.Tensor) -> Optional[Any]:
        tower = self.model.image_tower
        build = getattr(tower, "fast_encoder", None)
        if build is None or sample.device.type != "cpu":
            logger.info("No fast image encoder for %s on %s; the eager tower serves", type(tower).__name__,
                        sample.device.type)
            return None
        try:
            encoder = build(sample)
            if encoder is not None and not _agrees(encoder, self.model, sample):
                logger.info("The fast image encoder disagrees with the eager tower beyond %g; the eager tower serves",
                            FEATURE_RTOL)
                encoder = None
        except Exception as e:  # noqa: BLE001 — any failure of an optional backend means: run eagerly
            logger.warning("The fast image encoder could not be built (%s: %s); the eager tower serves",
                           type(e).__name__, e)
            return None
        if encoder is None:
            logger.info("The image tower has no fast encoder here; the eager tower serves")
        return encoder


def _agrees(encoder, model, sample: torch.Tensor) -> bool:
    with torch.inference_mode():
        return outputs_agree(encoder(sample), model.encode_image(sample.contiguous()), FEATURE_RTOL)


__all__ = ["FEATURE_RTOL", "FastPath"]
