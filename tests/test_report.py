"""mmgcs/report.py: the run report's files (training curves, per-genre F1 plot, metrics table), the console table,
the Hub's model-index and the filled model card, on the hand-computed predictions of tests/test_metrics.py."""

import pytest

from mmgcs import testing
from mmgcs.metrics import compute_metrics
from mmgcs.report import fill_model_card, format_metrics_table, model_index, write_run_report
from test_metrics import LABELS, NAMES, PROBS


# The engine's record shape: per-group learning rates nest in a dict; non-numeric fields are ignored.
HISTORY = [
    {"epoch": 1, "step": 10, "train_loss": 0.9, "val_loss": 0.8, "val_micro_f1": 0.30, "val_macro_f1": 0.20,
     "val_mAP": 0.4, "lr": {"head": 1e-3, "towers": 2e-5}, "inputs": "features", "time_s": 3.2},
    {"epoch": 2, "step": 20, "train_loss": 0.6, "val_loss": 0.7, "val_micro_f1": 0.45, "val_macro_f1": 0.31,
     "val_mAP": 0.5, "lr": {"head": 5e-4, "towers": 1e-5}, "inputs": "features", "time_s": 3.1},
]


def _png_ok(path):
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_write_run_report_writes_plots_and_table(tmp_path):
    m = compute_metrics(PROBS, LABELS, NAMES)
    written = write_run_report(tmp_path / "run", HISTORY, m, NAMES)
    assert set(written) == {"training_curves", "per_genre_f1", "metrics_table"}
    assert _png_ok(written["training_curves"]) and _png_ok(written["per_genre_f1"])
    table = written["metrics_table"].read_text()
    assert "| C | 1.000 | 0.333 | 0.500 | 1.000 | 3 | 1 | 0.500 |" in table
    assert "| Micro F1 | 0.667 |" in table


def test_training_curves_pick_losses_scores_and_learning_rates(tmp_path, monkeypatch):
    import matplotlib.axes

    plotted = []
    original = matplotlib.axes.Axes.plot

    def spy(ax, x, y, *args, label=None, **kwargs):
        plotted.append((label, list(x), list(y)))
        return original(ax, x, y, *args, label=label, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    from mmgcs.report import plot_training_curves

    assert _png_ok(plot_training_curves(HISTORY, tmp_path / "curves.png"))
    labels = {p[0] for p in plotted}
    assert labels == {"train_loss", "val_loss", "val_micro_f1", "val_macro_f1", "val_mAP", "lr_head", "lr_towers"}
    assert ("train_loss", [1, 2], [0.9, 0.6]) in plotted


def test_report_handles_history_without_curves_and_mismatched_labels(tmp_path):
    m = compute_metrics(PROBS, LABELS, NAMES)
    written = write_run_report(tmp_path, [{"epoch": 1, "note": "no numbers"}], m, NAMES)
    assert "training_curves" not in written and _png_ok(written["per_genre_f1"])
    with pytest.raises(ValueError, match="Z"):
        write_run_report(tmp_path, HISTORY, m, NAMES + ["Z"])


def test_console_table_lists_every_genre():
    text = format_metrics_table(compute_metrics(PROBS, LABELS, NAMES), markdown=False)
    lines = text.splitlines()
    assert any(line.startswith("Micro F1") and line.endswith("0.667") for line in lines)
    assert sum(line.split()[0] in NAMES for line in lines if line.strip()) == 3


def test_model_index_has_the_fields_the_hub_requires():
    m = compute_metrics(PROBS, LABELS, NAMES)
    index = model_index(m, model_name="mmgcs-fusion", dataset_name="movies", dataset_type="movies")
    result = index[0]["results"][0]
    assert index[0]["name"] == "mmgcs-fusion" and result["task"]["type"] == "text-classification"
    assert result["dataset"] == {"name": "movies", "type": "movies", "split": "test"}
    by_name = {x["name"]: x for x in result["metrics"]}
    assert by_name["Micro F1"]["type"] == "f1" and by_name["Micro F1"]["value"] == round(2 / 3, 4)
    assert by_name["Macro F1"]["value"] == round(59 / 90, 4)
    assert round(17 / 18, 4) in {x["value"] for x in result["metrics"]}  # mAP
    # A metric that is None is left out, never written as null.
    m["mAP"] = None
    values = [x["value"] for x in model_index(m, model_name="x", dataset_name="d", dataset_type="d")[0]["results"][0]["metrics"]]
    assert None not in values and round(17 / 18, 4) not in values


def test_fill_model_card_of_a_saved_bundle(tmp_path):
    from huggingface_hub import ModelCard

    testing.tiny_model(NAMES).save_pretrained(tmp_path)
    m = compute_metrics(PROBS, LABELS, NAMES)
    card_path = fill_model_card(tmp_path, m, model_name="mmgcs-test", dataset_name="movies", dataset_type="movies")
    card = ModelCard.load(card_path)
    assert card.data.library_name == "mmgcs" and card.data.model_name == "mmgcs-test"
    assert {(r.metric_name, r.metric_value) for r in card.data.eval_results} >= {("Micro F1", round(2 / 3, 4))}
    assert all(r.dataset_split == "test" and r.dataset_name == "movies" for r in card.data.eval_results)
    assert "0.6667" in card.text  # the body's metrics table was re-rendered with the same numbers


def test_fill_model_card_of_a_plain_card(tmp_path):
    card = tmp_path / "README.md"
    card.write_text("---\nlicense: apache-2.0\nlibrary_name: mmgcs\n---\n# Card body\n", encoding="utf-8")
    fill_model_card(card, compute_metrics(PROBS, LABELS, NAMES), model_name="x", dataset_name="d", dataset_type="d")
    text = card.read_text()
    assert "model-index:" in text and "# Card body" in text and "license: apache-2.0" in text
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        fill_model_card(tmp_path / "nope", {}, model_name="x", dataset_name="d", dataset_type="d")


def test_flatten_dict_joins_nested_keys_for_trackers_and_plots():
    from mmgcs.report import flatten_dict

    record = {"epoch": 2, "lr": {"head": 0.1, "backbone": {"last": 0.01}}, "inputs": "raw"}
    assert flatten_dict(record) == {"epoch": 2, "lr.head": 0.1, "lr.backbone.last": 0.01, "inputs": "raw"}
    assert set(flatten_dict(record, sep="_")) == {"epoch", "lr_head", "lr_backbone_last", "inputs"}
