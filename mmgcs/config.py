"""The only home of MMGCS defaults.

Precedence: dataclass defaults < YAML file(s) < ``section.key=value`` command-line overrides.
Unknown keys are errors; values are coerced to the declared field type, and a bad value names the field.
"""

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


@dataclass
class DataConfig:
    path: str = "data/movies"  # a built dataset folder (Hub layout) or a Hub dataset id
    train_split: str = "train"
    validation_split: str = "validation"
    test_split: str = "test"
    num_workers: int = 0  # DataLoader workers (decode/augment in parallel)


@dataclass
class ModelConfig:
    """Everything needed to rebuild a GenreClassifier offline; saved as the bundle's config.json.

    Flat and JSON-serializable on purpose: a nested dataclass comes back from the hub mixin as a plain dict.
    """

    labels: list = field(default_factory=list)
    task: str = "multilabel"  # "multilabel" (sigmoid + BCE) or "singlelabel" (softmax + CE)
    # Text tower: a name in the text-tower registry, or "none".
    text_tower: str = "hf"
    text_backbone: str = "sentence-transformers/all-MiniLM-L6-v2"
    text_pooling: str = "mean"  # "mean" or "cls"
    max_text_length: int = 128
    text_backbone_config: dict = field(default_factory=dict)  # resolved backbone config, filled at build time
    glove_path: str = ""  # BiLSTM tower: optional glove.6B.100d.txt
    word_embedding_dim: int = 100
    lstm_hidden_dim: int = 128
    vocab_size: int = 20000
    # Image tower: a name in the image-tower registry, or "none".
    image_tower: str = "timm"
    image_backbone: str = "tf_efficientnet_lite0"
    image_backbone_config: dict = field(default_factory=dict)  # resolved timm pretrained_cfg, filled at build time
    image_size: int = 224
    image_mean: list = field(default_factory=lambda: [0.485, 0.456, 0.406])
    image_std: list = field(default_factory=lambda: [0.229, 0.224, 0.225])
    interpolation: str = "bicubic"
    # Fusion head: a name in the fusion registry.
    fusion: str = "gated"
    fusion_dim: int = 256
    dropout: float = 0.2
    modality_dropout: float = 0.0  # probability of hiding one modality of a training row
    pos_weight: Optional[list] = None  # per-genre BCE pos_weight
    threshold: float = 0.5  # global decision threshold
    thresholds: Optional[list] = None  # per-genre thresholds tuned on validation; override `threshold`
    pretrained: bool = True  # load pretrained backbone weights when building a NEW model


@dataclass
class TrainConfig:
    output_dir: str = "runs/fusion"
    epochs: int = 10
    batch_size: int = 32
    eval_batch_size: int = 64
    optimizer: str = "adamw"  # adamw | adam | sgd
    lr: float = 1e-3  # heads
    backbone_lr: float = 2e-5  # towers, when they are trained
    weight_decay: float = 1e-2
    scheduler: str = "cosine"  # cosine | step | plateau | none
    warmup_ratio: float = 0.05
    grad_accum_steps: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # no | fp16 | bf16
    seed: int = 42
    text_finetune: str = "frozen"  # frozen | partial | full
    text_trainable_layers: int = 2  # for "partial"
    image_finetune: str = "frozen"
    image_trainable_blocks: int = 2
    freeze_epochs: int = 0  # two-stage schedule: towers frozen for this many epochs, then unfrozen as above
    cache_features: bool = True  # cache frozen towers' features on disk
    cache_dir: str = ".cache/mmgcs-features"
    early_stopping_patience: int = 3
    metric_for_best: str = "micro_f1"
    limit: int = 0  # use only the first N rows of each split (0 = all)
    log_with: str = ""  # e.g. "tensorboard"
    log_every: int = 20
    tune_thresholds: bool = True
    threshold_min_positives: int = 5  # per-genre threshold tuning needs this many validation positives
    push_to_hub: str = ""  # repo id
    resume: bool = False


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the field and what is accepted."""


def _coerce(value: Any, tp: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _coerce(value, args[0], name)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{name}: expected a boolean (true/false), got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected {tp.__name__}, got {value!r}")
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{name}: expected int, got {value!r}")
        try:
            # PyYAML reads "3e-4" as a string; float() handles it.
            return tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected {tp.__name__}, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return str(value)
    if tp in (list, dict) or origin in (list, dict):
        base = origin or tp
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value) if value.strip() else base()
            except yaml.YAMLError:
                value = None
            if base is list and isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, base):
            raise ConfigError(f"{name}: expected a {base.__name__}, got {value!r}")
        return value
    return value


def _apply(obj: Any, updates: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"Unknown config key {full!r}; valid keys here: {sorted(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a mapping of {sorted(f.name for f in dataclasses.fields(current))}")
            _apply(current, value, prefix=f"{full}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def parse_overrides(items: list[str]) -> dict:
    """``["train.lr=3e-4", "data.path=x"]`` → nested dict (values stay strings; coercion happens in _apply)."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"Override {item!r} must look like section.key=value (e.g. train.epochs=3)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def load_config(paths: list[str | Path] | str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Build a RunConfig: defaults < each YAML file in order < ``section.key=value`` overrides."""
    cfg = RunConfig()
    if isinstance(paths, (str, Path)):
        paths = [paths]
    for p in paths or []:
        p = Path(p)
        if not p.is_file():
            raise ConfigError(f"Config file {str(p)!r} not found; pass an existing YAML file with --config")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"Config file {str(p)!r} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"Config file {str(p)!r} must hold a mapping of sections (data/model/train)")
        _apply(cfg, loaded)
    _apply(cfg, parse_overrides(overrides or []))
    return cfg


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the fully resolved config next to a run (YAML, loadable again with ``--config``)."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")


def model_config_from_dict(d: dict) -> ModelConfig:
    cfg = ModelConfig()
    _apply(cfg, d)
    return cfg


__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "config_to_dict",
    "load_config",
    "model_config_from_dict",
    "parse_overrides",
    "save_config",
]
