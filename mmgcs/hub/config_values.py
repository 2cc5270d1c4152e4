"""Every ModelConfig field of a bundle within its domain, checked when the bundle loads, before anything is built.

config.json is input: `lexical_weight: NaN` or `image_mean: [NaN, NaN, NaN]` would load and make every score NaN,
`lexical_weight: 1e308` every score 1.0, and `interpolation: "nonsense"` or `threshold: NaN` would load and then
fail every prediction. Each field has one rule here (`FIELD_RULES`; tests/test_hub_config_values.py holds the table to
the dataclass, so a new field cannot go unchecked). A rule returns the problem in words: the field, what is wrong
with its value, and what it must be (the choices, or the range). The integer sizes keep their bounds in
`mmgcs.bundle_checks` (one home), and the nested backbone configs are checked there too.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

from mmgcs import bundle_checks as checks
from mmgcs.config import CHOICES, ModelConfig, check_text_template
from mmgcs.models.choices import model_choices
from mmgcs.models.preprocessing import CROP_MODES, INTERPOLATIONS

# A rule: (the field's value, the whole config, the field's name) -> the problem in words, or None.
Rule = Callable[[Any, ModelConfig, str], Optional[str]]

MAX_LABEL_CHARS = 256
MAX_NAME_CHARS = 4_096  # backbone ids and local paths (records; a bundle never reads them when it loads)
CHANNELS = 3  # posters are RGB (image_backbone_kwargs may not change in_chans)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _number_problem(name: str, value: Any, low: float, high: float, open_low: bool, open_high: bool) -> Optional[str]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{name} is not a number ({type(value).__name__})"
    bounds = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
    if isinstance(value, float) and math.isnan(value):
        return f"{name} is NaN; it must be a number in {bounds}"
    if value < low or value > high or (open_low and value == low) or (open_high and value == high):
        shown = f"{value:g}" if isinstance(value, float) or abs(value) < 10**15 else "a huge integer"
        return f"{name} is {shown}, outside {bounds}"
    return None


def number(low: float, high: float, *, open_low: bool = False, open_high: bool = False, why: str = "") -> Rule:
    """A finite number in [low, high] (or with open ends); `why` says where real values come from."""
    def rule(value: Any, cfg: ModelConfig, name: str = "") -> Optional[str]:
        problem = _number_problem(name, value, low, high, open_low, open_high)
        return f"{problem} {why}".rstrip() if problem else None
    return rule


def _never(cfg: ModelConfig) -> bool:
    return False


def numbers(length: Callable[[ModelConfig], int], what: str, item: Rule,
            required: Callable[[ModelConfig], bool] = _never) -> Rule:
    """None (unless `required(cfg)`), or a list of `length(cfg)` values (one per `what`), each passing `item`."""
    def rule(value: Any, cfg: ModelConfig, name: str = "") -> Optional[str]:
        if value is None:
            return f"{name} is missing (null); a model with an image tower needs it" if required(cfg) else None
        if len(value) != length(cfg):
            return f"{name} has {len(value)} values for {length(cfg)} {what}; give one per {what[:-1]} or null"
        return next(filter(None, (item(v, cfg, f"{name}[{i}]") for i, v in enumerate(value))), None)
    return rule


def choice(choices: Callable[[ModelConfig], tuple]) -> Rule:
    """A name among `choices(cfg)`: the message lists them."""
    def rule(value: Any, cfg: ModelConfig, name: str = "") -> Optional[str]:
        allowed = list(choices(cfg))
        return None if value in allowed else f"Unknown {name} {_short(value)}; available: {allowed}"
    return rule


def size(value: Any, cfg: ModelConfig, name: str = "") -> Optional[str]:
    """An integer size within its bound in mmgcs.bundle_checks.MODEL_FIELD_BOUNDS."""
    low, high = checks.MODEL_FIELD_BOUNDS[name]
    return checks.int_problem(name, value, low, high)


def text(limit: int) -> Rule:
    """A string of at most `limit` characters."""
    def rule(value: Any, cfg: ModelConfig, name: str = "") -> Optional[str]:
        return f"{name} is {len(value):,} characters, above the bound of {limit:,}" if len(value) > limit else None
    return rule


def anything(value: Any, cfg: ModelConfig, name: str = "") -> Optional[str]:
    """A field whose type the loader already checked and whose content other checks cover (or no load reads)."""
    return None


def _labels(value: list, cfg: ModelConfig, name: str = "") -> Optional[str]:
    if len(value) > checks.MAX_LABELS:
        return f"labels has {len(value)} entries, above the bound of {checks.MAX_LABELS}"
    if not value:
        return "labels is empty; a model needs its genre names"
    if not all(isinstance(x, str) and x.strip() for x in value):
        return "labels must all be non-empty strings"
    if max(len(x) for x in value) > MAX_LABEL_CHARS:
        return f"a label is longer than {MAX_LABEL_CHARS} characters"
    if len(set(value)) != len(value):
        return f"labels has duplicates: {sorted({x for x in value if value.count(x) > 1})[:5]}"
    return None


def _template(value: str, cfg: ModelConfig, name: str = "") -> Optional[str]:
    try:
        check_text_template(value)
    except ValueError as e:
        return f"{name}: {e}"
    return None


def _image_kwargs(value: dict, cfg: ModelConfig, name: str = "") -> Optional[str]:
    return checks.image_kwargs_problem(value)


def _interpolation(value: str, cfg: ModelConfig, name: str = "") -> Optional[str]:
    if value == "" and cfg.image_tower == "none":
        return None  # a plot-only model never resolves one
    return _INTERPOLATION_CHOICE(value, cfg, name)


def _registry(field: str) -> Rule:
    return choice(lambda cfg: tuple(model_choices()[field]))


def _has_image_tower(cfg: ModelConfig) -> bool:
    return cfg.image_tower != "none"


def _label_count(cfg: ModelConfig) -> int:
    return len(cfg.labels)


def _channels(cfg: ModelConfig) -> int:
    return CHANNELS


_INTERPOLATION_CHOICE = choice(lambda cfg: INTERPOLATIONS)
PROBABILITY = number(0.0, 1.0, why="(a decision threshold is a probability)")
RATE = number(0.0, 1.0, open_high=True, why="(a rate)")

FIELD_RULES: dict[str, Rule] = {
    "labels": _labels,
    "task": choice(lambda cfg: CHOICES["model.task"]),
    "text_tower": _registry("text_tower"),
    "text_backbone": text(MAX_NAME_CHARS),
    "text_pooling": _registry("text_pooling"),
    "max_text_length": size,
    "text_template": _template,
    "text_backbone_config": anything,  # sizes and remote-code keys: bundle_checks (size_problem, text_config_problem)
    "glove_path": text(MAX_NAME_CHARS),  # training only: a loaded BiLSTM takes its vocabulary from the bundle
    "freeze_word_embeddings": anything,
    "word_embedding_dim": size,
    "lstm_hidden_dim": size,
    "vocab_size": size,
    "image_tower": _registry("image_tower"),
    "image_backbone": text(MAX_NAME_CHARS),  # its source: bundle.image_source_problem
    "image_backbone_kwargs": _image_kwargs,
    "image_backbone_config": anything,  # its integers: bundle_checks.size_problem
    "image_size": size,
    "image_mean": numbers(_channels, "channels", number(0.0, 1.0, why="(pixels are scaled to [0, 1])"),
                          _has_image_tower),
    "image_std": numbers(_channels, "channels", number(1e-3, 100.0, why="(a per-channel scale)"), _has_image_tower),
    "interpolation": _interpolation,
    "image_crop_mode": choice(lambda cfg: CROP_MODES),
    "image_crop_pct": number(0.5, 1.5, why="(timm's models use 0.875 to 1.15; 1.0 keeps the whole poster)"),
    "backbone_weights": anything,  # a record of where the towers' first weights came from
    "fusion": _registry("fusion"),
    "fusion_dim": size,
    "fusion_heads": size,
    "dropout": RATE,
    "modality_dropout": RATE,
    "pos_weight": numbers(_label_count, "labels", number(0.0, 1e4, open_low=True, why="(training weighs at most 10)")),
    "threshold": PROBABILITY,
    "thresholds": numbers(_label_count, "labels", PROBABILITY),
    "tuned_precision": choice(lambda cfg: CHOICES["model.tuned_precision"]),
    "pretrained": anything,
    "init_text_from": text(MAX_NAME_CHARS),
    "init_image_from": text(MAX_NAME_CHARS),
    "lexical": anything,
    "lexical_features": size,
    "lexical_ngrams": size,
    "lexical_min_df": number(1, 1e9, why="(a count of training texts)"),
    "lexical_c": number(0.0, 1e6, open_low=True, why="(the inverse L2 strength of the branch's fit)"),
    "lexical_weight": number(0.0, 100.0, why="(calibration picks it from 0 to 2)"),
}


def field_problem(cfg: ModelConfig, names: Optional[list] = None) -> Optional[str]:
    """The first field of `cfg` (or of `names`) outside its domain, in words; None when every one is fine."""
    for name in names or FIELD_RULES:
        problem = FIELD_RULES[name](getattr(cfg, name), cfg, name)
        if problem:
            return problem
    return None


__all__ = ["FIELD_RULES", "field_problem"]
