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
from mmgcs.hub.errors import BundleError, HubUnavailableError
from mmgcs.hub.ids import is_hub_id
from mmgcs.hub.ids import hub_reachable
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


def read_config_and_meta(folder: Path) -> tuple[ModelConfig, dict]:
    """The ModelConfig and the bundle's `mmgcs_bundle` entry (format, version, the tokenizer files saved)."""
    file = folder / CONFIG_NAME
    if not file.is_file():
        raise BundleError(f"{folder} has no {CONFIG_NAME}: it is not an MMGCS model folder (save one with model.save_pretrained)")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{file} is not valid JSON ({e}); re-save the model or re-download the bundle") from None
    if not isinstance(raw, dict):
        raise BundleError(f"{file} must hold a JSON object of ModelConfig fields")
    meta = raw.pop(FORMAT_KEY, None)
    if meta is None:
        raise BundleError(f"{file} has no {FORMAT_KEY!r} entry: it was not written by MMGCS (GenreClassifier.save_pretrained)")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise BundleError(f"{file}: bundle format {meta!r} is not supported by this MMGCS (format {FORMAT_VERSION}); upgrade mmgcs")
    try:
        return model_config_from_dict(raw), meta
    except ConfigError as e:
        raise BundleError(f"{file}: {e}") from None


def read_state_dict(folder: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    file = folder / WEIGHTS_NAME
    if not file.is_file():
        raise BundleError(f"{folder} has no {WEIGHTS_NAME}; re-save the model (only safetensors weights are loaded, never pickle)")
    try:
        state = load_file(str(file), device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise BundleError(f"{file} is corrupt or truncated ({type(e).__name__}: {e}); re-save or re-download the bundle") from None
    bad = non_finite_tensors(state)
    if bad:
        raise BundleError(f"{file} holds NaN or infinite values in {_shown(bad)}: the weights are damaged or come from a "
                          "diverged training run. Re-download the bundle or re-train the model")
    return state


def _shown(names: list) -> str:
    return ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")


def load_weights_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Every tensor must be present, expected and of the right shape; otherwise a BundleError lists them."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)
    )
    problems = [f"{what} tensors: {_shown(keys)}"
                for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched)) if keys]
    if problems:
        raise BundleError(
            f"{source} does not match the model described by its config.json ({'; '.join(problems)}). "
            "The weights and config.json must come from the same save_pretrained call"
        )
    model.load_state_dict(state, strict=True)


def load_tokenizer_from_bundle(folder: Path, cfg: ModelConfig):
    if cfg.text_tower == "none":
        return None
    try:
        tokenizer = load_tokenizer(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
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
    sizes = {name: t.numel() for name, t in [*model.named_parameters(), *model.named_buffers()]}
    del model
    largest = max(sizes, key=sizes.get, default="")
    return sum(sizes.values()), largest, sizes.get(largest, 0)


def non_finite_tensors(state: dict) -> list[str]:
    """Names of the floating tensors holding a NaN or an Inf (a diverged run or a damaged file)."""
    return sorted(name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))


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


def check_buildable(cls, cfg: ModelConfig, file: Path) -> None:
    """Bounds, allowlists and the exact parameter count, all before any tensor is allocated."""
    problem = checks.size_problem(cfg) or checks.image_kwargs_problem(cfg.image_backbone_kwargs)
    if not problem and cfg.text_tower == "hf":
        problem = checks.text_config_problem(cfg.text_backbone_config)
    if not problem and cfg.image_tower == "timm":
        problem = image_source_problem(cfg)
    if problem:
        raise BundleError(f"{file}: {problem}. Fix config.json or re-save the model with model.save_pretrained")
    try:
        total, largest, largest_size = count_on_meta(cls, cfg)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise BundleError(f"{file} describes a model that cannot be built: {e}") from None
    if total > checks.MAX_PARAMETERS:
        raise BundleError(
            f"{file} describes a model of {total:,} parameters, above the bound of {checks.MAX_PARAMETERS:,} "
            f"(largest tensor: {largest}, {largest_size:,} values); a size in config.json is wrong. Fix it or "
            "re-save the model with model.save_pretrained"
        )


def with_overrides(cfg: ModelConfig, overrides: Optional[dict]) -> ModelConfig:
    """`cfg` with the inference-only fields a caller set when loading (`thresholds`, `threshold`, ...)."""
    if not overrides:
        return cfg
    bad = sorted(set(overrides) - LOAD_OVERRIDABLE)
    if bad:
        raise TypeError(f"from_pretrained cannot change {bad}; only {sorted(LOAD_OVERRIDABLE)} can be set when loading")
    try:
        return model_config_from_dict({**dataclasses.asdict(cfg), **overrides})
    except ConfigError as e:
        raise TypeError(f"from_pretrained: {e}") from None


def load_bundle(cls, path_or_repo_id, *, force_download=False, token=None, cache_dir=None, local_files_only=False,
                revision=None, map_location="cpu", overrides: Optional[dict] = None):
    """A `cls` model from a bundle folder or Hub id: every check first, then built and loaded strictly, eval mode."""
    folder = resolve_bundle(path_or_repo_id, revision=revision, cache_dir=cache_dir, force_download=force_download,
                            token=token, local_files_only=local_files_only)
    cfg, meta = read_config_and_meta(folder)
    cfg = with_overrides(cfg, overrides)
    check_bundle_files(folder, cfg, meta)
    check_buildable(cls, cfg, folder / CONFIG_NAME)
    tokenizer = load_tokenizer_from_bundle(folder, cfg)
    try:
        model = cls(cfg, tokenizer=tokenizer)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise BundleError(f"{folder / CONFIG_NAME} describes a model that cannot be built: {e}") from None
    load_weights_strict(model, read_state_dict(folder), str(folder / WEIGHTS_NAME))
    model.to(map_location)
    model.eval()
    return model


__all__ = [
    "BUNDLE_PATTERNS", "CARD_NAME", "CONFIG_NAME", "LOAD_OVERRIDABLE", "TOKENIZER_FILES", "WEIGHTS_NAME",
    "check_buildable", "check_bundle_files", "config_dict", "count_on_meta", "image_source_problem", "load_bundle", "load_tokenizer_from_bundle",
    "load_weights_strict", "non_finite_tensors", "read_config", "read_config_and_meta", "read_state_dict", "resolve_bundle",
    "save_bundle_files", "with_overrides",
]
