"""The custom-op plumbing (views, fake kernels, autograd, torch.compile) on its own,
with a plain-PyTorch stand-in kernel, so a failure here points at the plumbing and not at
a kernel. Real kernels are tested op by op in their own files."""

import importlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import torchvision_ops

import stt_kernels
from stt_kernels import reference
from stt_kernels.ops import kernels as kernel_tables
from stt_kernels.ops.kernels import Kernels


def _attend5(q, k, v, scale):
    """Attention over axis 2 of (B, Z, N, heads, d) views; returns out and lse (B, Z, heads, N)."""
    scores = torch.einsum("bznhd,bzmhd->bzhnm", q.double(), k.double()) * scale
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bzhnm,bzmhd->bznhd", torch.softmax(scores, -1), v.double())
    return out, lse


def _forward(q, k, v, out, lse, scale):
    o, log_sum_exp = _attend5(q, k, v, scale)
    out.copy_(o)
    lse.copy_(log_sum_exp)


def _backward(q, k, v, out, grad_out, lse, scale, grad_q, grad_k, grad_v):
    # Custom-op implementations run below autograd, so the stand-in writes the gradient out.
    q, k, v, do = (t.double() for t in (q, k, v, grad_out))
    p = torch.softmax(torch.einsum("bznhd,bzmhd->bzhnm", q, k) * scale, dim=-1)
    dp = torch.einsum("bznhd,bzmhd->bzhnm", do, v)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    grad_q.copy_(torch.einsum("bzhnm,bzmhd->bznhd", ds, k) * scale)
    grad_k.copy_(torch.einsum("bzhnm,bznhd->bzmhd", ds, q) * scale)
    grad_v.copy_(torch.einsum("bzhnm,bznhd->bzmhd", p, do))


def _deform_forward(x, offset, mask, weight, bias, sh, sw, ph, pw, dh, dw, groups, weight_groups):
    return reference.deform_conv2d(x, offset, mask, weight, bias, (sh, sw), (ph, pw), (dh, dw))


def _deform_backward(grad_out, x, offset, mask, weight, sh, sw, ph, pw, dh, dw, groups, weight_groups):
    torchvision_ops()  # the stand-in borrows torchvision's backward kernel
    use_mask = mask is not None
    grad_x, grad_weight, grad_offset, grad_mask, _ = torch.ops.torchvision._deform_conv2d_backward(
        grad_out,
        x,
        weight,
        offset,
        mask if use_mask else x.new_zeros(x.shape[0], 1),
        torch.zeros(weight.shape[0], dtype=x.dtype),
        sh,
        sw,
        ph,
        pw,
        dh,
        dw,
        weight_groups,
        groups,
        use_mask,
    )
    return grad_x, grad_offset, grad_mask if use_mask else x.new_empty((0,)), grad_weight


@pytest.fixture
def stand_in(monkeypatch):
    """Route the 'cpu' backend through the stand-in kernels for the duration of a test."""
    monkeypatch.setitem(kernel_tables.attention_kernels._python, "cpu", Kernels(_forward, _backward))
    monkeypatch.setitem(kernel_tables.deform_conv2d_kernels._python, "cpu", Kernels(_deform_forward, _deform_backward))
    monkeypatch.setattr(stt_kernels.backend, "_runs_on", lambda name, device: None)


@pytest.mark.parametrize(
    "op, spec",
    [
        (stt_kernels.spatial_attention, reference.spatial_attention),
        (stt_kernels.temporal_attention, reference.temporal_attention),
    ],
)
def test_attention_views_and_gradients(stand_in, op, spec):
    qkv = torch.randn(2, 3, 5, 4, 3, 2, 6, dtype=torch.float64, requires_grad=True)
    q, k, v = qkv.unbind(4)
    assert not q.is_contiguous()
    out = op(q, k, v, backend="cpu")
    expected = spec(q, k, v, 6**-0.5)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    (ours,) = torch.autograd.grad(out, qkv, grad)
    (theirs,) = torch.autograd.grad(expected, qkv, grad)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("name", ["spatial_attention", "temporal_attention"])
def test_attention_opcheck(stand_in, name):
    q, k, v = (torch.randn(1, 3, 2, 3, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    torch.library.opcheck(getattr(torch.ops.stt, name), (q, k, v, 0.5, "cpu"))


def test_attention_compiles_fullgraph(stand_in):
    q, k, v = (torch.randn(1, 2, 3, 3, 1, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        return (
            stt_kernels.spatial_attention(q, k, v, backend="cpu").sum()
            + stt_kernels.temporal_attention(q, k, v, backend="cpu").square().sum()
        )

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    expected = f(q, k, v)
    got = compiled(q, k, v)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(torch.autograd.grad(got, (q, k, v)), torch.autograd.grad(expected, (q, k, v)))


@pytest.mark.parametrize("with_mask, with_bias", [(True, True), (False, False)])
def test_deform_conv2d_gradients_and_opcheck(stand_in, with_mask, with_bias):
    x = torch.randn(2, 4, 6, 5, dtype=torch.float64, requires_grad=True)
    offset = torch.randn(2, 2 * 2 * 9, 6, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 2 * 9, 6, 5, dtype=torch.float64, requires_grad=True) if with_mask else None
    weight = torch.randn(3, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True) if with_bias else None
    inputs = [t for t in (x, offset, mask, weight, bias) if t is not None]
    ours = stt_kernels.deform_conv2d(x, offset, mask, weight, bias, backend="cpu")
    spec = reference.deform_conv2d(x, offset, mask, weight, bias, (1, 1), (1, 1), (1, 1))
    torch.testing.assert_close(ours, spec)
    grad = torch.randn_like(ours)
    torch.testing.assert_close(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(spec, inputs, grad))
    geometry = ([1, 1], [1, 1], [1, 1], 2)
    torch.library.opcheck(torch.ops.stt.deform_conv2d, (x, offset, mask, weight, bias, *geometry, "cpu"))


def test_batch_zero(stand_in):
    q = torch.randn(0, 2, 3, 3, 1, 4, dtype=torch.float64)
    assert stt_kernels.spatial_attention(q, q, q, backend="cpu").shape == q.shape


OPS = ["spatial_attention", "temporal_attention", "deform_conv2d"]


@pytest.mark.parametrize("name", OPS + [f"{op}_backward" for op in OPS])
def test_python_implementations_have_the_cpp_schemas(name):
    """The Python implementation serves the C++ op (as its hand-off ``_<op>_python``) or, without
    the compiled library, defines it: either way its signature must be the C++ schema."""
    if not kernel_tables.defined_in_cpp(name.removesuffix("_backward")):
        pytest.skip("the compiled library does not define the public ops")
    public = str(getattr(torch.ops.stt, name).default._schema).partition("stt::" + name)[2]
    hand_off = str(getattr(torch.ops.stt, f"_{name}_python").default._schema).partition(f"stt::_{name}_python")[2]
    assert public == hand_off
    if name.startswith("deform_conv2d"):
        module = importlib.import_module("stt_kernels.ops.deform_conv2d")
        implementation = module._backward if name.endswith("_backward") else module._forward
    else:
        module = importlib.import_module("stt_kernels.ops.attention")
        layout = module._SPATIAL if name.startswith("spatial") else module._TEMPORAL
        implementation = layout._backward if name.endswith("_backward") else layout._forward
    assert torch.library.infer_schema(implementation, mutates_args=()) == public


_WITHOUT_LIBRARY = textwrap.dedent("""
    import warnings, torch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the missing library is announced; that is test_build's
        import stt_kernels
    from stt_kernels import reference
    from stt_kernels.ops.kernels import defined_in_cpp
    assert not stt_kernels._extension.EXTENSION.loaded and not defined_in_cpp("spatial_attention")
    qkv = torch.randn(1, 2, 3, 2, 3, 2, 4, dtype=torch.float64, requires_grad=True)
    q, k, v = qkv.unbind(4)
    for op, spec in ((stt_kernels.spatial_attention, reference.spatial_attention),
                     (stt_kernels.temporal_attention, reference.temporal_attention)):
        out, expected = op(q, k, v), spec(q, k, v, 0.5)
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(torch.autograd.grad(out.sum(), qkv), torch.autograd.grad(expected.sum(), qkv))
    torch.library.opcheck(torch.ops.stt.spatial_attention, (q, k, v, 0.5, "auto"))
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    offset = torch.randn(1, 18, 4, 4, dtype=torch.float64)
    weight = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    out = stt_kernels.deform_conv2d(x, offset, None, weight)
    expected = reference.deform_conv2d(x, offset, None, weight, None, (1, 1), (1, 1), (1, 1))
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), x), torch.autograd.grad(expected.sum(), x))
    geometry = ([1, 1], [1, 1], [1, 1], 1)
    torch.library.opcheck(torch.ops.stt.deform_conv2d, (x, offset, None, weight, None, *geometry, "auto"))
    print("ok")
""")


def test_without_the_compiled_library_python_defines_the_ops(tmp_path):
    """A package without a usable library defines the public ops in Python (custom ops with Python
    autograd), so 'auto' falls back to the reference, forward and backward."""
    package = tmp_path / "stt_kernels"
    shutil.copytree(Path(stt_kernels.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    # Unloadable rather than absent: an editable install's import finder would find the checkout's.
    for library in package.glob("_C*.so"):
        library.write_bytes(b"not a shared library")
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_LIBRARY],
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-4000:]
