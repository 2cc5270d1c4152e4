"""MMGCS — Multi-Modal Genre Classification System: a movie's plot and/or poster → its genres."""

__version__ = "0.1.0"

from mmgcs.config import ModelConfig, RunConfig, load_config  # noqa: E402

__all__ = ["ModelConfig", "RunConfig", "__version__", "load_config"]
