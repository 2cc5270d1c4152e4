"""mmgcs/models/image_fast.py: the fast EfficientNet encoder behind the feature cache. Static "SAME" padding is exact
for every kernel and stride, and the optimized encoder agrees with the eager tower (eager again at another size)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.layers.conv2d_same import Conv2dSame

import mmgcs.models.image_fast as F


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
