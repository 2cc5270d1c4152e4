"""The genre metrics as a local Hugging Face `evaluate` module (`genre_metrics.py` in this folder, shipped in the
wheel): `evaluate.load(mmgcs.genre_metrics.PATH)`, or `load()`, loads it offline. Its numbers are those of
`mmgcs.metrics.compute_metrics`, the one entry point the engine and `mmgcs.evaluate` score through.
"""

from pathlib import Path

import evaluate

PATH = str(Path(__file__).resolve().parent)


def load(**kwargs) -> evaluate.EvaluationModule:
    """`evaluate.load` of this folder's module (keyword arguments go to `evaluate.load`)."""
    return evaluate.load(PATH, **kwargs)


__all__ = ["PATH", "load"]
