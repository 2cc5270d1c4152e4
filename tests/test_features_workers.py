"""Featurizing in DataLoader workers (mmgcs/features/workers.py): worker processes never hang whatever their number,
and batched poster decoding equals the model's transform (the fast encoder's static "SAME" padding and its agreement
with the eager tower: tests/test_models_image_fast.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import mmgcs.features as F
import mmgcs.features.workers as W


def test_featurizing_with_fewer_workers_than_cores_finishes():
    """A forked worker running more than one OpenMP thread hung forever (GNU OpenMP after fork) once the parent
    had run a parallel op: num_workers=1 on a 2-core machine never returned."""
    script = textwrap.dedent(
        """
        import io, warnings
        import numpy as np, PIL.Image, torch
        from datasets import Dataset, Features, Image, Value
        import mmgcs.features as F
        import mmgcs.features.workers as W
        from mmgcs.testing import tiny_model

        warnings.simplefilter("ignore")
        torch.set_num_threads(2)
        torch.randn(512, 512) @ torch.randn(512, 512)  # the parent's OpenMP pool is up
        def jpeg(i):
            buf = io.BytesIO()
            PIL.Image.fromarray(np.full((40, 30, 3), i * 20, np.uint8)).save(buf, format="JPEG")
            return {"bytes": buf.getvalue(), "path": None}
        split = Dataset.from_dict(
            {"id": list(range(6)), "plot": ["a plot %d" % i for i in range(6)], "poster": [jpeg(i) for i in range(6)]},
            features=Features({"id": Value("int64"), "plot": Value("string"), "poster": Image()}),
        )
        model = tiny_model(["A", "B"]).eval()
        W.MIN_POSTERS_TO_OPTIMIZE = 0
        image, mask = F.compute_image_features(model, split, batch_size=2, num_workers=1)
        text, _ = F.compute_text_features(model, split, batch_size=2, num_workers=1)
        assert bool(mask.all()) and image.abs().sum() > 0 and text.abs().sum() > 0
        assert torch.get_num_threads() == 2  # the main process's setting is restored
        print("done")
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    try:
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("featurizing with num_workers=1 hung")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("done")


@pytest.mark.parametrize("crop_mode", ["squash", "center"])
def test_batched_poster_decoding_equals_the_models_transform_bit_for_bit(crop_mode):
    import io

    import numpy as np
    import PIL.Image

    from mmgcs.data.images import load_image
    from mmgcs.processor import GenreProcessor
    from mmgcs.testing import tiny_model

    model = tiny_model(["A", "B"], image_crop_mode=crop_mode)
    transform = GenreProcessor.from_model(model).image_transform(False)
    rng = np.random.RandomState(0)
    posters = []
    for w, h in [(30, 45), (64, 64), (90, 40), (20, 20)]:
        buf = io.BytesIO()
        PIL.Image.fromarray(rng.randint(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
        posters.append(buf.getvalue())
    decode = W._DecodePosters(transform, channels_last=True)
    assert (decode.split is not None) == (crop_mode == "squash")  # the batched path only where it is exact
    rows, pixels, bad = decode(list(enumerate(posters)))
    assert rows.tolist() == [0, 1, 2, 3] and bad == []
    assert pixels.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(pixels, torch.stack([transform(load_image(p)) for p in posters]))
