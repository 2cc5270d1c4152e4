"""Model code: towers (text.py, image.py), fusion heads (fusion.py), the Hub-ready classifier (classifier.py).

The towers and heads (layer 2 in ARCHITECTURE.md) load with the package. The classifier sits above the predict path
and the bundle (layer 4), so this package does not re-export it, lazily or not (a lazy table is an import too, and
tests/test_layering.py reads them): `GenreClassifier` / `create_model` come from `mmgcs` or
`mmgcs.models.classifier`.
"""

from mmgcs.models.fusion import FUSIONS
from mmgcs.models.image import IMAGE_TOWERS
from mmgcs.models.text import TEXT_TOWERS

__all__ = ["FUSIONS", "IMAGE_TOWERS", "TEXT_TOWERS"]
