"""The data side of a run (timm's ``create_loader``): a dataset folder and a model → the splits the model can use,
the model made ready for them (lexical fit, pos_weight), and each training stage's prepared loaders, of raw rows
("raw"), of cached tower features ("features", every tower frozen) or both ("raw+text_features": the frozen
towers read from the feature cache, the others run on raw inputs).

The training loop only calls ``model(**batch)``; which towers a model has, what they read and which ones a stage
reads from the cache is decided here (with ``mmgcs.optim``'s fine-tuning plan).
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from accelerate.utils import gather_object
from torch.utils.data import DataLoader

from mmgcs.batching import (
    BadPosterReport,
    RowCollator,
    RowsWithFeatures,
    apply_text_template,
    drop_unusable_rows,
    feature_dataset,
    label_map,
    label_names,
    limit_rows,
    select_inputs,
    targets,
)
from mmgcs.config import ConfigError, RunConfig
from mmgcs.data import load_movies
from mmgcs.features import FeatureCache
from mmgcs.metrics import compute_metrics
from mmgcs.models.classifier import GenreClassifier, create_model
from mmgcs.models.losses import check_loss_for_task, loss_options
from mmgcs.models.init_from import init_from_config
from mmgcs.optim import frozen_towers
from mmgcs.prefix_loaders import prefix_loaders, prefix_stage_kind
from mmgcs.processor import GenreProcessor

logger = logging.getLogger(__name__)

ROLES = ("train", "validation", "test")
# A model's towers, in the order its forward reads them; each batch marks the rows having one's input with
# `<modality>_mask`.
MODALITIES = ("text", "image")


class SetupError(ValueError):
    """The run cannot start: its data (missing folder or split, no usable rows) or its model settings are wrong;
    the message says what to fix."""


@dataclass
class RunData:
    """The splits of one run, ready for its model, and what their targets mean."""

    splits: dict  # role → datasets.Dataset: only the columns batches are built from, unusable rows dropped
    labels: list[str]  # the model's outputs
    mapping: np.ndarray  # dataset class id → model output index (-1: not predicted)
    task: str  # "multilabel" | "singlelabel"
    modalities: tuple[str, ...]  # the model's towers, e.g. ("text", "image")

    def targets(self, role: str) -> torch.Tensor:
        return targets(self.splits[role]["genres"], self.mapping, len(self.labels), self.task)

    def score(self, pred: dict, thresholds) -> dict:
        """``compute_metrics`` of gathered predictions (``probs``, multi-hot ``labels``) under the task's rule:
        per-genre ``thresholds`` (or one for all), or the top genre of a single-label model."""
        return compute_metrics(pred["probs"], pred["labels"], self.labels, thresholds=thresholds,
                               argmax=self.task == "singlelabel")

    def loss(self, pred: dict) -> float:
        """Unweighted BCE / CE of gathered predictions: comparable across epochs and runs (the training loss is
        pos_weight-ed)."""
        p = torch.from_numpy(pred["probs"]).double().clamp(1e-7, 1 - 1e-7)
        y = torch.from_numpy(pred["labels"]).double()
        if self.task == "singlelabel":
            return float(-(y * p.log()).sum(1).mean())
        return float(torch.nn.functional.binary_cross_entropy(p, y))

    def multi_hot(self, y: torch.Tensor) -> torch.Tensor:
        """Targets as (N, L) multi-hot rows whatever the task (single-label class indices become one-hot)."""
        return torch.nn.functional.one_hot(y.clamp_min(0), len(self.labels)).float() if self.task == "singlelabel" else y


# ------------------------------------------------------------------------------------------------- splits
def load_splits(cfg: RunConfig, accelerator) -> tuple[dict, list[str]]:
    """role → the dataset's split (cut to ``train.limit``), and the dataset's genre names."""
    # One process per machine prepares the dataset in its datasets cache (a machine's own disk), the others then
    # read it; a cache folder shared by several machines is guarded by datasets' own file locks.
    with accelerator.local_main_process_first():
        try:
            dsd = load_movies(cfg.data.path)
        except FileNotFoundError as e:
            raise SetupError(str(e)) from None
    names = {}
    for role in ROLES:
        name = getattr(cfg.data, f"{role}_split")
        if name not in dsd:
            raise SetupError(f"data.{role}_split: the dataset has no split {name!r}; its splits are {list(dsd)}")
        names[role] = name
    splits = {role: limit_rows(dsd[name], cfg.train.limit) for role, name in names.items()}
    for role, split in splits.items():
        if len(split) == 0:
            raise SetupError(f"The {role} split ({names[role]!r}) of {cfg.data.path} is empty")
    return splits, label_names(splits["train"])


def model_modalities(model) -> tuple[str, ...]:
    return tuple(m for m in MODALITIES if getattr(model, f"{m}_tower", None) is not None)


def prepare_splits(splits: dict, dataset_labels: Sequence[str], model) -> RunData:
    """The splits as ``model`` reads them: its text template applied, its input columns, its usable rows."""
    modalities = model_modalities(model)
    use_text, use_image = "text" in modalities, "image" in modalities
    task, labels = model.config.task, list(model.config.labels)
    try:
        mapping = label_map(dataset_labels, labels)
    except ValueError as e:
        raise SetupError(str(e)) from None
    out = {}
    for role, split in splits.items():
        if use_text:
            try:
                split = apply_text_template(split, model.config.text_template)
            except ValueError as e:
                raise SetupError(str(e)) from None
        split = select_inputs(split, use_text, use_image)
        split, _ = drop_unusable_rows(split, role, use_text, use_image, mapping, task)
        if len(split) == 0:
            raise SetupError(f"No usable rows in the {role} split for this model (see the warning above)")
        out[role] = split
    return RunData(out, labels, mapping, task, modalities)


# ------------------------------------------------------------------------------------ the model's data fit
def head_loss(cfg: RunConfig) -> dict:
    """The head's loss options from train.loss and its parameters; a ConfigError names the field and the fix."""
    tcfg = cfg.train
    try:
        check_loss_for_task(cfg.model.task, tcfg.loss)
        return loss_options(tcfg.loss, tcfg.focal_gamma, tcfg.asl_gamma_neg, tcfg.asl_gamma_pos, tcfg.asl_clip)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def build_model(cfg: RunConfig, dataset_labels: Sequence[str]) -> GenreClassifier:
    """The run's model with its loss (``head_loss``): a whole bundle (``train.init_from``), or a new one predicting
    ``model.labels`` (default: the dataset's genres) whose towers may start from trained bundles
    (``model.init_*_from``)."""
    init_from = cfg.train.init_from
    try:
        towers_from = [f"model.{f.name}" for f in dataclasses.fields(cfg.model)
                       if f.name.startswith("init_") and getattr(cfg.model, f.name)]
        if init_from and towers_from:
            raise ValueError(f"train.init_from starts from a whole bundle and ignores model.*; unset either it "
                             f"or {' and '.join(towers_from)}")
        if init_from:
            model = GenreClassifier.from_pretrained(init_from)
            logger.info("Starting from the bundle %s (its model settings are used; model.* is ignored)", init_from)
        else:
            model = create_model(labels=list(cfg.model.labels) or list(dataset_labels), config=cfg.model)
            init_from_config(model)  # model.init_text_from / init_image_from: towers (+ late heads) from bundles
    except (ValueError, TypeError, OSError) as e:
        # Registries and loaders name the bad setting and the choices; show that, not a traceback.
        source = f"train.init_from={init_from}" if init_from else "model settings"
        raise SetupError(f"Could not build the model from the {source}: {e}") from e
    model.set_loss(head_loss(cfg))
    return model


def train_log_odds(texts, targets: np.ndarray) -> np.ndarray:
    """Each genre's log-odds among the training rows that have a text (those the lexical branch is fitted on); 0 for
    a genre all or none of them have (the branch holds a constant logit for it)."""
    present = np.array([isinstance(t, str) and bool(t.strip()) for t in texts])
    rate = (np.asarray(targets)[present] > 0).mean(0) if present.any() else np.zeros(np.shape(targets)[1])
    usable = (rate > 0) & (rate < 1)
    safe = np.where(usable, rate, 0.5)
    return np.where(usable, np.log(safe / (1.0 - safe)), 0.0)


def fit_lexical(model, data: RunData, prior_once: bool = False) -> None:
    """Fit the lexical branch (TF-IDF logistic regressions) on the training texts. Deterministic, so a resumed run
    refits the same weights (which its checkpoint then overwrites anyway); a bundle started from keeps its fit.
    ``prior_once`` (train.lexical_prior_once) then takes each genre's training log-odds out of the intercepts: the
    head already learns each genre's base rate, and the sum of two calibrated logits would count it twice."""
    if model.lexical is None or model.lexical.fitted:
        return
    start = time.time()
    y = data.targets("train").numpy()
    summary = model.lexical.fit(data.splits["train"]["plot"], y, c=model.config.lexical_c)
    logger.info("Lexical branch fitted in %.1f s on %d texts (%d n-gram buckets kept%s)", time.time() - start,
                summary["rows"], summary["ngrams_kept"],
                f"; constant genres: {[data.labels[j] for j in summary['constant_genres']]}"
                if summary["constant_genres"] else "")
    if prior_once:
        with torch.no_grad():
            model.lexical.bias -= torch.as_tensor(train_log_odds(data.splits["train"]["plot"], y),
                                                  dtype=model.lexical.bias.dtype)
        logger.info("Lexical branch: the training log-odds of each genre taken out of its intercept (prior counted once)")


def positive_weights(data: RunData) -> list[float]:
    """Each genre's positives up-weighted by sqrt(negatives / positives) in the train split (capped at 10): rare
    genres get a usable gradient without the over-prediction a full ratio causes."""
    y = data.targets("train")
    pos = y.sum(0).clamp_min(1.0)
    weight = ((len(y) - pos) / pos).clamp_min(1.0).sqrt().clamp_max(10.0)
    return [round(float(w), 4) for w in weight]


def fit_model_to_data(model, data: RunData, cfg: RunConfig, is_main: bool) -> None:
    """What a new model learns from the training split before the first step: the lexical branch (on the main
    process only: DDP's start-up broadcast gives every rank its weights) and the loss's pos_weight."""
    if is_main:
        fit_lexical(model, data, prior_once=cfg.train.lexical_prior_once)
    if cfg.train.pos_weight != "none" and data.task == "multilabel":
        model.config.pos_weight = positive_weights(data)
        model.pos_weight = torch.tensor(model.config.pos_weight, dtype=torch.float32)
        logger.info("BCE pos_weight per genre: %s", dict(zip(data.labels, model.config.pos_weight)))
    logger.info("Data %s: %s rows; %d genres; towers: %s", cfg.data.path, {r: len(s) for r, s in data.splits.items()},
                len(data.labels), ", ".join(data.modalities))


# ---------------------------------------------------------------------------------------------- batches
def presence(batch: dict) -> dict[str, torch.Tensor]:
    """modality → which rows of ``batch`` have that input."""
    return {m: batch[f"{m}_mask"] for m in MODALITIES if f"{m}_mask" in batch}


def loader_kind(cached: Sequence[str], towers: Sequence[str]) -> str:
    """The ``inputs`` of an epoch in history.json: raw, features, or raw+<modality>_features (mixed)."""
    if not cached:
        return "raw"
    if set(cached) == set(towers):
        return "features"
    return "+".join(["raw", *(f"{m}_features" for m in cached)])


class LoaderFactory:
    """Each stage's loaders, built once per kind and prepared by the accelerator; ``take`` cleans their batches."""

    def __init__(self, data: RunData, cfg: RunConfig, accelerator) -> None:
        self.data = data
        self.cfg = cfg
        self.accelerator = accelerator
        self._prepared: dict[str, dict] = {}
        self._bad_posters = BadPosterReport()

    def take(self, batch: dict) -> dict:
        """``batch`` as the model takes it: the rows whose input could not be decoded are reported once and left
        out of it (their input is masked already)."""
        return self._bad_posters.take(batch)

    def for_epoch(self, model, epoch: int) -> tuple[str, dict]:
        """(kind, role → prepared loader) for the stage ``epoch`` (0-based) belongs to; ``model`` unwrapped."""
        tcfg = self.cfg.train
        cached = frozen_towers(tcfg, self.data.modalities, epoch) if tcfg.cache_features else ()
        prefix_kind = prefix_stage_kind(model, tcfg, self.data.modalities, epoch)  # a tower's top trains from its prefix
        kind = prefix_kind or loader_kind(cached, self.data.modalities)
        if kind not in self._prepared:
            features = self._cached_features(model, cached) if cached else None
            if prefix_kind:
                loaders = prefix_loaders(model, self.data, tcfg, self.accelerator, features,
                                         lambda role: self._lexical_inputs(role, model), self._batch_size,
                                         kind=prefix_kind, num_workers=self.cfg.data.num_workers or None)
            elif kind == "features":
                loaders = self._feature_loaders(model, features)
            else:
                loaders = self._raw_loaders(model, features)
            self._prepared[kind] = {role: self.accelerator.prepare(dl) for role, dl in loaders.items()}
        return kind, self._prepared[kind]

    def _batch_size(self, role: str) -> int:
        return self.cfg.train.batch_size if role == "train" else self.cfg.train.eval_batch_size

    def _lexical_inputs(self, role: str, model) -> dict:
        """The lexical branch's inputs for a whole split, when its text tower's features come from the cache
        (the raw path gets them from the model's ``GenreProcessor``)."""
        if model.lexical is None:
            return {}
        return model.lexical.featurize(self.data.splits[role]["plot"])

    def _raw_loaders(self, model, features: Optional[dict] = None) -> dict:
        """Loaders of rows through the model's ``GenreProcessor``. ``features``: role → {modality: (features,
        mask)} of the frozen towers, read from the cache instead of running those towers on raw inputs every step."""
        data, loaders = self.data, {}
        for role, split in data.splits.items():
            train = role == "train"
            cached = (features or {}).get(role, {})
            extra = self._lexical_inputs(role, model) if "text" in cached else {}
            collate = RowCollator(GenreProcessor.from_model(model), data.mapping, len(data.labels), data.task,
                                  train=train, use_text="text" in data.modalities,
                                  use_image="image" in data.modalities, cached=tuple(cached))
            loaders[role] = DataLoader(
                RowsWithFeatures(split, cached, extra) if cached else split,
                batch_size=self._batch_size(role),
                shuffle=train,
                collate_fn=collate,
                num_workers=self.cfg.data.num_workers,
                persistent_workers=self.cfg.data.num_workers > 0,
            )
        return loaders

    def _feature_loaders(self, model, features: dict) -> dict:
        """Loaders of cached features only (every tower frozen): no raw input is read at all."""
        data, loaders = self.data, {}
        for role, split in data.splits.items():
            extra = self._lexical_inputs(role, model) if "text" in data.modalities else {}
            ds = feature_dataset(split, features[role], data.mapping, len(data.labels), data.task, extra=extra)
            loaders[role] = DataLoader(ds, batch_size=self._batch_size(role), shuffle=role == "train")
        return loaders

    def _cached_features(self, model, modalities: Sequence[str]) -> dict:
        """role → {modality: (features, mask)} from the feature cache (computed once, reused across runs)."""
        tcfg = self.cfg.train
        cache = FeatureCache(tcfg.cache_dir)
        model.to(self.accelerator.device)
        features = {}
        # The first process of each machine computes and stores the features (train.cache_dir may be on each
        # machine's own disk); the others then read them from disk. Machines sharing one cache folder compute each
        # entry once: the first to lock it computes, the others wait and read it (mmgcs.features.locks).
        # Featurizing (a cache miss) draws random numbers and a hit does not: keep training's RNG out of it, so a
        # run is the same whether its features were cached or not (and a second stage's miss changes nothing).
        with self.accelerator.local_main_process_first(), torch.random.fork_rng(devices=[]):
            for role, split in self.data.splits.items():
                features[role] = {
                    m: cache.get_or_compute(
                        model, split, m, batch_size=tcfg.eval_batch_size,
                        num_workers=self.cfg.data.num_workers or None,  # 0: the cache picks (one per core)
                    )
                    for m in modalities
                }
        self._report_cache(cache)
        return features

    def _report_cache(self, cache: FeatureCache) -> None:
        """On a multi-process run, the main process logs what each process's cache did (the others log warnings
        only): which machine computed which entries, and which read them."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return
        mine = (acc.process_index, acc.local_process_index, socket.gethostname(), str(cache.cache_dir.resolve()),
                cache.misses, cache.hits)
        counts = gather_object([mine])
        if acc.is_main_process:
            logger.info("Feature cache per process: %s", "; ".join(
                f"process {p} (local {local}, host {host}, cache {folder}): computed {misses}, read {hits}"
                for p, local, host, folder, misses, hits in sorted(counts)))


__all__ = [
    "SetupError",
    "build_model",
    "head_loss",
    "LoaderFactory",
    "MODALITIES",
    "RunData",
    "fit_lexical",
    "fit_model_to_data",
    "load_splits",
    "loader_kind",
    "model_modalities",
    "positive_weights",
    "train_log_odds",
    "prepare_splits",
    "presence",
]
