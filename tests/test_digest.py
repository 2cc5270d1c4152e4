"""mmgcs.digest: the framing of the tensors digest is stored on disk (feature-cache keys, frozen_weights.json of every
checkpoint), so it is pinned here against hashlib fed by hand; the tower hash and the checkpoint record go through it."""

from __future__ import annotations

import functools
import hashlib

import torch

from mmgcs.digest import file_sha256, tensors_digest
from mmgcs.models.tower import weights_hash
from mmgcs.testing import tiny_model


def _by_hand(tensors: dict, digest) -> str:
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.contiguous().numpy().tobytes())
    return digest.hexdigest()


def test_the_framing_is_name_dtype_shape_and_bytes_in_name_order():
    tensors = {"b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.tensor([1, 2], dtype=torch.int64),
               "c": torch.zeros(0), "d": torch.tensor(3.5, dtype=torch.float16)}
    assert tensors_digest(tensors) == _by_hand(tensors, hashlib.sha256())
    blake = functools.partial(hashlib.blake2b, digest_size=16)
    assert tensors_digest(tensors, blake) == _by_hand(tensors, blake())
    assert len(tensors_digest(tensors, blake)) == 32


def test_the_digest_follows_values_names_dtypes_and_shapes_not_layout():
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    base = tensors_digest({"w": t})
    assert tensors_digest({"w": t.t().contiguous().t()}) == base  # another memory layout, the same tensor
    assert tensors_digest({"w": t.clone().requires_grad_()}) == base
    changed = t.clone()
    changed[1, 2] += 1e-6
    assert len({base, tensors_digest({"w": changed}), tensors_digest({"v": t}), tensors_digest({"w": t.double()}),
                tensors_digest({"w": t.reshape(3, 2)})}) == 5


def test_a_towers_cache_hash_is_the_shared_digest_of_its_state_dict():
    model = tiny_model()
    tower = model.text_tower
    state = tower.state_dict()
    blake = functools.partial(hashlib.blake2b, digest_size=16)
    assert weights_hash(tower) == tensors_digest(state, blake)
    skipped = sorted(state)[:2]
    assert weights_hash(tower, exclude=skipped) == tensors_digest({k: v for k, v in state.items() if k not in skipped},
                                                                  blake)
    assert weights_hash(tower, exclude=skipped) != weights_hash(tower)


def test_file_sha256_reads_the_whole_file(tmp_path):
    data = bytes(range(256)) * 9000  # more than one 1 MiB block
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
