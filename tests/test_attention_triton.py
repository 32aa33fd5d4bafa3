"""The Triton attention kernels against the reference computed in float64.

Without a GPU the kernels run through Triton's interpreter (conftest sets
TRITON_INTERPRET=1): float32, small sizes, both kernel families forced by lowering the
packed-kernel cut-offs. The GPU cases (16-bit dtypes, long sequences, batches past the
65,535-block grid limit of axes 1 and 2) run unchanged where a GPU is visible.
"""

import pytest
import torch

pytest.importorskip("triton", reason="the triton backend needs Triton installed")

from conftest import GPU, requires_gpu  # noqa: E402

import stt_kernels  # noqa: E402
from stt_kernels import reference  # noqa: E402
from stt_kernels.triton import attention as triton_attention  # noqa: E402

DEVICE = "cuda" if GPU else "cpu"
OPS = {
    "spatial": (stt_kernels.spatial_attention, reference.spatial_attention),
    "temporal": (stt_kernels.temporal_attention, reference.temporal_attention),
}


@pytest.fixture(params=["packed", "tiled"])
def path(request, monkeypatch):
    """Run through the packed short-sequence kernels, or force the tiled flash kernels."""
    if request.param == "tiled":
        monkeypatch.setattr(triton_attention, "_PACKED_BUDGET_FORWARD", 0)
        monkeypatch.setattr(triton_attention, "_PACKED_BUDGET_BACKWARD", 0)
    return request.param


def packed_qkv(shape, dtype=torch.float32, d_stride=1):
    """q, k, v as the non-contiguous views of one packed (B, T, H, W, 3, heads, d) projection;
    ``d_stride`` > 1 spaces the head dim out as well."""
    b, t, h, w, heads, d = shape
    qkv = torch.randn(b, t, h, w, 3, heads, d * d_stride, device=DEVICE, dtype=dtype)[..., ::d_stride]
    return [x.requires_grad_() for x in qkv.detach().unbind(4)]


def run(op, q, k, v, grad, **kwargs):
    out = op(q, k, v, **kwargs)
    return (out, *torch.autograd.grad(out, (q, k, v), grad))


def oracle(spec, q, k, v, grad):
    """Reference values and gradients in float64."""
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    out = spec(q, k, v, q.shape[-1] ** -0.5)
    return (out, *torch.autograd.grad(out, (q, k, v), grad.double()))


# (B, T, H, W, heads, d): spatial N = H*W, temporal N = T; d = 24 is not a power of two.
SHAPES = {
    # On the default path N = 33 takes the packed forward and the tiled backward (from the
    # packed kernel's lse), N = 75 the tiled kernels both ways.
    "spatial": [(2, 1, 1, 1, 1, 8), (1, 3, 1, 7, 1, 24), (1, 2, 3, 11, 2, 8), (1, 1, 5, 15, 1, 8)],
    "temporal": [(1, 1, 3, 1, 2, 8), (2, 5, 1, 3, 1, 24), (1, 17, 3, 1, 1, 8)],
}
CASES = [(kind, shape) for kind, shapes in SHAPES.items() for shape in shapes]


@pytest.mark.parametrize("kind, shape", CASES, ids=[f"{k}-{'x'.join(map(str, s))}" for k, s in CASES])
def test_float32_values_and_gradients(path, kind, shape):
    op, spec = OPS[kind]
    q, k, v = packed_qkv(shape)
    grad = torch.randn(shape, device=DEVICE)
    ours = run(op, q, k, v, grad, backend="triton")
    for name, got, want in zip(("out", "grad_q", "grad_k", "grad_v"), ours, oracle(spec, q, k, v, grad)):
        # The interpreter's dot is exact, so only float32 rounding separates the two; gradients
        # that are exactly 0 (N = 1) come out at rounding level, hence the absolute term.
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("kind, shape", [("spatial", (1, 2, 3, 7, 1, 160)), ("temporal", (1, 9, 2, 1, 2, 256))])
def test_float32_head_dims_above_128(path, kind, shape):
    """BLOCK_D = 256 (d = 160 pads to it, 256 is the largest any backend takes); at d = 160 the
    default path runs the packed forward and the tiled backward."""
    op, spec = OPS[kind]
    q, k, v = packed_qkv(shape)
    grad = torch.randn(shape, device=DEVICE)
    ours = run(op, q, k, v, grad, backend="triton")
    for name, got, want in zip(("out", "grad_q", "grad_k", "grad_v"), ours, oracle(spec, q, k, v, grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("kind", ["spatial", "temporal"])
def test_strided_head_dim_and_grad_out(path, kind):
    """Head dim with stride 2, and an incoming gradient that is itself a strided view."""
    op, spec = OPS[kind]
    shape = (1, 3, 2, 5, 1, 8)
    q, k, v = packed_qkv(shape, d_stride=2)
    assert q.stride(-1) == 2
    grad = torch.randn(*shape[:-1], 2 * shape[-1], device=DEVICE)[..., 1::2]
    ours = run(op, q, k, v, grad, backend="triton")
    for got, want in zip(ours, oracle(spec, q, k, v, grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["spatial", "temporal"])
def test_all_scores_far_below_zero(path, kind):
    """Every real score near -280: the zero vectors padding the key tile would score 0, and
    exp(0 - lse) overflows float32, so the kernels must drop them, not just rely on k = 0."""
    op, spec = OPS[kind]
    shape = (1, 7, 1, 7, 1, 8)
    q, k, v = packed_qkv(shape)
    with torch.no_grad():
        q.mul_(0.1).add_(10.0)
        k.mul_(0.1).sub_(10.0)
    grad = torch.randn(shape, device=DEVICE)
    for got, want in zip(run(op, q, k, v, grad, backend="triton"), oracle(spec, q, k, v, grad)):
        # Scores of size ~280 carry float32 rounding of ~2e-5 into the softmax.
        torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-4)


def _strided_like(shape):
    """An uninitialised non-contiguous view of ``shape`` (every other row of a wider buffer)."""
    return torch.full((*shape[:-1], 2 * shape[-1]), float("nan"), device=DEVICE)[..., ::2]


def test_kernel_contract_writes_strided_outputs_and_lse(path):
    """The kernel-table entry points fill preallocated strided out, lse and gradients."""
    b, z, n, heads, d = 2, 3, 5, 2, 24
    qkv = torch.randn(b, n, z, 3, heads, d, device=DEVICE).transpose(1, 2)  # temporal-style layout
    q, k, v = qkv.unbind(3)
    out = _strided_like((b, z, n, heads, d))
    lse = torch.full((b, z, heads, 2 * n), float("nan"), device=DEVICE)[..., ::2]
    scale = 0.3
    triton_attention.forward(q, k, v, out, lse, scale)

    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    scores = torch.einsum("bznhd,bzmhd->bzhnm", q64, k64) * scale
    want = torch.einsum("bzhnm,bzmhd->bznhd", torch.softmax(scores, -1), v64)
    torch.testing.assert_close(out.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1).detach(), rtol=1e-5, atol=1e-6)

    grad_out = torch.randn(b, z, n, heads, d, device=DEVICE)
    grads = [_strided_like((b, z, n, heads, d)) for _ in range(3)]
    triton_attention.backward(q, k, v, out, grad_out, lse, scale, *grads)
    for got, want_grad in zip(grads, torch.autograd.grad(want, (q64, k64, v64), grad_out.double())):
        torch.testing.assert_close(got.double(), want_grad, rtol=1e-5, atol=1e-6)


def test_empty_batch():
    q, k, v = packed_qkv((0, 2, 3, 1, 1, 8))
    for kind in OPS:
        out, *grads = run(OPS[kind][0], q, k, v, torch.randn(q.shape, device=DEVICE), backend="triton")
        assert out.shape == q.shape and all(g.shape == q.shape for g in grads)


def test_rejects_float64_with_reason():
    q, k, v = (x.double() for x in packed_qkv((1, 2, 1, 3, 1, 8)))
    with pytest.raises(TypeError, match="backend .triton. does not take float64 tensors for spatial_attention"):
        stt_kernels.spatial_attention(q, k, v, backend="triton")


def test_opcheck_spatial():
    q, k, v = (torch.randn(1, 2, 2, 3, 1, 8, device=DEVICE, requires_grad=True) for _ in range(3))
    torch.library.opcheck(torch.ops.stt.spatial_attention, (q, k, v, 8**-0.5, "triton"))


# ---------------------------------------------------------------------------------------
# GPU only: low precision against the flash-attention rule, and sizes the interpreter cannot afford.


def _max_error(got, want):
    return max((g.double() - w).abs().max().item() for g, w in zip(got, want))


def _flash_rule(kind, shape, dtype, slack=1e-3):
    """Error against the float64 oracle at most twice that of the reference run in ``dtype``."""
    op, spec = OPS[kind]
    q, k, v = packed_qkv(shape, dtype)
    grad = torch.randn(shape, device=DEVICE, dtype=dtype)
    want = oracle(spec, q, k, v, grad)
    ours = run(op, q, k, v, grad, backend="triton")
    theirs = run(op, q, k, v, grad, backend="reference")
    for i, name in enumerate(("out", "grad_q", "grad_k", "grad_v")):
        err, ref_err = _max_error([ours[i]], [want[i]]), _max_error([theirs[i]], [want[i]])
        assert err <= 2 * ref_err + slack, f"{name}: {err:.3g} vs reference {ref_err:.3g} in {dtype}"


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "kind, shape",
    [
        ("spatial", (1, 2, 17, 241, 1, 128)),  # N = 4097: a tail of one query and one key
        ("spatial", (2, 3, 9, 13, 2, 24)),
        ("temporal", (1, 32, 24, 24, 2, 32)),  # packed kernels
        ("temporal", (1, 100, 4, 5, 2, 72)),  # tiled kernels
        ("spatial", (1, 2, 9, 13, 1, 256)),  # the largest head dim
        ("temporal", (1, 24, 4, 5, 2, 200)),  # BLOCK_D = 256: packed forward, tiled backward
    ],
)
def test_low_precision_flash_rule(kind, shape, dtype):
    _flash_rule(kind, shape, dtype)


@requires_gpu
@pytest.mark.parametrize("t", [32, 256])
def test_temporal_batch_beyond_grid_axis_limit(t):
    """More than 65,535 sequences, checked on the first and last pixel rows (pixels are
    independent, and the float64 reference of the whole batch would need ~35 GB)."""
    shape = (1, t, 256, 257, 1, 16)  # 65,792 sequences
    q, k, v = packed_qkv(shape, torch.bfloat16)
    grad = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16)
    ours = run(stt_kernels.temporal_attention, q, k, v, grad, backend="triton")
    rows = [0, shape[2] - 1]

    def pick(x):
        return x.detach()[:, :, rows]

    want = oracle(reference.temporal_attention, pick(q), pick(k), pick(v), pick(grad))
    theirs = run(
        stt_kernels.temporal_attention, *(pick(x).requires_grad_() for x in (q, k, v)), pick(grad), backend="reference"
    )
    for i in range(4):
        assert torch.isfinite(ours[i]).all()
        assert _max_error([pick(ours[i])], [want[i]]) <= 2 * _max_error([theirs[i]], [want[i]]) + 1e-3


@requires_gpu
def test_float32_large_on_gpu():
    """float32 on the GPU uses IEEE products (no TF32), so it keeps float32 accuracy."""
    op, spec = OPS["spatial"]
    shape = (1, 1, 17, 241, 1, 128)
    q, k, v = packed_qkv(shape)
    grad = torch.randn(shape, device=DEVICE)
    for got, want in zip(run(op, q, k, v, grad, backend="triton"), oracle(spec, q, k, v, grad)):
        torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)


def test_packed_autotuning_keys_on_the_sequence_count():
    """A tiny warm-up input must not choose the configuration the full-size call then reuses."""
    for kernel in (triton_attention._packed_forward, triton_attention._packed_backward):
        assert "NSEQ_BUCKET" in kernel.keys
    assert [triton_attention._bucket(n) for n in (0, 1, 3, 64, 65, 4097)] == [1, 1, 4, 64, 128, 8192]
