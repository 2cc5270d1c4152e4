"""The model bundle on disk and on the Hub: save, strict load, model card, push.

A bundle folder (= a Hub model repo) holds `model.safetensors`, `config.json` (the ModelConfig: labels,
thresholds, task, towers with their resolved backbone configs, preprocessing), the tokenizer files and a
`README.md` model card rendered from the `model_card.md` template. No pickle; no remote code.
"""

from __future__ import annotations  # torch only in annotations: `import mmgcs.hub` stays light (data CLI)

import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from mmgcs.config import ConfigError, ModelConfig, model_config_from_dict

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

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

TEMPLATE_PATHS = (
    Path(__file__).resolve().parent / "model_card.md",  # when shipped as package data
    Path(__file__).resolve().parents[1] / "model_card.md",  # the repository's template
)


class BundleError(ValueError):
    """A saved model folder is incomplete, tampered with, or does not fit this version of MMGCS."""


class HubUnavailableError(RuntimeError):
    """The Hugging Face Hub cannot be reached; the message says where the local copy is."""


class PushError(RuntimeError):
    """An upload to the Hub (a model bundle or a dataset) failed after everything was saved locally; the message
    says where the local copy is and how to upload it later."""


def is_hub_id(name: Union[str, Path]) -> bool:
    """Whether `name` is written like a Hub repo id, `owner/name` (huggingface_hub's own rules).

    Callers look for a local folder first; a bare name (no owner) is not taken as an id, because MMGCS models and
    datasets live in user repos and a bare word is far more often a mistyped local folder.
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(name, str) or name.count("/") != 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------- save
def config_dict(cfg: ModelConfig, tokenizer_files: Optional[list] = None) -> dict:
    from mmgcs import __version__

    meta = {"format": FORMAT_VERSION, "mmgcs_version": __version__}
    if tokenizer_files:
        meta["tokenizer_files"] = sorted(tokenizer_files)  # loading requires each (a lone tokenizer_config.json
        # would otherwise load as a 5-token vocabulary)
    return {FORMAT_KEY: meta, **dataclasses.asdict(cfg)}


def save_bundle_files(model, folder: Path) -> None:
    """Everything but the README (the hub mixin renders that right after, via generate_model_card)."""
    from safetensors.torch import save_model

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
    from mmgcs.models.embedded import hub_reachable

    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_repo_id)
    if path.exists() or not is_hub_id(name):
        raise BundleError(f"{name!r} is not a model folder. Pass a folder saved by save_pretrained or a Hub repo id (owner/name)")
    from huggingface_hub import snapshot_download

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
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = folder / WEIGHTS_NAME
    if not file.is_file():
        raise BundleError(f"{folder} has no {WEIGHTS_NAME}; re-save the model (only safetensors weights are loaded, never pickle)")
    try:
        state = load_file(str(file), device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise BundleError(f"{file} is corrupt or truncated ({type(e).__name__}: {e}); re-save or re-download the bundle") from None
    from mmgcs.bundle_checks import non_finite_tensors

    bad = non_finite_tensors(state)
    if bad:
        shown = ", ".join(bad[:5]) + (f", ... ({len(bad)} in all)" if len(bad) > 5 else "")
        raise BundleError(f"{file} holds NaN or infinite values in {shown}: the weights are damaged or come from a "
                          "diverged training run. Re-download the bundle or re-train the model")
    return state


def load_weights_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Every tensor must be present, expected and of the right shape; otherwise a BundleError lists them."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)
    )
    problems = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched)):
        if keys:
            shown = ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")
            problems.append(f"{what} tensors: {shown}")
    if problems:
        raise BundleError(
            f"{source} does not match the model described by its config.json ({'; '.join(problems)}). "
            "The weights and config.json must come from the same save_pretrained call"
        )
    model.load_state_dict(state, strict=True)


def load_tokenizer_from_bundle(folder: Path, cfg: ModelConfig):
    if cfg.text_tower == "none":
        return None
    from mmgcs.bundle_checks import tokenizer_problem
    from mmgcs.models.text import load_tokenizer

    try:
        tokenizer = load_tokenizer(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise BundleError(f"The tokenizer in {folder} cannot be loaded ({type(e).__name__}: {e}); re-save the model") from None
    problem = tokenizer_problem(tokenizer, cfg)
    if problem:
        raise BundleError(f"The tokenizer in {folder} does not fit the model: {problem}. Re-download the bundle "
                          "or re-save it with model.save_pretrained")
    return tokenizer


def check_bundle_files(folder: Path, cfg: ModelConfig, meta: dict) -> None:
    """Every file the config needs is there: the weights and, with a text tower, its tokenizer files."""
    from mmgcs.bundle_checks import missing_tokenizer_files

    missing = [] if (folder / WEIGHTS_NAME).is_file() else [WEIGHTS_NAME]
    if cfg.text_tower != "none":
        missing += missing_tokenizer_files(folder, meta.get("tokenizer_files"))
    if missing:
        why = " (only safetensors weights are loaded, never pickle)" if WEIGHTS_NAME in missing else ""
        raise BundleError(
            f"{folder} has no {', '.join(missing)}, which its config.json needs: the bundle is incomplete. Re-download "
            f"it (or copy the whole folder), or re-save the model with model.save_pretrained{why}"
        )


def check_buildable(cls, cfg: ModelConfig, file: Path) -> None:
    """Bounds, allowlists and the exact parameter count, all before any tensor is allocated."""
    from mmgcs import bundle_checks as checks

    problem = checks.size_problem(cfg) or checks.image_kwargs_problem(cfg.image_backbone_kwargs)
    if not problem and cfg.text_tower == "hf":
        problem = checks.text_config_problem(cfg.text_backbone_config)
    if not problem and cfg.image_tower == "timm":
        problem = checks.image_source_problem(cfg)
    if problem:
        raise BundleError(f"{file}: {problem}. Fix config.json or re-save the model with model.save_pretrained")
    try:
        total, largest, largest_size = checks.count_on_meta(cls, cfg)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise BundleError(f"{file} describes a model that cannot be built: {e}") from None
    if total > checks.MAX_PARAMETERS:
        raise BundleError(
            f"{file} describes a model of {total:,} parameters, above the bound of {checks.MAX_PARAMETERS:,} "
            f"(largest tensor: {largest}, {largest_size:,} values); a size in config.json is wrong. Fix it or "
            "re-save the model with model.save_pretrained"
        )


def load_bundle(cls, path_or_repo_id, *, force_download=False, token=None, cache_dir=None, local_files_only=False,
                revision=None, map_location="cpu", overrides: Optional[dict] = None):
    folder = resolve_bundle(path_or_repo_id, revision=revision, cache_dir=cache_dir, force_download=force_download,
                            token=token, local_files_only=local_files_only)
    cfg, meta = read_config_and_meta(folder)
    if overrides:
        bad = sorted(set(overrides) - LOAD_OVERRIDABLE)
        if bad:
            raise TypeError(f"from_pretrained cannot change {bad}; only {sorted(LOAD_OVERRIDABLE)} can be set when loading")
        try:
            cfg = model_config_from_dict({**dataclasses.asdict(cfg), **overrides})
        except ConfigError as e:
            raise TypeError(f"from_pretrained: {e}") from None
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


# ---------------------------------------------------------------------------------------------------- push
def default_bundle_dir(repo_id: str) -> Path:
    return Path("mmgcs-bundles") / repo_id.replace("/", "--")


def push_bundle(folder: Union[str, Path], repo_id: str, *, token: Optional[str] = None, private: Optional[bool] = None,
                commit_message: str = "Upload MMGCS genre classifier", **upload_kwargs: Any) -> str:
    """Upload a saved bundle folder to a Hub model repo (created if needed); returns the commit URL.

    Raises `HubUnavailableError` (the bundle stays at `folder`) when the Hub cannot be reached.
    """
    from mmgcs.models.embedded import hub_reachable

    folder = Path(folder)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise BundleError(f"{folder} has no {name}: save the model with model.save_pretrained({str(folder)!r}) first")
    read_config(folder)  # never publish a bundle that would not load

    retry = (f"The bundle is saved at {folder.resolve()}; upload it when online with "
             f"`hf upload {repo_id} {folder} --repo-type model` (or huggingface-cli upload), "
             f"or call mmgcs.hub.push_bundle({str(folder)!r}, {repo_id!r}) again")
    if not hub_reachable():
        raise HubUnavailableError(f"Cannot push to {repo_id!r}: the Hugging Face Hub is unreachable (or HF_HUB_OFFLINE is set). {retry}")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        repo_id = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True).repo_id
        info = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder),
                                 commit_message=commit_message, allow_patterns=BUNDLE_PATTERNS, **upload_kwargs)
    except OSError as e:  # connection errors
        raise HubUnavailableError(f"Cannot push to {repo_id!r}: {type(e).__name__}: {e}. {retry}") from None
    return str(getattr(info, "commit_url", info))


# ---------------------------------------------------------------------------------------------- model card
METRIC_NAMES = {  # compute_metrics key → (Hub metric type, display name, config)
    "micro_f1": ("f1", "Micro F1", "micro"),
    "macro_f1": ("f1", "Macro F1", "macro"),
    "weighted_f1": ("f1", "Weighted F1", "weighted"),
    "samples_f1": ("f1", "Samples F1", "samples"),
    "mAP": ("mean_average_precision", "mAP (macro)", "macro"),
    "micro_precision": ("precision", "Micro precision", "micro"),
    "micro_recall": ("recall", "Micro recall", "micro"),
    "accuracy": ("accuracy", "Accuracy", None),
}


def _pipeline_tag(cfg: ModelConfig) -> str:
    if cfg.text_tower == "none":
        return "image-classification"
    # A fused model is tagged text-classification (see the comment in model_card.md).
    return "text-classification"


def _base_models(cfg: ModelConfig) -> list[str]:
    out = []
    weights = cfg.backbone_weights or {}
    if cfg.text_tower == "hf" and str(weights.get("text", "")).startswith("pretrained") and not Path(cfg.text_backbone).is_dir():
        if "/" in cfg.text_backbone and not cfg.text_backbone.startswith(("/", ".")):
            out.append(cfg.text_backbone)
    if cfg.image_tower == "timm" and str(weights.get("image", "")).startswith("pretrained: timm"):
        hub_id = (cfg.image_backbone_config or {}).get("hf_hub_id")
        if hub_id:
            out.append(hub_id)
    return out


def card_metadata(cfg: ModelConfig, metrics: Optional[dict] = None, dataset_id: Optional[str] = None,
                  model_name: str = "mmgcs-genre-classifier"):
    from huggingface_hub import ModelCardData

    from mmgcs.report import eval_results as model_index_entries

    task = _pipeline_tag(cfg)
    eval_results = None
    if metrics:
        eval_results = model_index_entries(
            metrics, dataset_name=dataset_id or "movies (local)", dataset_type=dataset_id or "custom", task_type=task,
            task_name="Multi-label movie genre classification" if cfg.task == "multilabel" else "Movie classification",
        ) or None
    tags = ["mmgcs", "movie-genre-classification", "pytorch_model_hub_mixin", "model_hub_mixin"]
    tags.append("multi-label-classification" if cfg.task == "multilabel" else "single-label-classification")
    if cfg.text_tower != "none" and cfg.image_tower != "none":
        tags += ["multimodal", "image-text-classification"]
    return ModelCardData(
        library_name="mmgcs",
        license="apache-2.0",
        pipeline_tag=task,
        tags=tags,
        datasets=[dataset_id] if dataset_id else None,
        base_model=_base_models(cfg) or None,
        model_name=model_name if eval_results else None,
        eval_results=eval_results,
        language=["en"] if cfg.text_tower != "none" else None,
    )


def _template() -> Optional[str]:
    for path in TEMPLATE_PATHS:
        if path.is_file():
            return path.read_text(encoding="utf-8")
    return None


def _metrics_table(cfg: ModelConfig, metrics: Optional[dict]) -> str:
    if not metrics:
        return "Not evaluated yet: train with `accelerate launch training/train_fusion.py` to fill this section."
    rows = ["| metric | value |", "|---|---|"]
    for key, (_, name, _) in METRIC_NAMES.items():
        if isinstance(metrics.get(key), (int, float)):
            rows.append(f"| {name} | {metrics[key]:.4f} |")
    per = metrics.get("per_genre") or {}
    if per:
        rows += ["", "| genre | precision | recall | F1 | support | threshold |", "|---|---|---|---|---|---|"]
        for genre, m in per.items():
            def f(k):
                v = m.get(k)
                return f"{v:.3f}" if isinstance(v, float) else ("" if v is None else str(v))
            rows.append(f"| {genre} | {f('precision')} | {f('recall')} | {f('f1')} | {f('support')} | {f('threshold')} |")
    return "\n".join(rows)


def render_model_card(model_config: ModelConfig, metrics: Optional[dict] = None, dataset_id: Optional[str] = None,
                      repo_id: Optional[str] = None) -> str:
    """The bundle's README.md: Hub metadata (library, tags, base models, model-index from `metrics`) + text."""
    import jinja2
    from huggingface_hub import ModelCard

    cfg = model_config
    data = card_metadata(cfg, metrics, dataset_id)
    modalities = " + ".join(m for m, t in (("plot", cfg.text_tower), ("poster", cfg.image_tower)) if t != "none")
    weights = cfg.backbone_weights or {}
    values = dict(
        modalities=modalities,
        labels=", ".join(cfg.labels),
        num_labels=len(cfg.labels),
        task=cfg.task,
        text_tower="none" if cfg.text_tower == "none" else f"{cfg.text_tower} ({cfg.text_backbone}, {cfg.text_pooling} pooling, max {cfg.max_text_length} tokens)",
        image_tower="none" if cfg.image_tower == "none" else f"{cfg.image_tower} ({cfg.image_backbone}, {cfg.image_size} px, {cfg.interpolation}, {cfg.image_crop_mode})",
        text_weights=weights.get("text", "-"),
        image_weights=weights.get("image", "-"),
        fusion=cfg.fusion,
        lexical=(f"TF-IDF logistic regression over hashed word 1-{cfg.lexical_ngrams}-grams of the plot, added to the "
                 f"fused logits with weight {cfg.lexical_weight:g} (tuned on the validation split)") if cfg.lexical else "none",
        thresholds="tuned per genre on the validation split" if cfg.thresholds else f"{cfg.threshold} for every genre",
        dataset=dataset_id or "a local movie dataset built with `python -m mmgcs.data build`",
        metrics_table=_metrics_table(cfg, metrics),
        repo_id=repo_id or "<this repo id or a local folder>",
    )
    template = _template()
    if template is None:
        logger.warning("model_card.md template not found; writing a metadata-only model card")
        template = "---\n{{ card_data }}\n---\n\n# Movie genre classifier ({{ modalities }})\n\n{{ metrics_table }}\n"
    # Rendered with jinja2 directly (as huggingface_hub does) so the template's YAML comments survive.
    text = jinja2.Template(template, keep_trailing_newline=True).render(card_data=data.to_yaml(), **values)
    try:
        ModelCard(text)  # the Hub's own parser must accept the metadata
    except Exception as e:  # pragma: no cover - a broken template is a bug
        raise ValueError(f"The rendered model card has invalid metadata: {e}") from None
    return text


__all__ = [
    "BundleError",
    "HubUnavailableError",
    "PushError",
    "is_hub_id",
    "load_bundle",
    "push_bundle",
    "read_config",
    "render_model_card",
    "save_bundle_files",
]

