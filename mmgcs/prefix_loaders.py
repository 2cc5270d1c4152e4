"""The loaders of a stage that trains the text tower's top layers from its cached prefix (mmgcs/features/prefix.py).

A batch holds `text_hidden` (B, T, H: each row's cached valid tokens, padded to the batch's longest row),
`attention_mask`, `text_frozen_means` when the pooling reads frozen layers, `text_mask`, the frozen image tower's
cached features, the lexical branch's inputs and the labels. The model runs only the trainable layers, the pooling
and the head on it (``GenreClassifier.forward(text_hidden=...)``).
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Optional, Sequence

import torch
from torch.utils.data import DataLoader

from mmgcs.batching import targets
from mmgcs.config import TrainConfig
from mmgcs.features.prefix import CachedPrefix, PrefixCache
from mmgcs.features.workers import _main_threads
from mmgcs.optim import finetune_mode
from mmgcs.runtime import available_cores

logger = logging.getLogger(__name__)

PREFIX_KIND = "text_prefix"


def prefix_stage_kind(model, tcfg: TrainConfig, modalities: Sequence[str], epoch: int) -> Optional[str]:
    """The loader kind of `epoch` (0-based) when its text tower trains its top layers from the cached prefix
    ("text_prefix", or "text_prefix+image_features" with a frozen image tower); None when the stage does not."""
    if not (tcfg.prefix_cache and tcfg.cache_features) or "text" not in modalities:
        return None
    if finetune_mode(tcfg, "text", epoch) != "partial" or tcfg.text_trainable_layers < 1:
        return None
    if "image" in modalities and finetune_mode(tcfg, "image", epoch) != "frozen":
        logger.info("The image tower trains too: the text tower runs whole on raw plots (no cached prefix)")
        return None
    problem_of = getattr(model.text_tower, "prefix_problem", None)
    problem = problem_of() if problem_of is not None else f"{type(model.text_tower).__name__} is not split in layers"
    if problem:
        logger.info("No cached text prefix (%s): the text tower runs whole on raw plots", problem)
        return None
    return "+".join([PREFIX_KIND, *(["image_features"] if "image" in modalities else [])])


class PrefixRows(torch.utils.data.Dataset):
    """Row i of a split: its cached prefix, `text_mask`, and the other per-row tensors (`extra`: image features and
    mask, the lexical branch's inputs, the labels)."""

    def __init__(self, prefix: CachedPrefix, extra: dict[str, torch.Tensor]) -> None:
        for key, value in extra.items():
            if len(value) != len(prefix):
                raise ValueError(f"{key} holds {len(value)} rows but the cached prefix has {len(prefix)}")
        self.prefix = prefix
        self.extra = dict(extra, text_mask=prefix.mask)

    def __len__(self) -> int:
        return len(self.prefix)

    def __getitem__(self, i: int) -> dict:
        row = {k: v[i] for k, v in self.extra.items()}
        row["text_hidden"] = self.prefix.tokens(i)
        if self.prefix.frozen_means is not None:
            row["text_frozen_means"] = self.prefix.frozen_means[i]
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
    """Rows → a batch: the cached tokens padded (right) to the longest row, computed in float32 whatever their
    storage dtype; every other value stacked."""
    lengths = [len(r["text_hidden"]) for r in rows]
    width = rows[0]["text_hidden"].shape[1]
    hidden = torch.zeros(len(rows), max(lengths), width, dtype=torch.float32)
    mask = torch.zeros(len(rows), max(lengths), dtype=torch.long)
    for i, (row, n) in enumerate(zip(rows, lengths)):
        hidden[i, :n] = row["text_hidden"]
        mask[i, :n] = 1
    batch = {"text_hidden": hidden, "attention_mask": mask}
    for key in rows[0]:
        if key != "text_hidden":
            batch[key] = torch.stack([r[key] for r in rows])
            if batch[key].is_floating_point():
                batch[key] = batch[key].float()
    return batch


def prefix_loaders(model, data, tcfg: TrainConfig, accelerator, image_features: Optional[dict],
                   lexical_inputs: Callable[[str], dict], batch_size: Callable[[str], int]) -> dict:
    """role → loader over the cached prefix of `data`'s splits (`data`: mmgcs.loaders.RunData). The main process
    computes and stores each prefix first, the others read it; computing runs under its own RNG (a run is the same
    whether its prefix was cached or not)."""
    cache = PrefixCache(tcfg.cache_dir, tcfg.prefix_dtype)
    model.to(accelerator.device)
    prefixes = {}
    # Every core of this machine (its other processes wait meanwhile), whatever the stage before used (a first stage
    # training the head alone runs on one thread); MMGCS_NUM_THREADS, when set, is the user's choice.
    threads = torch.get_num_threads() if "MMGCS_NUM_THREADS" in os.environ else available_cores()
    with accelerator.local_main_process_first(), torch.random.fork_rng(devices=[]), _main_threads(threads):
        for role, split in data.splits.items():
            prefixes[role] = cache.get_or_compute(model, split, batch_size=tcfg.eval_batch_size)
    if cache.misses:
        logger.info("Cached the text prefix of %d split(s) in %.1f s", cache.misses, cache.seconds)
    cache.log_per_process(accelerator)
    loaders = {}
    for role, split in data.splits.items():
        extra = {"labels": targets(split["genres"], data.mapping, len(data.labels), data.task), **lexical_inputs(role)}
        for modality, (features, mask) in (image_features or {}).get(role, {}).items():
            extra[f"{modality}_features"], extra[f"{modality}_mask"] = features.float(), mask.bool()
        rows = PrefixRows(prefixes[role], extra)
        if role == "train":
            lengths = prefixes[role].offsets.diff()
            batches = LengthGroupedBatches(lengths, batch_size(role), tcfg.seed, accelerator.num_processes)
            loaders[role] = DataLoader(rows, batch_sampler=batches, collate_fn=collate_prefix)
        else:  # evaluation keeps the split's order (predictions are saved by row)
            loaders[role] = DataLoader(rows, batch_size=batch_size(role), collate_fn=collate_prefix)
    return loaders


__all__ = ["PREFIX_KIND", "EpochPermutation", "LengthGroupedBatches", "PrefixRows", "collate_prefix", "prefix_loaders", "prefix_stage_kind"]
