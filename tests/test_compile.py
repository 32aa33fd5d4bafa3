"""The ops and the networks under ``torch.compile`` with the default (inductor) backend and under
``torch.export``: fake kernels exact in sizes and strides, compiled forward and backward equal to
eager, dynamic T/H/W without recompiles, and exported graphs that resolve ``auto`` when they run.

Inductor compiles take tens of seconds on this project's 2 cores, so the SST grid runs every
fusion with the paper's ``split`` order plus both cascades with the deformable fusion (5 of 9);
``STT_COMPILE_SWEEP=1`` runs all 9. Everything is float64 so compiled and eager agree to ~1e-12.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch
from test_cli import TINY_YAML
from torch._dynamo.utils import counters
from torch._subclasses.fake_tensor import FakeTensorMode

import stt_kernels
from stt_kernels.nn.sst import FUSIONS, ORDERS
from stt_kernels.ops import kernels as kernel_tables

F64 = torch.float64
CPU_KERNELS = stt_kernels.backends()["cpu"]
needs_cpu_kernels = pytest.mark.skipif(not CPU_KERNELS.available, reason=f"cpu backend: {CPU_KERNELS.reason}")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _graphs() -> int:
    """Graphs Dynamo compiled since the test began (a recompile adds one)."""
    return counters["stats"]["unique_graphs"]


# --- fake kernels -------------------------------------------------------------------------


def _attention_layouts(shape=(2, 3, 4, 3, 2, 4)):
    """q, k, v in the layouts the module and users feed: packed-projection views, a permuted
    (T innermost) storage, a batch expanded with stride 0, and plain contiguous."""
    b, t, h, w, heads, d = shape
    packed = torch.randn(b, t, h, w, 3, heads, d, dtype=F64).unbind(4)
    permuted = tuple(torch.randn(b, h, w, t, heads, d, dtype=F64).permute(0, 3, 1, 2, 4, 5) for _ in range(3))
    expanded = tuple(torch.randn(1, t, h, w, heads, d, dtype=F64).expand(b, -1, -1, -1, -1, -1) for _ in range(3))
    contiguous = tuple(torch.randn(shape, dtype=F64) for _ in range(3))
    return {"packed": packed, "permuted": permuted, "expanded": expanded, "contiguous": contiguous}


def _deform_layouts(n=2, c=4, h=5, w=6, c_out=3, groups=2):
    """x, offset, mask, weight: channels-last (as the SST fusion makes them), a channel slice of
    one predictor output, stride-0 expanded batch and weight, and plain contiguous."""
    taps = 9

    def cl(*shape):
        return torch.randn(*shape, dtype=F64).contiguous(memory_format=torch.channels_last)

    predicted = cl(n, 3 * groups * taps, h, w)
    return {
        "channels_last": (
            cl(n, c, h, w),
            cl(n, 2 * groups * taps, h, w),
            cl(n, groups * taps, h, w).sigmoid(),
            cl(c_out, c, 3, 3),
        ),
        "sliced": (
            torch.randn(n, h, w, c, dtype=F64).permute(0, 3, 1, 2),
            predicted[:, : 2 * groups * taps],
            predicted[:, 2 * groups * taps :].sigmoid(),
            torch.randn(c_out, c, 3, 3, dtype=F64),
        ),
        "expanded": (
            torch.randn(1, c, h, w, dtype=F64).expand(n, -1, -1, -1),
            torch.randn(1, 2 * groups * taps, h, w, dtype=F64).expand(n, -1, -1, -1),
            torch.rand(1, groups * taps, h, w, dtype=F64).expand(n, -1, -1, -1),
            torch.randn(1, c, 3, 3, dtype=F64).expand(c_out, -1, -1, -1),
        ),
        "contiguous": (
            torch.randn(n, c, h, w, dtype=F64),
            torch.randn(n, 2 * groups * taps, h, w, dtype=F64),
            torch.rand(n, groups * taps, h, w, dtype=F64),
            torch.randn(c_out, c, 3, 3, dtype=F64),
        ),
    }


def _assert_fake_matches_real(op, args) -> None:
    """The fake kernel's outputs have the real kernel's sizes, strides and dtypes (all of them,
    not only the significant ones opcheck compares)."""
    real = op(*args)
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake = op(*fake_args)
    real, fake = (r if isinstance(r, (tuple, list)) else (r,) for r in (real, fake))
    for i, (r, f) in enumerate(zip(real, fake)):
        assert (tuple(f.shape), f.stride(), f.dtype) == (tuple(r.shape), r.stride(), r.dtype), f"output {i}"


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_cpu_kernels), "reference"])
@pytest.mark.parametrize("layout", ["packed", "permuted", "expanded", "contiguous"])
@pytest.mark.parametrize("name", ["spatial_attention", "temporal_attention"])
def test_attention_opcheck_and_fake_strides(name, layout, backend):
    q, k, v = _attention_layouts()[layout]
    forward, backward = getattr(torch.ops.stt, name), getattr(torch.ops.stt, f"{name}_backward")
    leaves = [t.detach().requires_grad_() for t in (q, k, v)] if layout != "expanded" else [q, k, v]
    torch.library.opcheck(forward, (*leaves, 0.5, backend))
    _assert_fake_matches_real(forward, (q, k, v, 0.5, backend))
    out, lse = forward(q, k, v, 0.5, backend)
    grad_out = torch.randn(out.shape, dtype=F64).transpose(2, 3).contiguous().transpose(2, 3)
    args = (q, k, v, out, lse, grad_out, 0.5, backend)
    torch.library.opcheck(backward, args)
    _assert_fake_matches_real(backward, args)


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_cpu_kernels), "reference"])
@pytest.mark.parametrize("layout", ["channels_last", "sliced", "expanded", "contiguous"])
@pytest.mark.parametrize("with_mask", [True, False])
def test_deform_conv2d_opcheck_and_fake_strides(layout, with_mask, backend):
    x, offset, mask, weight = _deform_layouts()[layout]
    mask = mask if with_mask else None
    bias = torch.randn(weight.shape[0], dtype=F64)
    geometry = ([1, 1], [1, 1], [1, 1], 2)
    args = (x, offset, mask, weight, bias, *geometry, backend)
    torch.library.opcheck(torch.ops.stt.deform_conv2d, args)
    _assert_fake_matches_real(torch.ops.stt.deform_conv2d, args)
    out = torch.ops.stt.deform_conv2d(*args)
    grad_out = torch.randn(out.shape, dtype=F64).contiguous(memory_format=torch.channels_last)
    backward_args = (grad_out, x, offset, mask, weight, *geometry, backend)
    torch.library.opcheck(torch.ops.stt.deform_conv2d_backward, backward_args)
    _assert_fake_matches_real(torch.ops.stt.deform_conv2d_backward, backward_args)


@needs_cpu_kernels
def test_auto_is_resolved_when_the_op_runs(monkeypatch):
    """An op called with 'auto' picks its kernel by device at run time, as an explicit name would."""
    seen = []
    original = kernel_tables.KernelTable.for_call

    def recording(self, backend, device, dtype, head_dim=None):
        kernels = original(self, backend, device, dtype, head_dim)
        seen.append((self.op, backend, kernels))
        return kernels

    monkeypatch.setattr(kernel_tables.KernelTable, "for_call", recording)
    q, k, v = _attention_layouts()["packed"]
    auto = torch.ops.stt.spatial_attention(q, k, v, 0.5, "auto")[0]
    torch.testing.assert_close(auto, torch.ops.stt.spatial_attention(q, k, v, 0.5, "cpu")[0], rtol=0, atol=0)
    assert seen[0][1] == "auto" and seen[0][2] == seen[1][2]
    with pytest.raises(stt_kernels.BackendUnavailableError, match="backend 'cuda' cannot run attention on cpu tensors"):
        torch.ops.stt.spatial_attention(q, k, v, 0.5, "cuda")


# --- compiled training ----------------------------------------------------------------------


def _grads(out, params, grad):
    return torch.autograd.grad(out, params, grad, allow_unused=True)


def _assert_compiled_equals_eager(module, x, **compile_args):
    params = [x] + [p for p in module.parameters()]
    # One pass at a time: a training-mode forward updates norm statistics in place.
    expected = module(x)
    grad = torch.randn_like(expected)
    expected_grads = _grads(expected, params, grad)
    got = torch.compile(module, fullgraph=True, **compile_args)(x)
    torch.testing.assert_close(got, expected)
    for ours, theirs in zip(_grads(got, params, grad), expected_grads):
        if theirs is not None:
            torch.testing.assert_close(ours, theirs)


def _sst(fusion, order, dim=8, heads=2):
    torch.manual_seed(0)
    module = stt_kernels.SSTAttention(dim, heads, fusion=fusion, order=order).double()
    if fusion == "deformable":
        with torch.no_grad():  # a fresh predictor is zero: make the offsets and masks matter
            module.fusion.predictor.weight.normal_(0, 0.3)
    return module


_SUBSET = [(fusion, "split") for fusion in FUSIONS] + [("deformable", o) for o in ORDERS if o != "split"]
_GRID = list(itertools.product(FUSIONS, ORDERS)) if os.environ.get("STT_COMPILE_SWEEP") == "1" else _SUBSET


@pytest.mark.parametrize("fusion, order", _GRID)
def test_sst_attention_inductor_matches_eager(fusion, order):
    x = torch.randn(2, 8, 3, 5, 6, dtype=F64, requires_grad=True)
    _assert_compiled_equals_eager(_sst(fusion, order), x)


def test_sst_dynamic_shapes_train_without_recompiles():
    """dynamic=True: one graph serves every B, T, H, W, square H = W included. (Traced first on a
    square slice, Dynamo would give H and W one symbol and recompile once for the first
    non-square one: its duck sizing, not ours.)"""
    module = _sst("add", "split")
    compiled = torch.compile(module, fullgraph=True, dynamic=True)
    for shape in [(2, 8, 3, 6, 7), (3, 8, 4, 5, 5), (2, 8, 5, 9, 4)]:
        x = torch.randn(*shape, dtype=F64, requires_grad=True)
        expected, got = module(x), compiled(x)
        torch.testing.assert_close(got, expected)
        grad = torch.randn_like(expected)
        torch.testing.assert_close(torch.autograd.grad(got, x, grad), torch.autograd.grad(expected, x, grad))
    assert _graphs() == 1


def test_sst_deformable_mark_dynamic_forward_without_recompiles():
    """T, H, W marked dynamic: the deformable fusion's forward compiles once for every size."""
    module = _sst("deformable", "split")
    compiled = torch.compile(module, fullgraph=True)
    with torch.no_grad():
        for shape in [(2, 8, 3, 6, 6), (2, 8, 4, 5, 7), (2, 8, 5, 9, 4)]:
            x = torch.randn(*shape, dtype=F64)
            torch._dynamo.mark_dynamic(x, (2, 3, 4))
            torch.testing.assert_close(compiled(x), module(x))
    assert _graphs() == 1


def test_sst_deformable_dynamic_training_is_correct():
    """dynamic=True training of the paper's module compiles and equals eager (it used to raise
    InductorError). Inductor's convolution backward (torch 2.14) specialises H and W, so a new
    size recompiles once: the predictor's nn.Conv2d does that on its own too."""
    module = _sst("deformable", "split")
    compiled = torch.compile(module, fullgraph=True, dynamic=True)
    x = torch.randn(2, 8, 3, 6, 6, dtype=F64, requires_grad=True)
    expected, got = module(x), compiled(x)
    torch.testing.assert_close(got, expected)
    grad = torch.randn_like(expected)
    torch.testing.assert_close(torch.autograd.grad(got, x, grad), torch.autograd.grad(expected, x, grad))


@pytest.mark.parametrize("preset, shape", [("tiny-cpu", (2, 1, 8, 32, 32)), ("mitoem-r", (1, 1, 8, 32, 32))])
def test_stt_unet_inductor_matches_eager(preset, shape):
    from stt_model.build import build_model

    torch.manual_seed(0)
    model = build_model(preset).double().train()
    x = torch.rand(*shape, dtype=F64, requires_grad=True)
    _assert_compiled_equals_eager(model, x)


def test_compile_as_the_first_call_of_a_process():
    """Tracing resolves the backend table before any eager call has filled a cache (the
    cached_property lock once stopped Dynamo here)."""
    script = (
        "import torch, stt_kernels\n"
        "m = stt_kernels.SSTAttention(8, 2).double()\n"
        "x = torch.randn(1, 8, 2, 3, 3, dtype=torch.float64)\n"
        "y = torch.compile(m, fullgraph=True, backend='eager')(x)\n"
        "torch.testing.assert_close(y, m(x))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


# --- export -----------------------------------------------------------------------------------


def _backend_args(program) -> list[str]:
    return [
        node.args[-1]
        for node in program.graph.nodes
        if node.op == "call_function" and str(node.target).startswith("stt.")
    ]


def _constants(program) -> set[object]:
    return {arg for node in program.graph.nodes for arg in node.args if isinstance(arg, str)}


def test_export_records_auto_not_the_traced_backend():
    module = _sst("deformable", "split").eval()
    x = torch.randn(1, 8, 3, 4, 5, dtype=F64)
    program = torch.export.export(module, (x,))
    assert _backend_args(program) == ["auto", "auto", "auto"]
    assert "cpu" not in _constants(program)
    torch.testing.assert_close(program.module()(x), module(x))


@needs_cpu_kernels
def test_export_records_a_backend_asked_for():
    module = _sst("deformable", "split").eval()
    x = torch.randn(1, 8, 3, 4, 5, dtype=F64)
    with stt_kernels.use_backend("cpu"):
        assert _backend_args(torch.export.export(module, (x,))) == ["cpu", "cpu", "cpu"]


def test_export_of_the_tiny_model_holds_no_backend_constant():
    from stt_model.build import build_model

    torch.manual_seed(0)
    model = build_model("tiny-cpu").eval()
    x = torch.rand(1, 1, 8, 32, 32)
    program = torch.export.export(model, (x,))
    assert _backend_args(program) and set(_backend_args(program)) == {"auto"}
    assert "cpu" not in _constants(program)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x))


# --- stt train --compile ------------------------------------------------------------------------

# The CLI tests' tiny run, three steps: the compiled and the eager run compare their losses.
_TRAIN_YAML = TINY_YAML.replace("iterations: 2", "iterations: 3").replace("checkpoint_every: 2", "checkpoint_every: 3")


def test_stt_train_compile_trains_as_eager(tmp_path):
    import csv

    import h5py

    from stt_model.cli import main
    from stt_model.data import synthetic_volume

    volume = synthetic_volume((8, 40, 40), seed=5)
    data = tmp_path / "vol.h5"
    with h5py.File(data, "w") as f:
        f["image"], f["label"] = volume.image, volume.labels
    config = tmp_path / "tiny.yaml"
    config.write_text(_TRAIN_YAML)

    def train(name, *extra):
        run = tmp_path / name
        assert (
            main(
                [
                    "train",
                    "--config",
                    str(config),
                    "--image",
                    f"{data}:image",
                    "--label",
                    f"{data}:label",
                    "--out",
                    str(run),
                    *extra,
                ]
            )
            == 0
        )
        with open(run / "train_log.csv") as f:
            return [float(row["seg"]) for row in csv.DictReader(f)]

    eager = train("eager")
    assert _graphs() == 0
    compiled = train("compiled", "--compile")
    assert _graphs() >= 1  # the network went through Dynamo
    assert len(compiled) == len(eager) == 3
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)
