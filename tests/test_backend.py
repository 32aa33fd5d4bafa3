"""Backend report, selection precedence (argument > context > STT_BACKEND > auto) and the
errors for a backend that cannot run."""

import importlib.util
import shutil

import pytest
import torch

import stt_kernels
from stt_kernels import backend as backend_module
from stt_kernels.backend import BackendUnavailableError, resolve
from stt_kernels.ops.kernels import attention_kernels

from conftest import GPU

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
@pytest.mark.skipif(shutil.which("nvcc") is None or torch.version.cuda is None,
                    reason="CUDA kernels are only compiled where nvcc and a CUDA build of torch are present")
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
