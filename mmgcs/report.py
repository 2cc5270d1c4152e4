"""Human-facing outputs of a run or an evaluation: PNG plots, per-genre tables, the trackers a run logs to, and
what a finished run leaves in its folder (metrics.json, test predictions, the bundle with its card filled)."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
from accelerate import utils as accelerate_utils

from mmgcs.config import ConfigError, RunConfig, config_to_dict
from mmgcs.hub import card, is_hub_id
from mmgcs.runs.folder import flatten_dict, mark_complete
from mmgcs.runs.swap import replace_folder, write_json_atomic

logger = logging.getLogger(__name__)

def _figure(width: float, height: float):
    # A bare Figure renders with the Agg canvas: no display needed (servers, DDP workers), and unlike pyplot it
    # neither switches the caller's backend (a notebook keeps inline plots) nor keeps global state.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


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


def format_metrics_table(metrics: Mapping, markdown: bool = True) -> str:
    """The headline numbers and a per-genre table (precision, recall, F1, AP, support, threshold); built by the one
    metrics-table builder, `mmgcs.hub.card.metrics_table`."""
    return card.metrics_table(metrics, card.REPORT_TABLE, markdown)


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


# ------------------------------------------------------------------------------------------- a run's outputs
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml",
                    "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "trackio": "trackio"}


def resolve_trackers(spec: str) -> Optional[list[str]]:
    """`train.log_with` → accelerate's `log_with` (where a run logs its curves live). "auto" picks TensorBoard
    when it is installed."""
    spec = (spec or "").strip().lower()
    if spec in ("", "none", "no", "false"):
        return None
    if spec == "auto":
        return ["tensorboard"] if accelerate_utils.is_tensorboard_available() else None
    names = [s.strip() for s in spec.split(",") if s.strip()]
    for name in names:
        if name not in TRACKER_PACKAGES:
            raise ConfigError(f"train.log_with: unknown tracker {name!r}; choose from {sorted(TRACKER_PACKAGES)}, auto or none")
        package = TRACKER_PACKAGES[name]
        if name == "tensorboard":
            ok = accelerate_utils.is_tensorboard_available()
        else:
            ok = importlib.util.find_spec(package) is not None
        if not ok:
            raise ConfigError(f"train.log_with: {name} is not installed; `pip install {package}` or set train.log_with=none")
    return names


def tracker_config(cfg: RunConfig) -> dict:
    """A run's settings as trackers take them (TensorBoard's hparams accept scalars and strings only)."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v))
            for k, v in flatten_dict(config_to_dict(cfg)).items()}


def single_input_metrics(test_pred: Mapping, hidden: Mapping, score: Callable[[dict], dict]) -> dict:
    """What a fused model does when a movie has only one input: scored (``score``) on the test rows that have it,
    with the other one hidden. ``hidden``: modality → the test prediction made without it."""
    out = {}
    for modality in hidden:
        others = [m for m in hidden if m != modality]
        rows = test_pred.get(f"has_{modality}")
        if len(others) != 1 or rows is None or not rows.any():
            continue
        pred = hidden[others[0]]
        out[f"{modality}_only"] = score({"probs": pred["probs"][rows], "labels": pred["labels"][rows]})
    return out


def run_metrics(score: Callable[[dict], dict], val_pred: Mapping, test_pred: Mapping, hidden: Mapping, state,
                train_time: float, thresholds: Optional[Sequence[float]], data, cfg: RunConfig,
                calibration: Optional[Mapping] = None) -> dict:
    """metrics.json of a finished run: test and validation scores (``score``: a prediction → compute_metrics under
    the run's decision rule), the loop's ``state`` (best epoch...), the tuned thresholds, the rows of each split
    (``data``: the run's RunData), the calibration's summary, and for a fused model the scores of each input alone
    (``hidden``, see ``single_input_metrics``)."""
    metrics = {
        "test": score(test_pred),
        "validation": score(val_pred),
        "best_epoch": state.best_epoch,
        f"best_val_{cfg.train.metric_for_best}": state.best_metric,
        "epochs_run": len(state.history),
        "train_time_s": round(train_time, 1),
        "thresholds": dict(zip(data.labels, thresholds)) if thresholds is not None else None,
        "labels": data.labels,
        "rows": {role: len(s) for role, s in data.splits.items()},
        "dataset": cfg.data.path,
        **(calibration or {}),
    }
    if hidden:
        metrics["test_single_input"] = single_input_metrics(test_pred, hidden, score)
    return metrics


def run_dataset_name(path: str) -> str:
    """The dataset a run's model card names: its Hub id, or the local folder's name."""
    hub_id = path if not Path(path).expanduser().exists() and is_hub_id(path) else None
    return hub_id or Path(path).expanduser().resolve().name


def save_finished_run(out: Path, bundle: str, model, data_path: str, metrics: Mapping, history: Sequence[Mapping],
                      test_pred: Mapping, hidden: Mapping, ids: Optional[Sequence] = None) -> None:
    """Everything a finished run leaves in ``out``: the bundle (its card's model-index filled with the test
    metrics; swapped in recoverably), metrics.json, history.json, test_predictions.npz (probabilities, targets,
    input presence, the views without each input, row ids), the plots and metrics.md; COMPLETE last."""
    dataset = run_dataset_name(data_path)

    def write_bundle(folder: Path) -> None:
        model.save_pretrained(folder)
        card.fill_model_card(folder, metrics["test"], model_name=f"mmgcs-{out.resolve().name}", dataset_name=dataset,
                             dataset_type=dataset, task_type=card.pipeline_tag(model.config))

    replace_folder(out / bundle, write_bundle)  # recoverable from a kill at any step (see mmgcs.runs.swap)
    write_json_atomic(out / "metrics.json", metrics)
    write_json_atomic(out / "history.json", history)
    arrays = {"probs": test_pred["probs"], "labels": test_pred["labels"]}
    arrays.update({k: v for k, v in test_pred.items() if k.startswith("has_")})
    for modality, pred in hidden.items():
        arrays[f"probs_without_{modality}"] = pred["probs"]
    if ids is not None:
        arrays["ids"] = np.asarray(ids)
    np.savez_compressed(out / "test_predictions.npz", **arrays)
    try:
        write_run_report(out, history, metrics["test"], metrics["labels"])
    except Exception as e:  # plots are a convenience; never lose a finished run over them
        logger.warning("Could not write the run report plots: %s", e)
    test = metrics["test"]
    logger.info("Test: micro-F1 %.4f macro-F1 %.4f mAP %.4f (best epoch %d); saved in %s", test["micro_f1"],
                test["macro_f1"], test["mAP"] or float("nan"), metrics["best_epoch"], out)
    mark_complete(out, {"best_epoch": metrics["best_epoch"], "metrics": "metrics.json", "model": bundle})


# The model card's model-index and the filling of a saved card live with the card (mmgcs.hub.card); these names
# stay here for the callers of the run report.
eval_results = card.eval_results
model_index = card.model_index
fill_model_card = card.fill_model_card


__all__ = [
    "TRACKER_PACKAGES",
    "eval_results",
    "fill_model_card",
    "flatten_dict",
    "format_metrics_table",
    "model_index",
    "plot_per_genre_f1",
    "plot_training_curves",
    "resolve_trackers",
    "run_dataset_name",
    "run_metrics",
    "save_finished_run",
    "single_input_metrics",
    "tracker_config",
    "write_run_report",
]
