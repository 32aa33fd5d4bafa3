"""Launching Triton kernels on the device of their tensors.

Triton launches on the *current* CUDA device, not on the device its pointers belong to: a
process that predicts on ``cuda:1`` without ``torch.cuda.set_device(1)`` would launch on GPU 0
with another GPU's memory. The CUDA kernels guard with ``c10::cuda::CUDAGuard``; this is the
same guard for the Triton ones.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., object])


def on_tensor_device(kernel: F) -> F:
    """``kernel(first_tensor, ...)`` run with ``first_tensor``'s GPU as the current device."""

    @functools.wraps(kernel)
    def launch(first: torch.Tensor, *args: object, **kwargs: object) -> object:
        device = first.device
        guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
        with guard:
            return kernel(first, *args, **kwargs)

    return launch  # type: ignore[return-value]
