"""Dataset rows → the batches a GenreClassifier takes (raw inputs through `model.preprocess`, or cached features).

This is the only place where the training code knows about plots and posters; the loop itself just calls
``model(**batch)``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from datasets import Image

from mmgcs.data.images import InvalidImageError, load_image, poster_present
from mmgcs.models.preprocessing import compose_text, plot_present

logger = logging.getLogger(__name__)


def label_names(split) -> list[str]:
    """The genre vocabulary of a split built by ``mmgcs.data`` (a Sequence of ClassLabel)."""
    try:
        return list(split.features["genres"].feature.names)
    except (KeyError, AttributeError):
        raise ValueError(
            "The dataset has no 'genres' column of genre class labels (Sequence(ClassLabel)); build it with "
            "`python -m mmgcs.data build --source ... --out DIR` and pass data.path=DIR"
        ) from None


def label_map(dataset_labels: Sequence[str], model_labels: Sequence[str]) -> np.ndarray:
    """Dataset class id → model output index (-1 for a genre the model does not predict)."""
    unknown = [g for g in model_labels if g not in dataset_labels]
    if unknown:
        raise ValueError(
            f"The model's labels {unknown} are not genres of this dataset; its genres are {list(dataset_labels)}. "
            "Set model.labels to a subset of them (or leave it empty to use them all)"
        )
    index = {g: i for i, g in enumerate(model_labels)}
    return np.array([index.get(g, -1) for g in dataset_labels], dtype=np.int64)


def targets(genre_ids: Sequence[Sequence[int]], mapping: np.ndarray, n_labels: int, task: str) -> torch.Tensor:
    """Multi-hot (B, L) float targets, or (B,) class indices (the first listed genre) for single-label models."""
    if task == "singlelabel":
        out = []
        for ids in genre_ids:
            mapped = [int(mapping[i]) for i in ids if mapping[i] >= 0]
            out.append(mapped[0] if mapped else -100)  # -100: cross-entropy's ignore index
        return torch.tensor(out, dtype=torch.long)
    y = torch.zeros(len(genre_ids), n_labels, dtype=torch.float32)
    for row, ids in enumerate(genre_ids):
        for i in ids:
            j = mapping[i]
            if j >= 0:
                y[row, j] = 1.0
    return y


def _compose_plots(titles, plots, template):
    return {"plot": [compose_text(template, p, t) for t, p in zip(titles, plots)]}


def apply_text_template(split, template: str):
    """The split with its `plot` column replaced by what the text tower reads (``ModelConfig.text_template``).

    Only the `plot` column changes, so the feature cache (keyed on the column each tower reads) keeps the poster
    features and recomputes the text ones.
    """
    if template == "{plot}" or "plot" not in split.column_names:
        return split
    if "title" not in split.column_names:
        raise ValueError(
            f"model.text_template={template!r} reads the title but the dataset has no 'title' column; "
            "set model.text_template={plot} or add titles to the dataset"
        )
    return split.map(
        _compose_plots, batched=True, input_columns=["title", "plot"], fn_kwargs={"template": template},
        desc="Composing text inputs",
    )


def select_inputs(split, use_text: bool, use_image: bool):
    """The columns batches are built from; posters stay encoded (decoded by the model's preprocessing).

    The same columns whatever the model's towers; the feature cache is keyed on the column a tower reads (plus
    the row ids), so a text-only, poster-only and fused model share their cached tower features.
    """
    for needed, column in ((use_text, "plot"), (use_image, "poster")):
        if needed and column not in split.column_names:
            kind = "a text" if column == "plot" else "an image"
            raise ValueError(f"The model has {kind} tower but the dataset has no {column!r} column")
    split = split.select_columns([c for c in ("id", "genres", "plot", "poster") if c in split.column_names])
    if "poster" in split.column_names:
        split = split.cast_column("poster", Image(decode=False))
    return split


def drop_unusable_rows(split, split_name: str, use_text: bool, use_image: bool, mapping: np.ndarray, task: str):
    """Rows this model cannot learn from or be scored on are removed, and reported by id (never silently).

    A row is unusable when it has none of the model's inputs (e.g. a plot-only movie for a poster model), or, for
    a single-label model, none of the model's genres.
    """

    def usable(batch):
        n = len(batch["genres"])
        ok = np.zeros(n, dtype=bool)
        if use_text:
            ok |= np.array([plot_present(p) for p in batch["plot"]], dtype=bool)
        if use_image:
            ok |= np.array([poster_present(p) for p in batch["poster"]], dtype=bool)
        if task == "singlelabel":
            ok &= np.array([any(mapping[i] >= 0 for i in ids) for ids in batch["genres"]], dtype=bool)
        return ok.tolist()

    n_before = len(split)
    flags = []
    for start in range(0, n_before, 1000):
        flags.extend(usable(split[start : start + 1000]))
    flags = np.array(flags, dtype=bool)
    if flags.all():
        return split, []
    ids = split["id"] if "id" in split.column_names else list(range(n_before))
    dropped = [ids[i] for i in np.flatnonzero(~flags)]
    needs = " or ".join(c for c, on in (("plot", use_text), ("poster", use_image)) if on)
    logger.warning(
        "%s: skipping %d of %d rows with no %s%s (ids: %s%s)",
        split_name,
        len(dropped),
        n_before,
        needs,
        " or none of the model's genres" if task == "singlelabel" else "",
        ", ".join(str(i) for i in dropped[:20]),
        ", ..." if len(dropped) > 20 else "",
    )
    return split.select(np.flatnonzero(flags).tolist()), dropped


# What the model's `GenreProcessor` returns for each tower's raw input: dropped from a batch that carries that
# tower's cached features instead.
RAW_INPUTS = {"text": ("input_ids", "attention_mask", "token_type_ids", "lexical_ids", "lexical_values"),
              "image": ("pixel_values",)}
# Per-row inputs that travel with a modality's cached features (the lexical branch reads the text's n-grams).
CACHED_WITH = {"text": ("lexical_ids", "lexical_values")}
# Batch key listing the (row id, reason) of posters that could not be decoded; the engine pops it before the model
# sees the batch and reports each row once (collators run in DataLoader workers, which cannot share that memory).
BAD_POSTERS = "bad_posters"


class RowCollator:
    """Rows → ``processor(plots, posters, train=...)`` (the model's ``GenreProcessor``) + targets; runs in
    DataLoader workers.

    A poster that cannot be decoded does not stop the run: like the feature cache, the row keeps its other input
    with its image masked out (``image_mask`` False), and the batch lists it under ``BAD_POSTERS``.
    ``cached``: modalities whose rows carry precomputed ``<modality>_features`` / ``<modality>_mask`` (a frozen
    tower read from the feature cache, see ``RowsWithFeatures``); those are stacked instead of preprocessed.
    """

    def __init__(
        self,
        preprocess: Callable[..., dict],
        mapping: np.ndarray,
        n_labels: int,
        task: str,
        train: bool,
        use_text: bool = True,
        use_image: bool = True,
        cached: Sequence[str] = (),
    ) -> None:
        self.cached = tuple(cached)
        self.use_text = use_text and "text" not in self.cached
        self.use_image = use_image and "image" not in self.cached
        self.preprocess = preprocess
        self.mapping = mapping
        self.n_labels = n_labels
        self.task = task
        self.train = train

    def __call__(self, rows: list[dict]) -> dict:
        plots = [r.get("plot") for r in rows] if self.use_text else None
        posters, bad = decode_posters(rows) if self.use_image else (None, [])
        batch = dict(self.preprocess(plots, posters, train=self.train)) if self.use_text or self.use_image else {}
        for modality in self.cached:
            for key in RAW_INPUTS[modality]:  # preprocess fills in every tower's input, missing or not
                batch.pop(key, None)
            for key in (f"{modality}_features", f"{modality}_mask", *CACHED_WITH.get(modality, ())):
                if key in rows[0]:
                    batch[key] = torch.stack([r[key] for r in rows])
        batch["labels"] = targets([r["genres"] for r in rows], self.mapping, self.n_labels, self.task)
        if bad:
            batch[BAD_POSTERS] = bad  # last: accelerate reads the batch size from a batch's first value
        return batch


def decode_posters(rows: list[dict]) -> tuple[list, list[tuple[Any, str]]]:
    """Each row's poster decoded to an RGB image, or None when it has none or it cannot be decoded; and the
    (row id, reason) of the latter."""
    posters, bad = [], []
    for row in rows:
        poster = row.get("poster")
        if not poster_present(poster):
            posters.append(None)
            continue
        try:
            posters.append(load_image(poster))
        except InvalidImageError as e:
            posters.append(None)
            bad.append((row.get("id"), str(e)))
    return posters, bad


class BadPosterReport:
    """Warns once per row (not once per epoch or per evaluation) about posters that could not be decoded."""

    def __init__(self) -> None:
        self.reported: set = set()

    def take(self, batch: dict) -> dict:
        """``batch`` without its ``BAD_POSTERS`` entry, after warning about the rows not reported yet."""
        for row_id, reason in batch.pop(BAD_POSTERS, ()):
            if (row_id, reason) in self.reported:
                continue
            self.reported.add((row_id, reason))
            logger.warning(
                "Poster of row id %s could not be decoded (%s); the row is used with its image masked out "
                "(image_mask False). Fix or remove that poster in the source data and rebuild the dataset",
                "unknown (the dataset has no 'id' column)" if row_id is None else row_id, reason,
            )
        return batch


class RowsWithFeatures(torch.utils.data.Dataset):
    """A split's rows, each with the cached features of the frozen towers (``text_features``, ``text_mask``, ...):
    the towers that train read their raw input from the row, the frozen ones are not run again every epoch."""

    def __init__(self, split, features: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 extra: Optional[dict[str, torch.Tensor]] = None) -> None:
        """``extra``: more per-row tensors that go with the cached features (the lexical branch's inputs)."""
        for modality, (feats, mask) in features.items():
            if len(feats) != len(split) or len(mask) != len(split):
                raise ValueError(f"{modality} features hold {len(feats)} rows but the split has {len(split)}")
        self.split = split
        self.tensors = {}
        for modality, (feats, mask) in features.items():
            self.tensors[f"{modality}_features"] = feats.float()
            self.tensors[f"{modality}_mask"] = mask.bool()
        self.tensors.update(_checked_extra(extra, len(split)))

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        # One Arrow read per batch (what a DataLoader asks for), not one per row.
        columns = self.split[list(indices)]
        rows = [{k: v[j] for k, v in columns.items()} for j in range(len(indices))]
        for row, i in zip(rows, indices):
            row.update({k: v[i] for k, v in self.tensors.items()})
        return rows


class FeatureDataset(torch.utils.data.Dataset):
    """Precomputed tower features (+ presence masks) and targets, one row per movie; batches by default collate."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        lengths = {k: len(v) for k, v in tensors.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"feature tensors disagree on the number of rows: {lengths}")
        self.tensors = tensors
        self.n = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.tensors.items()}


def feature_dataset(
    split,
    features: dict[str, tuple[torch.Tensor, torch.Tensor]],
    mapping: np.ndarray,
    n_labels: int,
    task: str,
    extra: Optional[dict[str, torch.Tensor]] = None,
) -> FeatureDataset:
    """``features``: modality → (features (N, D), mask (N,)) for the rows of ``split`` in order; ``extra``: more
    per-row tensors for the model (the lexical branch's inputs)."""
    tensors: dict[str, torch.Tensor] = {}
    for modality, (feats, mask) in features.items():
        if len(feats) != len(split):
            raise ValueError(f"{modality} features hold {len(feats)} rows but the split has {len(split)}")
        tensors[f"{modality}_features"] = feats.float()
        tensors[f"{modality}_mask"] = mask.bool()
    tensors.update(_checked_extra(extra, len(split)))
    tensors["labels"] = targets(split["genres"], mapping, n_labels, task)
    return FeatureDataset(tensors)


def _checked_extra(extra: Optional[dict[str, torch.Tensor]], n: int) -> dict[str, torch.Tensor]:
    for key, value in (extra or {}).items():
        if len(value) != n:
            raise ValueError(f"{key} holds {len(value)} rows but the split has {n}")
    return dict(extra or {})


def limit_rows(split, limit: int):
    return split.select(range(min(limit, len(split)))) if limit else split


__all__ = [
    "BAD_POSTERS",
    "BadPosterReport",
    "FeatureDataset",
    "RAW_INPUTS",
    "RowCollator",
    "RowsWithFeatures",
    "decode_posters",
    "drop_unusable_rows",
    "feature_dataset",
    "label_map",
    "label_names",
    "limit_rows",
    "select_inputs",
    "targets",
]
