"""Deterministic mode: under ``torch.use_deterministic_algorithms(True)`` every backward either
gives bitwise the same gradients twice (fixed-order sums) or raises torch's standard error
naming the op and backend (atomic accumulation)."""

import pytest
import torch

import stt_kernels
from stt_kernels.backend import CAPABILITIES, check_deterministic_backward

from conftest import available


@pytest.fixture
def deterministic():
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


def _attention_grads(op, backend):
    torch.manual_seed(1)
    # Several tasks per thread on the CPU; the interpreter runs one program at a time: tiny.
    shape = (1, 2, 3, 5, 3, 1, 8) if backend == "triton" else (2, 3, 9, 13, 3, 2, 8)
    qkv = torch.randn(*shape, requires_grad=True)
    q, k, v = qkv.unbind(4)
    op(q, k, v, backend=backend).square().sum().backward()
    return qkv.grad


def _deform_grads(backend):
    torch.manual_seed(1)
    leaves = [torch.randn(2, 4, 11, 13, requires_grad=True), torch.randn(2, 18, 11, 13, requires_grad=True),
              torch.rand(2, 9, 11, 13, requires_grad=True), torch.randn(5, 4, 3, 3, requires_grad=True)]
    stt_kernels.deform_conv2d(*leaves, backend=backend).square().sum().backward()
    return torch.cat([t.grad.flatten() for t in leaves])


def _deterministic_backends(op):
    names = [b for b in ("cpu", "reference", "triton") if op not in CAPABILITIES[b].atomic_backward]
    return [pytest.param(b, marks=pytest.mark.skipif(not available(b) or (b == "triton" and torch.cuda.is_available()),
                                                     reason=f"{b} is not available here (or runs on the GPU)"))
            for b in names]


@pytest.mark.parametrize("backend", _deterministic_backends("attention"))
@pytest.mark.parametrize("op", [stt_kernels.spatial_attention, stt_kernels.temporal_attention],
                         ids=["spatial", "temporal"])
def test_attention_backward_is_bitwise_repeatable(deterministic, op, backend):
    assert torch.equal(_attention_grads(op, backend), _attention_grads(op, backend))


@pytest.mark.parametrize("backend", _deterministic_backends("deform_conv2d"))
def test_deform_conv2d_backward_is_bitwise_repeatable(deterministic, backend):
    assert torch.equal(_deform_grads(backend), _deform_grads(backend))


@pytest.mark.skipif(not available("triton") or torch.cuda.is_available(), reason="needs Triton's interpreter")
def test_an_atomic_backward_raises_the_standard_error(deterministic):
    with pytest.raises(RuntimeError, match=r"stt::deform_conv2d backward on the 'triton' backend.*does not have a "
                                           r"deterministic implementation"):
        _deform_grads("triton")


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
