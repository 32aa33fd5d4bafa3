"""What is measured: cases (an op or a module, its inputs, its work model) at any shape, and the
named suites of (case, shape) a run goes through. Work models, per pass (``forward+backward``
counts both):

- attention, per sequence of ``N`` tokens and head: ``4 N^2 d`` FLOPs forward (``Q K^T``, ``P V``),
  the backward 2.5x that (five ``N x N x d`` products, flash style); traffic: q, k, v and out
  forward, and q, k, v, out, dout, dq, dk, dv backward.
- deformable convolution, ``C -> C``, 9 taps, per output pixel: ``2 C 9 C`` for the convolution
  and ``9 C 9`` for the sampling (four bilinear multiply-adds, the modulation) forward, twice
  each backward; traffic: every input and output once (and their gradients, backward).
- the ``SSTAttention`` block: its attentions and fusion as above, its projections and its 3 x 3
  offset predictor.
"""

from __future__ import annotations

import dataclasses
import functools
from abc import ABC, abstractmethod
from typing import Callable, Optional, Sequence

import torch

PASSES = ("forward", "forward+backward")
TIERS = ("quick", "default", "full")
Tensors = tuple[torch.Tensor, ...]


@dataclasses.dataclass(frozen=True)
class Shape:
    """An input ``(B, C, T, H, W)`` with ``heads`` heads; ``name`` tags the rows (``L0``: a level)."""

    batch: int
    t: int
    h: int
    w: int
    channels: int
    heads: int
    name: str = ""

    @property
    def tokens(self) -> int:
        return self.batch * self.t * self.h * self.w


class Case(ABC):
    """One op or module to measure; its implementations register under the same :attr:`name`."""

    name: str
    description = ""  # what the rows measure, under the case's heading in report.md
    dtypes: Optional[tuple[torch.dtype, ...]] = None  # the only dtypes it runs in; None: any asked for

    def label(self, s: Shape) -> str:
        return f"{s.name} B{s.batch} T{s.t} {s.h}x{s.w} C{s.channels} h{s.heads}".strip()

    def small(self, shape: Shape) -> Shape:
        """A few tokens of ``shape``: asks an implementation cheaply whether it runs at all."""
        return dataclasses.replace(shape, batch=1, t=2, h=4, w=4)

    @abstractmethod
    def leaves(self, shape: Shape, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Tensors:
        """Fresh inputs (those gradients are taken for)."""

    @abstractmethod
    def flops(self, shape: Shape, pass_: str) -> float: ...

    def bytes(self, shape: Shape, dtype: torch.dtype, pass_: str) -> Optional[float]:
        """Compulsory memory traffic; ``None`` where no such model makes sense (a network)."""
        return None


def randn(size: Sequence[int], dtype: torch.dtype, device: torch.device, gen: torch.Generator, scale: float = 1.0):
    # Drawn in float32 on the CPU so that every dtype and device sees the same numbers.
    return (torch.randn(*size, generator=gen) * scale).to(device=device, dtype=dtype)


class AttentionCase(Case):
    """One packed ``(B, T, H, W, 3, heads, d)`` projection, unbound into q, k, v views as the block does."""

    def __init__(self, name: str):
        self.name = name

    def leaves(self, shape: Shape, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Tensors:
        s = shape
        return (randn((s.batch, s.t, s.h, s.w, 3, s.heads, s.channels // s.heads), dtype, device, gen),)

    def flops(self, shape: Shape, pass_: str) -> float:
        n = shape.h * shape.w if self.name == "spatial_attention" else shape.t
        forward = 4.0 * n * shape.tokens * shape.channels  # 4 N^2 d per sequence and head
        return forward * (3.5 if pass_ == "forward+backward" else 1.0)

    def bytes(self, shape: Shape, dtype: torch.dtype, pass_: str) -> float:
        return float(shape.tokens * shape.channels * dtype.itemsize) * (12 if pass_ == "forward+backward" else 4)


class DeformConvCase(Case):
    """``deform_conv2d`` as the SST fusion runs it: each of the ``B * T`` slices an image, ``C -> C``,
    3 x 3, padding 1, one offset group, modulated; contiguous NCHW (what torchvision wants)."""

    name = "deform_conv2d"

    def leaves(self, shape: Shape, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Tensors:
        n, c, h, w = shape.batch * shape.t, shape.channels, shape.h, shape.w
        x, offset = randn((n, c, h, w), dtype, device, gen), randn((n, 18, h, w), dtype, device, gen, 2.0)
        mask = torch.sigmoid(randn((n, 9, h, w), torch.float32, torch.device("cpu"), gen)).to(device, dtype)
        weight, bias = randn((c, c, 3, 3), dtype, device, gen, (c * 9) ** -0.5), randn((c,), dtype, device, gen)
        return x, offset, mask, weight, bias

    def flops(self, shape: Shape, pass_: str) -> float:
        per_output = 2.0 * shape.channels * 9 * shape.channels + 9.0 * shape.channels * 9
        return per_output * shape.tokens * (3 if pass_ == "forward+backward" else 1)

    def bytes(self, shape: Shape, dtype: torch.dtype, pass_: str) -> float:
        c, pixels = shape.channels, shape.tokens
        inputs = pixels * (c + 27) + c * c * 9 + c  # x, offset, mask, weight, bias
        backward = inputs + 2 * pixels * c if pass_ == "forward+backward" else 0  # their gradients, dout, dx
        return float((inputs + pixels * c + backward) * dtype.itemsize)


@functools.lru_cache(maxsize=16)
def sst_module(channels: int, heads: int, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """One seeded ``SSTAttention`` per configuration, so that every implementation runs the same weights."""
    import stt_kernels

    state = torch.get_rng_state()
    torch.manual_seed(0)
    module = stt_kernels.SSTAttention(channels, heads)
    with torch.no_grad():  # non-zero offsets, so that the deformable fusion samples between pixels
        module.fusion.predictor.weight.normal_(0, 0.05)
    torch.set_rng_state(state)
    return module.to(device=device, dtype=dtype)


class SSTBlockCase(Case):
    """The ``SSTAttention`` block on ``(B, C, T, H, W)``, its parameter gradients in ``forward+backward``."""

    name = "sst_attention"
    _parts = (AttentionCase("spatial_attention"), AttentionCase("temporal_attention"), DeformConvCase())

    def leaves(self, shape: Shape, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Tensors:
        sst_module(shape.channels, shape.heads, dtype, device)  # built outside the timed calls
        return (randn((shape.batch, shape.channels, shape.t, shape.h, shape.w), dtype, device, gen),)

    def flops(self, shape: Shape, pass_: str) -> float:
        c = shape.channels
        linear = 2.0 * shape.tokens * (2 * c * 3 * c + 2 * c * c + c * 27 * 9)  # qkv and out twice, offsets
        return sum(p.flops(shape, pass_) for p in self._parts) + linear * (3 if pass_ == "forward+backward" else 1)

    def bytes(self, shape: Shape, dtype: torch.dtype, pass_: str) -> float:
        return sum(p.bytes(shape, dtype, pass_) for p in self._parts)


CASES: dict[str, Case] = {}
Suite = Callable[[str], list[tuple[str, Shape, Optional[tuple[str, ...]]]]]  # tier -> (case, shape, passes)
SUITES: dict[str, Suite] = {}


def register_case(case: Case) -> Case:
    if case.name in CASES:
        raise ValueError(f"case {case.name!r} is registered already")
    CASES[case.name] = case
    return case


def register_suite(name: str, suite: Suite) -> None:
    """``--suite name`` runs ``suite(tier)``'s entries (``None`` passes: both). A package with cases
    of its own (``stt_model``) registers them when its front end starts."""
    SUITES[name] = suite


def levels(tier: str) -> list[Shape]:
    """The STT-UNET levels (``mitoem-r``: channels 28/36/48/64, 4 heads, T kept, H = W halved).
    ``full``: the paper's 2 x 32 x 320 x 320 batch (the reference's level-0 scores fit nowhere: OOM
    rows); ``default``: 1 x 16 x 64 x 64, where the reference fits and a CPU finishes; ``quick``:
    the first two levels at 8 x 16 x 16, the whole engine in minutes on two cores."""
    batch, t, size, count = {"full": (2, 32, 320, 4), "default": (1, 16, 64, 4), "quick": (1, 8, 16, 2)}[tier]
    return [Shape(batch, t, size >> i, size >> i, c, 4, f"L{i}") for i, c in enumerate((28, 36, 48, 64)[:count])]


_KERNELS = (AttentionCase("spatial_attention"), AttentionCase("temporal_attention"), DeformConvCase(), SSTBlockCase())
for _case in _KERNELS:
    register_case(_case)
register_suite("levels", lambda tier: [(case.name, shape, None) for case in _KERNELS for shape in levels(tier)])
# The sizes the kernels' claims were made at, whatever the tier: 32 sequences of 4,096 tokens (d = 32),
# T = 32 at 64 x 64 pixels, 16 frames of 32 channels at 64 x 64, the block at C = 32, T = 8, 64 x 64.
_ISSUE = [("spatial_attention", 8, 128), ("temporal_attention", 32, 128), ("deform_conv2d", 16, 32)]
_ISSUE.append(("sst_attention", 8, 32))
register_suite("issue-shapes", lambda tier: [(op, Shape(1, t, 64, 64, c, 4, "issue"), None) for op, t, c in _ISSUE])
# Memory at full resolution: one 320 x 320 slice (102,400 tokens, 1 head, d = 32) forward+backward, and
# one full-resolution block forward (half an hour on 2 CPU cores); the reference is OOM in both.
_SCALE = [("spatial_attention", Shape(1, 1, 320, 320, 32, 1, "slice"), ("forward+backward",))]
_SCALE.append(("sst_attention", Shape(1, 32, 320, 320, 32, 4, "full"), ("forward",)))
register_suite("issue-scale", lambda tier: _SCALE)
