"""The ops and SSTAttention under CPU bfloat16 autocast: deform_conv2d takes its floating tensors
in the autocast dtype (a convolution, as autocast treats conv2d), the attention ops get q, k, v of
one dtype from their projection, and everything runs on the compiled cpu kernels, forward and
backward, close to float32."""

from __future__ import annotations

import pytest
import torch
from conftest import available

import stt_kernels

pytestmark = pytest.mark.skipif(not available("cpu"), reason="the cpu kernels are not built")


def _deform_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 9, 10, generator=g)
    offset = 2 * torch.randn(2, 18, 9, 10, generator=g)
    mask = torch.rand(2, 9, 9, 10, generator=g)
    weight = torch.randn(6, 8, 3, 3, generator=g) / 8
    bias = torch.randn(6, generator=g)
    return x, offset, mask, weight, bias


@pytest.mark.parametrize("call", ["public", "op"])
def test_deform_conv2d_casts_to_the_autocast_dtype(call):
    """Mixed float32 and bfloat16 tensors under autocast give what the same call on bfloat16
    copies gives, in bfloat16; float32 leaves get float32 gradients."""
    x, offset, mask, weight, bias = _deform_inputs()
    leaves = [t.requires_grad_() for t in (x, offset, mask, weight, bias)]
    args = (x.bfloat16(), offset, mask, weight, bias)  # a bfloat16 activation, float32 parameters

    def run(x, offset, mask, weight, bias):
        if call == "public":
            return stt_kernels.deform_conv2d(x, offset, mask, weight, bias, padding=1, backend="cpu")
        return torch.ops.stt.deform_conv2d(x, offset, mask, weight, bias, [1, 1], [1, 1], [1, 1], 1, "cpu")

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(*args)
    expected = run(*(t.detach().bfloat16() for t in args))
    assert out.dtype == torch.bfloat16
    assert torch.equal(out.detach(), expected)
    out.float().square().sum().backward()
    for t in leaves:
        assert t.grad is not None and t.grad.dtype == torch.float32 and t.grad.isfinite().all()


def test_deform_conv2d_outside_autocast_keeps_float32():
    x, offset, mask, weight, bias = _deform_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        out = stt_kernels.deform_conv2d(x, offset, mask, weight, bias, padding=1, backend="cpu")
    assert out.dtype == torch.float32


def test_deform_conv2d_autocast_leaves_float64():
    x, offset, mask, weight, bias = (t.double() for t in _deform_inputs())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = stt_kernels.deform_conv2d(x, offset, mask, weight, bias, padding=1, backend="cpu")
    assert out.dtype == torch.float64


def _module_and_input():
    torch.manual_seed(0)
    module = stt_kernels.SSTAttention(16, 2, offset_groups=2, backend="cpu")
    # The predictor starts at zero; random weights make the offsets and masks matter.
    torch.nn.init.normal_(module.fusion.predictor.weight, std=0.05)
    x = torch.randn(1, 16, 3, 8, 9)
    return module, x


def _grads(module):
    return {name: p.grad.clone() for name, p in module.named_parameters()}


def test_sst_attention_bfloat16_autocast_matches_float32():
    """Forward and backward on the cpu kernels (named, so a kernel without bfloat16 would raise
    rather than fall back), within bfloat16's tolerance of the float32 run; every parameter gets
    a finite gradient."""
    module, x = _module_and_input()
    expected = module(x)
    expected.square().mean().backward()
    expected_grads = _grads(module)
    module.zero_grad()

    x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    out.float().square().mean().backward()
    torch.testing.assert_close(out.float(), expected.detach(), rtol=2e-2, atol=3e-2)
    assert x.grad is not None and x.grad.isfinite().all()
    for name, grad in _grads(module).items():
        assert grad.isfinite().all(), name
        scale = expected_grads[name].abs().max().item()
        error = (grad - expected_grads[name]).abs().max().item()
        assert error <= 0.1 * scale + 1e-3, (name, error, scale)


def test_meta_tensors_have_no_autocast_and_pass_through():
    """Meta tensors (shape inference, the bench's planning) have no autocast state to read."""
    x, offset = torch.empty(2, 16, 4, 4, device="meta"), torch.empty(2, 18, 4, 4, device="meta")
    mask, weight = torch.empty(2, 9, 4, 4, device="meta"), torch.empty(8, 16, 3, 3, device="meta")
    assert stt_kernels.deform_conv2d(x, offset, mask, weight).shape == (2, 8, 4, 4)
