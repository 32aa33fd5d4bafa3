"""The ops in a process without Python's ``stt_kernels``: the CMake library (``libstt_kernels``)
registers the public ops, their autograd and CPU kernels from C++, so

- a ``torch.jit.trace``d ``tiny-cpu`` STT-UNET saved as TorchScript and an AOTInductor package of
  its ``torch.export`` run in a C++ program (``tests/libtorch``) that links LibTorch and the
  library, and match Python eager;
- loaded into a Python process that never imports ``stt_kernels``, the ops compute what
  torchvision and plain PyTorch compute, forward and backward, and refuse the Python-only
  backends by name.

The C++ build is cached (ninja, ``build/cmake-test``, shared with ``test_build.py``): cold, the
library and the program take about 3 CPU minutes; warm, the test takes about 80 s on two busy
cores, most of it the AOTInductor compile of the tiny model.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_build import _cmake_capability

ROOT = Path(__file__).resolve().parent.parent
# test_build.py's CMake build, with the same options plus the test program: one build of the
# library serves both tests.
BUILD = ROOT / "build" / "cmake-test"
PROGRAM = BUILD / "tests" / "libtorch" / "stt_libtorch_check"
LIBRARY = BUILD / "libstt_kernels.so"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("cmake") is None or shutil.which("ninja") is None,
        reason="needs cmake and ninja to build the LibTorch program",
    ),
    # The network's input checks compare sizes in Python; the tracer warns that they are not recorded.
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit.*` is deprecated:FutureWarning"),
]

# float32 throughout. TorchScript runs the same kernels eager runs; AOTInductor fuses and
# reorders the convolutions' neighbours, so its sums round differently (~1e-6 seen).
TORCHSCRIPT_TOLERANCE = dict(rtol=1e-5, atol=1e-5)
AOTI_TOLERANCE = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def built() -> Path:
    """The library and the C++ program, built against the LibTorch inside the installed torch."""
    configure = [
        "cmake",
        "-S",
        str(ROOT),
        "-B",
        str(BUILD),
        "-G",
        "Ninja",
        "-DSTT_BUILD_TESTS=ON",
        f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        f"-DSTT_CPU_CAPABILITY={_cmake_capability()}",
    ]
    for command in (configure, ["cmake", "--build", str(BUILD), "--parallel", "2"]):
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    assert PROGRAM.exists() and LIBRARY.exists()
    return PROGRAM


def _tiny_model() -> torch.nn.Module:
    from stt_model.build import build_model

    torch.manual_seed(0)
    return build_model("tiny-cpu").eval()


def test_exported_models_run_in_libtorch_and_match_eager(built, tmp_path):
    model = _tiny_model()
    # The smallest input the 4-level net takes (H, W multiples of 8), 8 slices as in training.
    x = torch.rand(1, 1, 8, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
        traced = torch.jit.trace(model, x, check_trace=False)
        program = torch.export.export(model, (x,))
    # The graphs call the stt ops with backend 'auto' (resolved by the C++ kernels when they run).
    calls = [n for n in traced.inlined_graph.nodes() if n.kind().startswith("stt::")]
    assert {n.kind() for n in calls} == {"stt::spatial_attention", "stt::temporal_attention", "stt::deform_conv2d"}
    assert all(list(n.inputs())[-1].toIValue() == "auto" for n in calls)
    exported = {n.target for n in program.graph.nodes if n.op == "call_function"}
    assert torch.ops.stt.spatial_attention.default in exported
    traced.save(str(tmp_path / "traced.pt"))
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "model.pt2"))
    torch.save(x, tmp_path / "input.pt")

    # No Python in the C++ process: the program does not link libpython.
    libraries = subprocess.run(["ldd", str(built)], capture_output=True, text=True).stdout
    assert "libstt_kernels" in libraries and "libpython" not in libraries
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    result = subprocess.run(
        [str(built), str(tmp_path / "traced.pt"), package, str(tmp_path / "input.pt"), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    torch.testing.assert_close(torch.load(tmp_path / "torchscript.pt"), expected, **TORCHSCRIPT_TOLERANCE)
    torch.testing.assert_close(torch.load(tmp_path / "aoti.pt"), expected, **AOTI_TOLERANCE)


# Runs in a fresh interpreter that loads the CMake library and never imports stt_kernels (whose
# _C would define the same ops): the C++ kernels run every call, with no Python hand-off.
_WITHOUT_STT_KERNELS = textwrap.dedent("""
    import sys, torch, torchvision
    torch.ops.load_library(sys.argv[1])
    assert "stt_kernels" not in sys.modules
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("stt::_spatial_attention_python", "CPU")
    torch.manual_seed(0)
    F64 = torch.float64

    def attention(q, k, v, scale):  # over axis 2 of (B, Z, N, heads, d)
        p = torch.softmax(torch.einsum("bznhd,bzmhd->bzhnm", q, k) * scale, -1)
        return torch.einsum("bzhnm,bzmhd->bznhd", p, v)

    views = {"spatial_attention": lambda t: t.flatten(2, 3),
             "temporal_attention": lambda t: t.flatten(2, 3).transpose(1, 2)}
    qkv = torch.randn(2, 3, 4, 5, 3, 2, 8, dtype=F64, requires_grad=True)
    q, k, v = qkv.unbind(4)  # strided views of one packed projection
    grad = torch.randn(2, 3, 4, 5, 2, 8, dtype=F64)
    for name, view in views.items():
        for backend in ("auto", "cpu"):
            out, lse = getattr(torch.ops.stt, name)(q, k, v, 0.3, backend)
            assert out.is_contiguous() and lse.dtype == torch.float64  # float64 q: a float64 lse
            spec = attention(view(q), view(k), view(v), 0.3)
            torch.testing.assert_close(view(out), spec)
            (ours,) = torch.autograd.grad(out, qkv, grad)
            (theirs,) = torch.autograd.grad(spec, qkv, view(grad))
            torch.testing.assert_close(ours, theirs)
        refusals = {"triton": "backend 'triton' on cpu tensors needs Python (`import stt_kernels`)",
                    "reference": "backend 'reference' on cpu tensors needs Python (`import stt_kernels`)",
                    "cuda": "backend 'cuda' cannot run on cpu tensors; use 'auto' or 'cpu'"}
        for backend, message in refusals.items():
            try:
                getattr(torch.ops.stt, name)(q, k, v, 0.3, backend)
            except RuntimeError as e:
                assert f"stt::{name}: {message}" in str(e), e
            else:
                raise AssertionError(f"{name} ran backend {backend!r} without Python")

    x = torch.randn(2, 4, 7, 6, dtype=F64, requires_grad=True)
    offset = torch.randn(2, 2 * 2 * 9, 7, 6, dtype=F64, requires_grad=True)
    mask = torch.rand(2, 2 * 9, 7, 6, dtype=F64, requires_grad=True)
    weight = torch.randn(3, 4, 3, 3, dtype=F64, requires_grad=True)
    bias = torch.randn(3, dtype=F64, requires_grad=True)
    for m in (mask, None):
        leaves = [t for t in (x, offset, m, weight, bias) if t is not None]
        ours = torch.ops.stt.deform_conv2d(x, offset, m, weight, bias, [1, 1], [1, 1], [1, 1], 2, "auto")
        theirs = torchvision.ops.deform_conv2d(x, offset, weight, bias, padding=1, mask=m)
        torch.testing.assert_close(ours, theirs)
        g = torch.randn_like(ours)
        torch.testing.assert_close(torch.autograd.grad(ours, leaves, g), torch.autograd.grad(theirs, leaves, g))
    print("ok")
""")


def test_cpp_ops_without_python_package(built):
    torchvision = pytest.importorskip("torchvision")
    del torchvision
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_STT_KERNELS, str(LIBRARY)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=BUILD,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-4000:]
