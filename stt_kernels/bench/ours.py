"""Our implementations: the public ops, once per backend, and the reference backend.

Every backend is listed on the device it runs on; whether it is available (built, Triton
installed) and has a kernel for the op is asked of ``stt_kernels`` at run time, so a
kernel that lands later shows up without a change here.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import torch

import stt_kernels
from stt_kernels.backend import CAPABILITIES, claimed_dtypes

from .implementation import Implementation

# The devices each backend runs on, from the backends' capability table (for cases built on our ops too).
BACKEND_DEVICES = {name: tuple(d for d in cap.devices if d != "meta") for name, cap in CAPABILITIES.items()}
_OPS: dict[str, Callable[..., torch.Tensor]] = {
    "spatial_attention": stt_kernels.spatial_attention,
    "temporal_attention": stt_kernels.temporal_attention,
    "deform_conv2d": stt_kernels.deform_conv2d,
}


def backend_unsupported(backend: str, device: torch.device, dtype: torch.dtype, pass_: str,
                        ops: Sequence[str] = ("attention", "deform_conv2d")) -> Optional[str]:
    """Why ``backend`` cannot run ``ops`` here in ``dtype`` (unavailable, dtype not claimed), or
    None. Benchmark cases built on our ops (the SST block, the model's training step) share it."""
    status = stt_kernels.backends()[backend]
    if not status.available:
        return f"backend {backend!r} unavailable: {status.reason}"
    for op in ops:
        if dtype not in claimed_dtypes(backend, op):
            return f"backend {backend!r} does not claim {dtype} for {op}"
    return None


def implementations() -> list[Implementation]:
    """``ours:<backend>`` for every compiled/Triton backend, and ``reference``, for every op."""
    found = []
    for op_name, op in _OPS.items():
        for backend, devices in BACKEND_DEVICES.items():
            found.append(Implementation(
                name="reference" if backend == "reference" else f"ours:{backend}",
                op=op_name,
                kind="reference" if backend == "reference" else "ours",
                call=functools.partial(op, backend=backend),
                devices=devices,
                unsupported=functools.partial(backend_unsupported, backend, ops=(op_name,)),
            ))
    return found
