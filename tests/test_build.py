"""The build: the CUDA sources hipify cleanly, CMake builds the same sources for LibTorch
(its CPU kernels for the capability asked), and a library built for another torch fails with
a sentence while 'reference' still works."""

import os
import platform
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import stt_kernels
from stt_kernels import _isa
from stt_kernels._extension import EXTENSION, _mismatch

ROOT = Path(__file__).resolve().parents[1]

# CUDA names that must not survive hipify: runtime API, libraries, CUDA-only headers.
_LEFTOVER = re.compile(r"\bcuda[A-Z]\w*\s*\(|\bcu(blas|sparse|rand|fft|solver)[A-Z_]\w*|#include\s*<cuda[_a-z]*\.h>")


def test_cuda_sources_hipify_cleanly(tmp_path):
    from torch.utils.hipify import hipify_python

    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    assert sources, "csrc/cuda has no CUDA sources"
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    hipify_python.hipify(
        project_directory=str(tmp_path / "csrc"),
        output_directory=str(tmp_path / "hip"),
        header_include_dirs=["include"],
        includes=["*"],
        is_pytorch_extension=True,
        show_progress=False,
    )
    hipified = sorted((tmp_path / "hip").rglob("*.hip"))
    assert len(hipified) == len(sources), f"hipify produced {hipified} from {sources}"
    for path in [*hipified, *(tmp_path / "hip" / "include").rglob("*.h")]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert not _LEFTOVER.search(line), f"{path.name}:{number} still CUDA after hipify: {line.strip()}"


def test_version_mismatch_is_a_sentence():
    message = _mismatch({"torch_version": "2.3.0+cu121", "cuda_version": "12.1"})
    assert message.startswith("stt_kernels._C was built for torch 2.3.0+cu121, CUDA 12.1; you have torch ")
    assert "rebuild" in message
    assert _mismatch({"torch_version": torch.__version__}) is None


@pytest.mark.slow
def test_library_for_another_torch_leaves_reference_working(tmp_path):
    """A package whose compiled library is unusable still imports; reference runs and the
    cpu backend refuses with the versions in the message."""
    package = tmp_path / "stt_kernels"
    installed = Path(stt_kernels.__file__).parent  # the package under test, with its library
    shutil.copytree(installed, package, ignore=shutil.ignore_patterns("__pycache__"))
    assert list(package.glob("_C*.so")), "the package under test has no compiled library"
    for library in package.glob("_C*.so"):
        library.write_bytes(b"not a shared library")
    (package / "_build_info.json").write_text('{"torch_version": "2.3.0+cu121", "cuda_version": "12.1"}')
    script = textwrap.dedent("""
        import warnings, torch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import stt_kernels
        assert any("built for torch 2.3.0+cu121, CUDA 12.1" in str(w.message) for w in caught), caught
        q = torch.randn(1, 2, 2, 2, 1, 4)
        stt_kernels.spatial_attention(q, q, q)  # auto falls back to reference
        stt_kernels.spatial_attention(q, q, q, backend="reference")
        try:
            stt_kernels.spatial_attention(q, q, q, backend="cpu")
        except stt_kernels.BackendUnavailableError as e:
            assert "built for torch 2.3.0+cu121" in str(e), e
            print("refused:", e)
        else:
            raise AssertionError("the cpu backend ran a library built for another torch")
    """)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "refused: backend 'cpu' cannot run spatial_attention" in result.stdout


def test_cmake_compiles_each_capability_with_the_flags_the_package_uses():
    text = (ROOT / "CMakeLists.txt").read_text()
    for capability in _isa.X86_CAPABILITIES:
        found = re.search(rf"set\(STT_CPU_FLAGS_{capability.name} ([^)]*)\)", text)
        assert found, f"CMakeLists.txt has no flags for {capability.name}"
        assert tuple(found.group(1).split()) == capability.flags, capability.name


def _cmake_capability() -> str:
    """avx2 where this CPU runs it (a capability other than the default native, so the test sees
    the option take effect), else the baseline."""
    features = stt_kernels._C.cpu_features() if EXTENSION.loaded else {}
    avx2 = next(c for c in _isa.X86_CAPABILITIES if c.name == "avx2")
    return "avx2" if all(features.get(f, False) for f in avx2.features) else "default"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_builds_the_same_sources():
    build = ROOT / "build" / "cmake-test"  # kept between runs so ninja rebuilds only what changed
    prefix = torch.utils.cmake_prefix_path
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    capability = _cmake_capability()
    subprocess.run(
        [
            "cmake",
            "-S",
            str(ROOT),
            "-B",
            str(build),
            *generator,
            f"-DCMAKE_PREFIX_PATH={prefix}",
            f"-DSTT_CPU_CAPABILITY={capability}",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    subprocess.run(["cmake", "--build", str(build), "--parallel", "2"], check=True, capture_output=True, text=True)
    library = build / "libstt_kernels.so"
    assert library.exists()
    # Load it into a torch that has not loaded stt_kernels._C (both would define the schemas).
    script = textwrap.dedent(f"""
        import ctypes, torch
        torch.ops.load_library({str(library)!r})
        for op in ("_attention_forward", "_attention_backward", "_deform_conv2d_forward", "_deform_conv2d_backward"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key("stt::" + op, "CPU"), op
        report = ctypes.CDLL({str(library)!r}).stt_cpu_kernels_capability
        report.restype = ctypes.c_char_p
        print(report().decode())
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert result.stdout.split()[-1] == f"stt_{capability}", "STT_CPU_CAPABILITY did not reach the compiler"
