"""spatial_attention / temporal_attention on every backend available here, against the
reference computed in float64 (the oracle), on fresh random inputs taken as non-contiguous
views of one packed (B, T, H, W, 3, heads, d) projection, as the model makes them.

GPU backends (cuda, triton) run the same cases on a GPU machine and skip here; Triton under
the interpreter is tested in test_attention_triton.py.
"""

import contextlib

import pytest
import torch
from conftest import GPU, available

import stt_kernels
from stt_kernels import reference
from stt_kernels.backend import CAPABILITIES

OPS = {
    "spatial": (stt_kernels.spatial_attention, reference.spatial_attention),
    "temporal": (stt_kernels.temporal_attention, reference.temporal_attention),
}

# (B, T, H, W, heads, d): spatial runs over N = H*W (1, 7, 4097, 551), temporal over N = T (1, 5,
# 7, 128, 129). The CPU kernel solves sequences up to 128 long in one transposed tile, a block
# of them per task: T = 7 over 198 sequences spans several blocks and a partial one, T = 128
# and 129 sit on both sides of the one-tile limit. Longer sequences are tiled by 128 queries and
# keys: N = 551 over 16 sequences is four full tiles and a partial one, on many parallel tasks.
SHAPES = {
    "spatial": [
        (2, 3, 1, 1, 2, 8),
        (1, 2, 7, 1, 3, 24),
        (2, 1, 1, 7, 1, 40),
        (1, 1, 17, 241, 1, 40),
        (2, 4, 19, 29, 2, 8),
    ],
    "temporal": [
        (2, 1, 3, 5, 2, 24),
        (1, 5, 3, 7, 3, 40),
        (2, 5, 4, 3, 1, 7),
        (1, 7, 9, 11, 2, 32),
        (1, 128, 3, 5, 2, 16),
        (1, 129, 2, 3, 1, 16),
    ],
}
CASES = [(kind, shape) for kind, shapes in SHAPES.items() for shape in shapes]


def device_of(backend):
    return CAPABILITIES[backend].devices[0]


def backend_param(name):
    """A backend as a test parameter: GPU backends skip without a GPU, and every backend
    skips when it is not available here (not built, Triton missing)."""
    marks = []
    if name in ("cuda", "triton") and not GPU:
        marks.append(
            pytest.mark.skip(
                reason=f"{name}: needs a CUDA or ROCm GPU (the interpreter is tested in test_attention_triton.py)"
            )
        )
    elif not available(name):
        marks.append(pytest.mark.skip(reason=f"{name}: {stt_kernels.backends()[name].reason}"))
    return pytest.param(name, marks=marks, id=name)


BACKENDS = [backend_param(name) for name in ("reference", "cpu", "cuda", "triton")]
GPU_BACKENDS = [backend_param(name) for name in ("cuda", "triton")]


def packed_qkv(shape, dtype, device):
    """q, k, v as views of one packed (B, T, H, W, 3, heads, d) leaf; returns (leaf, q, k, v)."""
    b, t, h, w, heads, d = shape
    qkv = torch.randn(b, t, h, w, 3, heads, d, dtype=dtype, device=device).requires_grad_()
    q, k, v = qkv.unbind(4)
    return qkv, q, k, v


def oracle(kind, qkv, grad):
    """The reference in float64: output and the gradient of the packed leaf."""
    spec = OPS[kind][1]
    x = qkv.detach().double().requires_grad_()
    q, k, v = x.unbind(4)
    out = spec(q, k, v, q.shape[-1] ** -0.5)
    (dx,) = torch.autograd.grad(out, x, grad.double())
    return out.detach(), dx


def run(kind, backend, qkv, grad):
    q, k, v = qkv.unbind(4)
    out = OPS[kind][0](q, k, v, backend=backend)
    (dx,) = torch.autograd.grad(out, qkv, grad)
    return out.detach(), dx


@contextlib.contextmanager
def matmul_precision(precision):
    """torch.set_float32_matmul_precision for the block: "high" lets float32 products on GPUs
    round their inputs to TF32 (Triton's tl.dot follows it, as torch.matmul does)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def relative_error(got, expected, scale=None):
    """Largest error relative to the largest expected value (or to ``scale``, for parts that
    may be all zeros, as the gradients of q and k of a single-token sequence are)."""
    scale = expected.abs().max() if scale is None else scale
    return ((got.double() - expected).abs().max() / scale).item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)], ids=["float32", "float64"])
@pytest.mark.parametrize("kind, shape", CASES, ids=[f"{k}-{'x'.join(map(str, s))}" for k, s in CASES])
def test_values_and_gradients_match_float64_oracle(backend, dtype, tol, kind, shape):
    qkv, q, _, _ = packed_qkv(shape, dtype, device_of(backend))
    assert not q.is_contiguous()
    grad = torch.randn(q.shape, dtype=dtype, device=q.device)
    # float32 tolerances are IEEE products' (TF32 has its own test below).
    with matmul_precision("highest"):
        out, dx = run(kind, backend, qkv, grad)
    want_out, want_dx = oracle(kind, qkv, grad)
    assert out.dtype == dtype and out.shape == q.shape and dx.shape == qkv.shape
    assert relative_error(out, want_out) <= tol
    for i, name in enumerate("qkv"):
        assert relative_error(dx[..., i, :, :], want_dx[..., i, :, :], want_dx.abs().max()) <= tol, f"grad of {name}"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize(
    "kind, shape",
    [("spatial", (1, 2, 9, 15, 2, 40)), ("temporal", (2, 5, 4, 3, 3, 24))],
    ids=["spatial-135", "temporal-5"],
)
def test_float32_under_tf32_matmul_precision(backend, kind, shape):
    """Under torch.set_float32_matmul_precision("high") Triton's float32 products take TF32
    inputs (10-bit mantissas, ~5e-4 relative rounding each): a TF32-sized tolerance. The CUDA
    kernels multiply in IEEE float32 whatever the setting, so theirs stays at 1e-5."""
    qkv, q, _, _ = packed_qkv(shape, torch.float32, "cuda")
    grad = torch.randn(q.shape, device=q.device)
    with matmul_precision("high"):
        out, dx = run(kind, backend, qkv, grad)
    want_out, want_dx = oracle(kind, qkv, grad)
    tol = 2e-2 if backend == "triton" else 1e-5
    assert relative_error(out, want_out) <= tol
    assert relative_error(dx, want_dx) <= tol


@pytest.mark.parametrize("backend", [backend_param("cpu"), backend_param("cuda")])
def test_float64_gradients_at_4097_keys_use_a_float64_lse(backend):
    """A float32 lse would put ~6e-8 |lse| of relative error into every recomputed probability
    (about 5e-7 here, |lse| ~ 9): the float64 lse keeps the gradients at float64 accuracy."""
    qkv, q, k, v = packed_qkv((1, 1, 17, 241, 1, 8), torch.float64, device_of(backend))
    _, lse = torch.ops.stt.spatial_attention(q, k, v, 8**-0.5, backend)
    scores = torch.einsum("bzxyhd,bzuvhd->bzhxyuv", q, k).flatten(3, 4).flatten(4, 5) * 8**-0.5
    assert lse.dtype == torch.float64
    assert relative_error(lse.flatten(), scores.logsumexp(-1).flatten()) <= 1e-13
    grad = torch.randn(q.shape, dtype=torch.float64, device=q.device)
    _, dx = run("spatial", backend, qkv, grad)
    _, want_dx = oracle("spatial", qkv, grad)
    assert relative_error(dx, want_dx) <= 1e-10


@pytest.mark.parametrize("backend", GPU_BACKENDS[:1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_cuda_head_dim_128_over_48_kib_of_shared_memory(backend, dtype):
    """d = 128: the dK/dV tiles take 66 KB (float32) or 133 KB (float64) per warp, over the
    default 48 KB a block gets; the launch opts in to the device's limit or tiles narrower."""
    qkv, q, _, _ = packed_qkv((1, 1, 5, 13, 1, 128), dtype, "cuda")
    grad = torch.randn(q.shape, dtype=dtype, device=q.device)
    out, dx = run("spatial", backend, qkv, grad)
    want_out, want_dx = oracle("spatial", qkv, grad)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert relative_error(out, want_out) <= tol and relative_error(dx, want_dx) <= tol


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize(
    "kind, shape",
    [
        ("spatial", (1, 2, 9, 15, 2, 40)),
        ("spatial", (1, 1, 17, 241, 1, 64)),
        ("temporal", (2, 5, 4, 3, 3, 24)),
        ("temporal", (1, 33, 5, 4, 2, 128)),
    ],
    ids=["spatial-135", "spatial-4097", "temporal-5", "temporal-33-d128"],
)
def test_low_precision_within_twice_the_reference_error(backend, dtype, kind, shape):
    """Flash-attention's rule: the kernel's error against the float64 oracle is at most twice
    that of the reference run in the same low precision (plus a little absolute slack)."""
    qkv, q, _, _ = packed_qkv(shape, dtype, "cuda")
    grad = torch.randn(q.shape, dtype=dtype, device=q.device)
    want_out, want_dx = oracle(kind, qkv, grad)
    out, dx = run(kind, backend, qkv, grad)
    ref_out, ref_dx = run(kind, "reference", qkv, grad)
    slack = 1e-3 if dtype == torch.float16 else 1e-2

    def err(got, want):
        return (got.double() - want).abs().max().item()

    assert err(out, want_out) <= 2 * err(ref_out, want_out) + slack * want_out.abs().max().item()
    for i, name in enumerate("qkv"):
        got, ref, want = dx[..., i, :, :], ref_dx[..., i, :, :], want_dx[..., i, :, :]
        assert err(got, want) <= 2 * err(ref, want) + slack * want.abs().max().item(), f"grad of {name}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["spatial", "temporal"])
def test_batch_zero(backend, kind):
    qkv, q, _, _ = packed_qkv((0, 3, 4, 5, 2, 8), torch.float32, device_of(backend))
    out, dx = run(kind, backend, qkv, torch.zeros(q.shape, device=q.device))
    assert out.shape == q.shape and dx.shape == qkv.shape


@pytest.mark.parametrize("kind", ["spatial", "temporal"])
def test_strided_head_dim_and_separate_tensors(kind):
    """Views whose d axis is not unit-stride, q/k/v from different tensors, and a custom scale."""
    b, t, h, w, heads, d = 1, 3, 4, 5, 2, 6
    q = torch.randn(b, t, h, w, d, heads, dtype=torch.float64).transpose(-1, -2).requires_grad_()
    k = torch.randn(b, t, h, w, heads, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, h, w, t, heads, d, dtype=torch.float64).permute(0, 3, 1, 2, 4, 5).requires_grad_()
    op, spec = OPS[kind]
    out = op(q, k, v, scale=0.3, backend="cpu")
    want = spec(q, k, v, 0.3)
    torch.testing.assert_close(out, want)
    grad = torch.randn_like(out)
    torch.testing.assert_close(
        torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad), rtol=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("kind, shape", [("spatial", (1, 2, 3, 2, 1, 3)), ("temporal", (2, 3, 1, 2, 1, 3))])
def test_gradcheck_float64_cpu(kind, shape):
    if not available("cpu"):
        pytest.skip(stt_kernels.backends()["cpu"].reason)
    _, q, k, v = packed_qkv(shape, torch.float64, "cpu")
    op = OPS[kind][0]
    assert torch.autograd.gradcheck(lambda q, k, v: op(q, k, v, backend="cpu"), (q, k, v))


@pytest.mark.parametrize("name", ["spatial_attention", "temporal_attention"])
def test_opcheck_cpu(name):
    if not available("cpu"):
        pytest.skip(stt_kernels.backends()["cpu"].reason)
    _, q, k, v = packed_qkv((1, 3, 2, 3, 2, 5), torch.float64, "cpu")
    torch.library.opcheck(getattr(torch.ops.stt, name), (q, k, v, 0.5, "cpu"))


def test_compile_fullgraph_matches_eager_cpu():
    if not available("cpu"):
        pytest.skip(stt_kernels.backends()["cpu"].reason)
    _, q, k, v = packed_qkv((1, 3, 3, 2, 2, 8), torch.float32, "cpu")

    def f(q, k, v):
        return (
            stt_kernels.spatial_attention(q, k, v, backend="cpu").square().sum()
            + stt_kernels.temporal_attention(q, k, v, backend="cpu").sum()
        )

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    want = f(q, k, v)
    got = compiled(q, k, v)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, (q, k, v)), torch.autograd.grad(want, (q, k, v)))


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)], ids=["float16", "bfloat16"])
def test_16_bit_on_cpu_is_computed_in_float32(dtype, tol):
    if not available("cpu"):
        pytest.skip(stt_kernels.backends()["cpu"].reason)
    qkv, q, _, _ = packed_qkv((1, 2, 3, 5, 2, 16), dtype, "cpu")
    grad = torch.randn(q.shape, dtype=dtype)
    out, dx = run("spatial", "cpu", qkv, grad)
    want_out, want_dx = oracle("spatial", qkv, grad)
    assert out.dtype == dtype
    assert relative_error(out, want_out) <= tol and relative_error(dx, want_dx) <= 2.5 * tol


def _kernel_args(n=4, d=8, **overrides):
    q, k, v, out = (torch.randn(2, 3, n, 2, d) for _ in range(4))
    args = dict(q=q, k=k, v=v, out=out, lse=torch.empty(2, 3, 2, n), scale=0.5)
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(lse=torch.empty(2, 3, 2, 4, dtype=torch.float64)), "lse must be float32"),
        (
            {
                **{name: torch.randn(2, 3, 4, 2, 8, dtype=torch.float64) for name in ("q", "k", "v", "out")},
                "lse": torch.empty(2, 3, 2, 4),
            },
            "lse must be float64 for float64 q",
        ),
        (dict(lse=torch.empty(2, 3, 4, 2)), "lse must have shape"),
        (dict(k=torch.randn(2, 3, 5, 2, 8)), "k must have the shape of q"),
        (dict(out=torch.randn(2, 3, 4, 2, 8, dtype=torch.float64)), "out must have the dtype of q"),
        (dict(q=torch.randn(3, 4, 2, 8)), "q must be a 5-d view"),
        (dict(scale=-1.0), "scale must be positive"),
    ],
)
def test_kernel_entry_checks_name_the_argument(overrides, words):
    if not available("cpu"):
        pytest.skip(stt_kernels.backends()["cpu"].reason)
    with pytest.raises(RuntimeError, match=words):
        torch.ops.stt._attention_forward(**_kernel_args(**overrides))
