"""Head dims: each backend's limit is a fact of the capability table. Validation takes up to the
largest limit, a backend named for a larger d refuses it naming itself and its limit, and
``auto`` skips backends that cannot take the call's d (``reference`` takes every d validation lets
through)."""

import dataclasses

import pytest
import torch

import stt_kernels
from stt_kernels import backend as backend_module
from stt_kernels.backend import CAPABILITIES, MAX_HEAD_DIM
from stt_kernels.ops.kernels import Kernels, attention_kernels

ALL = frozenset(backend_module.BACKENDS)
OPS = [stt_kernels.spatial_attention, stt_kernels.temporal_attention]


def _limit(monkeypatch, name: str, head_dim: int) -> None:
    monkeypatch.setitem(CAPABILITIES, name, dataclasses.replace(CAPABILITIES[name], max_head_dim=head_dim))


def _qkv(d: int, requires_grad: bool = False):
    return [torch.randn(1, 2, 2, 3, 2, d, dtype=torch.float64, requires_grad=requires_grad) for _ in range(3)]


def test_every_backend_has_a_limit_and_reference_the_largest():
    assert MAX_HEAD_DIM == max(c.max_head_dim for c in CAPABILITIES.values())
    assert CAPABILITIES["reference"].max_head_dim == MAX_HEAD_DIM >= 256
    assert all(c.max_head_dim >= 128 for c in CAPABILITIES.values())


@pytest.fixture
def every_backend_available(monkeypatch):
    monkeypatch.setattr(backend_module, "_status", lambda name: backend_module.BackendStatus(name, True, "", True))
    monkeypatch.setattr(backend_module, "_interpreting", lambda: False)


def test_auto_on_gpu_tensors_skips_backends_whose_limit_is_below_d(every_backend_available, monkeypatch):
    _limit(monkeypatch, "triton", 64)
    _limit(monkeypatch, "cuda", 128)
    gpu = torch.device("cuda", 0)

    def pick(d: int) -> str:
        return backend_module.resolve("auto", gpu, "spatial_attention", ALL, torch.float32, d)

    assert [pick(d) for d in (64, 65, 128, 129, MAX_HEAD_DIM)] == ["triton", "cuda", "cuda", "reference", "reference"]
    # deform_conv2d has no head dim: the attention limits never steer it.
    assert backend_module.resolve("auto", gpu, "deform_conv2d", ALL, torch.float32) == "triton"


def test_a_named_backend_refuses_a_head_dim_above_its_limit(every_backend_available, monkeypatch):
    _limit(monkeypatch, "triton", 64)
    _limit(monkeypatch, "cuda", 128)
    gpu = torch.device("cuda", 0)
    assert backend_module.resolve("triton", gpu, "temporal_attention", ALL, torch.float16, 64) == "triton"
    with pytest.raises(
        ValueError,
        match=r"backend 'triton' takes head dims d up to 64 for temporal_attention; got d = 96: "
        r"on cuda tensors use 'cuda' or 'reference', or 'auto'",
    ):
        backend_module.resolve("triton", gpu, "temporal_attention", ALL, torch.float16, 96)
    with pytest.raises(ValueError, match=r"backend 'cuda' takes head dims d up to 128 .* use 'reference', or 'auto'"):
        backend_module.resolve("cuda", gpu, "spatial_attention", ALL, torch.float32, 129)


@pytest.mark.parametrize("op", OPS)
def test_ops_refuse_a_named_backend_and_auto_passes_it_by(op, monkeypatch):
    """End to end on CPU tensors with the cpu limit lowered to 8: a cpu kernel that fails when
    called shows that auto (forward and backward) leaves it out at d = 12 and takes it at d = 8."""
    _limit(monkeypatch, "cpu", 8)

    def not_here(*args):
        raise AssertionError("the cpu kernel ran")

    monkeypatch.setitem(attention_kernels._python, "cpu", Kernels(not_here, not_here))
    q, k, v = _qkv(12, requires_grad=True)
    out = op(q, k, v)
    out.sum().backward()
    expected = op(*(t.detach() for t in (q, k, v)), backend="reference")
    torch.testing.assert_close(out, expected)
    assert q.grad is not None and torch.isfinite(q.grad).all()
    with pytest.raises(ValueError, match=r"backend 'cpu' takes head dims d up to 8 .* got d = 12"):
        op(q, k, v, backend="cpu")
    with stt_kernels.use_backend("cpu"), pytest.raises(ValueError, match=r"backend 'cpu' takes head dims d up to 8"):
        op(q, k, v)
    with pytest.raises(AssertionError, match="the cpu kernel ran"):
        op(*_qkv(8))


@pytest.mark.parametrize("op", OPS)
def test_the_largest_head_dim_runs_on_auto_and_one_more_is_refused(op):
    q, k, v = _qkv(MAX_HEAD_DIM)
    out = op(q, k, v)
    torch.testing.assert_close(out, op(q, k, v, backend="reference"))
    with pytest.raises(ValueError, match=rf"head dim d .* must be in 1..{MAX_HEAD_DIM}; got {MAX_HEAD_DIM + 1}"):
        op(*_qkv(MAX_HEAD_DIM + 1))


@pytest.mark.skipif(CAPABILITIES["cpu"].max_head_dim >= MAX_HEAD_DIM, reason="the cpu kernels take every head dim")
def test_the_cpu_backend_refuses_d_above_its_own_limit():
    d = CAPABILITIES["cpu"].max_head_dim + 1
    with pytest.raises(ValueError, match=rf"backend 'cpu' takes head dims d up to {d - 1} "):
        stt_kernels.spatial_attention(*_qkv(d), backend="cpu")


def test_a_scripted_caller_takes_the_largest_head_dim_and_refuses_one_more():
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return stt_kernels.temporal_attention(q, k, v)

    scripted = torch.jit.script(attend)
    q, k, v = _qkv(MAX_HEAD_DIM)
    torch.testing.assert_close(scripted(q, k, v), stt_kernels.temporal_attention(q, k, v, backend="reference"))
    with pytest.raises(torch.jit.Error, match=rf"must be in 1..{MAX_HEAD_DIM}; got {MAX_HEAD_DIM + 1}"):
        scripted(*_qkv(MAX_HEAD_DIM + 1))


def test_modules_take_up_to_the_largest_limit():
    assert stt_kernels.SpatialAttention(2 * MAX_HEAD_DIM, 2).head_dim == MAX_HEAD_DIM
    with pytest.raises(
        ValueError, match=rf"dim / heads = {MAX_HEAD_DIM + 1} exceeds the head dim limit {MAX_HEAD_DIM}"
    ):
        stt_kernels.TemporalAttention(MAX_HEAD_DIM + 1, 1)
