"""Featurization: a frozen tower run once over every row of a split, fast on CPU.

Posters: DataLoader workers read the JPEG bytes straight from the dataset (the main process never decodes), run
the model's own eval transform, and, on CPU, encode them too, one worker per core on one thread each, in batches
of 4 that keep activations in cache. They run the tower's fast encoder (`tower.fast_encoder`, for timm towers
mmgcs.models.image_fast.FastImageEncoder: static "SAME" padding, channels-last, traced and frozen with BatchNorm
folded into the convolutions, oneDNN-fused), built and checked against `model.encode_image` once by the main
process. Plots: tokenized in groups, encoded longest-first in batches of similar length (little padding), on CPU
in workers too. On a GPU, workers decode and the main process encodes. benchmarks/bench_featurize.py measures it:
EfficientNet-Lite0 at 224 px, ~13 ms of CPU a poster, decode and resize included (2-core EPYC).

The tuning constants below are read at call time: set them on this module (`mmgcs.features.workers`).
"""

import contextlib
import copy
import ctypes
import logging
import warnings
import weakref
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from datasets import Image

from mmgcs.data.images import InvalidImageError, load_image, poster_present
from mmgcs.fast_path import FastPath, fast_path_setting
from mmgcs.features.keys import model_tower
from mmgcs.models.image_fast import FastImageEncoder, split_eval_transform, to_normalized_batch
from mmgcs.models.preprocessing import plot_present, tokenize
from mmgcs.models.tower import outputs_agree
from mmgcs.processor import GenreProcessor
from mmgcs.progress import progress
from mmgcs.runtime import available_cores

logger = logging.getLogger(__name__)

# Posters per forward pass and CPU thread. EfficientNet-Lite0 (FastImageEncoder, one thread, 2-core EPYC) took
# 9.6 ms a poster at 1 and 2, 10.5 at 4, 10.1 at 8 and 10.3 at 16: flat once freed memory is kept (see
# _setup_compute_worker); small batches keep results flowing from the workers.
CPU_FORWARD_BATCH = 4
# Worker processes used when the caller does not say (one per core up to this): each holds a copy of the tower.
MAX_WORKERS = 8
# Tracing and freezing the image tower costs about a second; below this many posters eager mode is faster overall.
MIN_POSTERS_TO_OPTIMIZE = 256
# Plots are tokenized this many at a time (sorted by length inside a group), bounding memory on huge datasets.
TEXT_GROUP = 4096


class FeatureCacheWarning(UserWarning):
    """A cache file could not be used or written; features are recomputed (or kept in memory only)."""


def compute_features(
    model, split, modality: str, batch_size: int = 64, num_workers: Optional[int] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `model`'s `modality` tower (eval mode, no gradients) over every row of `split`; see get_or_compute."""
    model_tower(model, modality)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if modality == "image":
        return compute_image_features(model, split, batch_size=batch_size, num_workers=num_workers)
    return compute_text_features(model, split, batch_size=batch_size, num_workers=num_workers)


# ------------------------------------------------------------------------------------- the processes
def default_num_workers() -> int:
    """One worker per core (at most `MAX_WORKERS`): on CPU each decodes and encodes its own batches on one thread."""
    return max(1, min(MAX_WORKERS, available_cores()))


def _setup_compute_worker() -> None:
    """Settings for a DataLoader worker that runs a tower (called on its first batch).

    One thread: the worker is a forked copy of a process whose OpenMP thread pool cannot be used after fork
    (GNU OpenMP hangs in the first parallel region that needs more than one thread), and one single-threaded worker
    per core wastes nothing on thread synchronization. Freed activation memory is kept by the allocator instead of
    being returned to the OS after every batch: glibc maps blocks over its threshold (up to 32 MB) afresh each
    time, and the page faults of re-touching them cost EfficientNet-Lite0 ~30% more time at 8 posters a batch.
    """
    torch.set_num_threads(1)
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: serve blocks up to 1 GiB from the heap
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of freed heap
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


class _main_threads:
    """Run the main process on `n` threads for a block: while the workers hold every core, its own small ops
    (writing results into the output) would otherwise wake a second OpenMP thread that has no core to run on."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        self.saved = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved)


class _eval_mode:
    """Put a module in eval mode for a block and restore its previous mode after."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __enter__(self):
        self.was_training = self.module.training
        self.module.eval()
        return self.module

    def __exit__(self, *exc):
        self.module.train(self.was_training)


def _device_of(module: torch.nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _row_ids(split, rows: Sequence[int]) -> list:
    if "id" in split.column_names:
        ids = split.select_columns(["id"])[list(rows)]["id"] if len(rows) else []
        return list(ids)
    return [f"row {r}" for r in rows]


# ---------------------------------------------------------------------------------------------- text
def _text_batches(model, plots: list, rows: np.ndarray, batch_size: int):
    """(rows, input_ids, attention_mask) batches: tokenized in groups, longest first, each padded to its own
    longest plot (columns that are padding for every row of the batch are dropped, on either side)."""
    tokenizer = GenreProcessor.from_model(model).get_tokenizer()
    for g in range(0, len(rows), TEXT_GROUP):
        group = torch.as_tensor(rows[g : g + TEXT_GROUP])
        enc = tokenize(tokenizer, model.config, [plots[int(r)] for r in group])
        ids, attn = enc["input_ids"], enc["attention_mask"]
        order = torch.argsort(attn.sum(1), descending=True, stable=True)
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            a = attn[idx]
            keep = a.any(0)
            yield group[idx], ids[idx][:, keep], a[:, keep]


class _EncodeText:
    """Worker-side: one token batch → features with the worker's own copy of the text tower."""

    def __init__(self, tower: torch.nn.Module):
        self.tower = tower
        self._ready = False

    def __call__(self, batch):
        rows, ids, attn = batch
        if not self._ready:
            _setup_compute_worker()
            self._ready = True
        with torch.no_grad():
            return rows, self.tower(input_ids=ids, attention_mask=attn)


def compute_text_features(
    model, split, batch_size: int = 64, num_workers: Optional[int] = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plots → text-tower features, encoded in batches of similar length (little padding).

    On CPU with `num_workers` > 0 (None: one per core) the batches are encoded in worker processes, each with its
    own copy of the tower on its share of the cores (checked first to give `model.encode_text`'s numbers);
    otherwise in this process on the tower's device.
    """
    tower = model_tower(model, "text")
    n = len(split)
    plots = split.select_columns(["plot"])[:]["plot"]  # one Arrow → list conversion (a Column indexes row by row)
    present = np.array([plot_present(p) for p in plots], dtype=bool)
    rows = np.flatnonzero(present)
    features = torch.zeros(n, tower.out_dim, dtype=torch.float32)
    mask = torch.from_numpy(present)
    if len(rows) == 0:
        return features, mask
    device = _device_of(tower)
    workers = default_num_workers() if num_workers is None else int(num_workers)
    with _eval_mode(tower):
        batches = _text_batches(model, plots, rows, batch_size)
        worker_tower = fast = None
        if device.type == "cpu" and workers > 0:
            batches = list(batches)  # token ids only: a few bytes per token
            fast = _fast_text_encoder(model, batches[-1])
            if fast is None:
                with _main_threads(1):
                    worker_tower = _worker_text_tower(model, batches[-1])
        with progress(total=len(rows), desc="featurizing plots", unit="plots") as bar:
            if fast is not None:
                with torch.inference_mode():
                    for batch_rows, ids, attn in batches:
                        features[batch_rows] = fast.encode_text(ids, attn).float()
                        bar.update(len(batch_rows))
            elif worker_tower is not None:
                loader = torch.utils.data.DataLoader(
                    batches, batch_size=None, num_workers=workers, prefetch_factor=2,
                    collate_fn=_EncodeText(worker_tower),
                )
                with _main_threads(1):
                    for batch_rows, out in loader:
                        features[batch_rows] = out.float()
                        bar.update(len(batch_rows))
            else:
                with torch.inference_mode():
                    for batch_rows, ids, attn in batches:
                        features[batch_rows] = model.encode_text(ids.to(device), attn.to(device)).float().cpu()
                        bar.update(len(batch_rows))
    return features, mask


# tower -> (its weights' identity, the FastPath built for it): the export takes ~10-30 s for a 110 M encoder, and
# a run featurizes three splits with the same frozen tower.
_FAST_TEXT: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _weights_identity(tower: torch.nn.Module) -> tuple:
    # An in-place update (an optimizer step) bumps a tensor's version; a new tensor has a new address.
    return tuple((p.data_ptr(), p._version) for p in tower.parameters())


def _fast_text_encoder(model, sample) -> Optional[FastPath]:
    """The text tower in ONNX Runtime on every core (mmgcs.fast_path: checked there against the eager tower within
    1e-4), when it builds here and MMGCS_FAST_PATH is not 0; None → the worker processes' eager towers. Built once
    per tower and weights. Measured on 256 plots of data/movies (2 cores): all-mpnet-base-v2 29.0 plots/s vs 14.1
    in workers, the same features within 6e-7."""
    if not fast_path_setting():
        return None
    tower = model_tower(model, "text")
    identity = _weights_identity(tower)
    known = _FAST_TEXT.get(tower)
    if known is not None and known[0] == identity:
        return known[1]
    _, ids, attn = sample
    fast = FastPath(model)
    with torch.inference_mode():
        fast.encode_text(ids[:2], attn[:2])  # builds the encoder and checks it
    fast = fast if fast.text_kind() == "onnxruntime" else None
    _FAST_TEXT[tower] = (identity, fast)
    return fast


def _worker_text_tower(model, sample) -> Optional[torch.nn.Module]:
    """An eval-mode copy of the text tower for the workers, if it computes exactly `model.encode_text`."""
    _, ids, attn = sample
    ids, attn = ids[:2], attn[:2]
    copy_ = copy.deepcopy(model.text_tower).eval()
    with torch.no_grad():
        if outputs_agree(copy_(input_ids=ids, attention_mask=attn), model.encode_text(ids, attn)):
            return copy_
    logger.info("model.encode_text is not just its text tower; encoding in the main process")
    return None


# --------------------------------------------------------------------------------------------- image
class _PosterRows(torch.utils.data.Dataset):
    """(row, encoded poster) for the given rows; a batch is fetched from Arrow in one `take`."""

    def __init__(self, split, rows: np.ndarray):
        self.split = split
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        r = int(self.rows[i])
        return r, self.split[r]["poster"]

    def __getitems__(self, indices: list[int]):
        rows = [int(self.rows[i]) for i in indices]
        return list(zip(rows, self.split[rows]["poster"]))


class _DecodePosters:
    """Encoded posters → one float batch through the model's eval transform (runs in DataLoader workers).

    Exactly the processor's path (`load_image` then `GenreProcessor.image_transform(False)`), so the features equal
    what the model computes on raw posters. A poster that cannot be decoded is returned as an error, not raised.
    """

    def __init__(self, transform, channels_last: bool):
        self.transform = transform
        self.channels_last = channels_last
        self.split = split_eval_transform(transform)

    def __call__(self, items):
        rows, images, bad = [], [], []
        resize = self.split[0] if self.split else self.transform
        for r, poster in items:
            try:
                images.append(resize(load_image(poster)))
                rows.append(r)
            except InvalidImageError as e:
                bad.append((r, str(e)))
        if not images:
            pixels = torch.empty(0)
        elif self.split:
            pixels = to_normalized_batch(images, *self.split[1:])
        else:
            pixels = torch.stack(images)
        if self.channels_last and pixels.ndim == 4:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        return torch.tensor(rows, dtype=torch.long), pixels, bad


class _FeaturizePosters(_DecodePosters):
    """Decode *and* encode in the worker: each worker runs its own copy of the tower on one thread.

    On CPU this beats "workers decode, main process encodes" (4,048 posters, 2 busy cores: 73 vs 18 posters/s): no
    process waits for another, and single-threaded towers waste no time in thread synchronization, above all on a
    busy machine.
    """

    def __init__(self, transform, encoder: "torch.nn.Module | bytes"):
        super().__init__(transform, channels_last=True)
        self.encoder = encoder  # an eager tower, or the optimized one saved by FastImageEncoder.save
        self._encoder = None

    def __call__(self, items):
        rows, pixels, bad = super().__call__(items)
        if len(rows) == 0:
            return rows, torch.empty(0), bad
        with torch.inference_mode(False), torch.no_grad():
            if self._encoder is None:  # first batch of this worker
                _setup_compute_worker()
                self._encoder = FastImageEncoder.load(self.encoder) if isinstance(self.encoder, bytes) else self.encoder
            return rows, self._encoder(pixels), bad


class _MainEncoder:
    """Pixel batches → features in this process (workers only decode): the tower's fast encoder when it gives
    `model.encode_image`'s numbers, else `model.encode_image`; chosen on the first batch."""

    def __init__(self, model, tower: torch.nn.Module, device: torch.device, optimize: bool):
        self.model, self.tower, self.device, self.optimize = model, tower, device, optimize
        self._encoder: Optional[Callable] = None

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.device)
        if self._encoder is None:
            with torch.no_grad():  # tracing must not run under inference mode
                self._encoder = self._choose(pixels[:4])
        step = CPU_FORWARD_BATCH * torch.get_num_threads() if self.device.type == "cpu" else len(pixels)
        with torch.inference_mode():
            return torch.cat([self._encoder(pixels[s : s + step]) for s in range(0, len(pixels), step)])

    def _choose(self, sample: torch.Tensor) -> Callable:
        if self.optimize and outputs_agree(self.tower(sample), self.model.encode_image(sample)):
            fast = self.tower.fast_encoder(sample)
            if fast is not None:
                return fast
        return self.model.encode_image


def _poster_presence(split) -> np.ndarray:
    flags = []
    posters = split.select_columns(["poster"])
    for start in range(0, len(posters), 2048):
        flags.extend(poster_present(p) for p in posters[start : start + 2048]["poster"])
    return np.array(flags, dtype=bool)


def _undecoded_posters(split):
    """The poster column alone, left encoded: workers decode; the main process never does."""
    posters = split.select_columns(["poster"])
    if isinstance(posters.features["poster"], Image) and posters.features["poster"].decode:
        posters = posters.cast_column("poster", Image(decode=False))
    return posters


def compute_image_features(
    model, split, batch_size: int = 64, num_workers: Optional[int] = None, encode_in_workers: Optional[bool] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posters → image-tower features; undecodable posters are reported by id and masked out.

    On CPU with workers, each worker decodes and encodes batches of `CPU_FORWARD_BATCH` posters with its own copy
    of the tower (checked first to give `model.encode_image`'s numbers); otherwise workers decode and the main
    process encodes batches of `batch_size` on the tower's device. `encode_in_workers=False` forces the latter.
    """
    tower = model_tower(model, "image")
    posters = _undecoded_posters(split)
    rows = np.flatnonzero(_poster_presence(posters))
    features = torch.zeros(len(split), tower.out_dim, dtype=torch.float32)
    mask = torch.zeros(len(split), dtype=torch.bool)
    if len(rows) == 0:
        return features, mask
    device = _device_of(tower)
    workers = default_num_workers() if num_workers is None else int(num_workers)
    transform = GenreProcessor.from_model(model).image_transform(False)
    optimize = len(rows) >= MIN_POSTERS_TO_OPTIMIZE
    bad: list[tuple[int, str]] = []
    with _eval_mode(tower):
        in_workers = device.type == "cpu" and workers > 0 and encode_in_workers is not False
        with _main_threads(1):  # a few posters and one trace; idle OpenMP threads would only spin against the workers
            worker_encoder = _worker_encoder(model, posters, rows, transform, optimize) if in_workers else None
        loader = _poster_loader(posters, rows, transform, worker_encoder, batch_size, workers, device)
        encode = _MainEncoder(model, tower, device, optimize) if worker_encoder is None else None
        threads = _main_threads(1) if worker_encoder is not None else contextlib.nullcontext()
        with threads, progress(total=len(rows), desc="featurizing posters", unit="posters") as bar:
            for batch_rows, out, batch_bad in loader:
                bad.extend(batch_bad)
                bar.update(len(batch_rows) + len(batch_bad))
                if len(batch_rows) == 0:
                    continue
                features[batch_rows] = (encode(out) if encode is not None else out).float().cpu()
                mask[batch_rows] = True
    if bad:
        _warn_undecodable(split, bad)
    return features, mask


def _poster_loader(posters, rows, transform, worker_encoder, batch_size: int, workers: int, device: torch.device):
    """Workers that decode and encode (`worker_encoder` given) or only decode batches of posters."""
    if worker_encoder is not None:
        collate, loader_batch = _FeaturizePosters(transform, worker_encoder), min(batch_size, CPU_FORWARD_BATCH)
    else:
        collate, loader_batch = _DecodePosters(transform, channels_last=device.type == "cpu"), batch_size
    return torch.utils.data.DataLoader(
        _PosterRows(posters, rows),
        batch_size=loader_batch,
        num_workers=workers,
        collate_fn=collate,
        prefetch_factor=4 if workers > 0 else None,
    )


def _warn_undecodable(split, bad: list[tuple[int, str]]) -> None:
    ids = _row_ids(split, [r for r, _ in bad])
    details = "; ".join(f"id {i}: {msg}" for i, (_, msg) in list(zip(ids, bad))[:10])
    warnings.warn(
        f"{len(bad)} poster(s) could not be decoded and are treated as missing (mask False): {details}"
        f"{' ...' if len(bad) > 10 else ''}. Fix or remove them in the source data and rebuild the dataset.",
        FeatureCacheWarning,
        stacklevel=4,
    )


def _worker_encoder(model, posters, rows, transform, optimize: bool) -> "torch.nn.Module | bytes | None":
    """What the workers encode posters with, if it computes exactly `model.encode_image` (else None): the tower's
    fast encoder, built and checked here once and passed as bytes (any start method can send them; each worker
    loads it in a fraction of a second instead of tracing its own), or an eager copy of the tower."""
    sample_rows, sample, _ = _DecodePosters(transform, channels_last=False)(
        [(int(r), posters[int(r)]["poster"]) for r in rows[:8]]
    )
    if len(sample_rows) == 0:
        return None
    copy_ = copy.deepcopy(model.image_tower).eval()
    with torch.no_grad():
        if not outputs_agree(copy_(sample[:2]), model.encode_image(sample[:2])):
            logger.info("model.encode_image is not just its image tower; encoding in the main process")
            return None
        fast = copy_.fast_encoder(sample[:2]) if optimize else None
    if isinstance(fast, FastImageEncoder):
        return fast.save()
    return fast if fast is not None else copy_
