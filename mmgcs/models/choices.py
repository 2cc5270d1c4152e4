"""The names a registry-backed model setting may take, read from the registries when a config is checked.

`mmgcs.config` checks the values it owns when a config is loaded; the names of towers, fusion heads and poolings
belong to their registries (a tower or head registered later is a valid choice at once), so the engine checks
them here before a run builds or loads anything.
"""

from mmgcs.config import ModelConfig, check_choice
from mmgcs.models.fusion import FUSIONS
from mmgcs.models.image import IMAGE_TOWERS
from mmgcs.models.text import POOLINGS, TEXT_TOWERS

NO_TOWER = "none"  # a model without this modality


def model_choices() -> dict[str, list[str]]:
    """Each registry-backed ModelConfig field → the names it accepts now."""
    return {
        "text_tower": [*TEXT_TOWERS.names(), NO_TOWER],
        "image_tower": [*IMAGE_TOWERS.names(), NO_TOWER],
        "fusion": FUSIONS.names(),
        "text_pooling": list(POOLINGS),
    }


def check_model_choices(cfg: ModelConfig, prefix: str = "model.") -> None:
    """Raise ConfigError (`model.fusion: 'x' is not a valid choice; choose one of [...]`) for the first field whose
    value no registry holds."""
    for name, choices in model_choices().items():
        check_choice(f"{prefix}{name}", getattr(cfg, name), choices)


__all__ = ["NO_TOWER", "check_model_choices", "model_choices"]
