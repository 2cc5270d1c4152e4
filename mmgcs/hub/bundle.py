"""The model bundle on disk: save, strict load, and the checks a bundle passes before anything is built.

A bundle folder (= a Hub model repo) holds `model.safetensors`, `config.json` (the ModelConfig: labels,
thresholds, task, towers with their resolved backbone configs, preprocessing), the tokenizer files and a
`README.md` model card (see `mmgcs.hub.card`). No pickle; no remote code. The model class is a parameter
(`load_bundle(cls, ...)`), so this module sits below the classifier and never imports it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional, Union

import timm
import torch
from huggingface_hub import snapshot_download
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model

from mmgcs import __version__
from mmgcs import bundle_checks as checks
from mmgcs.config import ConfigError, ModelConfig, model_config_from_dict
from mmgcs.hub import weights
from mmgcs.hub.config_values import field_problem
from mmgcs.hub.errors import BundleError, HubUnavailableError, is_out_of_memory
from mmgcs.hub.ids import hub_reachable, is_hub_id
from mmgcs.hub.memory import memory_reported
from mmgcs.models.text import load_tokenizer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "added_tokens.json")
BUNDLE_PATTERNS = [CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, *TOKENIZER_FILES]
FORMAT_KEY = "mmgcs_bundle"  # config.json: {"mmgcs_bundle": {"format": 1, "mmgcs_version": ...}, ...fields}
FORMAT_VERSION = 1
# Fields a user may change when loading (they do not change the weights' shapes).
LOAD_OVERRIDABLE = {"thresholds", "threshold", "modality_dropout", "dropout"}
CONFIG_REMEDY = "Fix that value in config.json, or re-save the model with model.save_pretrained"


# ---------------------------------------------------------------------------------------------------- save
def config_dict(cfg: ModelConfig, tokenizer_files: Optional[list] = None) -> dict:
    meta = {"format": FORMAT_VERSION, "mmgcs_version": __version__}
    if tokenizer_files:
        meta["tokenizer_files"] = sorted(tokenizer_files)  # loading requires each (a lone tokenizer_config.json
        # would otherwise load as a 5-token vocabulary)
    return {FORMAT_KEY: meta, **dataclasses.asdict(cfg)}


def save_bundle_files(model, folder: Path) -> None:
    """Everything but the README (the hub mixin writes that right after, from generate_model_card)."""
    folder.mkdir(parents=True, exist_ok=True)
    # An older card would otherwise survive a re-save (the mixin never overwrites README.md).
    (folder / CARD_NAME).unlink(missing_ok=True)
    save_model(model, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "library": "mmgcs"})
    written = []
    if model.tokenizer is not None:
        saved = {Path(p).name for p in model.tokenizer.save_pretrained(str(folder))}
        # Only names the Hub download and upload carry (BUNDLE_PATTERNS) can be required when loading.
        written = [n for n in TOKENIZER_FILES if n in saved and (folder / n).is_file()]
    text = json.dumps(config_dict(model.config, written), indent=2, sort_keys=True) + "\n"
    (folder / CONFIG_NAME).write_text(text, encoding="utf-8")


# ---------------------------------------------------------------------------------------------------- load
def resolve_bundle(path_or_repo_id: Union[str, Path], *, revision=None, cache_dir=None, force_download=False,
                   token=None, local_files_only=False) -> Path:
    """A local bundle folder, or a Hub repo id downloaded (or found in the local Hub cache)."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_repo_id)
    if path.exists() or not is_hub_id(name):
        raise BundleError(f"{name!r} is not a model folder. Pass a folder saved by save_pretrained or a Hub repo id (owner/name)")
    offline = local_files_only or not hub_reachable()
    try:
        return Path(snapshot_download(
            name, revision=revision, cache_dir=cache_dir, force_download=force_download, token=token,
            local_files_only=offline, allow_patterns=BUNDLE_PATTERNS,
        ))
    except Exception as e:  # the hub client raises many types (offline, 404, gated, network)
        if offline:
            raise HubUnavailableError(
                f"{name!r} is not a local folder, is not in the local Hugging Face cache, and the Hub is unreachable. "
                f"Pass the folder the bundle was saved to, or retry when online ({type(e).__name__})"
            ) from None
        raise BundleError(f"Could not download the model {name!r} from the Hub: {type(e).__name__}: {e}") from None


def read_config(folder: Path) -> ModelConfig:
    return read_config_and_meta(folder)[0]


def check_json_files(folder: Path) -> None:
    """Every JSON file of the bundle (config.json, the tokenizer's, any other a library may read from the folder)
    is of a sane size and nesting depth before any parser sees it: Python's json, which transformers uses for
    tokenizer.json, recurses once per level."""
    for file in sorted(folder.glob("*.json")):
        if file.is_file():
            bound = checks.MAX_CONFIG_BYTES if file.name == CONFIG_NAME else checks.MAX_JSON_BYTES
            problem = checks.json_file_problem(file, bound)
            if problem:
                raise BundleError(f"{file} cannot be read: {problem}. The file is damaged or was not written by "
                                  "save_pretrained; re-download the bundle or re-save the model with "
                                  "model.save_pretrained")


def read_config_and_meta(folder: Path) -> tuple[ModelConfig, dict]:
    """The ModelConfig and the bundle's `mmgcs_bundle` entry (format, version, the tokenizer files saved); every
    number finite and every field within its domain (`mmgcs.hub.config_values`), or a BundleError naming it."""
    file = folder / CONFIG_NAME
    if not file.is_file():
        raise BundleError(f"{folder} has no {CONFIG_NAME}: it is not an MMGCS model folder (save one with model.save_pretrained)")
    check_json_files(folder)
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4,300 digits
        raise BundleError(f"{file} is not valid JSON ({e}); re-save the model or re-download the bundle") from None
    if not isinstance(raw, dict):
        raise BundleError(f"{file} must hold a JSON object of ModelConfig fields")
    meta = raw.pop(FORMAT_KEY, None)
    if meta is None:
        raise BundleError(f"{file} has no {FORMAT_KEY!r} entry: it was not written by MMGCS (GenreClassifier.save_pretrained)")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise BundleError(f"{file}: bundle format {meta!r} is not supported by this MMGCS (format {FORMAT_VERSION}); upgrade mmgcs")
    try:
        cfg = model_config_from_dict(raw)
    except ConfigError as e:
        raise BundleError(f"{file}: {e}") from None
    except OverflowError:  # an integer too large for a float field; the walk below names it
        cfg = None
    problem = (field_problem(cfg) if cfg is not None else None) or checks.non_finite_problem(raw)
    if problem or cfg is None:
        raise BundleError(f"{file}: {problem or 'a number is too large'}. {CONFIG_REMEDY}")
    return cfg, meta


def read_state_dict(folder: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The bundle's tensors as a dict (its header checked for form first, so damaged data is named before any
    read); a NaN or an Inf in one is a BundleError. Loading a model uses `weights.copy_weights` instead."""
    file = folder / WEIGHTS_NAME
    if not file.is_file():
        raise BundleError(f"{folder} has no {WEIGHTS_NAME}; re-save the model (only safetensors weights are loaded, never pickle)")
    weights.read_header(file)
    try:
        state = load_file(str(file), device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        if is_out_of_memory(e):
            raise
        raise BundleError(f"{file} is corrupt or truncated ({type(e).__name__}: {e}); re-save or re-download the bundle") from None
    bad = sorted(name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if bad:
        raise BundleError(f"{file} holds NaN or infinite values in {', '.join(bad[:5])}: the weights are damaged or "
                          "come from a diverged training run. Re-download the bundle or re-train the model")
    return state


def load_tokenizer_from_bundle(folder: Path, cfg: ModelConfig):
    if cfg.text_tower == "none":
        return None
    try:
        tokenizer = load_tokenizer(str(folder), local_files_only=True)
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: a deep JSON file check_json_files missed
        if is_out_of_memory(e):
            raise
        raise BundleError(f"The tokenizer in {folder} cannot be loaded ({type(e).__name__}: {e}); re-save the model") from None
    problem = checks.tokenizer_problem(tokenizer, cfg)
    if problem:
        raise BundleError(f"The tokenizer in {folder} does not fit the model: {problem}. Re-download the bundle "
                          "or re-save it with model.save_pretrained")
    return tokenizer


def _plain_timm_name(name) -> bool:
    return isinstance(name, str) and ":" not in name and timm.is_model(name)


def image_source_problem(cfg: ModelConfig) -> Optional[str]:
    """Why the image backbone cannot be rebuilt offline from the stored config alone, or None."""
    name = cfg.image_backbone
    if _plain_timm_name(name):
        return None
    arch = (cfg.image_backbone_config or {}).get("architecture")
    if ":" in str(name) and _plain_timm_name(arch):
        return None  # rebuilt from the stored architecture (TimmImageTower._build), never from the Hub or a folder
    if ":" in str(name):
        return (f"image_backbone={name!r} would fetch its architecture from the Hub or a folder, and "
                f"image_backbone_config.architecture ({arch!r}) is not a timm model; a bundle is rebuilt from its "
                "stored configs only. Re-save the model with mmgcs (it stores the architecture)")
    return f"image_backbone={name!r} is not a timm model in this timm version; upgrade timm or re-save the model"


def count_on_meta(cls, cfg: ModelConfig) -> tuple[int, str, int]:
    """(parameters + buffers, the largest tensor's name, its size) of `cls(cfg)` built on the meta device:
    exact, and nothing is allocated. Run after `size_problem`, so no single field can make the build slow."""
    with torch.device("meta"):
        model = cls(cfg, tokenizer=None)
    return _count(model)


def _count(model: torch.nn.Module) -> tuple[int, str, int]:
    sizes = {name: t.numel() for name, t in [*model.named_parameters(), *model.named_buffers()]}
    largest = max(sizes, key=sizes.get, default="")
    return sum(sizes.values()), largest, sizes.get(largest, 0)


def check_bundle_files(folder: Path, cfg: ModelConfig, meta: dict) -> None:
    """Every file the config needs is there: the weights and, with a text tower, its tokenizer files."""
    missing = [] if (folder / WEIGHTS_NAME).is_file() else [WEIGHTS_NAME]
    if cfg.text_tower != "none":
        missing += checks.missing_tokenizer_files(folder, meta.get("tokenizer_files"))
    if missing:
        why = " (only safetensors weights are loaded, never pickle)" if WEIGHTS_NAME in missing else ""
        raise BundleError(
            f"{folder} has no {', '.join(missing)}, which its config.json needs: the bundle is incomplete. Re-download "
            f"it (or copy the whole folder), or re-save the model with model.save_pretrained{why}"
        )


def check_buildable(cls, cfg: ModelConfig, file: Path) -> dict[str, torch.Tensor]:
    """Bounds, allowlists and the exact parameter count, all before any tensor is allocated. Returns the model's
    state dict on the meta device (names, shapes, dtypes), which the weights' header must match."""
    problem = checks.size_problem(cfg) or checks.image_kwargs_problem(cfg.image_backbone_kwargs)
    if not problem and cfg.text_tower == "hf":
        problem = checks.text_config_problem(cfg.text_backbone_config)
    if not problem and cfg.image_tower == "timm":
        problem = image_source_problem(cfg)
    if problem:
        raise BundleError(f"{file}: {problem}. Fix config.json or re-save the model with model.save_pretrained")
    try:
        with torch.device("meta"):
            model = cls(cfg, tokenizer=None)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        if is_out_of_memory(e):
            raise
        raise BundleError(f"{file} describes a model that cannot be built: {e}") from None
    total, largest, largest_size = _count(model)
    if total > checks.MAX_PARAMETERS:
        raise BundleError(
            f"{file} describes a model of {total:,} parameters, above the bound of {checks.MAX_PARAMETERS:,} "
            f"(largest tensor: {largest}, {largest_size:,} values); a size in config.json is wrong. Fix it or "
            "re-save the model with model.save_pretrained"
        )
    return weights.expected_tensors(model)


def with_overrides(cfg: ModelConfig, overrides: Optional[dict]) -> ModelConfig:
    """`cfg` with the inference-only fields a caller set when loading (`thresholds`, `threshold`, ...), each
    within its domain."""
    if not overrides:
        return cfg
    bad = sorted(set(overrides) - LOAD_OVERRIDABLE)
    if bad:
        raise TypeError(f"from_pretrained cannot change {bad}; only {sorted(LOAD_OVERRIDABLE)} can be set when loading")
    try:
        changed = model_config_from_dict({**dataclasses.asdict(cfg), **overrides})
    except ConfigError as e:
        raise TypeError(f"from_pretrained: {e}") from None
    problem = field_problem(changed, sorted(overrides))
    if problem:
        raise TypeError(f"from_pretrained: {problem}")
    return changed


def build_model(cls, cfg: ModelConfig, tokenizer, file: Path):
    """`cls(cfg)` for real (after check_buildable passed on the meta device)."""
    try:
        return cls(cfg, tokenizer=tokenizer)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        if is_out_of_memory(e):
            raise
        raise BundleError(f"{file} describes a model that cannot be built: {e}") from None


def load_bundle(cls, path_or_repo_id, *, force_download=False, token=None, cache_dir=None, local_files_only=False,
                revision=None, map_location="cpu", overrides: Optional[dict] = None):
    """A `cls` model from a bundle folder or Hub id: every check first (config values, then the weights' header
    against the model on the meta device), then built and its tensors copied in, eval mode."""
    folder = resolve_bundle(path_or_repo_id, revision=revision, cache_dir=cache_dir, force_download=force_download,
                            token=token, local_files_only=local_files_only)
    weights_file = folder / WEIGHTS_NAME
    with memory_reported(weights_file):
        cfg, meta = read_config_and_meta(folder)
        cfg = with_overrides(cfg, overrides)
        check_bundle_files(folder, cfg, meta)
        expected = check_buildable(cls, cfg, folder / CONFIG_NAME)
        header = weights.read_header(weights_file)
        weights.check_header(header, expected, str(weights_file))  # before anything is allocated or read
        tokenizer = load_tokenizer_from_bundle(folder, cfg)
        model = build_model(cls, cfg, tokenizer, folder / CONFIG_NAME)
        weights.check_header(header, model.state_dict(), str(weights_file))  # the real build, as on the meta device
        weights.copy_weights(model, weights_file)
    model.to(map_location)
    model.eval()
    return model


__all__ = [
    "BUNDLE_PATTERNS", "CARD_NAME", "CONFIG_NAME", "LOAD_OVERRIDABLE", "TOKENIZER_FILES", "WEIGHTS_NAME",
    "build_model", "check_buildable", "check_bundle_files", "check_json_files", "config_dict", "count_on_meta",
    "image_source_problem", "load_bundle", "load_tokenizer_from_bundle", "read_config", "read_config_and_meta",
    "read_state_dict", "resolve_bundle", "save_bundle_files", "with_overrides",
]
