"""What is measured: cases (an op or a module, its inputs and its work model) at any shape, and
the named suites of (case, shape) that a run goes through.

Work models (per pass; ``forward+backward`` counts both):

- attention, per sequence of ``N`` tokens and per head: ``4 N^2 d`` FLOPs forward (``Q K^T`` and
  ``P V``), the backward ``2.5x`` that (five ``N x N x d`` products, flash style); compulsory
  traffic: read q, k, v and write out forward; read q, k, v, out, dout and write dq, dk, dv backward.
- deformable convolution, ``N`` images, ``C -> C``, ``K`` taps, ``Ho x Wo`` outputs: the
  convolution ``2 C K C Ho Wo`` plus the sampling ``9 C K Ho Wo`` (four bilinear multiply-adds and
  the modulation) forward; backward twice each (input and weight gradients; values and offsets);
  traffic: every input and output tensor once (and their gradients, backward).
- the ``SSTAttention`` block: its two attentions and its deformable fusion as above, plus the
  projections (qkv and out of each branch) and the 3 x 3 offset predictor.
"""

from __future__ import annotations

import dataclasses
import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

PASSES = ("forward", "forward+backward")
TIERS = ("quick", "default", "full")


@dataclass(frozen=True)
class Shape:
    """An input ``(B, C, T, H, W)`` with ``heads`` heads (``d = C / heads``); ``name`` tags the
    rows (``L0`` for an STT-UNET level, ``issue`` for the issues' own sizes)."""

    batch: int
    t: int
    h: int
    w: int
    channels: int
    heads: int
    name: str = ""

    @property
    def head_dim(self) -> int:
        return self.channels // self.heads

    @property
    def tokens(self) -> int:
        """Voxels of the feature map, ``B * T * H * W``."""
        return self.batch * self.t * self.h * self.w


class Case(ABC):
    """One op or module to measure; implementations register under the same :attr:`name`."""

    name: str
    description = ""  # what the rows measure, under the case's heading in report.md

    def label(self, shape: Shape) -> str:
        return f"{shape.name} B{shape.batch} T{shape.t} {shape.h}x{shape.w} C{shape.channels} h{shape.heads}".strip()

    def small(self, shape: Shape) -> Shape:
        """A few tokens of ``shape``: asks an implementation whether it runs at all, cheaply."""
        return dataclasses.replace(shape, batch=1, t=2, h=4, w=4)

    @abstractmethod
    def leaves(self, shape: Shape, dtype: torch.dtype, device: torch.device,
               generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """Fresh input tensors (those gradients are taken for)."""

    def arguments(self, leaves: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The call's arguments made from ``leaves``: views only, cheap enough to time along."""
        return tuple(leaves)

    @abstractmethod
    def flops(self, shape: Shape, pass_: str) -> float: ...

    @abstractmethod
    def bytes(self, shape: Shape, dtype: torch.dtype, pass_: str) -> Optional[float]:
        """Compulsory memory traffic; ``None`` where no such model makes sense (a network)."""


def randn(shape: Sequence[int], dtype: torch.dtype, device: torch.device, generator: torch.Generator,
          scale: float = 1.0) -> torch.Tensor:
    # Drawn in float32 on the CPU so that every dtype and device sees the same numbers.
    return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype)


class AttentionCase(Case):
    """q, k, v unbound from one packed ``(B, T, H, W, 3, heads, d)`` projection: strided views,
    as ``SSTAttention`` makes them."""

    def __init__(self, name: str):
        self.name = name

    def leaves(self, shape: Shape, dtype: torch.dtype, device: torch.device,
               generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        s = shape
        return (randn((s.batch, s.t, s.h, s.w, 3, s.heads, s.head_dim), dtype, device, generator),)

    def arguments(self, leaves: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return leaves[0].unbind(4)

    def flops(self, shape: Shape, pass_: str) -> float:
        n = shape.h * shape.w if self.name == "spatial_attention" else shape.t
        sequences = shape.tokens * shape.heads / n
        return 4.0 * n * n * shape.head_dim * sequences * (3.5 if pass_ == "forward+backward" else 1.0)

    def bytes(self, shape: Shape, dtype: torch.dtype, pass_: str) -> float:
        tensor = float(shape.tokens * shape.channels * dtype.itemsize)
        return tensor * (12 if pass_ == "forward+backward" else 4)


class DeformConvCase(Case):
    """``deform_conv2d`` as the SST fusion runs it: each of the ``B * T`` slices an image,
    ``C -> C``, 3 x 3, padding 1, one offset group, modulated; contiguous NCHW inputs (the layout
    torchvision wants, so no peer pays a copy)."""

    name = "deform_conv2d"

    def leaves(self, shape: Shape, dtype: torch.dtype, device: torch.device,
               generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        n, c, h, w = shape.batch * shape.t, shape.channels, shape.h, shape.w
        mask = torch.sigmoid(randn((n, 9, h, w), torch.float32, torch.device("cpu"), generator))
        return (randn((n, c, h, w), dtype, device, generator), randn((n, 18, h, w), dtype, device, generator, 2.0),
                mask.to(device=device, dtype=dtype), randn((c, c, 3, 3), dtype, device, generator, (c * 9) ** -0.5),
                randn((c,), dtype, device, generator))

    def flops(self, shape: Shape, pass_: str) -> float:
        per_output = 2.0 * shape.channels * 9 * shape.channels + 9.0 * shape.channels * 9
        return per_output * shape.tokens * (3 if pass_ == "forward+backward" else 1)

    def bytes(self, shape: Shape, dtype: torch.dtype, pass_: str) -> float:
        c = shape.channels
        tensors = shape.tokens * (c + 27) + c * c * 9 + c  # x, offset, mask, weight, bias
        total = tensors + shape.tokens * c  # + out
        if pass_ == "forward+backward":
            total += tensors + 2 * shape.tokens * c  # their gradients, dout and dx
        return float(total * dtype.itemsize)


@functools.lru_cache(maxsize=16)
def sst_module(channels: int, heads: int, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """One seeded ``SSTAttention`` per configuration, so every backend runs the same weights."""
    import stt_kernels

    state = torch.get_rng_state()
    torch.manual_seed(0)
    module = stt_kernels.SSTAttention(channels, heads)
    with torch.no_grad():  # non-zero offsets, so the deformable fusion samples between pixels
        module.fusion.predictor.weight.normal_(0, 0.05)
    torch.set_rng_state(state)
    return module.to(device=device, dtype=dtype)


class SSTBlockCase(Case):
    """The ``SSTAttention`` block on ``(B, C, T, H, W)``; its parameter gradients are part of the
    ``forward+backward`` pass."""

    name = "sst_attention"
    _parts = (AttentionCase("spatial_attention"), AttentionCase("temporal_attention"), DeformConvCase())

    def leaves(self, shape: Shape, dtype: torch.dtype, device: torch.device,
               generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        sst_module(shape.channels, shape.heads, dtype, device)  # built outside the timed calls
        return (randn((shape.batch, shape.channels, shape.t, shape.h, shape.w), dtype, device, generator),)

    def flops(self, shape: Shape, pass_: str) -> float:
        c = shape.channels
        linear = 2.0 * shape.tokens * (2 * c * 3 * c + 2 * c * c + c * 27 * 9)
        return sum(p.flops(shape, pass_) for p in self._parts) + linear * (3 if pass_ == "forward+backward" else 1)

    def bytes(self, shape: Shape, dtype: torch.dtype, pass_: str) -> float:
        return sum(p.bytes(shape, dtype, pass_) for p in self._parts)


CASES: dict[str, Case] = {}
# A suite: the tier -> its (case name, shape, passes or None for every pass) entries.
Suite = Callable[[str], list[tuple[str, Shape, Optional[tuple[str, ...]]]]]
SUITES: dict[str, Suite] = {}


def register_case(case: Case) -> Case:
    if case.name in CASES:
        raise ValueError(f"case {case.name!r} is registered already")
    CASES[case.name] = case
    return case


def register_suite(name: str, suite: Suite) -> None:
    """Make ``--suite name`` run ``suite(tier)``; a package with cases of its own (``stt_model``)
    registers them itself, when its front end starts."""
    SUITES[name] = suite


_KERNEL_CASES = ("spatial_attention", "temporal_attention", "deform_conv2d", "sst_attention")


def levels(tier: str) -> list[Shape]:
    """The STT-UNET levels (preset ``mitoem-r``: channels 28/36/48/64, 4 heads, ``1 x 2 x 2``
    downsampling, so T stays while H = W halve). ``full``: the paper's 2 x 32 x 320 x 320 batch
    (the reference's scores at level 0 fit nowhere: OOM rows). ``default``: batch 1, 16 x 64 x 64,
    where the reference fits in a workstation and a CPU finishes. ``quick``: the first two levels at
    8 x 16 x 16, the whole engine in minutes on two cores."""
    batch, t, size, count = {"full": (2, 32, 320, 4), "default": (1, 16, 64, 4), "quick": (1, 8, 16, 2)}[tier]
    return [Shape(batch, t, size >> i, size >> i, c, 4, f"L{i}") for i, c in enumerate((28, 36, 48, 64)[:count])]


register_case(AttentionCase("spatial_attention"))
register_case(AttentionCase("temporal_attention"))
register_case(DeformConvCase())
register_case(SSTBlockCase())
register_suite("levels", lambda tier: [(case, shape, None) for case in _KERNEL_CASES for shape in levels(tier)])
# The sizes the kernels' own claims were made at, whatever the tier: 32 sequences of 4,096 tokens
# (d = 32); T = 32 at each of 64 x 64 pixels; 16 frames of 32 channels at 64 x 64; the block at
# C = 32, T = 8, 64 x 64.
register_suite("issue-shapes", lambda tier: [
    ("spatial_attention", Shape(1, 8, 64, 64, 128, 4, "issue"), None),
    ("temporal_attention", Shape(1, 32, 64, 64, 128, 4, "issue"), None),
    ("deform_conv2d", Shape(1, 16, 64, 64, 32, 4, "issue"), None),
    ("sst_attention", Shape(1, 8, 64, 64, 32, 4, "issue"), None)])
# Memory at full resolution: one 320 x 320 slice (102,400 tokens, 1 head, d = 32) forward+backward,
# and one full-resolution block forward (half an hour on 2 CPU cores; the reference is OOM in both).
register_suite("issue-scale", lambda tier: [
    ("spatial_attention", Shape(1, 1, 320, 320, 32, 1, "slice"), ("forward+backward",)),
    ("sst_attention", Shape(1, 32, 320, 320, 32, 4, "full"), ("forward",))])
