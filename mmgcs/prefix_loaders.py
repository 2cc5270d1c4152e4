"""The loaders of a stage that trains a tower's top layers from its cached prefix: the text tower's
(mmgcs/features/prefix.py), the image tower's (mmgcs/features/image_prefix.py), or both.

A batch holds, for a text prefix, `text_hidden` (B, T, H: each row's cached valid tokens, padded to the batch's
longest row), `attention_mask`, `text_frozen_means` when the pooling reads frozen layers and `text_mask`; for an image
prefix, `image_hidden` (B, C, H, W: the feature maps entering the trainable stages) and `image_mask`; a frozen tower's
cached features; the lexical branch's inputs and the labels. The model runs only the trainable layers, the pooling
and the head on it (``GenreClassifier.forward(text_hidden=..., image_hidden=...)``).
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Optional, Sequence

import torch
from torch.utils.data import DataLoader

from mmgcs.batching import targets
from mmgcs.config import TrainConfig
from mmgcs.features.image_prefix import CachedImagePrefix, ImagePrefixCache
from mmgcs.features.prefix import CachedPrefix, PrefixCache
from mmgcs.features.workers import _main_threads
from mmgcs.models.image_prefix import plan_cut
from mmgcs.optim import FINETUNE_SETTINGS, finetune_mode
from mmgcs.runtime import available_cores

logger = logging.getLogger(__name__)

PREFIX_KIND = "text_prefix"
CACHES = {"text": PrefixCache, "image": ImagePrefixCache}  # modality -> its prefix cache


def prefix_stage_kind(model, tcfg: TrainConfig, modalities: Sequence[str], epoch: int) -> Optional[str]:
    """The loader kind of `epoch` (0-based) when a tower trains its top from a cached prefix and every other tower
    is frozen (read from the feature cache): "<modality>_prefix" or "_features" per tower, in the model's order
    ("text_prefix+image_features", "text_features+image_prefix", "text_prefix+image_prefix", ...); None when no
    tower does, or one trains whole (then every tower runs on raw inputs)."""
    if not (tcfg.prefix_cache and tcfg.cache_features):
        return None
    inputs = {m: _stage_input(model, tcfg, m, epoch) for m in modalities}
    if "prefix" not in inputs.values():
        return None
    whole = [m for m, kind in inputs.items() if kind is None]
    if whole:
        logger.info("The %s tower trains whole: every tower runs on raw inputs (no cached prefix)", whole[0])
        return None
    return "+".join(f"{m}_{kind}" for m, kind in inputs.items())


def _stage_input(model, tcfg: TrainConfig, modality: str, epoch: int) -> Optional[str]:
    """What a stage's loaders give one tower: "features" (frozen), "prefix" (its top trains from the cached prefix)
    or None (it runs whole on raw inputs)."""
    mode = finetune_mode(tcfg, modality, epoch)
    if mode == "frozen":
        return "features"
    trainable = getattr(tcfg, FINETUNE_SETTINGS[modality][1])
    if mode != "partial" or trainable < 1:
        return None
    if modality == "image" and not tcfg.image_prefix_cache:
        return None  # opt-in: the cached map gives up poster augmentation (config.TrainConfig.image_prefix_cache)
    problem = _prefix_problem(getattr(model, f"{modality}_tower"), modality, trainable)
    if problem:
        logger.info("No cached %s prefix (%s): the %s tower runs whole on raw inputs", modality, problem, modality)
        return None
    return "prefix"


def _prefix_problem(tower, modality: str, trainable: int) -> Optional[str]:
    if modality == "image":
        try:
            plan_cut(tower, trainable)
        except ValueError as e:
            return str(e)
        return None
    problem_of = getattr(tower, "prefix_problem", None)
    return problem_of() if problem_of is not None else f"{type(tower).__name__} is not split in layers"


class PrefixRows(torch.utils.data.Dataset):
    """Row i of a split: its cached text prefix and `text_mask` (`prefix`), its cached image prefix and `image_mask`
    (`image_prefix`), either or both, and the other per-row tensors (`extra`: a frozen tower's features and mask,
    the lexical branch's inputs, the labels)."""

    def __init__(self, prefix: Optional[CachedPrefix], extra: dict[str, torch.Tensor],
                 image_prefix: Optional[CachedImagePrefix] = None) -> None:
        if prefix is None and image_prefix is None:
            raise ValueError("PrefixRows needs a cached text or image prefix")
        self.prefix, self.image_prefix = prefix, image_prefix
        self.extra = dict(extra)
        if prefix is not None:
            self.extra["text_mask"] = prefix.mask
        if image_prefix is not None:
            self.extra["image_mask"] = image_prefix.mask
        for key, value in self.extra.items():
            if len(value) != len(self):
                raise ValueError(f"{key} holds {len(value)} rows but the cached prefix has {len(self)}")

    def __len__(self) -> int:
        return len(self.prefix if self.prefix is not None else self.image_prefix)

    def __getitem__(self, i: int) -> dict:
        row = {k: v[i] for k, v in self.extra.items()}
        if self.prefix is not None:
            row["text_hidden"] = self.prefix.tokens(i)
            if self.prefix.frozen_means is not None:
                row["text_frozen_means"] = self.prefix.frozen_means[i]
        if self.image_prefix is not None:
            row["image_hidden"] = self.image_prefix.feature_map(i)
        return row


class EpochPermutation(torch.utils.data.Sampler):
    """A random order of `n` rows that depends only on (seed, epoch): a resumed run replays the interrupted one's."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=self.generator()).tolist())

    def __len__(self) -> int:
        return self.n


class LengthGroupedBatches(torch.utils.data.Sampler):
    """Training batches of rows of similar length (the Hugging Face Trainer's group_by_length): the epoch's random
    order is cut into groups of `GROUP_BATCHES` batches, each group sorted by length and cut into batches, and the
    full batches are shuffled (the short one stays last). A batch then pads little (plots of 5 to 128 tokens, 65 on
    average). `sampler` is the epoch's order (accelerate calls its set_epoch).

    On `processes` data-parallel processes a step's batch is the `processes` batches accelerate deals in turn, so the
    groups are cut into global batches of `batch_size * processes` rows, each then cut into consecutive per-process
    batches: a step sees the rows one process sees with the global batch (the same model, as on the feature path)."""

    GROUP_BATCHES = 50

    def __init__(self, lengths: torch.Tensor, batch_size: int, seed: int, processes: int = 1) -> None:
        self.lengths, self.batch_size, self.processes = lengths, batch_size, processes
        self.sampler = EpochPermutation(len(lengths), seed)

    def __iter__(self):
        order = torch.tensor(list(self.sampler), dtype=torch.long)
        size = self.batch_size * self.processes
        group = self.GROUP_BATCHES * size
        batches = []
        for start in range(0, len(order), group):
            rows = order[start : start + group]
            rows = rows[torch.argsort(self.lengths[rows], descending=True, stable=True)]
            batches.extend(rows[b : b + size].tolist() for b in range(0, len(rows), size))
        # The one short batch stays last, where accelerate's sharding of batches across processes expects it.
        full = [b for b in batches if len(b) == size]
        shuffle = torch.randperm(len(full), generator=self.sampler.generator()).tolist()
        steps = [full[i] for i in shuffle] + [b for b in batches if len(b) < size]
        return iter([s[b : b + self.batch_size] for s in steps for b in range(0, len(s), self.batch_size)])

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)


def collate_prefix(rows: list[dict]) -> dict:
    """Rows → a batch: the cached tokens padded (right) to the longest row; every other value (the image prefix's
    feature maps too) stacked; cached values computed in float32 whatever their storage dtype."""
    batch = _pad_tokens(rows) if "text_hidden" in rows[0] else {}
    for key in rows[0]:
        if key != "text_hidden":
            batch[key] = torch.stack([r[key] for r in rows])
            if batch[key].is_floating_point():
                batch[key] = batch[key].float()
    return batch


def _pad_tokens(rows: list[dict]) -> dict:
    lengths = [len(r["text_hidden"]) for r in rows]
    width = rows[0]["text_hidden"].shape[1]
    hidden = torch.zeros(len(rows), max(lengths), width, dtype=torch.float32)
    mask = torch.zeros(len(rows), max(lengths), dtype=torch.long)
    for i, (row, n) in enumerate(zip(rows, lengths)):
        hidden[i, :n] = row["text_hidden"]
        mask[i, :n] = 1
    return {"text_hidden": hidden, "attention_mask": mask}


def prefix_loaders(model, data, tcfg: TrainConfig, accelerator, image_features: Optional[dict],
                   lexical_inputs: Callable[[str], dict], batch_size: Callable[[str], int], kind: str = PREFIX_KIND,
                   num_workers: Optional[int] = None) -> dict:
    """role → loader over the cached prefixes of `data`'s splits (`data`: mmgcs.loaders.RunData) named by `kind`
    (prefix_stage_kind's); `image_features`: role → {modality: (features, mask)} of the frozen towers. The main
    process computes and stores each prefix first, the others read it; computing runs under its own RNG (a run is
    the same whether its prefix was cached or not). `num_workers`: the poster workers of an image prefix."""
    modalities = [part[: -len("_prefix")] for part in kind.split("+") if part.endswith("_prefix")]
    prefixes = _cached_prefixes(model, data, tcfg, accelerator, modalities, num_workers)
    loaders = {}
    for role, split in data.splits.items():
        extra = {"labels": targets(split["genres"], data.mapping, len(data.labels), data.task), **lexical_inputs(role)}
        for modality, (features, mask) in (image_features or {}).get(role, {}).items():
            extra[f"{modality}_features"], extra[f"{modality}_mask"] = features.float(), mask.bool()
        text, image = prefixes[role].get("text"), prefixes[role].get("image")
        rows = PrefixRows(text, extra, image_prefix=image)
        if role == "train":  # rows of similar plot length together; an image prefix alone: equal lengths
            lengths = text.offsets.diff() if text is not None else torch.ones(len(rows), dtype=torch.int64)
            batches = LengthGroupedBatches(lengths, batch_size(role), tcfg.seed, accelerator.num_processes)
            loaders[role] = DataLoader(rows, batch_sampler=batches, collate_fn=collate_prefix)
        else:  # evaluation keeps the split's order (predictions are saved by row)
            loaders[role] = DataLoader(rows, batch_size=batch_size(role), collate_fn=collate_prefix)
    return loaders


def _cached_prefixes(model, data, tcfg: TrainConfig, accelerator, modalities: Sequence[str],
                     num_workers: Optional[int]) -> dict:
    """role → {modality: its cached prefix} (computed and stored on a miss)."""
    caches = {m: CACHES[m](tcfg.cache_dir, tcfg.prefix_dtype) for m in modalities}
    if "image" in caches:
        caches["image"].num_workers = num_workers
    model.to(accelerator.device)
    prefixes = {}
    # Every core of this machine (its other processes wait meanwhile), whatever the stage before used (a first stage
    # training the head alone runs on one thread); MMGCS_NUM_THREADS, when set, is the user's choice.
    threads = torch.get_num_threads() if "MMGCS_NUM_THREADS" in os.environ else available_cores()
    with accelerator.local_main_process_first(), torch.random.fork_rng(devices=[]), _main_threads(threads):
        for role, split in data.splits.items():
            prefixes[role] = {m: cache.get_or_compute(model, split, batch_size=tcfg.eval_batch_size)
                              for m, cache in caches.items()}
    for cache in caches.values():
        if cache.misses:  # "Cached the text prefix ..." / "Cached the image prefix ...": benchmarks read these lines
            logger.info(f"Cached the {cache.what} of %d split(s) in %.1f s", cache.misses, cache.seconds)
        cache.log_per_process(accelerator)
    return prefixes


__all__ = ["CACHES", "PREFIX_KIND", "EpochPermutation", "LengthGroupedBatches", "PrefixRows",
           "collate_prefix", "prefix_loaders", "prefix_stage_kind"]
