"""GenreProcessor: a bundle's raw-input side, beside the model (transformers' Processor, open_clip's `preprocess`).

    processor = GenreProcessor.from_pretrained("bundle/")      # or GenreProcessor.from_model(model)
    batch = processor(plots=["A ghost at night."], posters=["poster.jpg"])   # the tensors model(**batch) takes
    processor.decisions(probabilities)                         # each row's genres at the bundle's thresholds

Built from the bundle's config (with its tokenizer and the lexical branch's idf), it owns what lies between a raw
movie and the model's tensors: the checks of the inputs, the text template, tokenization, the lexical n-gram
features, the poster transform; and the way back, scores to genres at the decision thresholds. The model's forward
takes tensors only; `mmgcs.inference.Predictor` joins the two.
"""

from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from safetensors import safe_open

from mmgcs.config import ModelConfig
from mmgcs.data.images import InvalidImageError, load_image
from mmgcs.decisions import decide, decision_thresholds
from mmgcs.hub.bundle import (
    WEIGHTS_NAME, check_bundle_files, load_tokenizer_from_bundle, read_config_and_meta, resolve_bundle, with_overrides,
)
from mmgcs.models.lexical import LexicalBranch
from mmgcs.models.preprocessing import check_plot, compose_text, image_transform, plot_present, tokenize

NO_INPUT = (
    "Nothing to classify: give the movie's plot (text), its poster (an image file, bytes or PIL image), or both"
)
NO_TOKENIZER = (
    "This model has no tokenizer: build it with mmgcs.create_model(...) or load a saved bundle with "
    "GenreClassifier.from_pretrained(...), which restore the tokenizer"
)
LEXICAL_IDF = "lexical.idf"  # the only tensor of the bundle the processor reads: the lexical branch's n-gram idf


def paired_inputs(plots: Optional[list], posters: Optional[list]) -> tuple[list, list]:
    """One plot and one poster per movie, None where missing (a list left out is all None); at least one is given."""
    n = len(plots) if plots is not None else len(posters)
    plots = list(plots) if plots is not None else [None] * n
    posters = list(posters) if posters is not None else [None] * n
    if len(plots) != len(posters):
        raise ValueError(f"Got {len(plots)} plots and {len(posters)} posters; pass one of each per movie (None when missing)")
    return plots, posters


class GenreProcessor:
    """Raw movies ↔ a model's tensors, from the settings stored in its bundle.

    `lexical` is the model's `LexicalBranch` (only its `featurize` is used: hashed n-grams weighted by the fitted
    idf), or None for a model without one. A processor made `from_model` shares the model's config, tokenizer and
    lexical branch, so a threshold set on `model.config` or an idf fitted in training is seen at once.
    """

    def __init__(self, config: ModelConfig, tokenizer: Any = None, lexical: Optional[LexicalBranch] = None):
        self.config = config
        self.tokenizer = tokenizer
        self.lexical = lexical
        self._transforms: dict = {}

    # -------------------------------------------------------------------------------------------- building
    @classmethod
    def from_model(cls, model) -> "GenreProcessor":
        """The processor of a loaded or newly built `GenreClassifier`."""
        return cls(model.config, getattr(model, "tokenizer", None), getattr(model, "lexical", None))

    @classmethod
    def from_config(cls, config: ModelConfig, tokenizer: Any = None,
                    lexical_idf: Optional[torch.Tensor] = None) -> "GenreProcessor":
        """A processor for `config` with its `tokenizer` (a model with a text tower needs one to read plots) and,
        for a config with `lexical`, the branch's fitted idf (zeros, i.e. no n-gram features, when left out)."""
        lexical = None
        if getattr(config, "lexical", False):
            lexical = LexicalBranch(config.lexical_features, len(config.labels), config.lexical_ngrams,
                                    config.lexical_min_df)
            if lexical_idf is not None:
                lexical.idf.data.copy_(lexical_idf)
        return cls(config, tokenizer, lexical)

    @classmethod
    def from_pretrained(cls, path_or_repo_id: Union[str, Path], *, revision: Optional[str] = None,
                        cache_dir: Union[str, Path, None] = None, force_download: bool = False, token=None,
                        local_files_only: bool = False, **config_overrides) -> "GenreProcessor":
        """The processor of a bundle folder or Hub repo id, checked as `GenreClassifier.from_pretrained` checks
        it (config values, the files it needs, the tokenizer against the config); no model is built.
        `config_overrides` may change inference-only fields (`thresholds`, `threshold`)."""
        folder = resolve_bundle(path_or_repo_id, revision=revision, cache_dir=cache_dir, force_download=force_download,
                                token=token, local_files_only=local_files_only)
        cfg, meta = read_config_and_meta(folder)
        cfg = with_overrides(cfg, config_overrides)
        check_bundle_files(folder, cfg, meta)
        idf = None
        if cfg.lexical:
            with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:
                idf = f.get_tensor(LEXICAL_IDF) if LEXICAL_IDF in f.keys() else None
        return cls.from_config(cfg, load_tokenizer_from_bundle(folder, cfg), idf)

    # ------------------------------------------------------------------------------------------ the inputs
    @property
    def labels(self) -> list[str]:
        return list(self.config.labels)

    @property
    def reads_plots(self) -> bool:
        return self.config.text_tower != "none"

    @property
    def reads_posters(self) -> bool:
        return self.config.image_tower != "none"

    def check_usable(self, plot: Any, poster: Any, index: Optional[int] = None) -> None:
        """A clear error when this model can classify nothing of the movie (e.g. a poster for a plot-only model)."""
        where = "" if index is None else f"movie #{index}: "
        check_plot(plot, 0 if index is None else index)
        if (plot_present(plot) and self.reads_plots) or (poster is not None and self.reads_posters):
            return
        if not self.reads_plots and plot_present(plot):
            raise ValueError(f"{where}this model reads posters only; pass poster=... (the plot alone cannot be classified)")
        if not self.reads_posters and poster is not None:
            raise ValueError(f"{where}this model reads plots only; pass plot=... (the poster alone cannot be classified)")
        raise ValueError(where + NO_INPUT + ("" if plot is None else " (the plot is empty)"))

    def compose(self, plots: list, titles: Optional[list] = None) -> list:
        """What the text tower reads for each movie: its plot under the bundle's `text_template` (as in training),
        so a model trained on "{title}. {plot}" is served the same way. A missing title (or `titles` left out) is
        left out."""
        if titles is None:
            titles = [None] * len(plots)
        elif len(titles) != len(plots):
            raise ValueError(f"Got {len(titles)} titles for {len(plots)} movies; pass one title per movie (None when unknown)")
        for i, title in enumerate(titles):
            if title is not None and not isinstance(title, str):
                raise TypeError(f"title #{i} must be a string or None, got {type(title).__name__}")
        template = getattr(self.config, "text_template", "{plot}")
        return [compose_text(template, plot, title) for plot, title in zip(plots, titles)]

    def validated(self, plots: Optional[list], posters: Optional[list],
                  titles: Optional[list] = None) -> tuple[list, list]:
        """Movies checked one by one (an error names the movie when there are several) → (composed texts, posters)."""
        if plots is None and posters is None:
            raise ValueError(NO_INPUT)
        plots, posters = paired_inputs(plots, posters)
        for i, (plot, poster) in enumerate(zip(plots, posters)):
            self.check_usable(plot, poster, index=i if len(plots) > 1 else None)
        return self.compose(plots, titles), posters

    # ----------------------------------------------------------------------------------------- the tensors
    def __call__(self, plots: Optional[list] = None, posters: Optional[list] = None,
                 train: bool = False) -> dict[str, torch.Tensor]:
        """Raw plots (str or None) and posters (PIL image, path, bytes, datasets Image dict, or None) → a batch (the
        training collator uses it too, `train=True` for the augmenting poster transform).

        Masks are False where an input is missing (None or an empty plot). Raises `InvalidImageError` naming the
        bad poster."""
        if plots is None and posters is None:
            raise ValueError("preprocess needs plots and/or posters")
        plots, posters = paired_inputs(plots, posters)
        batch: dict[str, torch.Tensor] = {}
        if self.reads_plots:
            for i, p in enumerate(plots):
                check_plot(p, i)
            texts = [p if plot_present(p) else "" for p in plots]
            batch.update(tokenize(self.get_tokenizer(), self.config, texts))
            batch["text_mask"] = torch.tensor([plot_present(p) for p in plots], dtype=torch.bool)
            if self.lexical is not None:
                batch.update(self.lexical.featurize(texts))
        if self.reads_posters:
            batch["pixel_values"], batch["image_mask"] = self._images(posters, train)
        return batch

    def _images(self, posters: list, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        transform = self.image_transform(train)
        size = self.config.image_size
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

    def image_transform(self, train: bool = False):
        """The torchvision transform for this bundle's posters (timm's eval transform, or the train one)."""
        if train not in self._transforms:
            self._transforms[train] = image_transform(self.config, train)
        return self._transforms[train]

    def get_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError(NO_TOKENIZER)
        return self.tokenizer

    # ---------------------------------------------------------------------------------------- the decisions
    def thresholds(self) -> list[float]:
        """Each genre's decision threshold (the bundle's calibrated ones, else `threshold` for all)."""
        return decision_thresholds(self.config).tolist()

    def decisions(self, probs: torch.Tensor) -> list[list[str]]:
        """Each row's genres at the bundle's thresholds (single-label: the top genre), highest score first."""
        cfg = self.config
        rows = probs.numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs)
        chosen = decide(rows, cfg.labels, decision_thresholds(cfg), argmax=cfg.task == "singlelabel")
        index = {label: j for j, label in enumerate(cfg.labels)}
        return [sorted(genres, key=lambda g: -row[index[g]]) for genres, row in zip(chosen, rows)]


__all__ = ["GenreProcessor", "NO_INPUT", "NO_TOKENIZER", "paired_inputs"]
