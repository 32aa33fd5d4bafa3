"""The reference ops against independent float64 formulations: explicit loops for the
attention ops, torchvision for the deformable convolution (values and every gradient)."""

import math

import pytest
import torch
from conftest import torchvision_ops

from stt_kernels import reference


def _loop_attention(q, k, v, scale, sequence_axes):
    """Softmax attention written out token by token, for tiny inputs.

    ``sequence_axes``: which of (T, H, W) form the sequence; the rest index separate sequences.
    """
    b, t, h, w, heads, d = q.shape
    out = torch.zeros_like(q)
    positions = [(ti, hi, wi) for ti in range(t) for hi in range(h) for wi in range(w)]

    def same_sequence(p1, p2):
        return all(p1[axis] == p2[axis] for axis in range(3) if axis not in sequence_axes)

    for bi in range(b):
        for head in range(heads):
            for p in positions:
                keys = [p2 for p2 in positions if same_sequence(p, p2)]
                scores = [scale * float(torch.dot(q[(bi, *p, head)], k[(bi, *p2, head)])) for p2 in keys]
                top = max(scores)
                weights = [math.exp(s - top) for s in scores]
                total = sum(weights)
                for weight, p2 in zip(weights, keys):
                    out[(bi, *p, head)] += weight / total * v[(bi, *p2, head)]
    return out


@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1, 3), (2, 3, 2, 3, 2, 4), (1, 4, 1, 5, 1, 5)])
def test_spatial_attention_matches_loops(shape):
    q, k, v = (torch.randn(shape, dtype=torch.float64) for _ in range(3))
    scale = 0.7
    expected = _loop_attention(q, k, v, scale, sequence_axes=(1, 2))
    torch.testing.assert_close(reference.spatial_attention(q, k, v, scale), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1, 3), (2, 3, 2, 3, 2, 4), (1, 5, 1, 2, 3, 2)])
def test_temporal_attention_matches_loops(shape):
    q, k, v = (torch.randn(shape, dtype=torch.float64) for _ in range(3))
    scale = 1.3
    expected = _loop_attention(q, k, v, scale, sequence_axes=(0,))
    torch.testing.assert_close(reference.temporal_attention(q, k, v, scale), expected, rtol=1e-12, atol=1e-12)


def _deform_inputs(n, c, h, w, c_out, kh, kw, groups, weight_groups, stride, padding, dilation, with_mask, spread):
    ho = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    wo = (w + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    f64 = dict(dtype=torch.float64, requires_grad=True)
    x = torch.randn(n, c, h, w, **f64)
    offset = (torch.randn(n, 2 * groups * kh * kw, ho, wo, dtype=torch.float64) * spread).requires_grad_()
    mask = torch.rand(n, groups * kh * kw, ho, wo, **f64) if with_mask else None
    weight = torch.randn(c_out, c // weight_groups, kh, kw, **f64)
    bias = torch.randn(c_out, **f64)
    return x, offset, mask, weight, bias


DEFORM_CASES = [
    # n, c, h, w, c_out, kh, kw, G, wg, stride, padding, dilation, mask, offset spread (pixels)
    (2, 6, 7, 9, 4, 3, 3, 2, 1, 1, 1, 1, True, 1.5),
    (1, 4, 5, 6, 6, 3, 2, 1, 2, 2, 0, 1, False, 3.0),
    (2, 6, 8, 7, 3, 3, 3, 3, 3, 1, 2, 2, True, 6.0),  # offsets far beyond the borders
    (1, 3, 1, 1, 2, 1, 1, 1, 1, 1, 0, 1, True, 0.8),  # 1 x 1 image
]


@pytest.mark.parametrize("case", DEFORM_CASES)
def test_deform_conv2d_matches_torchvision(case):
    *sizes, stride, padding, dilation, with_mask, spread = case
    x, offset, mask, weight, bias = _deform_inputs(*sizes, stride, padding, dilation, with_mask, spread)
    args = ((stride, stride), (padding, padding), (dilation, dilation))
    ours = reference.deform_conv2d(x, offset, mask, weight, bias, *args)
    theirs = torchvision_ops().deform_conv2d(x, offset, weight, bias, *args, mask=mask)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)

    inputs = [t for t in (x, offset, mask, weight, bias) if t is not None]
    grad = torch.randn_like(ours)
    for mine, tv in zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(theirs, inputs, grad)):
        torch.testing.assert_close(mine, tv, rtol=1e-10, atol=1e-10)


def test_deform_conv2d_integer_offsets_keep_their_gradient():
    """At whole-pixel sampling points the offset gradient is torchvision's one-sided
    derivative, not zero (a naive |.|-based bilinear weight gets this wrong)."""
    x, offset, mask, weight, bias = _deform_inputs(1, 2, 5, 5, 2, 3, 3, 1, 1, 1, 1, 1, True, 0.0)
    with torch.no_grad():
        offset.copy_(torch.randint(-2, 3, offset.shape).double())
    args = ((1, 1), (1, 1), (1, 1))
    ours = reference.deform_conv2d(x, offset, mask, weight, bias, *args).sum()
    theirs = torchvision_ops().deform_conv2d(x, offset, weight, bias, *args, mask=mask).sum()
    (g_ours,) = torch.autograd.grad(ours, offset)
    (g_theirs,) = torch.autograd.grad(theirs, offset)
    assert g_theirs.abs().sum() > 0
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-10, atol=1e-10)
