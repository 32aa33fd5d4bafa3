"""Shared test set-up: Triton runs through its interpreter when no GPU is visible, and
the dtypes/devices each backend claims."""

import os
import zlib

import torch

if not torch.cuda.is_available():
    # Must be set before any Triton kernel is defined: triton.jit reads it at decoration.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The CLI's busy-machine warning depends on the load average, which the suite itself raises:
# commands run by tests stay quiet (inherited by their subprocesses); tests/test_threads.py
# turns it back on where it tests it.
os.environ["STT_BUSY_WARNING"] = "0"

import pytest  # noqa: E402

import stt_kernels  # noqa: E402

GPU = torch.cuda.is_available()
requires_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA or ROCm GPU")


def available(name: str) -> bool:
    return stt_kernels.backends()[name].available


def torchvision_ops():
    """``torchvision.ops``, or a skip saying why not: a torchvision built for another torch
    imports but lacks its compiled ops (e.g. PyPI's torchvision beside a local torch wheel)."""
    try:
        import torchvision

        torch.ops.torchvision.deform_conv2d.default  # noqa: B018 - raises if the ops did not load
        return torchvision.ops
    except (ImportError, RuntimeError, AttributeError) as exc:
        pytest.skip(f"torchvision is missing or unusable here: {exc}", allow_module_level=True)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Every test draws fresh random inputs, reproducible from the test's name."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
