"""Shared test set-up: Triton runs through its interpreter when no GPU is visible, and
the dtypes/devices each backend claims."""

import os
import zlib

import torch

if not torch.cuda.is_available():
    # Must be set before any Triton kernel is defined: triton.jit reads it at decoration.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import stt_kernels  # noqa: E402

GPU = torch.cuda.is_available()
requires_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA or ROCm GPU")


def available(name: str) -> bool:
    return stt_kernels.backends()[name].available


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Every test draws fresh random inputs, reproducible from the test's name."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
