"""The one predict path: raw movies (plot, poster, title) → genre scores and decisions.

    predictor = Predictor(model)                         # a GenreClassifier (any object with its interface)
    predictor.predict(plot="...", poster="poster.jpg")   # {"scores": {...}, "genres": [...]}

Validate → compose the text (the bundle's template) → preprocess (tokenize, poster transform, lexical features) →
each tower once, on the rows that have its input → the views (fused, plot-only, poster-only) → decisions at the
bundle's thresholds. `GenreClassifier.predict`, `mmgcs.serving` (and so the Space) and `mmgcs.evaluate` all come
here. It sits below the classifier: it takes a model object and never imports the class.
"""

import contextlib
import functools
from typing import Any, Iterator, Optional, Union

import torch

from mmgcs.data.images import InvalidImageError, load_image
from mmgcs.explain import explain_movie, genres_to_explain
from mmgcs.fast_path import FastPath
from mmgcs.decisions import decide, decision_thresholds
from mmgcs.models.preprocessing import check_plot, compose_text, plot_present, tokenize

LEXICAL_INPUTS = ("lexical_ids", "lexical_values")
# What a batch carries for each modality (raw inputs or cached features). The lexical branch reads the plot's
# n-grams, so it goes with the text.
MODALITY_INPUTS = {
    "text": ("input_ids", "attention_mask", "token_type_ids", "text_features", *LEXICAL_INPUTS),
    "image": ("pixel_values", "image_features"),
}
NO_INPUT = (
    "Nothing to classify: give the movie's plot (text), its poster (an image file, bytes or PIL image), or both"
)


# ------------------------------------------------------------------------------------------------- inputs
def paired_inputs(plots: Optional[list], posters: Optional[list]) -> tuple[list, list]:
    """One plot and one poster per movie, None where missing (a list left out is all None); at least one is given."""
    n = len(plots) if plots is not None else len(posters)
    plots = list(plots) if plots is not None else [None] * n
    posters = list(posters) if posters is not None else [None] * n
    if len(plots) != len(posters):
        raise ValueError(f"Got {len(plots)} plots and {len(posters)} posters; pass one of each per movie (None when missing)")
    return plots, posters


def _check_usable(model, plot: Any, poster: Any, index: Optional[int] = None) -> None:
    where = "" if index is None else f"movie #{index}: "
    check_plot(plot, 0 if index is None else index)
    has_text = plot_present(plot) and model.text_tower is not None
    has_image = poster is not None and model.image_tower is not None
    if has_text or has_image:
        return
    if model.text_tower is None and plot_present(plot):
        raise ValueError(f"{where}this model reads posters only; pass poster=... (the plot alone cannot be classified)")
    if model.image_tower is None and poster is not None:
        raise ValueError(f"{where}this model reads plots only; pass plot=... (the poster alone cannot be classified)")
    raise ValueError(where + NO_INPUT + ("" if plot is None else " (the plot is empty)"))


def composed_plots(model, plots: list, titles: Optional[list]) -> list:
    """What the text tower reads for each movie: its plot under the model's `text_template` (as in training), so a
    model trained on "{title}. {plot}" is served the same way. A missing title (or `titles` left out) is left out."""
    if titles is None:
        titles = [None] * len(plots)
    elif len(titles) != len(plots):
        raise ValueError(f"Got {len(titles)} titles for {len(plots)} movies; pass one title per movie (None when unknown)")
    for i, title in enumerate(titles):
        if title is not None and not isinstance(title, str):
            raise TypeError(f"title #{i} must be a string or None, got {type(title).__name__}")
    template = getattr(model.config, "text_template", "{plot}")
    return [compose_text(template, plot, title) for plot, title in zip(plots, titles)]


# ------------------------------------------------------------------------------------------- preprocessing
def preprocess(model, plots: Optional[list] = None, posters: Optional[list] = None,
               train: bool = False) -> dict[str, torch.Tensor]:
    """Raw plots (str or None) and posters (PIL image, path, bytes, datasets Image dict, or None) → a batch, with the
    tokenizer and image settings stored in the bundle (`model.preprocess`; training's collator uses it too).

    Masks are False where an input is missing (None or an empty plot). Raises `InvalidImageError` naming the bad
    poster.
    """
    if plots is None and posters is None:
        raise ValueError("preprocess needs plots and/or posters")
    plots, posters = paired_inputs(plots, posters)
    batch: dict[str, torch.Tensor] = {}
    if model.text_tower is not None:
        for i, p in enumerate(plots):
            check_plot(p, i)
        texts = [p if plot_present(p) else "" for p in plots]
        batch.update(tokenize(model.get_tokenizer(), model.config, texts))
        batch["text_mask"] = torch.tensor([plot_present(p) for p in plots], dtype=torch.bool)
        if model.lexical is not None:
            batch.update(model.lexical.featurize(texts))
    if model.image_tower is not None:
        batch["pixel_values"], batch["image_mask"] = _images(model, posters, train)
    return batch


def _images(model, posters: list, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    transform = model.image_transform(train)
    size = model.config.image_size
    tensors, mask = [], []
    for i, poster in enumerate(posters):
        if poster is None:
            tensors.append(torch.zeros(3, size, size))
            mask.append(False)
            continue
        try:
            image = load_image(poster)
        except InvalidImageError as e:
            raise InvalidImageError(f"poster #{i}: {e}") from None
        tensors.append(transform(image))
        mask.append(True)
    return torch.stack(tensors), torch.tensor(mask, dtype=torch.bool)


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
    for a process that only serves this model (`mmgcs.fast_path.OnnxTextTower`).
    """

    def __init__(self, model, device: Union[str, torch.device, None] = None, fast: bool = False,
                 release_eager_text: bool = False):
        if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
            raise TypeError(
                f"Predictor takes a loaded model, got the path {model!r}: use "
                "Predictor(GenreClassifier.from_pretrained(path_or_hub_id))"
            )
        self.model = model if device is None else model.to(device)
        self.fast = FastPath(self.model, release_eager_text=release_eager_text) if fast else None

    @property
    def labels(self) -> list[str]:
        return list(self.model.config.labels)

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
                probs, views = self.run(preprocess(self.model, [plots[i] for i in rows], [posters[i] for i in rows]),
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
            return self.run(preprocess(self.model, plots, posters), by_modality)

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
        cfg = self.model.config
        rows = probs.numpy()
        chosen = decide(rows, cfg.labels, decision_thresholds(cfg), argmax=cfg.task == "singlelabel")
        index = {label: j for j, label in enumerate(cfg.labels)}
        return [sorted(genres, key=lambda g: -row[index[g]]) for genres, row in zip(chosen, rows)]

    def _results(self, probs: torch.Tensor, views: Optional[dict]) -> list[dict]:
        labels = self.model.config.labels
        out = []
        for j, genres in enumerate(self.decisions(probs)):
            result = {"scores": dict(zip(labels, probs[j].tolist())), "genres": genres}
            if views is not None:
                result["by_modality"] = {name: dict(zip(labels, p[j].tolist()))
                                         for name, (p, mask) in views.items() if mask is None or bool(mask[j])}
            out.append(result)
        return out

    def _validated(self, plots: Optional[list], posters: Optional[list], titles: Optional[list]) -> tuple[list, list]:
        if plots is None and posters is None:
            raise ValueError(NO_INPUT)
        plots, posters = paired_inputs(plots, posters)
        for i, (plot, poster) in enumerate(zip(plots, posters)):
            _check_usable(self.model, plot, poster, index=i if len(plots) > 1 else None)
        return composed_plots(self.model, plots, titles), posters


@contextlib.contextmanager
def _eval_mode(model) -> Iterator[None]:
    """Predictions never use dropout or update BatchNorm statistics; the model's own mode comes back after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def predict(model, plot: Optional[str] = None, poster: Any = None, by_modality: bool = False,
            title: Optional[str] = None, explain: bool = False) -> dict:
    return Predictor(model).predict(plot, poster, by_modality=by_modality, title=title, explain=explain)


def predict_batch(model, plots: Optional[list] = None, posters: Optional[list] = None, batch_size: int = 32,
                  by_modality: bool = False, titles: Optional[list] = None, explain: bool = False) -> list[dict]:
    return Predictor(model).predict_batch(plots, posters, batch_size=batch_size, by_modality=by_modality, titles=titles,
                                          explain=explain)


__all__ = ["NO_INPUT", "Predictor", "composed_plots", "predict", "predict_batch", "preprocess", "without_modality"]
