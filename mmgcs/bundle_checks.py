"""What a bundle's config.json may ask for, checked before anything is built or allocated.

A bundle comes from disk or the Hub, so its config.json is input, not code: a typo'd or tampered size could ask
for terabytes (`vocab_size=2**34`), a backbone kwarg could make timm open an arbitrary file (`checkpoint_path`),
a backbone name could reach for the Hub ("hf-hub:..."), and a text config could point at remote code
(`auto_map`). Each check raises one error naming the field, its value, the bound and the remedy. The bounds are
generous (real models sit far below them); they exist to turn a wrong number into a clear message.

Import-light (no torch or timm at import time). The kwargs allowlist lives in mmgcs.config (re-exported here).
The checks that need torch or timm (the image source, the parameter count on the meta device, NaN weights) live
with the loader, `mmgcs.hub.bundle`; the domain of every ModelConfig field (names in their registries, floats in
their ranges) in `mmgcs.hub.config_values`.
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path
from typing import Any, Optional

# The image-backbone kwargs allowlist is a config field's domain (checked when a run config is validated too).
from mmgcs.config import IMAGE_BACKBONE_KWARGS, image_kwargs_problem  # noqa: F401

# The whole model (towers + fusion + lexical branch), counted on the meta device before the real build.
# 2e9 float32 parameters are 8 GB; the largest shipped config (mpnet-base + ConvNeXt-T) is ~140 M.
MAX_PARAMETERS = 2_000_000_000

# ModelConfig fields that size a tensor or a loop: (lowest, highest).
MODEL_FIELD_BOUNDS: dict[str, tuple[int, int]] = {
    "max_text_length": (1, 65_536),
    "image_size": (8, 2_048),  # 3 x 2048^2 floats = 50 MB per poster at inference
    "fusion_dim": (1, 65_536),
    "fusion_heads": (1, 1_024),
    "word_embedding_dim": (1, 65_536),
    "lstm_hidden_dim": (1, 65_536),
    "vocab_size": (1, 1 << 22),
    "lexical_features": (1, 1 << 24),
    "lexical_ngrams": (1, 8),
}
MAX_LABELS = 4_096

# Size fields of a transformers config (any model type; also inside nested text/vision sub-configs).
BACKBONE_FIELD_BOUNDS: dict[str, int] = {
    **dict.fromkeys(("vocab_size",), 1 << 22),  # 4 M tokens (the largest real vocabularies are ~256 k)
    **dict.fromkeys(("hidden_size", "d_model", "dim", "n_embd", "embedding_size", "embed_dim", "head_dim"), 32_768),
    **dict.fromkeys(("intermediate_size", "hidden_dim", "ffn_dim", "n_inner", "d_ff", "encoder_ffn_dim"), 262_144),
    **dict.fromkeys(("num_hidden_layers", "n_layers", "num_layers", "n_layer", "encoder_layers"), 512),
    **dict.fromkeys(("num_attention_heads", "n_heads", "n_head", "num_key_value_heads", "encoder_attention_heads"), 1_024),
    **dict.fromkeys(("max_position_embeddings", "n_positions", "max_seq_len"), 1 << 20),
    **dict.fromkeys(("type_vocab_size", "num_labels", "num_buckets"), 65_536),
}
# Every other integer in a backbone config (token ids, windows, ...): a number above this is no real setting.
MAX_OTHER_BACKBONE_INT = 1 << 24

# Keys of a transformers config that load code or fetch things: a bundle never runs code it ships.
REFUSED_TEXT_KEYS = ("auto_map", "trust_remote_code", "quantization_config", "custom_pipelines")
SAFE_ATTENTION = (None, "eager", "sdpa")


# ---------------------------------------------------------------------------------------- size bounds
def int_problem(name: str, value: Any, low: int, high: int) -> Optional[str]:
    """Why `name=value` is no integer in [low, high] (an integral float counts), or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer() and math.isfinite(value):
            value = int(value)
        else:
            return f"{name}={value!r} is not an integer"
    if not low <= value <= high:
        return f"{name}={value} is outside the bound [{low}, {high}]"
    return None


def backbone_config_problem(config: Any, prefix: str) -> Optional[str]:
    """The first out-of-bound size in a (possibly nested) backbone config dict, or None."""
    if isinstance(config, dict):
        items = config.items()
    elif isinstance(config, list):
        items = ((str(i), v) for i, v in enumerate(config))
    else:
        return None
    for key, value in items:
        name = f"{prefix}.{key}"
        if key in BACKBONE_FIELD_BOUNDS and not isinstance(value, (dict, list)):
            problem = int_problem(name, value, 0, BACKBONE_FIELD_BOUNDS[key])
        elif isinstance(value, int) and not isinstance(value, bool):
            problem = int_problem(name, value, -MAX_OTHER_BACKBONE_INT, MAX_OTHER_BACKBONE_INT)
        else:
            problem = backbone_config_problem(value, name)
        if problem:
            return problem
    return None


def size_problem(cfg) -> Optional[str]:
    """The first ModelConfig size (its own fields, then the towers' backbone configs) out of bounds, or None."""
    if len(cfg.labels) > MAX_LABELS:
        return f"labels has {len(cfg.labels)} entries, above the bound of {MAX_LABELS}"
    for name, (low, high) in MODEL_FIELD_BOUNDS.items():
        problem = int_problem(name, getattr(cfg, name), low, high)
        if problem:
            return problem
    return (backbone_config_problem(cfg.text_backbone_config, "text_backbone_config")
            or backbone_config_problem(cfg.image_backbone_config, "image_backbone_config"))


# ---------------------------------------------------------------------------------------- sources
def text_config_problem(config: Any) -> Optional[str]:
    """Why a stored transformers config may not be rebuilt (remote code, quantization, kernels), or None."""
    if not isinstance(config, dict):
        return None
    for key in REFUSED_TEXT_KEYS:
        if key in config:
            return f"text_backbone_config.{key} is set: a bundle never loads remote code or quantization backends"
    for key in ("attn_implementation", "_attn_implementation"):
        value = config.get(key)
        # A repo id ("kernels-community/flash-attn", "org/repo:fn") makes transformers fetch kernel code from the
        # Hub; plain names (eager, sdpa, flash_attention_2, ...) only pick an installed implementation.
        if value is not None and (not isinstance(value, str) or "/" in value or ":" in value):
            return (f"text_backbone_config.{key}={value!r} is not allowed (it fetches kernel code from the Hub); "
                    f"use a plain implementation name such as {list(SAFE_ATTENTION[1:])}")
    for key, value in config.items():
        problem = text_config_problem(value) if isinstance(value, dict) else None
        if problem:
            return problem.replace("text_backbone_config.", f"text_backbone_config.{key}.", 1)
    return None


# ---------------------------------------------------------------------------------------- JSON files
# Python's json (which transformers uses for tokenizer.json) recurses once per nesting level: a file of 100k
# nested brackets ends in a RecursionError. Real bundle files nest < 10 levels; the bound leaves room for any.
MAX_JSON_DEPTH = 64
# tokenizer.json of the largest real vocabularies (Gemma's 256 k tokens) is ~35 MB; config.json is a few KB
# (4,096 labels and two backbone configs stay under 1 MB).
MAX_JSON_BYTES = 128 * 2**20
MAX_CONFIG_BYTES = 16 * 2**20
# A JSON string (an unterminated one runs to the end: the parser reports that), found without backtracking.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\Z)', re.DOTALL)
_NOT_A_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_BRACKET_STEP = [1 if chr(b) in "[{" else -1 for b in range(256)]  # after the filter: only brackets


def json_too_deep(data: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether JSON text opens arrays/objects deeper than `limit` at any point, found without recursion in
    C-speed passes: strings are dropped, then the running count of open brackets is taken. Unclosed brackets
    count too (Python's parser recurses into them before it finds the text malformed)."""
    brackets = _JSON_STRING.sub(b"", data).translate(None, _NOT_A_BRACKET)
    return bool(brackets) and max(itertools.accumulate(map(_BRACKET_STEP.__getitem__, brackets))) > limit


def _size(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n:,} bytes"


def json_file_problem(file: Path, max_bytes: int = MAX_JSON_BYTES) -> Optional[str]:
    """Why a bundle's JSON file must not reach a JSON parser (too large, or nested too deep), or None. The
    file is read once, at most `max_bytes` of it."""
    size = file.stat().st_size
    if size > max_bytes:
        return f"{file.name} is {_size(size)}, above the bound of {_size(max_bytes)} for it"
    with open(file, "rb") as handle:
        data = handle.read(size + 1)  # read(n) allocates n bytes up front: never more than the file
    if len(data) > max_bytes:  # it grew since stat
        return f"{file.name} is above the bound of {_size(max_bytes)} for it"
    if json_too_deep(data):
        return f"{file.name} nests arrays or objects deeper than {MAX_JSON_DEPTH} levels (no real bundle file does)"
    return None


# Floats in config.json (eps, rope theta, init ranges): any real setting is far inside this. Integers have their
# own bounds (size_problem); only one too large for any float (which a float field would fail to convert) is
# refused here.
MAX_CONFIG_FLOAT = 1e12
FLOAT_RANGE = 2**1024


def non_finite_problem(value: Any, name: str = "") -> Optional[str]:
    """The first number in a parsed config (nested dicts and lists) that is NaN, infinite (JSON `Infinity`, or a
    literal like 1e400 that overflows), a float beyond +-MAX_CONFIG_FLOAT or an integer beyond any float, named by
    its path; None when all are fine. Run on text already checked by `json_too_deep`, so the recursion is shallow."""
    if isinstance(value, dict):
        found = (non_finite_problem(v, f"{name}.{k}" if name else str(k)) for k, v in value.items())
    elif isinstance(value, list):
        found = (non_finite_problem(v, f"{name}[{i}]") for i, v in enumerate(value))
    elif isinstance(value, float) and not math.isfinite(value):
        return f"{name} is {'NaN' if math.isnan(value) else 'infinite'}; every number in config.json must be finite"
    elif isinstance(value, float) and abs(value) > MAX_CONFIG_FLOAT:
        return f"{name} is {value:.3g}, beyond +-{MAX_CONFIG_FLOAT:.0e}; no model setting is that large"
    elif isinstance(value, int) and abs(value) >= FLOAT_RANGE:  # str() of a JSON int is bounded (4,300 digits)
        return f"{name} is an integer of {len(str(abs(value)))} digits; no model setting is that large"
    else:
        return None
    return next((problem for problem in found if problem), None)


# ---------------------------------------------------------------------------------------- files
# A vocabulary file a tokenizer can be rebuilt from when a (legacy) bundle has no tokenizer.json.
VOCAB_FILES = ("vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")


def missing_tokenizer_files(folder: Path, recorded: Optional[list]) -> list[str]:
    """The tokenizer files the text tower needs that `folder` lacks. `recorded` is the list save_pretrained
    wrote into config.json; bundles from before that record need tokenizer.json or a vocabulary file."""
    if isinstance(recorded, list) and recorded:
        return [str(n) for n in recorded if not (folder / Path(str(n)).name).is_file()]
    if (folder / "tokenizer.json").is_file():
        return []
    if (folder / "tokenizer_config.json").is_file() and any((folder / n).is_file() for n in VOCAB_FILES):
        return []
    return ["tokenizer.json"]


def tokenizer_problem(tokenizer, cfg) -> Optional[str]:
    """Why a loaded tokenizer cannot feed the stored text tower, or None: a vocabulary of special tokens only
    (what transformers builds when the vocabulary file is gone), or token ids past the embedding table."""
    size = len(tokenizer)
    specials = len(set(getattr(tokenizer, "all_special_ids", []) or []))
    if size <= specials:
        return f"the tokenizer has only its {size} special tokens (its vocabulary file is missing or empty)"
    vocab = (cfg.text_backbone_config or {}).get("vocab_size")
    if isinstance(vocab, int) and size > vocab:
        return f"the tokenizer has {size} tokens but the text tower's embedding holds {vocab} (text_backbone_config.vocab_size)"
    return None


__all__ = [
    "IMAGE_BACKBONE_KWARGS",
    "MAX_CONFIG_BYTES",
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_PARAMETERS",
    "image_kwargs_problem",
    "int_problem",
    "json_file_problem",
    "json_too_deep",
    "non_finite_problem",
    "missing_tokenizer_files",
    "size_problem",
    "text_config_problem",
    "tokenizer_problem",
]
