"""The Triton deform_conv2d kernels (the interpreter without a GPU): float32 against
torchvision and the reference, values and gradients; 16-bit dtypes on a GPU only."""

from __future__ import annotations

import pytest
import torch
from conftest import GPU, requires_gpu, torchvision_ops
from test_deform_conv2d import (
    _away_from_integers,
    _channels_last,
    assert_matches,
    make_inputs,
    stt_call,
    values_and_grads,
)

torchvision_ops()

DEVICE = "cuda" if GPU else "cpu"

# Tiny sizes: the interpreter runs one program at a time.
CASES = {
    "plain": dict(n=2, c=4, c_out=3, h=7, w=5),
    "mask-none": dict(n=2, c=4, c_out=3, h=5, w=7, mask=False, bias=False),
    "stride-2-pad-2-dil-2": dict(n=2, c=4, c_out=5, h=9, w=7, stride=(2, 2), padding=(2, 2), dilation=(2, 2)),
    "pad-0-stride-2-1": dict(n=2, c=5, c_out=3, h=7, w=9, stride=(2, 1), padding=(0, 0)),
    "groups-2-weight-groups-2": dict(n=2, c=6, c_out=4, h=5, w=5, groups=2, weight_groups=2),
    "kernel-3x2-groups-2": dict(
        n=2, c=4, c_out=4, h=7, w=5, kernel=(3, 2), padding=(1, 0), groups=2, weight_groups=2, dilation=(1, 2)
    ),
    "wide-spread": dict(n=1, c=4, c_out=3, h=5, w=5, spread=5.0),
}


def _f32(case):
    return make_inputs(**CASES[case], dtype=torch.float32, device=DEVICE)


@pytest.mark.parametrize("case", list(CASES))
def test_float32_matches_torchvision(case):
    assert_matches(_f32(case), "triton", rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["plain", "groups-2-weight-groups-2"])
def test_float32_matches_reference(case):
    a = _f32(case)
    ref = lambda t: stt_call(t, "reference")  # noqa: E731
    assert_matches(a, "triton", rtol=1e-4, atol=1e-5, oracle=ref)


def test_channels_last_input():
    a = make_inputs(n=2, c=6, c_out=4, h=5, w=7, groups=3, weight_groups=2, dtype=torch.float32, device=DEVICE)
    assert_matches(_channels_last(a), "triton", rtol=1e-4, atol=1e-5)


def test_integer_offsets_match_torchvision():
    """Whole-pixel offsets put padded border taps on y = -1 / x = -1 exactly (one-sided gradient)."""
    a = make_inputs(
        n=2, c=4, c_out=3, h=5, w=7, groups=2, padding=(1, 2), dilation=(1, 2), dtype=torch.float32, device=DEVICE
    )
    a["offset"] = (torch.randint(-2, 3, a["offset"].shape) * (torch.rand(a["offset"].shape) < 0.5)).to(a["offset"])
    assert_matches(a, "triton", rtol=1e-4, atol=1e-5)


def test_batch_zero():
    a = make_inputs(n=0, c=4, c_out=3, h=5, w=5, dtype=torch.float32, device=DEVICE)
    out, grads, _ = values_and_grads(lambda t: stt_call(t, "triton"), a)
    assert out.shape == (0, 3, 5, 5)
    assert grads["weight"].shape == a["weight"].shape and not grads["weight"].any()


def test_float64_is_refused():
    a = make_inputs(n=1, c=4, c_out=3, h=5, w=5, device=DEVICE)
    with pytest.raises(TypeError, match="backend .triton. does not take float64 tensors for deform_conv2d"):
        stt_call(a, "triton")


def test_opcheck():
    a = make_inputs(n=1, c=4, c_out=3, h=5, w=5, groups=2, dtype=torch.float32, device=DEVICE)
    a["offset"] = _away_from_integers(a["offset"])
    args = (
        a["x"].requires_grad_(),
        a["offset"].requires_grad_(),
        a["mask"].requires_grad_(),
        a["weight"].requires_grad_(),
        a["bias"].requires_grad_(),
        [1, 1],
        [1, 1],
        [1, 1],
        2,
        "triton",
    )
    torch.library.opcheck(torch.ops.stt.deform_conv2d, args)


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["plain", "groups-2-weight-groups-2", "kernel-3x2-groups-2"])
def test_half_precision_against_float64(dtype, case):
    """Error to a float64 oracle at most twice the reference's own error in the same dtype."""
    a64 = make_inputs(**CASES[case], dtype=torch.float64, device=DEVICE)
    a16 = {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in a64.items()}
    exact, exact_grads, grad_out = values_and_grads(lambda t: stt_call(t, "reference"), a64)
    ref, ref_grads, _ = values_and_grads(lambda t: stt_call(t, "reference"), a16, grad_out.to(dtype))
    got, got_grads, _ = values_and_grads(lambda t: stt_call(t, "triton"), a16, grad_out.to(dtype))
    for name in ["out", *exact_grads]:
        e, r, g = (exact, ref, got) if name == "out" else (exact_grads[name], ref_grads[name], got_grads[name])
        ref_err = (r.double() - e).abs().max().item()
        err = (g.double() - e).abs().max().item()
        slack = 1e-2 * e.abs().max().item() + 1e-3
        assert err <= 2 * ref_err + slack, f"{name}: {err} vs reference {ref_err}"
