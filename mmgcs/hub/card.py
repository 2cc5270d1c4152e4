"""The model card: Hub metadata (library, tags, base models, pipeline tag, model-index) and the text rendered from
the `model_card.md` template, with the one metrics-table builder used by the card, the run report and
`mmgcs.evaluate`."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import jinja2
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.repocard_data import eval_results_to_model_index

from mmgcs.config import ModelConfig
from mmgcs.hub.bundle import CARD_NAME, CONFIG_NAME, read_config
from mmgcs.resources import resource_path

logger = logging.getLogger(__name__)

# The repository's model_card.md, shipped in the package (mmgcs/resources/).
TEMPLATE = resource_path("model_card.md")
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
NOT_EVALUATED = "Not evaluated yet: train with `accelerate launch training/train_fusion.py` to fill this section."


def pipeline_tag(cfg: ModelConfig) -> str:
    """The Hub task of a model: poster-only models are image classifiers, anything reading plots a text one.
    No multimodal tag exists, so a fused model is tagged text-classification (see the comment in model_card.md)."""
    return "image-classification" if cfg.text_tower == "none" else "text-classification"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ------------------------------------------------------------------------------------------ metrics tables
@dataclass(frozen=True)
class TableStyle:
    """How a metrics table reads: which headline metrics and per-genre columns, in what format."""

    headline: tuple  # (compute_metrics key, display name)
    columns: tuple  # (per-genre key, column header)
    headline_digits: int
    missing: str  # what an absent per-genre value shows
    skip_absent_headline: bool  # leave out a headline metric that is not a number (else show `missing`)
    by_support: bool  # per-genre rows by support, largest first (else in the metrics' order)


# The bundle card: every metric the Hub's model-index carries, 4 digits.
CARD_TABLE = TableStyle(
    headline=tuple((key, name) for key, (_, name, _) in METRIC_NAMES.items()),
    columns=(("precision", "precision"), ("recall", "recall"), ("f1", "F1"), ("support", "support"),
             ("threshold", "threshold")),
    headline_digits=4, missing="", skip_absent_headline=True, by_support=False,
)
# The run report's metrics.md and `mmgcs.evaluate`'s printout.
REPORT_TABLE = TableStyle(
    headline=(("micro_f1", "Micro F1"), ("macro_f1", "Macro F1"), ("weighted_f1", "Weighted F1"),
              ("samples_f1", "Samples F1"), ("mAP", "Mean average precision"), ("n_samples", "Samples")),
    columns=tuple((c, c) for c in ("precision", "recall", "f1", "ap", "support", "predicted", "threshold")),
    headline_digits=3, missing="–", skip_absent_headline=False, by_support=True,
)


def _cell(v: Any, digits: int, missing: str) -> str:
    if v is None:
        return missing
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def metrics_table(metrics: Mapping, style: TableStyle = REPORT_TABLE, markdown: bool = True) -> str:
    """The headline numbers and a per-genre table (markdown, or aligned plain text for a terminal)."""
    if style.skip_absent_headline:
        head = [(name, f"{float(metrics[key]):.{style.headline_digits}f}") for key, name in style.headline
                if isinstance(metrics.get(key), (int, float))]
    else:
        head = [(name, _cell(metrics.get(key), style.headline_digits, "–")) for key, name in style.headline]
    per = metrics.get("per_genre") or {}
    items = sorted(per.items(), key=lambda kv: -kv[1]["support"]) if style.by_support else list(per.items())
    cols = ["genre"] + [header for _, header in style.columns]
    rows = [[name] + [_cell(m.get(key), 3, style.missing) for key, _ in style.columns] for name, m in items]
    if not markdown:
        width = max([len(c) for c in cols] + [len(r[0]) for r in rows])
        lines = [f"{k:<24} {v}" for k, v in head] + [""]
        lines.append(f"{cols[0]:<{width}} " + " ".join(f"{c:>9}" for c in cols[1:]))
        return "\n".join(lines + [f"{r[0]:<{width}} " + " ".join(f"{v:>9}" for v in r[1:]) for r in rows])
    lines = ["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in head]
    if rows:
        lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ model-index
def eval_results(test_metrics: Mapping, *, dataset_name: str, dataset_type: str, dataset_split: str = "test",
                 task_type: str = "text-classification",
                 task_name: str = "Multi-label movie genre classification") -> list:
    """`huggingface_hub.EvalResult` entries for a model card's `model-index` (names and types: METRIC_NAMES).

    The Hub needs task.type, dataset.type/name and each metric's type and value; metrics that are None (e.g. mAP
    when no genre has positives) are left out rather than written as null.
    """
    return [
        EvalResult(task_type=task_type, task_name=task_name, dataset_type=dataset_type, dataset_name=dataset_name,
                   dataset_split=dataset_split, metric_type=metric_type, metric_name=metric_name,
                   metric_config=metric_config, metric_value=round(float(test_metrics[key]), 4))
        for key, (metric_type, metric_name, metric_config) in METRIC_NAMES.items() if _is_number(test_metrics.get(key))
    ]


def model_index(test_metrics: Mapping, *, model_name: str, **kwargs) -> list[dict]:
    """The `model-index` YAML block (as plain data) for `test_metrics`; kwargs as in :func:`eval_results`."""
    return eval_results_to_model_index(model_name, eval_results(test_metrics, **kwargs))


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
                  model_name: str = "mmgcs-genre-classifier") -> ModelCardData:
    task = pipeline_tag(cfg)
    results = None
    if metrics:
        results = eval_results(
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
        model_name=model_name if results else None,
        eval_results=results,
        language=["en"] if cfg.text_tower != "none" else None,
    )


# ------------------------------------------------------------------------------------------ the card
def _template() -> Optional[str]:
    return TEMPLATE.read_text(encoding="utf-8") if TEMPLATE.is_file() else None


def _card_values(cfg: ModelConfig, metrics: Optional[dict], dataset_id: Optional[str], repo_id: Optional[str]) -> dict:
    weights = cfg.backbone_weights or {}
    text = f"{cfg.text_tower} ({cfg.text_backbone}, {cfg.text_pooling} pooling, max {cfg.max_text_length} tokens)"
    image = f"{cfg.image_tower} ({cfg.image_backbone}, {cfg.image_size} px, {cfg.interpolation}, {cfg.image_crop_mode})"
    return dict(
        modalities=" + ".join(m for m, t in (("plot", cfg.text_tower), ("poster", cfg.image_tower)) if t != "none"),
        labels=", ".join(cfg.labels),
        num_labels=len(cfg.labels),
        task=cfg.task,
        text_tower="none" if cfg.text_tower == "none" else text,
        image_tower="none" if cfg.image_tower == "none" else image,
        text_weights=weights.get("text", "-"),
        image_weights=weights.get("image", "-"),
        fusion=cfg.fusion,
        lexical=(f"TF-IDF logistic regression over hashed word 1-{cfg.lexical_ngrams}-grams of the plot, added to the "
                 f"fused logits with weight {cfg.lexical_weight:g} (tuned on the validation split)") if cfg.lexical else "none",
        thresholds="tuned per genre on the validation split" if cfg.thresholds else f"{cfg.threshold} for every genre",
        dataset=dataset_id or "a local movie dataset built with `python -m mmgcs.data build`",
        metrics_table=metrics_table(metrics, CARD_TABLE) if metrics else NOT_EVALUATED,
        repo_id=repo_id or "<this repo id or a local folder>",
    )


def render_model_card(model_config: ModelConfig, metrics: Optional[dict] = None, dataset_id: Optional[str] = None,
                      repo_id: Optional[str] = None) -> str:
    """The bundle's README.md: Hub metadata (library, tags, base models, model-index from `metrics`) + text."""
    data = card_metadata(model_config, metrics, dataset_id)
    template = _template()
    if template is None:
        logger.warning("model_card.md template not found; writing a metadata-only model card")
        template = "---\n{{ card_data }}\n---\n\n# Movie genre classifier ({{ modalities }})\n\n{{ metrics_table }}\n"
    # Rendered with jinja2 directly (as huggingface_hub does) so the template's YAML comments survive.
    text = jinja2.Template(template, keep_trailing_newline=True).render(
        card_data=data.to_yaml(), **_card_values(model_config, metrics, dataset_id, repo_id))
    try:
        ModelCard(text)  # the Hub's own parser must accept the metadata
    except Exception as e:  # pragma: no cover - a broken template is a bug
        raise ValueError(f"The rendered model card has invalid metadata: {e}") from None
    return text


class RenderedModelCard(ModelCard):
    """A card saved exactly as rendered: `ModelCard.save` re-serializes the YAML and drops the template's comments."""

    def save(self, filepath: Union[str, Path]) -> None:
        Path(filepath).write_text(self._content, encoding="utf-8")


def model_card(cfg: ModelConfig, metrics: Optional[dict] = None, dataset_id: Optional[str] = None,
               repo_id: Optional[str] = None, **_unused) -> RenderedModelCard:
    """The card `save_pretrained` writes (its `model_card_kwargs` are these keywords; others are ignored)."""
    return RenderedModelCard(render_model_card(cfg, metrics, dataset_id, repo_id))


def fill_model_card(card_path: Union[str, Path], test_metrics: Mapping, *, model_name: str, dataset_name: str,
                    dataset_type: str, dataset_split: str = "test", task_type: str = "text-classification") -> Path:
    """Put test metrics into a saved model card (`README.md`, or the bundle folder holding it).

    Sets the `model-index`; when the card sits in a bundle (`config.json` beside it) the card is first
    re-rendered by :func:`render_model_card`, so its metrics tables show the same numbers. For a bundle saved
    before the test split was scored (the engine saves the best epoch, then tests it).
    """
    card_path = Path(card_path)
    if card_path.is_dir():
        card_path = card_path / CARD_NAME
    if not card_path.is_file():
        raise FileNotFoundError(f"Model card {card_path} not found; save the model with model.save_pretrained first")
    card = ModelCard.load(card_path)
    if (card_path.parent / CONFIG_NAME).is_file():
        datasets = card.data.datasets
        dataset_id = datasets[0] if isinstance(datasets, list) and len(datasets) == 1 else datasets or None
        card = ModelCard(render_model_card(read_config(card_path.parent), dict(test_metrics), dataset_id))
    card.data.model_name = model_name
    card.data.eval_results = eval_results(test_metrics, dataset_name=dataset_name, dataset_type=dataset_type,
                                          dataset_split=dataset_split, task_type=task_type)
    card.save(card_path)
    return card_path


__all__ = [
    "CARD_TABLE", "METRIC_NAMES", "REPORT_TABLE", "RenderedModelCard", "TableStyle", "card_metadata", "eval_results",
    "fill_model_card", "metrics_table", "model_card", "model_index", "pipeline_tag", "render_model_card",
]
