"""Backend report, selection precedence (argument > context > STT_BACKEND > auto) and the
errors for a backend that cannot run."""

import importlib.util
import shutil

import pytest
import torch
from conftest import GPU

import stt_kernels
from stt_kernels import backend as backend_module
from stt_kernels.backend import BackendUnavailableError, resolve
from stt_kernels.ops.kernels import attention_kernels

EVERYWHERE = frozenset({"triton", "cuda", "cpu", "reference"})
CPU = torch.device("cpu")


def test_report_names_every_backend_with_a_reason():
    report = stt_kernels.backends()
    assert list(report) == ["triton", "cuda", "cpu", "reference"]
    for status in report.values():
        assert status.reason
        assert status.name in str(status)
    assert report["reference"].available


def test_cpu_kernels_are_built_here():
    status = stt_kernels.backends()["cpu"]
    assert status.available and status.built, status.reason


@pytest.mark.skipif(GPU, reason="checks the report of a machine without a GPU")
@pytest.mark.skipif(
    shutil.which("nvcc") is None or torch.version.cuda is None,
    reason="CUDA kernels are only compiled where nvcc and a CUDA build of torch are present",
)
def test_cuda_compiled_without_gpu():
    status = stt_kernels.backends()["cuda"]
    assert status.built and not status.available
    assert "compiled" in status.reason and "no GPU is visible" in status.reason


TRITON = importlib.util.find_spec("triton") is not None


@pytest.mark.skipif(GPU, reason="checks the report of a machine without a GPU")
@pytest.mark.skipif(not TRITON, reason="Triton is not installed")
def test_triton_is_interpreter_only_here(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "interpreter only" in stt_kernels.backends()["triton"].reason
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    status = stt_kernels.backends()["triton"]
    assert not status.available and "TRITON_INTERPRET=1" in status.reason


def test_auto_on_cpu_prefers_compiled_kernels():
    assert resolve(None, CPU, "op", EVERYWHERE) == "cpu"
    assert resolve("auto", CPU, "op", frozenset({"reference"})) == "reference"


def test_precedence(monkeypatch):
    monkeypatch.setenv("STT_BACKEND", "reference")
    assert resolve(None, CPU, "op", EVERYWHERE) == "reference"
    with stt_kernels.use_backend("cpu"):
        assert resolve(None, CPU, "op", EVERYWHERE) == "cpu"
        with stt_kernels.use_backend("reference"):
            assert resolve(None, CPU, "op", EVERYWHERE) == "reference"
        assert resolve("reference", CPU, "op", EVERYWHERE) == "reference"
    assert resolve(None, CPU, "op", EVERYWHERE) == "reference"
    monkeypatch.delenv("STT_BACKEND")
    assert resolve(None, CPU, "op", EVERYWHERE) == "cpu"


def test_unknown_names_are_errors(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of triton, cuda, cpu, reference, auto; got 'gpu'"):
        resolve("gpu", CPU, "op", EVERYWHERE)
    with pytest.raises(ValueError, match="use_backend"):
        with stt_kernels.use_backend("fast"):
            pass
    monkeypatch.setenv("STT_BACKEND", "nope")
    with pytest.raises(ValueError, match="STT_BACKEND environment variable"):
        resolve(None, CPU, "op", EVERYWHERE)


def test_cuda_backend_on_cpu_tensors_says_how():
    with pytest.raises(BackendUnavailableError, match=r"backend 'cuda' cannot run op on cpu tensors: .*"):
        resolve("cuda", CPU, "op", EVERYWHERE)


@pytest.mark.skipif(GPU, reason="without a GPU the Triton backend needs the interpreter")
@pytest.mark.skipif(not TRITON, reason="Triton is not installed")
def test_triton_without_interpreter_says_how(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        resolve("triton", CPU, "op", EVERYWHERE)


@pytest.mark.skipif(TRITON, reason="checks the report of a machine without Triton")
def test_missing_triton_says_how_to_install():
    status = stt_kernels.backends()["triton"]
    assert not status.available and "pip install triton" in status.reason


def test_missing_extension_says_how_to_build(monkeypatch):
    broken = backend_module.EXTENSION.__class__(loaded=False, error="stt_kernels._C is not built; rebuild it")
    monkeypatch.setattr(backend_module, "EXTENSION", broken)
    status = stt_kernels.backends()["cpu"]
    assert not status.available and "rebuild" in status.reason
    with pytest.raises(BackendUnavailableError, match="backend 'cpu' cannot run op on cpu tensors: .*rebuild"):
        resolve("cpu", CPU, "op", EVERYWHERE)
    assert resolve(None, CPU, "op", EVERYWHERE) == "reference"


def test_backend_without_the_op_is_not_implemented():
    with pytest.raises(NotImplementedError, match="op has no 'cpu' kernel yet; available for it: reference"):
        resolve("cpu", CPU, "op", frozenset({"reference"}))


def test_kernel_table_reads_the_dispatcher():
    """The table claims a compiled kernel only if the dispatcher has one."""
    compiled = {name for name in ("cpu", "cuda") if attention_kernels._compiled(name)}
    for name in compiled:
        key = {"cpu": "CPU", "cuda": "CUDA"}[name]
        assert torch._C._dispatch_has_kernel_for_dispatch_key("stt::_attention_forward", key)
    assert "reference" in attention_kernels.implemented()


# --- the capability table drives auto, simulated GPUs included -------------------------------


@pytest.fixture
def every_backend_available(monkeypatch):
    """As on a machine with a GPU, every backend built: auto's GPU decisions, checked on the CPU."""
    monkeypatch.setattr(backend_module, "_status", lambda name: backend_module.BackendStatus(name, True, "", True))
    monkeypatch.setattr(backend_module, "_interpreting", lambda: False)


ALL = frozenset(backend_module.BACKENDS)


@pytest.mark.parametrize("op", ["spatial_attention", "temporal_attention", "deform_conv2d"])
@pytest.mark.parametrize(
    "dtype, want",
    [(torch.float32, "triton"), (torch.bfloat16, "triton"), (torch.float16, "triton"), (torch.float64, "cuda")],
)
def test_auto_on_gpu_tensors_picks_by_dtype(every_backend_available, op, dtype, want):
    assert backend_module.resolve("auto", torch.device("cuda", 0), op, ALL, dtype) == want


def test_auto_falls_back_to_the_next_backend_that_can_run_the_call(every_backend_available):
    gpu = torch.device("cuda", 0)
    assert backend_module.resolve("auto", gpu, "deform_conv2d", ALL - {"triton"}, torch.float32) == "cuda"
    assert (
        backend_module.resolve("auto", gpu, "deform_conv2d", frozenset({"triton", "reference"}), torch.float64)
        == "reference"
    )
    cpu = torch.device("cpu")
    assert backend_module.resolve("auto", cpu, "spatial_attention", ALL, torch.float64) == "cpu"
    assert backend_module.resolve("auto", cpu, "deform_conv2d", ALL, torch.bfloat16) == "cpu"
    assert backend_module.resolve("auto", cpu, "deform_conv2d", ALL - {"cpu"}, torch.bfloat16) == "reference"


def test_a_named_backend_without_the_dtype_names_those_that_have_it(every_backend_available):
    with pytest.raises(
        TypeError,
        match=r"backend 'triton' does not take float64 tensors for spatial_attention "
        r"\(it takes float32, float16, bfloat16\); on cuda tensors use 'cuda' or "
        r"'reference', or 'auto'",
    ):
        backend_module.resolve("triton", torch.device("cuda"), "spatial_attention", ALL, torch.float64)


def test_the_interpreter_does_not_claim_bfloat16(monkeypatch):
    monkeypatch.setattr(backend_module, "_interpreting", lambda: True)
    assert torch.bfloat16 not in backend_module.claimed_dtypes("triton", "spatial_attention")
    monkeypatch.setattr(backend_module, "_interpreting", lambda: False)
    assert torch.bfloat16 in backend_module.claimed_dtypes("triton", "spatial_attention")


def test_a_cpu_bfloat16_deform_conv2d_runs_on_the_cpu_kernels():
    x = torch.randn(1, 2, 5, 6, dtype=torch.bfloat16)
    offset = torch.randn(1, 18, 5, 6, dtype=torch.bfloat16)
    weight = torch.randn(3, 2, 3, 3, dtype=torch.bfloat16)
    got = stt_kernels.deform_conv2d(x, offset, None, weight)
    assert torch.equal(got, stt_kernels.deform_conv2d(x, offset, None, weight, backend="cpu"))
    # Computed in float32 and rounded once: within bfloat16's rounding of the float32 result.
    expected = stt_kernels.deform_conv2d(x.float(), offset.float(), None, weight.float(), backend="reference")
    torch.testing.assert_close(got.float(), expected, rtol=1e-2, atol=1e-2)
