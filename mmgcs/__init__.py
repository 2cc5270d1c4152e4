"""MMGCS — Multi-Modal Genre Classification System: a movie's plot and/or poster → its genres.

Importing the package changes no process state (the CPU policy is `mmgcs.runtime.configure_cpu_policy`, called by
the entry points) and loads no model code: the model classes come on first use.
"""

from mmgcs.lazy import lazy_exports
from mmgcs.config import ModelConfig, RunConfig, load_config

__version__ = "0.1.0"

# Model classes import torch/transformers/timm: load them on first use so `import mmgcs` stays light.
_LAZY = {
    "GenreClassifier": "mmgcs.models.classifier",
    "create_model": "mmgcs.models.classifier",
    "Predictor": "mmgcs.inference",
    "GenreProcessor": "mmgcs.processor",
}

__getattr__ = lazy_exports("mmgcs", globals(), _LAZY)


__all__ = ["GenreClassifier", "GenreProcessor", "ModelConfig", "Predictor", "RunConfig", "__version__", "create_model", "load_config"]
