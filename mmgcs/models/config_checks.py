"""The checks of a ModelConfig that its fields alone can tell, run before a GenreClassifier is built (by
`create_model`, the constructor, and so every bundle load): each message names the field and the fix.

A run's settings are checked by `mmgcs.config.validate_config` (choices, minimums, the template); these are the
model's own rules (labels, towers that exist, thresholds per label, the backbone's positions).
"""

from mmgcs.bundle_checks import image_kwargs_problem
from mmgcs.config import ModelConfig
from mmgcs.models.preprocessing import CROP_MODES, INTERPOLATIONS
from mmgcs.models.text import POOLINGS

TASKS = ("multilabel", "singlelabel")


def check_model_config(cfg: ModelConfig) -> None:
    """Check what the fields alone can tell; each message names the field and the fix."""
    if not cfg.labels:
        raise ValueError("config.labels is empty: pass the genre names, e.g. create_model(labels=['Drama', 'Comedy'])")
    if not all(isinstance(x, str) and x for x in cfg.labels):
        raise ValueError(f"config.labels must be non-empty strings, got {cfg.labels!r}")
    if len(set(cfg.labels)) != len(cfg.labels):
        dupes = sorted({x for x in cfg.labels if cfg.labels.count(x) > 1})
        raise ValueError(f"config.labels has duplicates: {dupes}")
    if cfg.task not in TASKS:
        raise ValueError(f"Unknown task {cfg.task!r}; available: {list(TASKS)}")
    if cfg.task == "singlelabel" and len(cfg.labels) < 2:
        raise ValueError("A singlelabel task needs at least 2 labels")
    if cfg.text_tower == "none" and cfg.image_tower == "none":
        raise ValueError("text_tower and image_tower are both 'none': a model needs at least one tower")
    for name in ("thresholds", "pos_weight"):
        value = getattr(cfg, name)
        if value is not None and len(value) != len(cfg.labels):
            raise ValueError(f"config.{name} has {len(value)} values for {len(cfg.labels)} labels; give one per label or None")
    if cfg.thresholds is not None and not all(0.0 <= float(t) <= 1.0 for t in cfg.thresholds):
        raise ValueError(f"config.thresholds must lie in [0, 1], got {cfg.thresholds}")
    if not 0.0 <= cfg.modality_dropout < 1.0:
        raise ValueError(f"config.modality_dropout must be in [0, 1), got {cfg.modality_dropout}")
    if cfg.image_size <= 0 or cfg.max_text_length <= 0:
        raise ValueError("config.image_size and config.max_text_length must be positive")
    if cfg.image_crop_mode not in CROP_MODES:
        raise ValueError(f"Unknown image_crop_mode {cfg.image_crop_mode!r}; available: {list(CROP_MODES)}")
    if cfg.interpolation and cfg.interpolation not in INTERPOLATIONS:  # "" = the backbone's own, resolved later
        raise ValueError(f"Unknown interpolation {cfg.interpolation!r}; available: {list(INTERPOLATIONS)}")
    if not 0.0 <= cfg.threshold <= 1.0:  # also refuses NaN, which would decide no genre at all
        raise ValueError(f"config.threshold must lie in [0, 1], got {cfg.threshold}")
    kwargs_problem = image_kwargs_problem(cfg.image_backbone_kwargs)
    if kwargs_problem:
        raise ValueError(f"config.{kwargs_problem}")
    if cfg.text_pooling not in POOLINGS:
        raise ValueError(f"Unknown text_pooling {cfg.text_pooling!r}; available: {sorted(POOLINGS)}")
    if cfg.lexical and cfg.text_tower == "none":
        raise ValueError("config.lexical reads the plot text, but text_tower='none'; set lexical=false or add a text tower")
    if cfg.lexical and cfg.task != "multilabel":
        raise ValueError("config.lexical supports the multilabel task only; set lexical=false for a singlelabel model")
    if cfg.lexical and (cfg.lexical_features <= 0 or cfg.lexical_ngrams < 1 or cfg.lexical_min_df < 1 or cfg.lexical_c <= 0):
        raise ValueError("config.lexical_features, lexical_ngrams, lexical_min_df and lexical_c must be positive")
    positions = (cfg.text_backbone_config or {}).get("max_position_embeddings")
    if cfg.text_tower == "hf" and isinstance(positions, int) and cfg.max_text_length > positions:
        raise ValueError(
            f"max_text_length={cfg.max_text_length} exceeds the text backbone's {positions} positions; lower it"
        )


__all__ = ["TASKS", "check_model_config"]
