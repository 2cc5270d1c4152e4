"""Model code: towers (text.py, image.py), fusion heads (fusion.py), the Hub-ready classifier (classifier.py)."""

from mmgcs.models.classifier import GenreClassifier, create_model
from mmgcs.models.fusion import FUSIONS
from mmgcs.models.image import IMAGE_TOWERS
from mmgcs.models.text import TEXT_TOWERS

__all__ = ["FUSIONS", "IMAGE_TOWERS", "TEXT_TOWERS", "GenreClassifier", "create_model"]
