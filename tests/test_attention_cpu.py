"""The CPU attention kernels beyond what test_attention.py covers through the public ops: head
dims up to 256 and odd sizes on both code paths (whole short sequences, and tiles of queries and
keys sized from the L2 cache), every tile-product engine (oneDNN's brgemm for float32, the
at::vec micro-kernel when oneDNN is off, and MKL's sgemm in the forward of the avx2 library where
torch's BLAS is MKL), and float16/bfloat16 converted tile by tile, held to
flash-attention's rule. The kernels are called through their entry points
(``torch.ops.stt._attention_forward/_backward``, 5-d ``(B, Z, N, heads, d)`` views), so head
dims the public ops do not yet take are tested as well.
"""

import contextlib

import pytest
import torch
from conftest import available

import stt_kernels
from stt_kernels._extension import EXTENSION

pytestmark = pytest.mark.skipif(not available("cpu"), reason="the cpu backend is not available here")

# (B, Z, N, heads, d). N <= 128 is one transposed tile per sequence; longer N is tiled (at
# most 512 keys and 256 queries a tile, fewer for large d), so 300 and 777 end in partial
# tiles, and d = 160 and 256 at N = 777 span several key tiles.
SHAPES = [
    (1, 2, 5, 2, 160),
    (2, 1, 33, 1, 256),
    (1, 1, 129, 2, 1),
    (1, 2, 300, 1, 131),
    (1, 1, 777, 2, 160),
    (1, 1, 777, 1, 256),
    (1, 3, 517, 2, 255),
    # Heads narrower than a vector (d < 16 in float32 under AVX-512) take the dot kernel for
    # P V and dS K: 8 and 13 (8 + 4 + 1 rows of B) across partial tiles of several keys;
    # one sequence splits its key tiles across threads in the backward.
    (1, 2, 300, 2, 8),
    (2, 1, 1100, 1, 13),
    (1, 1, 777, 1, 8),
]
IDS = ["x".join(map(str, s)) for s in SHAPES]

# The forward takes MKL's sgemm (heads of 32 or more) only in the avx2 library with an MKL torch;
# elsewhere "sgemm" would repeat "brgemm" (test_isa_dispatch runs the avx2 library on AVX-512 CPUs).
_SGEMM_HERE = EXTENSION.info.get("cpu_capability") == "avx2" and torch.backends.mkl.is_available()
ENGINES = [
    pytest.param("sgemm", marks=pytest.mark.skipif(not _SGEMM_HERE, reason="sgemm runs only in the avx2 library")),
    "brgemm",
    "microkernel",
]


@contextlib.contextmanager
def engine(name, monkeypatch):
    """Run the kernels on one tile-product engine: oneDNN off for the micro-kernel, and
    STT_CPU_SGEMM=0 (read at each call) to keep the avx2 forward on brgemm."""
    if name == "brgemm":
        monkeypatch.setenv("STT_CPU_SGEMM", "0")
    else:
        monkeypatch.delenv("STT_CPU_SGEMM", raising=False)
    with torch.backends.mkldnn.flags(enabled=name != "microkernel"):
        yield


def packed(shape, dtype, seed=0):
    """q, k, v as strided views of one packed (B, Z, N, 3, heads, d) tensor, as the model makes them."""
    b, z, n, heads, d = shape
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, z, n, 3, heads, d, generator=gen, dtype=torch.float64).to(dtype)
    return qkv.unbind(3)


def oracle(q, k, v, grad, scale, dtype=torch.float64):
    """Softmax attention over N per (b, z, head), computed in ``dtype``: output and gradients."""
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    s = torch.einsum("bznhd,bzmhd->bzhnm", q, k) * scale
    out = torch.einsum("bzhnm,bzmhd->bznhd", s.softmax(-1), v)
    grads = torch.autograd.grad(out, (q, k, v), grad.to(dtype))
    return out.detach(), grads


def kernels(q, k, v, grad, scale):
    """Forward and backward kernels: output, lse and the gradients of q, k, v."""
    b, z, n, heads, _ = q.shape
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(b, z, heads, n, dtype=lse_dtype)
    torch.ops.stt._attention_forward(q, k, v, out, lse, scale)
    dq, dk, dv = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    torch.ops.stt._attention_backward(q, k, v, out, grad, lse, scale, dq, dk, dv)
    return out, lse, (dq, dk, dv)


def max_error(got, want):
    return (got.double() - want.double()).abs().max().item()


@pytest.mark.parametrize("name", ENGINES)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.float64, 1e-10)], ids=["float32", "float64"])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_head_dims_to_256_and_odd_sizes_match_float64(shape, dtype, tol, name, monkeypatch):
    q, k, v = packed(shape, dtype)
    grad = torch.randn(q.shape, dtype=torch.float64).to(dtype)
    scale = shape[-1] ** -0.5
    with engine(name, monkeypatch):
        out, lse, grads = kernels(q, k, v, grad, scale)
    want_out, want_grads = oracle(q, k, v, grad, scale)
    assert out.dtype == dtype
    assert max_error(out, want_out) <= tol * want_out.abs().max().item()
    rows = torch.logsumexp(torch.einsum("bznhd,bzmhd->bzhnm", q.double(), k.double()) * scale, -1)
    assert max_error(lse, rows) <= tol * rows.abs().max().item() + tol
    for name, got, want in zip("qkv", grads, want_grads):
        assert max_error(got, want) <= tol * max(want.abs().max().item(), 1e-3), f"grad of {name}"


@pytest.mark.parametrize("shape", [(1, 2, 33, 2, 32), (1, 1, 300, 2, 32), (1, 1, 300, 1, 8)], ids=str)
def test_scores_across_the_whole_range_of_the_exponential(shape):
    """A scale 30 times the usual spreads the scores over hundreds: the exponentials run from
    1 down past 2^-127, where the vector exponential flushes to 0, on every path."""
    q, k, v = packed(shape, torch.float32, seed=3)
    grad = torch.randn(q.shape, dtype=torch.float64).float()
    scale = 30 * shape[-1] ** -0.5
    out, lse, grads = kernels(q, k, v, grad, scale)
    want_out, want_grads = oracle(q, k, v, grad, scale)
    scores = torch.einsum("bznhd,bzmhd->bzhnm", q.double(), k.double()) * scale
    assert (scores.amax(-1, keepdim=True) - scores).max() > 127 / 1.4427  # exp(-88): 2^-127
    rows = torch.logsumexp(scores, -1)
    assert max_error(lse, rows) <= 1e-5 * rows.abs().max().item()
    assert max_error(out, want_out) <= 1e-4 * want_out.abs().max().item()
    for name, got, want in zip("qkv", grads, want_grads):
        assert max_error(got, want) <= 1e-4 * want.abs().max().item(), f"grad of {name}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("shape", [SHAPES[i] for i in (1, 3, 5, 7)], ids=[IDS[i] for i in (1, 3, 5, 7)])
def test_16_bit_within_twice_the_error_of_a_16_bit_reference(shape, dtype):
    """Flash-attention's rule: against the float64 oracle, the kernels' error is at most twice
    that of the same formula run in the 16-bit dtype itself, plus a little absolute slack."""
    q, k, v = packed(shape, dtype, seed=1)
    grad = torch.randn(q.shape, dtype=torch.float64).to(dtype)
    scale = shape[-1] ** -0.5
    out, _, grads = kernels(q, k, v, grad, scale)
    want_out, want_grads = oracle(q, k, v, grad, scale)
    ref_out, ref_grads = oracle(q, k, v, grad, scale, dtype=dtype)
    slack = 1e-3 if dtype == torch.float16 else 1e-2
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert max_error(out, want_out) <= 2 * max_error(ref_out, want_out) + slack * want_out.abs().max().item()
    for name, got, ref, want in zip("qkv", grads, ref_grads, want_grads):
        bound = 2 * max_error(ref, want) + slack * want.abs().max().item()
        assert max_error(got, want) <= bound, f"grad of {name}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize(
    "kind, shape",
    [("spatial", (1, 2, 17, 31, 2, 40)), ("temporal", (1, 33, 5, 4, 2, 64)), ("spatial", (1, 1, 9, 15, 1, 128))],
    ids=["spatial-527", "temporal-33", "spatial-135-d128"],
)
def test_public_ops_16_bit_follow_the_flash_attention_rule(kind, shape, dtype):
    b, t, h, w, heads, d = shape
    qkv = torch.randn(b, t, h, w, 3, heads, d, dtype=torch.float64).to(dtype).requires_grad_()
    op = stt_kernels.spatial_attention if kind == "spatial" else stt_kernels.temporal_attention
    grad = torch.randn(b, t, h, w, heads, d, dtype=torch.float64).to(dtype)

    def run(x, backend):
        out = op(*x.unbind(4), backend=backend)
        (dx,) = torch.autograd.grad(out, x, grad.to(x.dtype))
        return out.detach(), dx

    out, dx = run(qkv, "cpu")
    ref_out, ref_dx = run(qkv, "reference")
    want_out, want_dx = run(qkv.detach().double().requires_grad_(), "reference")
    slack = 1e-3 if dtype == torch.float16 else 1e-2
    assert out.dtype == dtype and dx.dtype == dtype
    assert max_error(out, want_out) <= 2 * max_error(ref_out, want_out) + slack * want_out.abs().max().item()
    for i, name in enumerate("qkv"):
        got, ref, want = dx[..., i, :, :], ref_dx[..., i, :, :], want_dx[..., i, :, :]
        assert max_error(got, want) <= 2 * max_error(ref, want) + slack * want.abs().max().item(), f"grad of {name}"


@pytest.mark.parametrize("name", ENGINES)
def test_results_are_bitwise_repeatable_on_every_engine(name, monkeypatch):
    q, k, v = packed((1, 2, 600, 2, 48), torch.float32)
    grad = torch.randn(q.shape)
    with engine(name, monkeypatch):
        first = kernels(q, k, v, grad, 0.2)
        second = kernels(q, k, v, grad, 0.2)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert all(torch.equal(a, b) for a, b in zip(first[2], second[2]))


@pytest.mark.parametrize(
    "kind, shape",
    [("spatial", (1, 2, 13, 11, 1, 256)), ("temporal", (1, 9, 3, 2, 2, 200)), ("spatial", (1, 1, 25, 23, 1, 160))],
    ids=["spatial-143-d256", "temporal-9-d200", "spatial-575-d160"],
)
def test_public_ops_take_head_dims_to_256_on_cpu(kind, shape):
    qkv = torch.randn(*shape[:4], 3, *shape[4:], requires_grad=True)
    op = stt_kernels.spatial_attention if kind == "spatial" else stt_kernels.temporal_attention
    grad = torch.randn(*shape)
    out = op(*qkv.unbind(4), backend="cpu")
    (dx,) = torch.autograd.grad(out, qkv, grad)
    x = qkv.detach().double().requires_grad_()
    want = op(*x.unbind(4), backend="reference")
    (want_dx,) = torch.autograd.grad(want, x, grad.double())
    assert max_error(out, want) <= 2e-5 * want.abs().max().item()
    assert max_error(dx, want_dx) <= 2e-5 * want_dx.abs().max().item()
