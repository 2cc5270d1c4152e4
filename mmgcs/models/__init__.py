"""Model code: towers (text.py, image.py), fusion heads (fusion.py), the Hub-ready classifier (classifier.py).

The towers and heads (layer 2 in ARCHITECTURE.md) load with the package; the classifier sits above the predict path
and the bundle (layer 4), so `GenreClassifier` / `create_model` load on first use: importing a model part (e.g.
`mmgcs.models.preprocessing` from `mmgcs.inference`) must not import the classifier back.
"""

from mmgcs.lazy import lazy_exports
from mmgcs.models.fusion import FUSIONS
from mmgcs.models.image import IMAGE_TOWERS
from mmgcs.models.text import TEXT_TOWERS

_LAZY = {"GenreClassifier": "mmgcs.models.classifier", "create_model": "mmgcs.models.classifier"}

__getattr__ = lazy_exports("mmgcs.models", globals(), _LAZY)


__all__ = ["FUSIONS", "IMAGE_TOWERS", "TEXT_TOWERS", "GenreClassifier", "create_model"]
