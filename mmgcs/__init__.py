"""MMGCS — Multi-Modal Genre Classification System: a movie's plot and/or poster → its genres."""

__version__ = "0.1.0"

import os

# Idle OpenMP workers sleep instead of spinning (read when torch starts its thread pool, so only if mmgcs is
# imported first; the user's own setting wins). On a CPU shared with other processes, spinning workers wait out
# each other's time slices at every op: an epoch of the default head on 2 threads took 10-42 s spinning vs 3.5 s
# passive while another process used the cores (3.0 s on 1 thread); one fused prediction in the app cost 1,160 ms
# of CPU spinning vs 130 ms passive.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from mmgcs.config import ModelConfig, RunConfig, load_config  # noqa: E402

# Model classes import torch/transformers/timm: load them on first use so `import mmgcs` stays light.
_LAZY = {
    "GenreClassifier": "mmgcs.models.classifier",
    "create_model": "mmgcs.models.classifier",
    "Predictor": "mmgcs.inference",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mmgcs' has no attribute {name!r}")


__all__ = ["GenreClassifier", "ModelConfig", "Predictor", "RunConfig", "__version__", "create_model", "load_config"]
