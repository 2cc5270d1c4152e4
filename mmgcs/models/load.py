"""A trained model from a bundle folder or a Hub id, on a device, ready to predict: the one loader of `mmgcs evaluate`,
`mmgcs predict` and the served model."""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

from mmgcs.hub.errors import BundleMemoryError
from mmgcs.hub.ids import is_hub_id
from mmgcs.models.classifier import GenreClassifier
from mmgcs.runtime import release_freed_memory

MODEL_REMEDY = (
    "Train one with `accelerate launch training/train_fusion.py` (it saves runs/fusion/model), or set "
    "MMGCS_MODEL to a Hub model id or to a folder saved by `save_pretrained`."
)


class ModelNotFoundError(RuntimeError):
    """The model source names nothing loadable; the message says how to get a model. `cause`: the loader's own
    error, which the command-line tools show after their own words."""

    def __init__(self, message: str, cause: BaseException):
        super().__init__(message)
        self.cause = cause


def load_model(source: str, device: Union[str, torch.device, None] = None) -> GenreClassifier:
    """A GenreClassifier from a folder or a Hub id, in eval mode on `device` (default: cuda when there is one), or
    `ModelNotFoundError` explaining how to get one."""
    local = Path(source).expanduser()
    try:
        model = GenreClassifier.from_pretrained(str(local) if local.exists() else source)
    except BundleMemoryError as e:
        # the bundle is fine: the remedy is memory, not training another model
        raise ModelNotFoundError(f"Could not load the model {source!r}: {e}", e) from e
    except Exception as e:
        if not local.exists() and not is_hub_id(source):
            raise ModelNotFoundError(f"No model at {source!r}. {MODEL_REMEDY}", e) from e
        raise ModelNotFoundError(f"Could not load the model {source!r} ({type(e).__name__}: {e}). {MODEL_REMEDY}",
                                 e) from e
    model = model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    release_freed_memory()  # the state dict read beside the built module: ~130 MB for MiniLM + Lite0
    return model.eval()
