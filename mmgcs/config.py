"""The only home of MMGCS defaults.

Precedence: dataclass defaults < YAML file(s) < ``section.key=value`` command-line overrides.
Unknown keys are errors; values are coerced to the declared field type, and a bad value names the field.

Layer 0: imports no other MMGCS module. The values a setting may take are checked here (`CHOICES`, `MINIMUMS`, the
text template, the image-backbone kwargs allowlist); the names a registry holds (towers, fusion heads, poolings)
are checked against the registries themselves by `mmgcs.models.check_model_choices`, which the engine calls.
"""

import dataclasses
import difflib
import re
import string
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

# The default backbones; `mmgcs.models.embedded` knows where their weights come from offline.
DEFAULT_TEXT_BACKBONE = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_IMAGE_BACKBONE = "tf_efficientnet_lite0"


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
    Fields marked "resolved" are filled from the backbone when a NEW model is built and then frozen in the bundle,
    so preprocessing always comes from the bundle and never from code defaults that could drift.
    """

    labels: list = field(default_factory=list)
    task: str = "multilabel"  # "multilabel" (sigmoid + BCE) or "singlelabel" (softmax + CE)
    # Text tower: a name in the text-tower registry ("hf", "bilstm"), or "none".
    text_tower: str = "hf"
    text_backbone: str = DEFAULT_TEXT_BACKBONE  # Hub id or local folder (also the BiLSTM's tokenizer)
    text_pooling: str = "mean"  # "mean", "cls" or "mean4" (average of the last 4 layers' means)
    max_text_length: int = 128
    # What the text tower reads: {plot}, optionally with {title} (e.g. "{title}. {plot}"). A movie without a title
    # reads its plot alone; without a plot the text input is missing whatever the template.
    text_template: str = "{plot}"
    text_backbone_config: dict = field(default_factory=dict)  # resolved backbone config (transformers to_dict())
    glove_path: str = ""  # BiLSTM tower: optional glove.6B.100d.txt; its words become the vocabulary
    freeze_word_embeddings: bool = True  # BiLSTM: keep GloVe vectors fixed (ignored without GloVe)
    word_embedding_dim: int = 100
    lstm_hidden_dim: int = 128
    vocab_size: int = 20000  # BiLSTM + GloVe: keep the N most frequent GloVe words (resolved to the real size)
    # Image tower: a name in the image-tower registry ("timm", "simplecnn"), or "none".
    image_tower: str = "timm"
    image_backbone: str = DEFAULT_IMAGE_BACKBONE
    image_backbone_kwargs: dict = field(default_factory=dict)  # extra timm.create_model kwargs (drop_path_rate, ...)
    image_backbone_config: dict = field(default_factory=dict)  # resolved timm pretrained_cfg, filled at build time
    image_size: int = 224
    image_mean: Optional[list] = None  # None = the backbone's own normalization (resolved at build time)
    image_std: Optional[list] = None
    interpolation: str = ""  # "" = the backbone's own (resolved at build time)
    # Posters are ~2:3; "squash" resizes the whole poster to a square (keeps title and artwork), "center" crops.
    image_crop_mode: str = "squash"  # squash | center | border
    image_crop_pct: float = 1.0
    backbone_weights: dict = field(default_factory=dict)  # resolved: where each tower's initial weights came from
    # Fusion head: a name in the fusion registry ("late", "concat", "gated", "attention").
    fusion: str = "gated"
    fusion_dim: int = 256
    fusion_heads: int = 4  # "attention" fusion
    dropout: float = 0.2
    modality_dropout: float = 0.0  # probability of hiding one modality of a training row (rows with both)
    pos_weight: Optional[list] = None  # per-genre BCE pos_weight
    threshold: float = 0.5  # global decision threshold
    thresholds: Optional[list] = None  # per-genre thresholds tuned on validation; override `threshold`
    # The precision the features were computed and the thresholds tuned at ("fp32" | "bf16"): serving's "auto"
    # serves in it where the CPU runs it natively, else in fp32 (mmgcs.serving.choose_precision).
    tuned_precision: str = "fp32"
    pretrained: bool = True  # load pretrained backbone weights when building a NEW model
    # Start a NEW model's towers from trained bundles (folder or Hub id; "" = no): the text tower (+ tokenizer) of
    # a plot model and the image tower of a poster model, and their heads into a "late" fusion's branches
    # (mmgcs.models.init_from). Kept in the bundle as a record of where the towers came from.
    init_text_from: str = ""
    init_image_from: str = ""
    # Lexical branch (mmgcs.models.lexical): a TF-IDF logistic regression over hashed word n-grams of the text,
    # fitted in closed form before the head trains; its logits, times `lexical_weight` (tuned on validation after
    # training), are added to the fused logits of rows that have a text.
    lexical: bool = False
    lexical_features: int = 262144  # hash buckets (2**18); the weights are lexical_features x len(labels) floats
    lexical_ngrams: int = 2  # words and word pairs
    lexical_min_df: int = 2  # n-grams seen in fewer training texts are dropped
    lexical_c: float = 4.0  # inverse L2 strength of each genre's logistic regression
    lexical_weight: float = 1.0


@dataclass
class TrainConfig:
    output_dir: str = "runs/fusion"
    init_from: str = ""  # start from an existing MMGCS bundle (folder or Hub id) instead of building new towers
    epochs: int = 10
    max_steps: int = 0  # stop after this many optimizer steps in total (0 = no limit); for smoke runs
    batch_size: int = 32
    eval_batch_size: int = 64
    optimizer: str = "adamw"  # adamw | adam | sgd
    lr: float = 1e-3  # heads
    backbone_lr: float = 2e-5  # towers, when they are trained
    weight_decay: float = 1e-2  # applied to weight matrices only (p.ndim >= 2), never to biases/norms
    momentum: float = 0.9  # sgd only
    scheduler: str = "cosine"  # cosine (with linear warmup) | step | plateau | none
    warmup_ratio: float = 0.05  # cosine: fraction of all optimizer steps spent warming up
    step_size_epochs: int = 3  # step: multiply the lr by `gamma` every this many epochs
    gamma: float = 0.1  # step / plateau: lr decay factor
    plateau_patience: int = 1  # plateau: epochs without improvement of `metric_for_best` before decaying
    grad_accum_steps: int = 1
    max_grad_norm: float = 1.0  # 0 disables clipping
    mixed_precision: str = "auto"  # auto (bf16/fp16 on a GPU that has it, else no) | no | fp16 | bf16
    seed: int = 42
    text_finetune: str = "frozen"  # frozen | partial | full
    text_trainable_layers: int = 2  # for "partial"
    image_finetune: str = "frozen"
    image_trainable_blocks: int = 2
    freeze_epochs: int = 0  # two-stage schedule: towers frozen for this many epochs, then tuned as above
    cache_features: bool = True  # frozen towers: compute features once (on disk) and train the head on them
    cache_dir: str = ".cache/mmgcs-features"
    # text_finetune=partial with cache_features: the frozen bottom of the text encoder runs once per split and its
    # output is cached (mmgcs/features/prefix.py); each step runs only the trainable top layers. false: every step
    # runs the whole encoder (with dropout in the frozen layers too).
    prefix_cache: bool = True
    # image_finetune=partial with prefix_cache: also train the image tower's last image_trainable_blocks stages from
    # the cached feature map entering them (mmgcs/features/image_prefix.py). Opt-in (configs/tuned-image.yaml sets
    # it), because that map is computed once at the eval transform: posters are then never augmented (no random
    # crops, flips or colour jitter; every epoch sees each poster's one view and the tuned stages may overfit
    # sooner). false: every step runs the whole image tower on augmented posters, as before the image prefix.
    image_prefix_cache: bool = False
    prefix_dtype: str = "float32"  # how the cached prefix is stored: float32 | bfloat16 (half the disk and memory)
    early_stopping_patience: int = 3  # epochs without improvement before stopping (0 = never stop early)
    # micro_macro_f1: the mean of micro- and macro-F1, so the kept epoch does not trade the rare genres for the
    # frequent ones.
    metric_for_best: str = "micro_f1"
    limit: int = 0  # use only the first N rows of each split (0 = all)
    log_with: str = "auto"  # auto (tensorboard when installed) | none | tensorboard | wandb | ... (comma-separated)
    log_every: int = 20
    pos_weight: str = "none"  # none | sqrt (BCE weight sqrt(negatives/positives) per genre, from the train split)
    # The head's multi-label loss: bce | focal (Lin et al. 2017: easy rows down-weighted by (1 - p_t)^focal_gamma) |
    # asymmetric (Ridnik et al. 2021: negatives by p_m^asl_gamma_neg, p_m = max(p - asl_clip, 0); positives by
    # (1 - p)^asl_gamma_pos). Both keep the many easy negatives of a rare genre from drowning its positives.
    loss: str = "bce"
    focal_gamma: float = 2.0
    asl_gamma_neg: float = 4.0
    asl_gamma_pos: float = 0.0
    asl_clip: float = 0.05
    # The lexical branch's logistic regressions and the head each learn a genre's base rate; added up, a rare genre's
    # prior counts twice and its probabilities sink below the threshold grid (TV Movie < 0.002 on data/movies).
    # true: the branch's intercepts lose the training log-odds of their genre right after its fit, so it adds its
    # evidence only and the prior is counted once (by the head).
    lexical_prior_once: bool = False
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
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"Unknown config key {full!r}{hint}; valid keys here: {sorted(names)}")
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


# Values a key may take; checked after all sources are merged so the error names the final culprit. This is their
# one home: the tables that implement them (mmgcs.optim's optimizers and schedules, the towers' fine-tuning
# modes, the model's tasks) are held to these names by tests/test_config.py.
CHOICES: dict[str, tuple] = {
    "model.task": ("multilabel", "singlelabel"),
    "model.tuned_precision": ("fp32", "bf16"),
    "train.optimizer": ("adamw", "adam", "sgd"),
    "train.scheduler": ("cosine", "step", "plateau", "none"),
    "train.mixed_precision": ("auto", "no", "fp16", "bf16"),
    "train.text_finetune": ("frozen", "partial", "full"),
    "train.image_finetune": ("frozen", "partial", "full"),
    "train.pos_weight": ("none", "sqrt"),
    "train.metric_for_best": ("micro_f1", "macro_f1", "micro_macro_f1", "weighted_f1", "samples_f1", "mAP", "loss"),
    "train.loss": ("bce", "focal", "asymmetric"),
    "train.prefix_dtype": ("float32", "bfloat16"),
}

# (lowest allowed, whether the lowest is allowed itself)
MINIMUMS: dict[str, tuple] = {
    "train.epochs": (1, True),
    "train.max_steps": (0, True),
    "train.batch_size": (1, True),
    "train.eval_batch_size": (1, True),
    "train.lr": (0, False),
    "train.backbone_lr": (0, True),
    "train.weight_decay": (0, True),
    "train.momentum": (0, True),
    "train.warmup_ratio": (0, True),
    "train.step_size_epochs": (1, True),
    "train.gamma": (0, False),
    "train.plateau_patience": (0, True),
    "train.grad_accum_steps": (1, True),
    "train.max_grad_norm": (0, True),
    "train.text_trainable_layers": (0, True),
    "train.image_trainable_blocks": (0, True),
    "train.freeze_epochs": (0, True),
    "train.early_stopping_patience": (0, True),
    "train.limit": (0, True),
    "train.log_every": (1, True),
    "train.threshold_min_positives": (1, True),
    "train.focal_gamma": (0, True),
    "train.asl_gamma_neg": (0, True),
    "train.asl_gamma_pos": (0, True),
    "train.asl_clip": (0, True),
    "data.num_workers": (0, True),
}

# `--fast`: a quick experiment on a slice of the data; explicit `key=value` overrides still win.
FAST_PROFILE: dict = {"train": {"limit": 256, "epochs": 2, "early_stopping_patience": 0}}


# ------------------------------------------------------------------------------------ values of single fields
TEXT_FIELDS = ("plot", "title")


def check_text_template(template: str) -> None:
    """A template must read the plot and may add the title; anything else is a typo the user should see."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise ValueError(f"{template!r} is not a valid format string ({e}); use e.g. '{{title}}. {{plot}}'") from None
    unknown = names - set(TEXT_FIELDS)
    if "plot" not in names or unknown:
        raise ValueError(
            f"{template!r} must contain {{plot}} and may contain {{title}}"
            + (f"; unknown fields {sorted(unknown)}" if unknown else "")
        )


def _rate(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= float(value) < 1.0


def _pool(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[a-z_]{0,16}", value) is not None


def _img_size(value: Any) -> bool:
    sizes = value if isinstance(value, (list, tuple)) and len(value) == 2 else [value]
    return all(isinstance(v, int) and not isinstance(v, bool) and 8 <= v <= 2_048 for v in sizes)


# timm.create_model kwargs that only change regularization, pooling or the input size. Anything else
# (checkpoint_path, pretrained_cfg_overlay, in_chans, ...) could read a file, fetch weights or change shapes.
# Checked for run configs (here), new models and loaded bundles (mmgcs.bundle_checks re-exports it).
IMAGE_BACKBONE_KWARGS = {
    "drop_rate": (_rate, "a rate in [0, 1)"),
    "drop_path_rate": (_rate, "a rate in [0, 1)"),
    "drop_block_rate": (_rate, "a rate in [0, 1)"),
    "attn_drop_rate": (_rate, "a rate in [0, 1)"),
    "proj_drop_rate": (_rate, "a rate in [0, 1)"),
    "pos_drop_rate": (_rate, "a rate in [0, 1)"),
    "global_pool": (_pool, "a timm pooling name such as 'avg' or 'max'"),
    "img_size": (_img_size, "an int (or [height, width]) between 8 and 2048"),
}


def image_kwargs_problem(kwargs: Any) -> Optional[str]:
    """Why `image_backbone_kwargs` is refused (a message naming the key), or None when every key is allowed."""
    if not isinstance(kwargs, dict):
        return f"image_backbone_kwargs must be a mapping, got {type(kwargs).__name__}"
    for key, value in kwargs.items():
        if key not in IMAGE_BACKBONE_KWARGS:
            return (f"image_backbone_kwargs: {key!r} is not allowed (it could read files, fetch weights or change "
                    f"the architecture); allowed keys: {sorted(IMAGE_BACKBONE_KWARGS)}")
        ok, expected = IMAGE_BACKBONE_KWARGS[key]
        if not ok(value):
            return f"image_backbone_kwargs.{key}: expected {expected}, got {value!r}"
    return None


def _get(cfg: Any, dotted: str) -> Any:
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def check_choice(key: str, value: Any, choices: Sequence[str]) -> None:
    """The one "not a valid choice" error: names the field, the value and every valid choice."""
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not a valid choice; choose one of {list(choices)}")


def validate_config(cfg: "RunConfig") -> None:
    """Raise ConfigError naming the field and what it accepts when a merged value is out of its domain."""
    for key, choices in CHOICES.items():
        check_choice(key, _get(cfg, key), choices)
    for key, (low, inclusive) in MINIMUMS.items():
        value = _get(cfg, key)
        if value < low or (value == low and not inclusive):
            bound = f">= {low}" if inclusive else f"> {low}"
            raise ConfigError(f"{key}: must be {bound}, got {value!r}")
    kwargs_problem = image_kwargs_problem(cfg.model.image_backbone_kwargs)
    if kwargs_problem:
        raise ConfigError(f"model.{kwargs_problem}")
    try:
        check_text_template(cfg.model.text_template)
    except ValueError as e:
        raise ConfigError(f"model.text_template: {e}") from None
    if cfg.train.warmup_ratio >= 1:
        raise ConfigError(f"train.warmup_ratio: must be < 1 (a fraction of all steps), got {cfg.train.warmup_ratio!r}")
    if cfg.train.freeze_epochs >= cfg.train.epochs and cfg.train.freeze_epochs > 0:
        raise ConfigError(
            f"train.freeze_epochs: must be < train.epochs ({cfg.train.epochs}) so the towers are unfrozen at some "
            f"point, got {cfg.train.freeze_epochs}"
        )


def read_yaml_mapping(path: str | Path, *, kind: str, expected: str, remedy: str) -> dict:
    """A YAML file that must hold a mapping; a missing file, bad YAML or another shape is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{kind} file {str(path)!r} not found; {remedy}")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{kind} file {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{kind} file {str(path)!r} must hold {expected}")
    return loaded


def load_config(
    paths: list[str | Path] | str | Path | None = None,
    overrides: list[str] | None = None,
    fast: bool = False,
) -> RunConfig:
    """Build a RunConfig: defaults < each YAML file in order < the ``--fast`` profile < ``section.key=value``."""
    cfg = RunConfig()
    if isinstance(paths, (str, Path)):
        paths = [paths]
    for p in paths or []:
        _apply(cfg, read_yaml_mapping(p, kind="Config", expected="a mapping of sections (data/model/train)",
                                      remedy="pass an existing YAML file with --config"))
    if fast:
        _apply(cfg, FAST_PROFILE)
    _apply(cfg, parse_overrides(overrides or []))
    validate_config(cfg)
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
    "CHOICES",
    "ConfigError",
    "DEFAULT_IMAGE_BACKBONE",
    "DEFAULT_TEXT_BACKBONE",
    "FAST_PROFILE",
    "DataConfig",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "check_choice",
    "check_text_template",
    "config_to_dict",
    "image_kwargs_problem",
    "load_config",
    "model_config_from_dict",
    "parse_overrides",
    "save_config",
    "validate_config",
]
