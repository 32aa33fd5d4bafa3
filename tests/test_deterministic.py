"""Deterministic mode: under ``torch.use_deterministic_algorithms(True)`` every backward either
gives bitwise the same gradients twice (fixed-order sums) or raises torch's standard error
naming the op and backend (atomic accumulation). GPU backends run on the GPU where there is
one (``cuda`` skips without); Triton runs through its interpreter on the CPU otherwise."""

import pytest
import torch
from conftest import GPU, available, requires_gpu

import stt_kernels
from stt_kernels.backend import CAPABILITIES, check_deterministic_backward


@pytest.fixture
def deterministic():
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


def _device(backend):
    return "cuda" if GPU and backend in ("cuda", "triton") else "cpu"


# (B, T, H, W, 3, heads, d). "many": more sequences than threads, a task per sequence on the
# CPU; "long": one 391-token sequence (spatial), whose key tiles the CPU splits across threads
# and whose dQ the CUDA kernels gather over four key tiles. The interpreter runs one program
# at a time: tiny.
ATTENTION_SHAPES = {"many": (2, 3, 9, 13, 3, 2, 8), "long": (1, 1, 17, 23, 3, 1, 8)}


def _attention_grads(op, backend, shape):
    torch.manual_seed(1)
    if backend == "triton" and not GPU:
        shape = (1, 2, 3, 5, 3, 1, 8)
    qkv = torch.randn(*shape, device=_device(backend), requires_grad=True)
    q, k, v = qkv.unbind(4)
    op(q, k, v, backend=backend).square().sum().backward()
    return qkv.grad


def _deform_grads(backend):
    torch.manual_seed(1)
    device = _device(backend)
    leaves = [
        torch.randn(2, 4, 11, 13, device=device),
        torch.randn(2, 18, 11, 13, device=device),
        torch.rand(2, 9, 11, 13, device=device),
        torch.randn(5, 4, 3, 3, device=device),
    ]
    leaves = [t.requires_grad_() for t in leaves]
    stt_kernels.deform_conv2d(*leaves, backend=backend).square().sum().backward()
    return torch.cat([t.grad.flatten() for t in leaves])


def _deterministic_backends(op):
    names = [b for b in ("cpu", "reference", "triton", "cuda") if op not in CAPABILITIES[b].atomic_backward]
    return [
        pytest.param(b, marks=pytest.mark.skipif(not available(b), reason=f"{b}: {stt_kernels.backends()[b].reason}"))
        for b in names
    ]


def test_the_cuda_attention_backward_is_not_atomic():
    """Its dQ pass owns its query rows (no atomics): deterministic, so no error to raise."""
    assert "attention" not in CAPABILITIES["cuda"].atomic_backward


@pytest.mark.parametrize("backend", _deterministic_backends("attention"))
@pytest.mark.parametrize("shape", list(ATTENTION_SHAPES.values()), ids=list(ATTENTION_SHAPES))
@pytest.mark.parametrize(
    "op", [stt_kernels.spatial_attention, stt_kernels.temporal_attention], ids=["spatial", "temporal"]
)
def test_attention_backward_is_bitwise_repeatable(deterministic, op, shape, backend):
    if backend == "triton" and not GPU and shape != ATTENTION_SHAPES["many"]:
        pytest.skip("the interpreter runs one tiny shape")
    assert torch.equal(_attention_grads(op, backend, shape), _attention_grads(op, backend, shape))


@pytest.mark.parametrize("backend", _deterministic_backends("deform_conv2d"))
def test_deform_conv2d_backward_is_bitwise_repeatable(deterministic, backend):
    assert torch.equal(_deform_grads(backend), _deform_grads(backend))


@pytest.mark.skipif(not available("triton") or GPU, reason="needs Triton's interpreter")
def test_an_atomic_backward_raises_the_standard_error(deterministic):
    with pytest.raises(
        RuntimeError,
        match=r"stt::deform_conv2d backward on the 'triton' backend.*does not have a "
        r"deterministic implementation",
    ):
        _deform_grads("triton")


@requires_gpu
def test_the_cuda_deform_conv2d_backward_raises_the_standard_error(deterministic):
    """Its grad_x scatters with atomics (grad_weight is a fixed-order sum of cuBLAS products)."""
    if not available("cuda"):
        pytest.skip(stt_kernels.backends()["cuda"].reason)
    with pytest.raises(
        RuntimeError,
        match=r"stt::deform_conv2d backward on the 'cuda' backend.*does not have a "
        r"deterministic implementation",
    ):
        _deform_grads("cuda")


@pytest.mark.parametrize("backend, op", [(b, op) for b, cap in CAPABILITIES.items() for op in cap.atomic_backward])
def test_every_atomic_backward_is_refused_or_warned(deterministic, backend, op):
    with pytest.raises(RuntimeError, match=rf"stt::{op} backward on the '{backend}' backend"):
        check_deterministic_backward(backend, op)
    torch.use_deterministic_algorithms(True, warn_only=True)
    with pytest.warns(UserWarning, match=rf"stt::{op} backward on the '{backend}' backend"):
        check_deterministic_backward(backend, op)


def test_nothing_is_refused_outside_deterministic_mode():
    for backend, cap in CAPABILITIES.items():
        for op in cap.atomic_backward:
            check_deterministic_backward(backend, op)
