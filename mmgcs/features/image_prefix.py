"""`ImagePrefixCache`: the frozen bottom of a partially tuned image tower, run once per split and kept on disk.

With `train.image_finetune=partial` and `image_trainable_blocks=k`, the stem and the stages below the last k give the
same feature map every epoch for a poster at the eval transform. That map (the input of the first trainable stage,
mmgcs/models/image_prefix.py) is computed once per split and stored like the text prefix (`PrefixCache`, whose key,
lock and store it reuses): one safetensors file per key, computed under the entry's lock, written atomically. The key
holds the tower's backbone, a digest of the frozen bottom's weights, where the tower is cut, the image size and eval
transform, the posters read and the storage dtype.

Only the rows with a poster hold a map; a row without one (no poster, or one that cannot be decoded: the feature
cache's rule, warned about by id) is masked out (`image_mask` False) and never runs through the trainable top: its
features are zeros, as the feature cache holds them (mmgcs.models.image_prefix.features_from_prefix). So the tuned
BatchNorms' batch statistics come from real posters only; the raw path (train.prefix_cache=false) runs the whole tower
on a zero image for such a row, so the two agree exactly on the rows of a batch where every movie has a poster.

Posters are never augmented on this path: every epoch sees each poster's one eval view (see train.prefix_cache).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from mmgcs.features.keys import column_digest, model_tower
from mmgcs.features.prefix import PREFIX_FORMAT, STORAGE_DTYPES, PrefixCache, check_prefix_inputs
from mmgcs.features.workers import _poster_presence, _undecoded_posters, compute_image_features
from mmgcs.models.image_prefix import ImageBottom, image_cut, prefix_key

logger = logging.getLogger(__name__)


@dataclass
class CachedImagePrefix:
    """One split's image prefix: `maps` (P, C, H, W) the feature maps of the P rows with a usable poster, in row
    order; `mask` (N,): whether row i has one (a row without reads zeros, masked out)."""

    maps: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self) -> None:
        # Row i's map is maps[rank[i]] when mask[i] (rank: how many usable posters come before it).
        self.rank = torch.cumsum(self.mask.reshape(-1).to(torch.int64), 0) - 1

    def __len__(self) -> int:
        return len(self.mask)

    def feature_map(self, row: int) -> torch.Tensor:
        return self.maps[int(self.rank[row])] if bool(self.mask[row]) else self.maps.new_zeros(self.maps.shape[1:])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"maps": self.maps, "mask": self.mask}

    def problem(self, n_rows: int, dtype: torch.dtype) -> Optional[str]:
        """What is wrong with a loaded prefix for `n_rows` rows stored as `dtype` (None: nothing)."""
        if self.mask.shape != (n_rows,) or self.mask.dtype != torch.bool:
            return f"its mask has shape {tuple(self.mask.shape)} for {n_rows} rows"
        if self.maps.ndim != 4 or self.maps.shape[0] != int(self.mask.sum()):
            return f"its maps have shape {tuple(self.maps.shape)} for {int(self.mask.sum())} posters"
        if self.maps.dtype != dtype:
            return f"it holds {self.maps.dtype}, not {dtype}"
        return None if bool(torch.isfinite(self.maps).all()) else "it holds non-finite values"


def image_prefix_key(model, split, dtype: str) -> dict:
    """Everything the image prefix of `split` under `model`'s (partially tuned) image tower depends on, JSON-able."""
    tower = model_tower(model, "image")
    check_prefix_inputs(split, "poster", "image prefix", dtype)
    return {
        "format": PREFIX_FORMAT,
        "modality": "image_prefix",
        **prefix_key(tower, model.config),
        "image_size": model.config.image_size,
        "dtype": dtype,
        "dataset": {
            "column": "poster",
            "content": column_digest(split, "poster"),
            "ids": column_digest(split, "id") if "id" in split.column_names else None,
            "num_rows": len(split),
        },
    }


class _BottomAsModel:
    """What `compute_image_features` reads of a model (its image tower, `encode_image`, the config its processor's
    eval transform comes from), with the frozen bottom as the tower: the feature cache's poster pipeline (decoding
    workers, the traced and fused encoder where it gives the same numbers, undecodable posters masked and reported)
    then computes the feature maps."""

    def __init__(self, model, bottom: ImageBottom):
        self.image_tower, self.config = bottom, model.config  # the config: the processor's poster transform

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_tower(pixels)


def compute_image_prefix(model, split, batch_size: int = 64, dtype: torch.dtype = torch.float32,
                         num_workers: Optional[int] = None) -> CachedImagePrefix:
    """Run the image tower's frozen bottom (eval mode, no gradients) over the posters of `split` at the eval
    transform, in workers as the feature cache runs the whole tower (`num_workers`, None: one a core)."""
    tower = model_tower(model, "image")
    bottom = ImageBottom(tower, image_cut(tower), model.config.image_size)
    present = np.flatnonzero(_poster_presence(_undecoded_posters(split)))
    maps = torch.empty(0, *bottom.map_shape, dtype=dtype)
    mask = torch.zeros(len(split), dtype=torch.bool)
    if len(present):
        flat, decoded = compute_image_features(_BottomAsModel(model, bottom), split.select(present),
                                               batch_size=batch_size, num_workers=num_workers)
        maps = flat[decoded].reshape(-1, *bottom.map_shape).to(dtype)
        mask[torch.as_tensor(present)[decoded]] = True
    return CachedImagePrefix(maps.contiguous(), mask)


class ImagePrefixCache(PrefixCache):
    """Cached image prefixes on disk, one safetensors file per key (see `image_prefix_key`): `PrefixCache`'s lookups,
    lock and store over `compute_image_prefix`. `num_workers`: the feature cache's poster workers (None: one a core)."""

    what = "image prefix"

    def __init__(self, *args, num_workers: Optional[int] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_workers = num_workers

    def key(self, model, split) -> dict:
        return image_prefix_key(model, split, self.dtype)

    def compute(self, model, split, batch_size: int) -> CachedImagePrefix:
        return compute_image_prefix(model, split, batch_size=batch_size, dtype=STORAGE_DTYPES[self.dtype],
                                    num_workers=self.num_workers)

    @staticmethod
    def from_tensors(tensors: dict) -> CachedImagePrefix:
        return CachedImagePrefix(tensors["maps"], tensors["mask"])

    @staticmethod
    def describe(prefix: CachedImagePrefix) -> dict:
        return {"posters": int(prefix.maps.shape[0]), "map": list(prefix.maps.shape[1:])}


__all__ = ["CachedImagePrefix", "ImagePrefixCache", "compute_image_prefix", "image_prefix_key"]
