"""On-disk cache of frozen towers' features, and fast featurization of posters and plots.

A frozen tower gives the same output for a row in every epoch, so training a fusion head over it needs the tower
run once per row, not once per epoch. `FeatureCache.get_or_compute` runs it once and stores the result under a
key made of everything the features depend on:

- the tower's own `cache_key(cfg, tokenizer)` (mmgcs.models.tower): its type, backbone name, resolved backbone
  config, pooling, a hash of its *current* weights, and its preprocessing (image size / mean / std /
  interpolation / crop and the transform itself, or the tokenizer's full definition and the maximum text length);
- the rows: the content of the one column the tower reads, with the row ids and count (`keys`).

`keys`: key composition and content digests; `store`: the files (atomic writes, damaged files recomputed, a full
disk downgraded to "this run only"); `locks`: one writer per entry among the processes and machines sharing a
cache folder; `workers`: featurization in DataLoader workers. The fast EfficientNet
encoder the workers run is the image tower's (`tower.fast_encoder`, mmgcs.models.image_fast).
"""

from mmgcs.features.keys import (
    CACHE_FORMAT,
    COLUMNS,
    MODALITIES,
    column_digest,
    feature_key,
    key_digest,
    tokenizer_fingerprint,
    weights_hash,
)
from mmgcs.features.locks import CacheLockTimeout
from mmgcs.features.store import DEFAULT_CACHE_DIR, FeatureCache
from mmgcs.features.workers import (
    FeatureCacheWarning,
    compute_features,
    compute_image_features,
    compute_text_features,
    default_num_workers,
)
from mmgcs.models.image_fast import FastImageEncoder, static_same_padding

__all__ = [
    "CACHE_FORMAT",
    "COLUMNS",
    "CacheLockTimeout",
    "DEFAULT_CACHE_DIR",
    "MODALITIES",
    "FastImageEncoder",
    "FeatureCache",
    "FeatureCacheWarning",
    "column_digest",
    "compute_features",
    "compute_image_features",
    "compute_text_features",
    "default_num_workers",
    "feature_key",
    "key_digest",
    "static_same_padding",
    "tokenizer_fingerprint",
    "weights_hash",
]
