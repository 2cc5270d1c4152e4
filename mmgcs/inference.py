"""The one predict path: raw movies (plot, poster, title) → genre scores and decisions.

    predictor = Predictor(model)                         # a GenreClassifier (any object with its interface)
    predictor.predict(plot="...", poster="poster.jpg")   # {"scores": {...}, "genres": [...]}

Validate → compose the text (the bundle's template) → preprocess (tokenize, poster transform, lexical features) →
each tower once, on the rows that have its input → the views (fused, plot-only, poster-only) → decisions at the
bundle's thresholds. The raw-input steps and the decisions are the bundle's `GenreProcessor` (mmgcs.processor); this
module runs the towers and the head between them. `GenreClassifier.predict`, `mmgcs.serving` (and so the Space) and
`mmgcs.evaluate` all come here. It sits below the classifier: it takes a model object and never imports the class.
"""

import contextlib
import functools
from typing import Any, Iterator, Optional, Union

import torch

from mmgcs.explain import explain_movie, genres_to_explain
from mmgcs.fast_path import FastPath
from mmgcs.processor import GenreProcessor

LEXICAL_INPUTS = ("lexical_ids", "lexical_values")
# What a batch carries for each modality (raw inputs or cached features). The lexical branch reads the plot's
# n-grams, so it goes with the text.
MODALITY_INPUTS = {
    "text": ("input_ids", "attention_mask", "token_type_ids", "text_features", *LEXICAL_INPUTS),
    "image": ("pixel_values", "image_features"),
}


def composed_plots(model, plots: list, titles: Optional[list]) -> list:
    """`GenreProcessor.compose` for `model`: kept for the benchmarks that read a model's texts this way."""
    return GenreProcessor.from_model(model).compose(plots, titles)


# ------------------------------------------------------------------------------------------------- views
def without_modality(batch: dict, modality: str) -> dict:
    """`batch` as the model sees a movie without `modality` (the one rule for a plot-only or poster-only
    prediction): that modality's inputs and features dropped and its mask all False. A new dict; `batch` is kept.

    Dropping the inputs (not only masking them) means the tower is not run at all; the fusion heads ignore a
    masked modality, so the scores equal those of a forward that still carries the inputs under a False mask."""
    if modality not in MODALITY_INPUTS:
        raise ValueError(f"Unknown modality {modality!r}; available: {sorted(MODALITY_INPUTS)}")
    key = f"{modality}_mask"
    mask = batch.get(key)
    if mask is None:
        rows = next(v for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
        mask = torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device)
    out = {k: v for k, v in batch.items() if k not in MODALITY_INPUTS[modality]}
    out[key] = torch.zeros_like(mask, dtype=torch.bool)
    return out


# ------------------------------------------------------------------------------------------------ towers
def _encode_present(encode, inputs: tuple, mask: torch.Tensor) -> torch.Tensor:
    """A tower's features for the rows whose `mask` is True; zeros for the others, whose input is a blank
    placeholder that the fusion head ignores anyway (so a plot-only call never runs the image tower)."""
    if bool(mask.all()):
        return encode(*inputs)
    rows = mask.nonzero().squeeze(1)
    present = encode(*(x.index_select(0, rows) for x in inputs))
    out = present.new_zeros((mask.shape[0],) + tuple(present.shape[1:]))
    return out.index_copy(0, rows, present)


def _encode_image(model, pixels: torch.Tensor) -> torch.Tensor:
    if pixels.device.type == "cpu":
        # channels-last input runs CPU convolutions ~10-25 % faster (same numbers to ~1e-6)
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    return model.encode_image(pixels)


def _encode(model, batch: dict, fast: Optional[FastPath] = None) -> dict[str, torch.Tensor]:
    """Each tower run once, on the rows that have its input: `text_features` / `image_features` for the head
    (the image tower through `fast`, a frozen model's fast encoder, when given)."""
    features = {}
    text_mask, image_mask = batch.get("text_mask"), batch.get("image_mask")
    if model.text_tower is not None and bool(text_mask.any()):
        inputs = (batch["input_ids"], batch["attention_mask"])
        encode_text = fast.encode_text if fast is not None else model.encode_text
        features["text_features"] = _encode_present(encode_text, inputs, text_mask)
    if model.image_tower is not None and bool(image_mask.any()):
        encode = fast.encode_image if fast is not None else functools.partial(_encode_image, model)
        features["image_features"] = _encode_present(encode, (batch["pixel_values"],), image_mask)
    return features


def _head_probs(model, batch: dict) -> torch.Tensor:
    """The fusion head alone over precomputed tower features (a forward pass that skips the towers)."""
    return model.probabilities(model(**batch)["logits"]).float().cpu()


# ---------------------------------------------------------------------------------------------- Predictor
class Predictor:
    """The one predict path over a loaded model (`GenreClassifier.from_pretrained(...)`, or one being trained).

    Predictions always run in eval mode and give the model back in the mode it was in; `device` (optional) moves
    the model once, here. `fast=True` runs the image tower through its fast encoder (mmgcs.fast_path: the same
    scores within 1e-4, eager where none applies): only for a model whose weights no longer change (serving).
    `release_eager_text=True` (with `fast`) lets the text tower's eager weights go once its fast encoder is checked:
    for a process that only serves this model (`mmgcs.fast_path.OnnxTextTower`). `processor`: the raw-input side
    (default: `GenreProcessor.from_model(model)`, which shares the model's config, tokenizer and lexical branch).
    """

    def __init__(self, model, device: Union[str, torch.device, None] = None, fast: bool = False,
                 release_eager_text: bool = False, processor: Optional[GenreProcessor] = None):
        if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
            raise TypeError(
                f"Predictor takes a loaded model, got the path {model!r}: use "
                "Predictor(GenreClassifier.from_pretrained(path_or_hub_id))"
            )
        self.model = model if device is None else model.to(device)
        self.processor = processor if processor is not None else GenreProcessor.from_model(self.model)
        self.fast = FastPath(self.model, release_eager_text=release_eager_text) if fast else None

    @property
    def labels(self) -> list[str]:
        return self.processor.labels

    def predict(self, plot: Optional[str] = None, poster: Any = None, by_modality: bool = False,
                title: Optional[str] = None, explain: bool = False) -> dict:
        """One movie → `{"scores": {genre: probability}, "genres": [predicted genres, highest first]}` (plus
        `"by_modality"`: the fused, plot-only and poster-only scores, when asked; `"explanation"` with `explain`:
        the words, plot/poster share and poster occlusion map behind each predicted genre, see mmgcs.explain).
        `title` is read only when the model's `text_template` uses it."""
        return self.predict_batch([plot], [poster], by_modality=by_modality, titles=[title], explain=explain)[0]

    __call__ = predict

    def predict_batch(self, plots: Optional[list] = None, posters: Optional[list] = None, batch_size: int = 32,
                      by_modality: bool = False, titles: Optional[list] = None, explain: bool = False) -> list[dict]:
        """Many movies → a list of `predict` results, in input order."""
        plots, posters = self._validated(plots, posters, titles)
        # Batch plots of similar length together: a batch is padded to its longest plot.
        order = sorted(range(len(plots)), key=lambda i: len(plots[i]) if isinstance(plots[i], str) else 0)
        out: list = [None] * len(plots)
        with _eval_mode(self.model):
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                probs, views = self.run(self.processor([plots[i] for i in rows], [posters[i] for i in rows]),
                                        by_modality)
                for j, result in enumerate(self._results(probs, views)):
                    out[rows[j]] = result
            if explain:  # one movie at a time: each runs its towers on 1 + grid² posters (mmgcs.explain)
                for i, result in enumerate(out):
                    result["explanation"] = explain_movie(self, plots[i], posters[i], genres_to_explain(result))
        return out

    def explain(self, plot: Optional[str] = None, poster: Any = None, genres: Optional[list] = None,
                title: Optional[str] = None, grid: int = 7) -> dict:
        """The explanation of one movie's `genres` (default: the predicted ones), see mmgcs.explain."""
        plots, posters = self._validated([plot], [poster], [title])
        if genres is None:
            genres = genres_to_explain(self.predict_batch(plots, posters)[0])
        with _eval_mode(self.model):
            return explain_movie(self, plots[0], posters[0], list(genres), grid=grid)

    def probabilities(self, plots: list, posters: list, titles: Optional[list] = None,
                      by_modality: bool = False) -> tuple[torch.Tensor, Optional[dict]]:
        """The movies as one batch, in order → (probabilities (B, L) on CPU, views as in :meth:`run`)."""
        plots, posters = self._validated(plots, posters, titles)
        with _eval_mode(self.model):
            return self.run(self.processor(plots, posters), by_modality)

    @torch.inference_mode()
    def run(self, batch: dict, by_modality: bool = False) -> tuple[torch.Tensor, Optional[dict]]:
        """A preprocessed batch → (probabilities (B, L) on CPU, views). With `by_modality`, `views` maps "fused"
        and each modality present in some row to (probabilities from that input alone, its row mask); else None."""
        model = self.model
        batch = {k: v.to(model.device) for k, v in batch.items()}
        masks = {m: batch[f"{m}_mask"] for m in MODALITY_INPUTS if batch.get(f"{m}_mask") is not None}
        features = _encode(model, batch, self.fast)
        # The lexical branch reads the text's n-grams directly (no tower); the text mask switches it off per row.
        features.update({k: batch[k] for k in LEXICAL_INPUTS if k in batch})
        features.update({f"{m}_mask": mask for m, mask in masks.items()})
        probs = _head_probs(model, features)
        if not by_modality:
            return probs, None
        # Each view re-runs only the small head, with the other modality withheld (without_modality).
        views = {"fused": (probs, None)}
        for name, mask in masks.items():
            if bool(mask.any()):  # a view is only meaningful for rows that have that input
                alone = features
                for other in masks.keys() - {name}:
                    alone = without_modality(alone, other)
                views[name] = (_head_probs(model, alone), mask.cpu())
        return probs, views

    def decisions(self, probs: torch.Tensor) -> list[list[str]]:
        """Each row's genres at the bundle's thresholds (single-label: the top genre), highest score first."""
        return self.processor.decisions(probs)

    def _results(self, probs: torch.Tensor, views: Optional[dict]) -> list[dict]:
        labels = self.processor.config.labels
        out = []
        for j, genres in enumerate(self.decisions(probs)):
            result = {"scores": dict(zip(labels, probs[j].tolist())), "genres": genres}
            if views is not None:
                result["by_modality"] = {name: dict(zip(labels, p[j].tolist()))
                                         for name, (p, mask) in views.items() if mask is None or bool(mask[j])}
            out.append(result)
        return out

    def _validated(self, plots: Optional[list], posters: Optional[list], titles: Optional[list]) -> tuple[list, list]:
        return self.processor.validated(plots, posters, titles)


@contextlib.contextmanager
def _eval_mode(model) -> Iterator[None]:
    """Predictions never use dropout or update BatchNorm statistics; the model's own mode comes back after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


__all__ = ["Predictor", "composed_plots", "without_modality"]
