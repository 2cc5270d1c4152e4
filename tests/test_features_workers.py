"""The fast image encoder behind the feature cache: static "SAME" padding is exact, the optimized encoder agrees
with the eager tower, and worker processes never hang whatever their number."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
from timm.layers.conv2d_same import Conv2dSame

import mmgcs.features as F
import mmgcs.features.workers as W


def _same_convs(module) -> int:
    return sum(type(m) is Conv2dSame for m in module.modules())


@pytest.mark.parametrize("size", [31, 32, 33])
def test_static_same_padding_is_exact_for_every_kernel_and_stride(size):
    torch.manual_seed(0)
    layers = [
        Conv2dSame(3, 8, 3, stride=2),  # even size: one more column right than left
        Conv2dSame(8, 8, 5, stride=2, groups=8),  # depthwise, pads 1+2 or 2+2
        Conv2dSame(8, 6, 4, stride=1),  # even kernel at stride 1: asymmetric too
        Conv2dSame(6, 6, (3, 5), stride=(3, 1), bias=False),  # non-square kernel, unequal strides
        Conv2dSame(6, 4, 1, stride=2),  # no padding at all
    ]
    net = torch.nn.Sequential(*layers).eval()
    x = torch.randn(2, 3, size, size)
    fixed = copy.deepcopy(net)
    assert F.static_same_padding(fixed, x) == 5
    assert _same_convs(fixed) == 0
    with torch.no_grad():
        torch.testing.assert_close(fixed(x), net(x), rtol=0, atol=1e-5)


def test_static_same_padding_of_a_tf_efficientnet_keeps_its_outputs():
    torch.manual_seed(0)
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, as in trained weights
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 64, 64)
    fixed = copy.deepcopy(net)
    assert _same_convs(net) == 5 and F.static_same_padding(fixed, x) == 5 and _same_convs(fixed) == 0
    with torch.no_grad():
        reference = net(x)
        torch.testing.assert_close(fixed(x), reference, rtol=0, atol=1e-5)
        encoder = F.FastImageEncoder(net, x)
        assert encoder.kind == "torchscript-frozen"
        torch.testing.assert_close(encoder(x), reference, rtol=1e-4, atol=1e-4)
        other = torch.randn(1, 3, 96, 96)  # another image size: the static padding does not fit; eager runs
        torch.testing.assert_close(encoder(other), net(other))
    assert _same_convs(net) == 5  # the tower itself is untouched
    assert not torch.jit.onednn_fusion_enabled()  # the process-wide switch is restored


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
