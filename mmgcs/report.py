"""Human-facing outputs of a run or an evaluation: PNG plots, per-genre tables, the model card's test metrics."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

HEADLINE_METRICS = (  # compute_metrics key, display name
    ("micro_f1", "Micro F1"),
    ("macro_f1", "Macro F1"),
    ("weighted_f1", "Weighted F1"),
    ("samples_f1", "Samples F1"),
    ("mAP", "Mean average precision"),
)


def _figure(width: float, height: float):
    # A bare Figure renders with the Agg canvas: no display needed (servers, DDP workers), and unlike pyplot it
    # neither switches the caller's backend (a notebook keeps inline plots) nor keeps global state.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def flatten_dict(record: Mapping, sep: str = ".", prefix: str = "") -> dict:
    """Nested mappings as one level, keys joined by ``sep``: ``{"lr": {"head": 0.1}}`` → ``{"lr.head": 0.1}``."""
    out = {}
    for k, v in record.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_dict(v, sep, f"{key}{sep}"))
        else:
            out[key] = v
    return out


def _series(history: Sequence[Mapping]) -> dict[str, list[tuple[float, float]]]:
    """Every numeric field as (x, y) points, x being the ``epoch`` field (else 1..n); nested dicts flatten."""
    series = {}
    for i, record in enumerate(history):
        flat = {k: float(v) for k, v in flatten_dict(record, sep="_").items() if _is_number(v)}
        x = flat.pop("epoch", float(i + 1))
        for k, v in flat.items():
            series.setdefault(k, []).append((x, v))
    return series


def _is_lr(name: str) -> bool:
    n = name.lower()
    return n in ("lr", "learning_rate") or n.startswith(("lr_", "learning_rate_"))


def plot_training_curves(history: Sequence[Mapping], path: str | Path) -> Optional[Path]:
    """Losses, validation scores and (when recorded) learning rates per epoch, from the engine's history.

    ``history`` is a list of per-epoch dicts. Numeric fields whose name holds ``loss`` are losses; names holding
    ``f1``, ``map``, ``_ap`` or ``accuracy`` are scores; ``lr`` (or a dict of them per parameter group) are
    learning rates. Returns None (and writes nothing) when the history holds neither losses nor scores.
    """
    series = _series(history)
    losses = {k: v for k, v in series.items() if "loss" in k.lower()}
    scores = {
        k: v
        for k, v in series.items()
        if k not in losses and any(t in k.lower() for t in ("f1", "map", "_ap", "accuracy"))
    }
    lrs = {k: v for k, v in series.items() if _is_lr(k) and any(y > 0 for _, y in v)}
    if not losses and not scores:
        return None
    from matplotlib.ticker import MaxNLocator

    panels = [(losses, "Loss"), (scores, "Validation scores")] + ([(lrs, "Learning rate")] if lrs else [])
    fig = _figure(5.5 * len(panels), 4)
    axes = fig.subplots(1, len(panels))
    for ax, (group, title) in zip(axes, panels):
        for name, points in sorted(group.items()):
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=name)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if group:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
    if scores:
        axes[1].set_ylim(0, 1)
    if lrs:
        axes[2].set_yscale("log")  # warmup and decay span orders of magnitude
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def plot_per_genre_f1(metrics: Mapping, path: str | Path, title: str = "Per-genre F1 (test)") -> Path:
    """Horizontal bars of each genre's F1 (sorted), labelled with its support."""
    per_genre = metrics["per_genre"]
    rows = sorted(per_genre.items(), key=lambda kv: (kv[1]["f1"], kv[1]["support"]))
    fig = _figure(8, 0.32 * len(rows) + 1.4)
    ax = fig.subplots()
    names = [name for name, _ in rows]
    f1s = [m["f1"] for _, m in rows]
    bars = ax.barh(names, f1s, color="#4C72B0")
    for bar, (_, m) in zip(bars, rows):
        ax.text(bar.get_width() + 0.01, bar.get_y() + bar.get_height() / 2, f"{m['f1']:.2f} (n={m['support']})",
                va="center", fontsize=7)
    micro = metrics.get("micro_f1")
    if _is_number(micro):
        ax.axvline(micro, color="#C44E52", linestyle="--", linewidth=1, label=f"micro F1 {micro:.3f}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlim(0, 1.15)
    ax.set_xlabel("F1")
    ax.set_title(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def format_metrics_table(metrics: Mapping, markdown: bool = True) -> str:
    """The headline numbers and a per-genre table (precision, recall, F1, AP, support, threshold)."""
    head = [(label, metrics.get(key)) for key, label in HEADLINE_METRICS]
    head.append(("Samples", metrics.get("n_samples")))
    cols = ["genre", "precision", "recall", "f1", "ap", "support", "predicted", "threshold"]
    rows = [
        [name] + [_fmt(m.get(c)) for c in cols[1:]]
        for name, m in sorted(metrics["per_genre"].items(), key=lambda kv: -kv[1]["support"])
    ]
    if markdown:
        lines = ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in head]
        lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    width = max([len(c) for c in cols] + [len(r[0]) for r in rows])
    lines = [f"{k:<24} {_fmt(v)}" for k, v in head] + [""]
    lines.append(f"{cols[0]:<{width}} " + " ".join(f"{c:>9}" for c in cols[1:]))
    lines += [f"{r[0]:<{width}} " + " ".join(f"{v:>9}" for v in r[1:]) for r in rows]
    return "\n".join(lines)


def write_run_report(
    output_dir: str | Path,
    history: Sequence[Mapping],
    test_metrics: Mapping,
    label_names: Sequence[str],
) -> dict[str, Path]:
    """Write ``training_curves.png``, ``per_genre_f1.png`` and ``metrics.md`` into ``output_dir``.

    ``history`` is the engine's list of per-epoch dicts (e.g. ``{"epoch": 1, "train_loss": .., "val_loss": ..,
    "val_micro_f1": .., "val_macro_f1": ..}``); ``test_metrics`` is a :func:`mmgcs.metrics.compute_metrics`
    result. Returns the written paths by name.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    missing = [n for n in label_names if n not in test_metrics.get("per_genre", {})]
    if missing:
        raise ValueError(f"test_metrics has no per-genre entry for {missing}; pass the metrics of this model's labels")
    written = {}
    curves = plot_training_curves(history, out / "training_curves.png")
    if curves is not None:
        written["training_curves"] = curves
    written["per_genre_f1"] = plot_per_genre_f1(test_metrics, out / "per_genre_f1.png")
    md = out / "metrics.md"
    md.write_text("# Test metrics\n\n" + format_metrics_table(test_metrics) + "\n", encoding="utf-8")
    written["metrics_table"] = md
    return written


def eval_results(
    test_metrics: Mapping,
    *,
    dataset_name: str,
    dataset_type: str,
    dataset_split: str = "test",
    task_type: str = "text-classification",
    task_name: str = "Multi-label movie genre classification",
) -> list:
    """``huggingface_hub.EvalResult`` entries for a model card's ``model-index``.

    Metric names and types come from ``mmgcs.hub.METRIC_NAMES``, and the bundle card renderer
    (``mmgcs.hub.card_metadata``) builds its model-index with this function too, so a card rendered at save time
    and one filled later agree. The Hub needs task.type, dataset.type/name and each metric's type and value;
    metrics that are None (e.g. mAP when no genre has positives) are left out rather than written as null.
    """
    from huggingface_hub import EvalResult

    from mmgcs.hub import METRIC_NAMES

    results = []
    for key, (metric_type, metric_name, metric_config) in METRIC_NAMES.items():
        value = test_metrics.get(key)
        if not _is_number(value):
            continue
        results.append(
            EvalResult(
                task_type=task_type,
                task_name=task_name,
                dataset_type=dataset_type,
                dataset_name=dataset_name,
                dataset_split=dataset_split,
                metric_type=metric_type,
                metric_name=metric_name,
                metric_config=metric_config,
                metric_value=round(float(value), 4),
            )
        )
    return results


def model_index(test_metrics: Mapping, *, model_name: str, **kwargs) -> list[dict]:
    """The ``model-index`` YAML block (as plain data) for ``test_metrics``; kwargs as in :func:`eval_results`."""
    from huggingface_hub.repocard_data import eval_results_to_model_index

    return eval_results_to_model_index(model_name, eval_results(test_metrics, **kwargs))


def fill_model_card(
    card_path: str | Path,
    test_metrics: Mapping,
    *,
    model_name: str,
    dataset_name: str,
    dataset_type: str,
    dataset_split: str = "test",
    task_type: str = "text-classification",
) -> Path:
    """Put test metrics into a saved model card (``README.md``, or the bundle folder holding it).

    Sets the ``model-index``; when the card sits in a bundle (``config.json`` beside it) the card is first
    re-rendered by :func:`mmgcs.hub.render_model_card`, so its metrics tables show the same numbers. For a bundle
    saved before the test split was scored (the engine saves the best epoch, then tests it).
    """
    from huggingface_hub import ModelCard

    card_path = Path(card_path)
    if card_path.is_dir():
        card_path = card_path / "README.md"
    if not card_path.is_file():
        raise FileNotFoundError(f"Model card {card_path} not found; save the model with model.save_pretrained first")
    card = ModelCard.load(card_path)
    if (card_path.parent / "config.json").is_file():
        from mmgcs.hub import read_config, render_model_card

        datasets = card.data.datasets
        dataset_id = datasets[0] if isinstance(datasets, list) and len(datasets) == 1 else datasets or None
        card = ModelCard(render_model_card(read_config(card_path.parent), dict(test_metrics), dataset_id))
    card.data.model_name = model_name
    card.data.eval_results = eval_results(
        test_metrics,
        dataset_name=dataset_name,
        dataset_type=dataset_type,
        dataset_split=dataset_split,
        task_type=task_type,
    )
    card.save(card_path)
    return card_path


__all__ = [
    "eval_results",
    "flatten_dict",
    "fill_model_card",
    "format_metrics_table",
    "model_index",
    "plot_per_genre_f1",
    "plot_training_curves",
    "write_run_report",
]
