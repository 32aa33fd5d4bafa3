"""deform_conv2d against torchvision.ops.deform_conv2d and the float64 reference, every backend
that runs here: values and the gradients of x, offset, mask, weight and bias."""

from __future__ import annotations

import pytest
import torch
from conftest import available, requires_gpu, torchvision_ops

import stt_kernels

tv_ops = torchvision_ops()

CPU_BACKENDS = ["reference", "cpu"]


def _skip_unless(backend: str) -> None:
    if not available(backend):
        pytest.skip(stt_kernels.backends()[backend].reason)


def make_inputs(
    n=2,
    c=6,
    c_out=4,
    h=9,
    w=11,
    kernel=(3, 3),
    stride=(1, 1),
    padding=(1, 1),
    dilation=(1, 1),
    groups=1,
    weight_groups=1,
    mask=True,
    bias=True,
    spread=2.5,
    dtype=torch.float64,
    device="cpu",
):
    """Random inputs whose offsets move the sampling points over several pixels, a tenth of
    them far beyond the borders (whole taps reading zeros)."""
    kh, kw = kernel
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    x = torch.randn(n, c, h, w, dtype=dtype, device=device)
    offset = torch.randn(n, 2 * groups * kh * kw, ho, wo, dtype=dtype, device=device) * spread
    far = torch.rand(offset.shape, device=device) < 0.1
    offset = torch.where(far, offset.sign() * (max(h, w) + 2 * spread) + offset, offset)
    m = torch.rand(n, groups * kh * kw, ho, wo, dtype=dtype, device=device) if mask else None
    weight = torch.randn(c_out, c // weight_groups, kh, kw, dtype=dtype, device=device) / (c * kh * kw) ** 0.5
    b = torch.randn(c_out, dtype=dtype, device=device) if bias else None
    return dict(x=x, offset=offset, mask=m, weight=weight, bias=b, stride=stride, padding=padding, dilation=dilation)


def torchvision_call(a):
    return tv_ops.deform_conv2d(
        a["x"],
        a["offset"],
        a["weight"],
        a["bias"],
        stride=a["stride"],
        padding=a["padding"],
        dilation=a["dilation"],
        mask=a["mask"],
    )


def stt_call(a, backend):
    return stt_kernels.deform_conv2d(
        a["x"],
        a["offset"],
        a["mask"],
        a["weight"],
        a["bias"],
        stride=a["stride"],
        padding=a["padding"],
        dilation=a["dilation"],
        backend=backend,
    )


def grad_names(a):
    return [k for k in ("x", "offset", "mask", "weight", "bias") if a[k] is not None]


def values_and_grads(fn, a, grad_out=None):
    """fn's output and the gradients of every tensor input, for a fixed random grad_out."""
    a = {k: (v.detach().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
    out = fn(a)
    if grad_out is None:
        grad_out = torch.randn_like(out)
    names = grad_names(a)
    grads = (
        torch.autograd.grad(out, [a[k] for k in names], grad_out, allow_unused=True)
        if out.numel()
        else [torch.zeros_like(a[k]) for k in names]
    )
    return out.detach(), dict(zip(names, grads)), grad_out


def assert_matches(a, backend, rtol=1e-9, atol=1e-10, oracle=torchvision_call):
    """backend's output and gradients against the oracle's on the same inputs."""
    expected, expected_grads, grad_out = values_and_grads(oracle, a)
    got, got_grads, _ = values_and_grads(lambda t: stt_call(t, backend), a, grad_out)
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)
    for name, value in expected_grads.items():
        torch.testing.assert_close(
            got_grads[name], value, rtol=rtol, atol=atol, msg=lambda m, name=name: f"grad {name}: {m}"
        )


CASES = {
    "plain": dict(),
    "mask-none": dict(mask=False, bias=False),
    "odd-stride-pad-dil": dict(h=13, w=10, stride=(2, 3), padding=(2, 0), dilation=(2, 1)),
    "groups-2": dict(c=6, groups=2),
    "groups-3-weight-groups-2": dict(c=6, c_out=4, groups=3, weight_groups=2),
    "weight-groups-3": dict(c=6, c_out=6, groups=2, weight_groups=3, kernel=(2, 3), padding=(0, 1)),
    "kernel-1x1": dict(kernel=(1, 1), padding=(0, 0), c=5, c_out=3),
    "kernel-5x3-batch-3": dict(n=3, kernel=(5, 3), padding=(2, 1), h=7, w=6),
    "wide-spread": dict(spread=6.0, h=5, w=7),
    "large-image-tiles": dict(n=1, c=4, c_out=3, h=40, w=37, groups=2),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_float64_matches_torchvision(backend, case):
    _skip_unless(backend)
    assert_matches(make_inputs(**CASES[case]), backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float32_against_float64_reference(backend):
    _skip_unless(backend)
    a64 = make_inputs(n=2, c=8, c_out=8, h=17, w=15, groups=2)
    a32 = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in a64.items()}
    expected, expected_grads, grad_out = values_and_grads(lambda t: stt_call(t, "reference"), a64)
    got, got_grads, _ = values_and_grads(lambda t: stt_call(t, backend), a32, grad_out.float())
    for name, value, result in [("out", expected, got)] + [(k, v, got_grads[k]) for k, v in expected_grads.items()]:
        scale = value.abs().max().item()
        torch.testing.assert_close(
            result.double(), value, rtol=1e-5, atol=1e-5 * scale, msg=lambda m, name=name: f"{name}: {m}"
        )


def _low_precision_errors(a64, dtype, backend):
    """Per output and gradient: (error of backend in dtype, error of the reference run in dtype),
    both against the float64 reference on the same inputs (rounded to dtype first)."""
    low = {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in a64.items()}
    rounded = {k: (v.to(torch.float64) if isinstance(v, torch.Tensor) else v) for k, v in low.items()}
    expected, expected_grads, grad_out = values_and_grads(lambda t: stt_call(t, "reference"), rounded)
    got, got_grads, _ = values_and_grads(lambda t: stt_call(t, backend), low, grad_out.to(dtype))
    base, base_grads, _ = values_and_grads(lambda t: stt_call(t, "reference"), low, grad_out.to(dtype))
    assert got.dtype == dtype and all(g.dtype == dtype for g in got_grads.values())
    pairs = [("out", expected, got, base)] + [(k, v, got_grads[k], base_grads[k]) for k, v in expected_grads.items()]
    return {
        name: ((result.double() - value).abs().max().item(), (baseline.double() - value).abs().max().item(), value)
        for name, value, result, baseline in pairs
    }


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize(
    "case", ["plain", "mask-none", "odd-stride-pad-dil", "groups-3-weight-groups-2", "large-image-tiles"]
)
def test_cpu_16_bit_against_float64(dtype, case):
    """flash-attention's rule: the error to the float64 oracle at most twice that of the
    reference run in the same dtype, plus 1e-3 of the output's scale; forward and every gradient."""
    _skip_unless("cpu")
    a64 = make_inputs(**dict(CASES[case], c=16 if case == "plain" else CASES[case].get("c", 6)))
    for name, (error, baseline, value) in _low_precision_errors(a64, dtype, "cpu").items():
        allowed = 2 * baseline + 1e-3 * value.abs().max().item()
        assert error <= allowed, (name, error, allowed)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_cpu_16_bit_channels_last_and_auto(dtype):
    """A channels-last 16-bit x is read in place, and auto runs the cpu kernels for it: the same
    numbers as backend='cpu' on a contiguous copy."""
    _skip_unless("cpu")
    a = {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in make_inputs(c=8, groups=2).items()}
    expected, expected_grads, grad_out = values_and_grads(lambda t: stt_call(t, "cpu"), a)
    got, got_grads, _ = values_and_grads(lambda t: stt_call(t, "auto"), _channels_last(a), grad_out)
    assert torch.equal(got, expected)
    for name, value in expected_grads.items():
        assert torch.equal(got_grads[name], value), name


def _channels_last(a):
    return dict(a, x=a["x"].contiguous(memory_format=torch.channels_last))


def _strided(a):
    """Views with gaps and transposed storage: the kernels must read them as they are."""
    x, offset, weight = a["x"], a["offset"], a["weight"]
    wide = torch.zeros(x.shape[0], x.shape[1] * 2, x.shape[2], x.shape[3] + 3, dtype=x.dtype)
    wide[:, ::2, :, 1:-2] = x
    offset_t = offset.transpose(2, 3).contiguous().transpose(2, 3)
    weight_t = weight.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    mask = a["mask"]
    mask_t = mask.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    return dict(a, x=wide[:, ::2, :, 1:-2], offset=offset_t, weight=weight_t, mask=mask_t)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", [_channels_last, _strided])
def test_non_contiguous_inputs(backend, layout):
    _skip_unless(backend)
    a = make_inputs(c=6, groups=3, weight_groups=2)
    assert_matches(layout(a), backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_batch_zero(backend):
    _skip_unless(backend)
    a = make_inputs(n=0)
    out, grads, _ = values_and_grads(lambda t: stt_call(t, backend), a)
    assert out.shape == (0, 4, 9, 11)
    assert grads["weight"].shape == a["weight"].shape and not grads["weight"].any()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_offsets_all_outside_give_bias(backend):
    _skip_unless(backend)
    a = make_inputs()
    a["offset"] = torch.full_like(a["offset"], 1e4)
    out, grads, _ = values_and_grads(lambda t: stt_call(t, backend), a)
    torch.testing.assert_close(out, a["bias"].view(1, -1, 1, 1).expand_as(out))
    assert not grads["x"].any() and not grads["offset"].any() and not grads["mask"].any()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_integer_offsets_match_torchvision(backend):
    """Zero and whole-pixel offsets (the usual initialisation) put the border taps of a padded
    convolution exactly on y = -1 or x = -1, where torchvision's offset gradient is one-sided."""
    _skip_unless(backend)
    a = make_inputs(c=4, groups=2, padding=(1, 2), dilation=(1, 2))
    a["offset"] = torch.randint(-2, 3, a["offset"].shape, dtype=a["offset"].dtype) * (
        torch.rand(a["offset"].shape) < 0.5
    )
    assert_matches(a, backend)


def test_cpu_backward_is_deterministic():
    _skip_unless("cpu")
    a = make_inputs(n=4, c=8, c_out=8, h=16, w=16, groups=2, dtype=torch.float32)
    first = values_and_grads(lambda t: stt_call(t, "cpu"), a)
    second = values_and_grads(lambda t: stt_call(t, "cpu"), a, first[2])
    for name in first[1]:
        assert torch.equal(first[1][name], second[1][name]), name


def _away_from_integers(offset):
    """Sampling points with fractional parts in [0.2, 0.8]: bilinear sampling is not
    differentiable where a point crosses a pixel row or column, and the base grid is integral."""
    return offset.floor() + 0.2 + 0.6 * torch.rand_like(offset)


@pytest.mark.parametrize("mask", [True, False])
def test_gradcheck_cpu(mask):
    _skip_unless("cpu")
    a = make_inputs(
        n=2, c=4, c_out=2, h=5, w=4, groups=2, weight_groups=2, mask=mask, spread=1.5, stride=(1, 2), dilation=(2, 1)
    )
    a["offset"] = _away_from_integers(a["offset"])
    names = grad_names(a)

    def fn(*tensors):
        return stt_call(dict(a, **dict(zip(names, tensors))), "cpu")

    inputs = [a[k].detach().requires_grad_() for k in names]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def test_opcheck_cpu():
    _skip_unless("cpu")
    a = make_inputs(n=2, c=4, c_out=3, h=6, w=5, groups=2, dtype=torch.float32)
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
        "cpu",
    )
    torch.library.opcheck(torch.ops.stt.deform_conv2d, args)


def _compile_inputs():
    a = make_inputs(n=1, c=4, c_out=4, h=6, w=7, groups=2, dtype=torch.float32)
    return [a[k].requires_grad_() for k in ("x", "offset", "mask", "weight", "bias")]


def _compare_compiled(fn, args):
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    expected, got = fn(*args), compiled(*args)
    torch.testing.assert_close(got, expected)
    grad = torch.randn_like(expected)
    torch.testing.assert_close(torch.autograd.grad(got, args, grad), torch.autograd.grad(expected, args, grad))


def test_compile_fullgraph_custom_op():
    _skip_unless("cpu")

    def fn(x, offset, mask, weight, bias):
        return torch.ops.stt.deform_conv2d(x, offset, mask, weight, bias, [1, 1], [1, 1], [1, 1], 2, "cpu").relu()

    _compare_compiled(fn, _compile_inputs())


def test_compile_fullgraph_public_function():
    _skip_unless("cpu")

    def fn(x, offset, mask, weight, bias):
        return stt_kernels.deform_conv2d(x, offset, mask, weight, bias, padding=1, backend="cpu").relu()

    _compare_compiled(fn, _compile_inputs())


@pytest.mark.parametrize(
    "change, error",
    [
        (lambda a: dict(a, offset=a["offset"][:, :-1]), ValueError),  # channels not a multiple of 2*K*K
        (lambda a: dict(a, mask=a["mask"][:, :-1]), ValueError),  # mask channels do not match offset's G
        (lambda a: dict(a, offset=a["offset"][:, :, :-1]), ValueError),  # not the output size
        (lambda a: dict(a, mask=a["mask"][:, :, :, :-1]), ValueError),
        (lambda a: dict(a, weight=a["weight"][:, :-1]), ValueError),  # weight.shape[1] does not divide C
        (lambda a: dict(a, x=a["x"].numpy()), TypeError),
    ],
)
def test_bad_inputs(change, error):
    a = change(make_inputs(c=6))
    with pytest.raises(error):
        stt_call(a, "cpu" if available("cpu") else "reference")


@requires_gpu
@pytest.mark.parametrize(
    "case",
    ["plain", "mask-none", "odd-stride-pad-dil", "groups-3-weight-groups-2", "kernel-5x3-batch-3", "large-image-tiles"],
)
def test_cuda_float64_matches_torchvision(case):
    _skip_unless("cuda")
    a = make_inputs(**CASES[case], device="cuda")
    # The input gradient is summed by atomics: order-dependent in the last bits.
    assert_matches(a, "cuda", rtol=1e-8, atol=1e-9)


@requires_gpu
@pytest.mark.parametrize(
    "dtype, precision",
    [(torch.float32, "highest"), (torch.float32, "high"), (torch.float16, "highest"), (torch.bfloat16, "highest")],
    ids=["float32", "float32-tf32", "float16", "bfloat16"],
)
def test_cuda_low_precision(dtype, precision):
    """float32 within ~1e-5 of the float64 oracle with IEEE products, and within a TF32-sized
    1e-2 under torch.set_float32_matmul_precision("high") (cuBLAS rounds the products' inputs
    to 10-bit mantissas); float16/bfloat16 within twice the error of the reference run in the
    same precision."""
    _skip_unless("cuda")
    a64 = make_inputs(n=2, c=16, c_out=8, h=19, w=17, groups=2, device="cuda")
    low = {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in a64.items()}
    expected, expected_grads, grad_out = values_and_grads(lambda t: stt_call(t, "reference"), a64)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        got, got_grads, _ = values_and_grads(lambda t: stt_call(t, "cuda"), low, grad_out.to(dtype))
    finally:
        torch.set_float32_matmul_precision(before)
    ref_low, ref_low_grads, _ = values_and_grads(lambda t: stt_call(t, "reference"), low, grad_out.to(dtype))
    pairs = [("out", expected, got, ref_low)] + [
        (k, v, got_grads[k], ref_low_grads[k]) for k, v in expected_grads.items()
    ]
    for name, value, result, baseline in pairs:
        error = (result.double() - value).abs().max().item()
        if dtype == torch.float32:
            tol = 1e-5 if precision == "highest" else 1e-2
            assert error <= tol * value.abs().max().item() + 1e-6, (name, error)
        else:
            allowed = 2 * (baseline.double() - value).abs().max().item() + 1e-3 * value.abs().max().item()
            assert error <= allowed, (name, error, allowed)
