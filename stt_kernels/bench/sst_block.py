"""The ``SSTAttention`` block as a benchmark case: the module of the STT-UNET level, its
input ``(B, C, T, H, W)``, on each backend (the ``reference`` backend is the same module in
plain PyTorch, the comparison issue 5 asks for).

One module per (channels, heads, dtype, device), seeded, so every backend runs the same
weights; its parameter gradients are part of the ``forward+backward`` pass.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch

import stt_kernels

from .cases import AttentionCase, Case, DeformConvCase, _randn, register_case
from .implementation import Implementation
from .ours import BACKEND_DEVICES, backend_unsupported
from ..ops.kernels import attention_kernels, deform_conv2d_kernels
from .registry import register_implementation
from .shapes import _HEADS as HEADS, Level

NAME = "sst_attention"


@functools.lru_cache(maxsize=16)
def _module(channels: int, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    generator_state = torch.get_rng_state()
    torch.manual_seed(0)
    module = stt_kernels.SSTAttention(channels, HEADS).to(device=device, dtype=dtype)
    torch.set_rng_state(generator_state)
    return module


class SSTBlockCase(Case):
    name = NAME
    _parts = (AttentionCase("spatial_attention"), AttentionCase("temporal_attention"), DeformConvCase())

    def leaves(self, level: Level, dtype: torch.dtype, device: torch.device,
               generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        x = _randn((level.batch, level.channels, level.t, level.h, level.w), dtype, device, generator)
        _module(level.channels, dtype, device)  # built outside the timed calls
        return (x,)

    def arguments(self, leaves: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return tuple(leaves)

    def _linear_flops(self, level: Level) -> float:
        """The projections (2 x qkv, 2 x out) and the 3x3 offset predictor, forward."""
        tokens = level.batch * level.t * level.h * level.w
        c = level.channels
        return 2.0 * tokens * (2 * c * 3 * c + 2 * c * c + c * 27 * 9)

    def flops(self, level: Level, pass_: str) -> float:
        factor = 3.0 if pass_ == "forward+backward" else 1.0
        return sum(part.flops(level, pass_) for part in self._parts) + factor * self._linear_flops(level)

    def bytes(self, level: Level, dtype: torch.dtype, pass_: str) -> float:
        return sum(part.bytes(level, dtype, pass_) for part in self._parts)


def _call(backend: str, x: torch.Tensor) -> torch.Tensor:
    with stt_kernels.use_backend(backend):
        return _module(x.shape[1], x.dtype, x.device)(x)


def _block_unsupported(backend: str, device: torch.device, dtype: torch.dtype, pass_: str) -> Optional[str]:
    implemented = attention_kernels.implemented() & deform_conv2d_kernels.implemented()
    if backend not in implemented:
        return f"backend {backend!r} lacks a kernel for one of the block's ops"
    return backend_unsupported(backend, device, dtype, pass_)


register_case(SSTBlockCase())
for _backend, _devices in BACKEND_DEVICES.items():
    register_implementation(Implementation(
        name="reference" if _backend == "reference" else f"ours:{_backend}", op=NAME,
        kind="reference" if _backend == "reference" else "ours",
        call=functools.partial(_call, _backend), devices=_devices,
        unsupported=functools.partial(_block_unsupported, _backend)))
