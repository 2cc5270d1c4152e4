"""MMGCS genre metrics as a Hugging Face `evaluate` metric: the F1 family, the per-genre report and mAP of
multi-label genre predictions, computed by `mmgcs.metrics.compute_metrics` (scikit-learn) — the numbers the
engine writes to metrics.json and `python -m mmgcs.evaluate` reports.

    import evaluate, mmgcs.genre_metrics
    metric = evaluate.load(mmgcs.genre_metrics.PATH)      # offline: the module ships inside the package
    metric.compute(predictions=probs, references=labels, label_names=[...], thresholds=[...])
"""

import datasets
import evaluate

from mmgcs.metrics import compute_metrics

_DESCRIPTION = """Multi-label genre classification scores: micro/macro/weighted/samples F1, precision and recall,
mAP (mean average precision over the genres with positives), micro AP, subset accuracy, Hamming loss and a
per-genre report (precision, recall, F1, support, predictions, AP, threshold)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: per movie, one probability per genre (n_samples x n_genres), in [0, 1].
    references: per movie, a multi-hot row of its true genres (n_samples x n_genres), in {0, 1}.
    label_names: the genre names, one per column.
    thresholds: None (0.5), one float, or one decision threshold per genre (e.g. the bundle's tuned ones).
    argmax: score a single-label model by its top genre instead of thresholds.
Returns:
    the dict of `mmgcs.metrics.compute_metrics`: micro_f1, macro_f1, weighted_f1, samples_f1, micro_precision,
    micro_recall, macro_precision, macro_recall, mAP, micro_ap, subset_accuracy, hamming_loss, n_samples,
    genres_without_positives, per_genre (plus accuracy with argmax).
"""

_CITATION = """@misc{mmgcs, title={MMGCS: Multi-Modal Genre Classification System}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class GenreMetrics(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # float64, as the engine's probabilities are scored: float32 storage would move the last digits.
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float64")),
                    "references": datasets.Sequence(datasets.Value("int64")),
                }
            ),
            reference_urls=["https://scikit-learn.org/stable/modules/model_evaluation.html#multilabel-ranking-metrics"],
        )

    def _compute(self, predictions, references, label_names=None, thresholds=None, argmax=False) -> dict:
        if label_names is None:
            label_names = [f"genre_{j}" for j in range(len(predictions[0]) if len(predictions) else 0)]
        return compute_metrics(predictions, references, list(label_names), thresholds, argmax=argmax)
