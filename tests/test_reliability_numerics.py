"""The non-finite rules written in stt_kernels/reference (deform_conv2d.py, attention.py), on
every backend that runs here, forward and backward; Triton's interpreter refusing bfloat16.

Each case is checked against an oracle of its own, not against another backend: the same
backend's run on clean input (what the NaN cannot reach must not change), a run with the
tap's mask set to 0 (what a point outside the image must equal), and the set of pixels each
sampling point reads, worked out here from the offsets.
"""

import itertools
import math

import pytest
import torch
from conftest import GPU, available

import stt_kernels

# Triton's interpreter runs numpy, which warns on every NaN it makes: here they are the point.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

NAN, INF = float("nan"), float("inf")
INTERPRETED = not GPU


def _backends(*names):
    return [
        pytest.param(n, marks=pytest.mark.skipif(not available(n), reason=f"backend {n} is not available here"))
        for n in names
    ]


def _device(backend):
    return "cuda" if backend in ("triton", "cuda") and GPU else "cpu"


# ---------------------------------------------------------------------------------------
# deform_conv2d: N = 1, C = 4 in G = 2 offset groups and 2 weight groups, 3 x 3 taps, 5 x 6
# image, padding 1: offset group g's channels are weight group g's, whose outputs are
# channels 2g, 2g + 1.

C, H, W, K, G = 4, 5, 6, 9, 2
PER_GROUP = C // G


def _inputs(spread=1.5):
    f32 = dict(dtype=torch.float32)
    return dict(
        x=torch.randn(1, C, H, W, **f32),
        offset=torch.randn(1, 2 * G * K, H, W, **f32) * spread,
        mask=torch.rand(1, G * K, H, W, **f32),
        weight=torch.randn(4, PER_GROUP, 3, 3, **f32),
        bias=torch.randn(4, **f32),
    )


def _run(backend, a, grad_out):
    """Output and every gradient, as float64 CPU tensors."""
    dev = _device(backend)
    leaves = {k: v.detach().clone().to(dev).requires_grad_() for k, v in a.items()}
    out = stt_kernels.deform_conv2d(
        leaves["x"], leaves["offset"], leaves["mask"], leaves["weight"], leaves["bias"], padding=1, backend=backend
    )
    out.backward(grad_out.to(dev))
    result = {"out": out.detach()}
    result.update({k: v.grad for k, v in leaves.items()})
    return {k: v.double().cpu() for k, v in result.items()}


def _reads(offset):
    """``reads[g, k, y, x, i, j]``: tap ``k`` of group ``g`` at output pixel ``(y, x)`` reads
    input pixel ``(i, j)`` (one of its bilinear neighbours inside the image)."""
    off = offset.double().reshape(G, K, 2, H, W)
    reads = torch.zeros(G, K, H, W, H, W, dtype=torch.bool)
    for g, k, y, x in itertools.product(range(G), range(K), range(H), range(W)):
        py = y - 1 + k // 3 + off[g, k, 0, y, x].item()
        px = x - 1 + k % 3 + off[g, k, 1, y, x].item()
        if not (math.isfinite(py) and math.isfinite(px)):
            continue
        for i in (math.floor(py), math.floor(py) + 1):
            for j in (math.floor(px), math.floor(px) + 1):
                if 0 <= i < H and 0 <= j < W:
                    reads[g, k, y, x, i, j] = True
    return reads


def _exactly(got, expected, clean, what, free=None):
    """``got`` is non-finite exactly where ``expected`` says and equals ``clean`` everywhere
    else but at ``free``."""
    bad = ~torch.isfinite(got)
    assert torch.equal(bad, expected), (
        f"{what}: non-finite at {bad.nonzero().tolist()}, expected at {expected.nonzero().tolist()}"
    )
    same = ~expected if free is None else ~expected & ~free
    torch.testing.assert_close(got[same], clean[same], rtol=1e-5, atol=1e-5, msg=what)


def _none(t):
    return torch.zeros_like(t, dtype=torch.bool)


def _tap_entry(g, k, y, x):
    """Index of tap (g, k) at pixel (y, x) in mask, and of its two coordinates in offset."""
    return (0, g * K + k, y, x), [(0, 2 * (g * K + k) + c, y, x) for c in (0, 1)]


DEFORM_BACKENDS = _backends("reference", "cpu", "triton", "cuda")


@pytest.mark.parametrize("backend", DEFORM_BACKENDS)
@pytest.mark.parametrize("coordinate, other", [(0, None), (0, INF), (1, -1e30)])
def test_deform_nan_offset_is_nan_where_sampled(backend, coordinate, other):
    """A NaN offset (also beside an infinite or far other coordinate) makes its sample NaN,
    never 'outside the image'; backward: NaN grad_offset (both coordinates), grad_mask and the
    grad_weight entries of that sample; grad_x as if the point were not there."""
    a = _inputs()
    grad_out = torch.randn(1, 4, H, W)
    g, k, y, x = 1, 4, 2, 3
    m_at, off_at = _tap_entry(g, k, y, x)
    clean = _run(backend, a, grad_out)
    kept = a["mask"][m_at].item()
    a["mask"][m_at] = 0
    without = _run(backend, a, grad_out)
    a["mask"][m_at] = kept
    a["offset"][off_at[coordinate]] = NAN
    if other is not None:
        a["offset"][off_at[1 - coordinate]] = other
    got = _run(backend, a, grad_out)

    out = _none(got["out"])
    out[0, 2 * g : 2 * g + 2, y, x] = True
    _exactly(got["out"], out, clean["out"], "out")
    assert got["out"][out].isnan().all()
    offset = _none(got["offset"])
    for i in off_at:
        offset[i] = True
    _exactly(got["offset"], offset, clean["offset"], "grad_offset")
    mask = _none(got["mask"])
    mask[m_at] = True
    _exactly(got["mask"], mask, clean["mask"], "grad_mask")
    weight = _none(got["weight"])
    weight[2 * g : 2 * g + 2, :, k // 3, k % 3] = True
    _exactly(got["weight"], weight, clean["weight"], "grad_weight")
    _exactly(got["x"], _none(got["x"]), without["x"], "grad_x")
    _exactly(got["bias"], _none(got["bias"]), clean["bias"], "grad_bias")


@pytest.mark.parametrize("backend", DEFORM_BACKENDS)
@pytest.mark.parametrize("coordinate, value", [(0, INF), (1, -INF), (0, -1e30), (1, 1e30)])
def test_deform_infinite_or_far_offset_samples_zero(backend, coordinate, value):
    """An infinite or far offset samples outside the image: everything equals the run with
    that tap's mask at 0, and its own grad_offset and grad_mask are 0."""
    a = _inputs()
    grad_out = torch.randn(1, 4, H, W)
    m_at, off_at = _tap_entry(0, 7, 4, 0)
    a["offset"][off_at[coordinate]] = value
    got = _run(backend, a, grad_out)
    a["mask"][m_at] = 0
    want = _run(backend, a, grad_out)
    for name in ("out", "x", "offset", "weight", "bias"):
        _exactly(got[name], _none(got[name]), want[name], name)
    assert all(got["offset"][i] == 0 for i in off_at)
    assert got["mask"][m_at] == 0
    got["mask"][m_at] = want["mask"][m_at]
    _exactly(got["mask"], _none(got["mask"]), want["mask"], "grad_mask")


@pytest.mark.parametrize("backend", DEFORM_BACKENDS)
@pytest.mark.parametrize(
    "value, pixel, spread",
    [
        (NAN, (0, 0), 1.5),  # the safe address of outside neighbours
        (NAN, (4, 5), 0.0),  # integer points: in-image neighbours at weight 0
        (INF, (2, 3), 1.5),
        (INF, (0, 0), 0.0),
    ],
)
def test_deform_nonfinite_x_reaches_only_its_samples(backend, value, pixel, spread):
    """A NaN or inf pixel reaches the samples that read it as an in-image neighbour (even at
    weight 0), never those whose outside neighbours stand in its place."""
    a = _inputs(spread)
    grad_out = torch.randn(1, 4, H, W)
    c = 3
    g = c // PER_GROUP
    clean = _run(backend, a, grad_out)
    a["x"][(0, c, *pixel)] = value
    got = _run(backend, a, grad_out)
    hits = _reads(a["offset"][0])[g][..., pixel[0], pixel[1]]  # (K, H, W)
    assert hits.any()

    out = _none(got["out"])
    out[0, 2 * g : 2 * g + 2] = hits.any(0)
    _exactly(got["out"], out, clean["out"], "out")
    offset = _none(got["offset"]).view(G, K, 2, H, W)
    offset[g] = hits.unsqueeze(1)
    _exactly(got["offset"], offset.view_as(got["offset"]), clean["offset"], "grad_offset")
    mask = _none(got["mask"]).view(G, K, H, W)
    mask[g] = hits
    _exactly(got["mask"], mask.view_as(got["mask"]), clean["mask"], "grad_mask")
    weight = _none(got["weight"])
    weight[2 * g : 2 * g + 2, c % PER_GROUP] = hits.flatten(1).any(1).view(3, 3)
    _exactly(got["weight"], weight, clean["weight"], "grad_weight")
    _exactly(got["x"], _none(got["x"]), clean["x"], "grad_x")


@pytest.mark.parametrize("backend", DEFORM_BACKENDS)
@pytest.mark.parametrize("far", [False, True])
def test_deform_nan_mask_is_nan_even_on_a_zero_sample(backend, far):
    """A NaN mask makes that pixel's outputs of the group NaN, also when the point is outside
    the image (NaN * 0); backward: grad_x is NaN at the point's in-image neighbours."""
    a = _inputs()
    grad_out = torch.randn(1, 4, H, W)
    g, k, y, x = 0, 0, 1, 1
    m_at, off_at = _tap_entry(g, k, y, x)
    a["offset"][off_at[0]] = 50.0 if far else 0.3
    a["offset"][off_at[1]] = 0.6
    clean = _run(backend, a, grad_out)
    a["mask"][m_at] = NAN
    got = _run(backend, a, grad_out)
    hits = _reads(a["offset"][0])[g, k, y, x]  # (H, W)
    assert hits.any() != far

    out = _none(got["out"])
    out[0, 2 * g : 2 * g + 2, y, x] = True
    _exactly(got["out"], out, clean["out"], "out")
    offset = _none(got["offset"])
    for i in off_at:
        offset[i] = True
    _exactly(got["offset"], offset, clean["offset"], "grad_offset")
    _exactly(got["mask"], _none(got["mask"]), clean["mask"], "grad_mask")
    weight = _none(got["weight"])
    weight[2 * g : 2 * g + 2, :, k // 3, k % 3] = True
    _exactly(got["weight"], weight, clean["weight"], "grad_weight")
    grad_x = _none(got["x"])
    grad_x[0, g * PER_GROUP : (g + 1) * PER_GROUP] = hits
    _exactly(got["x"], grad_x, clean["x"], "grad_x")


@pytest.mark.parametrize("backend", DEFORM_BACKENDS)
def test_deform_nan_weight_is_nan_in_its_output_channel(backend):
    """A NaN weight makes its output channel NaN at every pixel (also where its tap samples
    0); backward: NaN grad_offset and grad_mask of its tap and group at every pixel, grad_x
    NaN where its channel's tap reads; grad_weight unchanged."""
    a = _inputs()
    grad_out = torch.randn(1, 4, H, W)
    o, c, k = 1, 1, 5
    g = c // PER_GROUP
    clean = _run(backend, a, grad_out)
    a["weight"][o, c % PER_GROUP, k // 3, k % 3] = NAN
    got = _run(backend, a, grad_out)
    hits = _reads(a["offset"][0])[g, k]  # (H, W, H, W)

    out = _none(got["out"])
    out[0, o] = True
    _exactly(got["out"], out, clean["out"], "out")
    offset = _none(got["offset"]).view(G, K, 2, H, W)
    offset[g, k] = True
    _exactly(got["offset"], offset.view_as(got["offset"]), clean["offset"], "grad_offset")
    mask = _none(got["mask"]).view(G, K, H, W)
    mask[g, k] = True
    _exactly(got["mask"], mask.view_as(got["mask"]), clean["mask"], "grad_mask")
    _exactly(got["weight"], _none(got["weight"]), clean["weight"], "grad_weight")
    grad_x = _none(got["x"])
    grad_x[0, c] = hits.flatten(0, 1).any(0)
    _exactly(got["x"], grad_x, clean["x"], "grad_x")


# ---------------------------------------------------------------------------------------
# Attention: (B, T, H, W, heads, d) = (1, 2, 3, 4, 2, 8): spatial sequences of 12 tokens per
# (t, head), temporal ones of 2 per (pixel, head).

SHAPE = (1, 2, 3, 4, 2, 8)
ATTENTION_BACKENDS = _backends("reference", "cpu", "triton", "cuda")
OPS = {"spatial": stt_kernels.spatial_attention, "temporal": stt_kernels.temporal_attention}


def _attend(op, backend, q, k, v, grad_out):
    dev = _device(backend)
    leaves = [t.detach().clone().to(dev).requires_grad_() for t in (q, k, v)]
    out = OPS[op](*leaves, backend=backend)
    out.backward(grad_out.to(dev))
    return [t.double().cpu() for t in (out.detach(), *(leaf.grad for leaf in leaves))]


def _sequence(op, t, pixel):
    """Token positions (t, h, w) of the sequence holding token ``(t, *pixel)``."""
    if op == "spatial":
        return [(t, i, j) for i in range(SHAPE[2]) for j in range(SHAPE[3])]
    return [(s, *pixel) for s in range(SHAPE[1])]


def _mark(shape, tokens, head, dims=slice(None)):
    m = torch.zeros(shape, dtype=torch.bool)
    for tok in tokens:
        m[(0, *tok, head, dims)] = True
    return m


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("op", ["spatial", "temporal"])
@pytest.mark.parametrize("where, value", [("q", NAN), ("q", INF), ("k", NAN), ("v", NAN)])
def test_attention_nonfinite_rows(backend, op, where, value):
    """NaN/inf in query i: row i NaN; NaN in a key: every row of its sequence NaN; NaN in
    v[j, e]: column e of the sequence NaN. Backward: the NaN rows' query gradients and their
    sequence's key and value gradients are NaN (for an infinite query, at least those of the
    keys it does not score -inf); nothing else changes."""
    q, k, v = (torch.randn(SHAPE) for _ in range(3))
    grad_out = torch.randn(SHAPE)
    clean = _attend(op, backend, q, k, v, grad_out)
    t, pixel, head, dim = 1, (2, 1), 1, 3
    {"q": q, "k": k, "v": v}[where][(0, t, *pixel, head, dim)] = value
    got = _attend(op, backend, q, k, v, grad_out)
    seq = _sequence(op, t, pixel)
    if where == "q":
        rows, grad_q = _mark(SHAPE, [(t, *pixel)], head), _mark(SHAPE, [(t, *pixel)], head)
        grad_kv = _mark(SHAPE, seq, head)
    elif where == "k":
        rows = grad_q = grad_kv = _mark(SHAPE, seq, head)
    else:
        rows = _mark(SHAPE, seq, head, dim)
        grad_q = _mark(SHAPE, seq, head)  # dO . v over the NaN column
        grad_kv = _mark(SHAPE, seq, head)
    for name, value_, expected, before in zip(
        ("out", "grad_q", "grad_k", "grad_v"), got, (rows, grad_q, grad_kv, grad_kv), clean
    ):
        if where == "v" and name == "grad_v":
            expected = _none(value_)  # dV = P^T dO: no v in it
        free = None
        if where == "q" and value == INF and name in ("grad_k", "grad_v"):
            # The row's weights are NaN in plain softmax; a flash backward's exp(s - lse) may
            # give the keys scoring -inf weight 0 instead (finite gradients, less row i's
            # share). Either way those of the other keys are NaN.
            scores = (q[0, t, pixel[0], pixel[1], head].double() * k[0, :, :, :, head].double()).sum(-1)
            must = torch.tensor([scores[tok] != -INF for tok in seq])
            marked = value_[(0, *zip(*seq), head)]
            assert marked[must].isnan().all(), name
            free = expected.clone()
            free[(0, *zip(*seq), head)] = ~must.unsqueeze(-1)
            expected = expected.clone()
            expected[(0, *zip(*seq), head)] = ~torch.isfinite(marked)
        _exactly(value_, expected, before, name, free)
        assert value_[expected].isnan().all(), name


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_attention_minus_infinite_keys_weigh_nothing(backend):
    """Keys that score -inf for every query (in whole leading blocks of the flash kernels,
    N = 128) take weight 0, as in plain softmax: the rows stay finite and equal attention over
    the other keys (here: the same keys with v = 0 and a far negative score)."""
    shape = (1, 1, 8, 16, 1, 4)
    q, k, v = (torch.randn(shape) for _ in range(3))
    q[..., 0] = -q[..., 0].abs() - 0.5
    grad_out = torch.randn(shape)
    k[0, 0, :4, :, 0, 0] = INF
    got = _attend("spatial", backend, q, k, v, grad_out)
    exact = q.double(), k.double(), v.double()
    want = stt_kernels.spatial_attention(*exact, backend="reference")
    assert torch.isfinite(got[0]).all()
    torch.testing.assert_close(got[0], want, rtol=1e-4, atol=1e-4)
    others = stt_kernels.spatial_attention(
        q[:, :, 4:].double(), k[:, :, 4:].double(), v[:, :, 4:].double(), backend="reference"
    )
    assert torch.equal(want[:, :, 4:].isfinite(), others.isfinite())


def test_attention_all_minus_infinite_row_is_nan():
    """A row whose every score is -inf is NaN (0 / 0), as plain softmax gives."""
    q, k, v = (torch.randn(SHAPE) for _ in range(3))
    q[..., 0] = -1.0
    k[..., 0] = INF
    for backend in [b for b in ("reference", "cpu", "triton") if available(b)]:
        dev = _device(backend)
        out = stt_kernels.spatial_attention(q.to(dev), k.to(dev), v.to(dev), backend=backend)
        assert out.isnan().all(), backend


# ---------------------------------------------------------------------------------------
# Triton's interpreter and bfloat16


@pytest.mark.skipif(not INTERPRETED or not available("triton"), reason="needs Triton's interpreter (no GPU)")
def test_interpreter_refuses_bfloat16_with_the_reason():
    q = torch.randn(SHAPE, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"bfloat16 .* under TRITON_INTERPRET=1: .*tl\.dot.* use 'cpu' or 'reference'"):
        stt_kernels.spatial_attention(q, q, q, backend="triton")
    a = {k: v.bfloat16() for k, v in _inputs().items()}
    with pytest.raises(TypeError, match=r"bfloat16 .* under TRITON_INTERPRET=1: .*tl\.dot.* use 'cpu' or 'reference'"):
        stt_kernels.deform_conv2d(a["x"], a["offset"], a["mask"], a["weight"], backend="triton")


@pytest.mark.skipif(not INTERPRETED or not available("triton"), reason="needs Triton's interpreter (no GPU)")
@pytest.mark.parametrize("op", ["attention", "deform_conv2d"])
def test_interpreter_float16_is_right(op):
    """The interpreter's float16 products measure right, so float16 stays allowed there."""
    if op == "attention":
        q, k, v = (torch.randn(SHAPE) for _ in range(3))
        got = stt_kernels.spatial_attention(q.half(), k.half(), v.half(), backend="triton")
        want = stt_kernels.spatial_attention(q.double(), k.double(), v.double(), backend="reference")
    else:
        a = _inputs()
        got = stt_kernels.deform_conv2d(
            *(a[n].half() for n in ("x", "offset", "mask", "weight")), padding=1, backend="triton"
        )
        want = stt_kernels.deform_conv2d(
            *(a[n].double() for n in ("x", "offset", "mask", "weight")), padding=1, backend="reference"
        )
    assert (got.double() - want).abs().max() <= 1e-2 * want.abs().max()


def test_backend_report_recommends_cpu_not_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = stt_kernels.backends()["triton"].reason
    if GPU:
        pytest.skip("a GPU is visible: Triton runs on it")
    assert "'cpu'" in reason and "for tests, float32 only" in reason and "set TRITON_INTERPRET" not in reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "for tests, float32 only" in stt_kernels.backends()["triton"].reason
