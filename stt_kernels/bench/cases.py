"""What is benchmarked: the ops at the STT-UNET levels, with their FLOP and byte counts.

A :class:`Case` makes the inputs of one op for one :class:`~.shapes.Level` and counts its work.
Cases live in :data:`CASES`, keyed by name; implementations (``ours.py``, ``peers.py``) are
looked up by the same name. The ``SSTAttention`` block is ``sst_block.py``; the STT-UNET
training step comes from ``stt_model.train_step_bench`` (a plugin: see ``plugins.py``). A case
with sizes other than the SST levels overrides :meth:`Case.levels`.

Work models (per pass; ``fwd+bwd`` counts both):

- attention, per sequence of ``N`` tokens and per head: ``4 N^2 d`` FLOPs forward (``Q K^T``
  and ``P V``), the backward ``2.5x`` that (five ``N x N x d`` products, flash style);
  compulsory traffic: read q, k, v and write out forward; read q, k, v, out, dout and write
  dq, dk, dv backward.
- deformable convolution, ``N`` images, ``C -> C_out``, ``K`` taps, ``Ho x Wo`` outputs: the
  convolution ``2 C K C_out Ho Wo`` plus sampling ``9 C K Ho Wo`` (four bilinear
  multiply-adds and the modulation) forward; backward ``2x`` the convolution (input and
  weight gradients) plus ``2x`` the sampling (values and offsets); traffic: every input and
  output tensor once (the gradients too, backward).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional, Sequence

import torch

from .shapes import Level, levels, tiny

PASSES = ("forward", "forward+backward")


class Case(ABC):
    """One op to benchmark. Subclasses say how to make its inputs and how much work it is."""

    name: str
    description = ""   # what the rows measure, under the op's heading in report.md

    def levels(self, tier: str) -> list[Level]:
        return levels(tier)

    def small(self, level: Level) -> Level:
        """A few tokens of ``level``: for asking an implementation whether it runs at all, and
        for loading what it loads on first use."""
        return tiny(level)

    @staticmethod
    def label(level: Level) -> str:
        return (f"L{level.level} B{level.batch} T{level.t} {level.h}x{level.w} "
                f"C{level.channels} h{level.heads}")

    @staticmethod
    def tokens(level: Level) -> int:
        """Voxels of the level's feature map, ``B * T * H * W``: the x axis of the plots."""
        return level.batch * level.t * level.h * level.w

    @abstractmethod
    def leaves(self, level: Level, dtype: torch.dtype, device: torch.device,
               generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """Fresh input tensors (the ones gradients are taken for)."""

    @abstractmethod
    def arguments(self, leaves: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The op's arguments made from ``leaves``; views only, cheap enough to time along."""

    @abstractmethod
    def flops(self, level: Level, pass_: str) -> float: ...

    @abstractmethod
    def bytes(self, level: Level, dtype: torch.dtype, pass_: str) -> Optional[float]:
        """Compulsory memory traffic; ``None`` where no such model makes sense (a network)."""


def _randn(shape: Sequence[int], dtype: torch.dtype, device: torch.device, generator: torch.Generator,
           scale: float = 1.0) -> torch.Tensor:
    # Drawn in float32 on the CPU so every dtype and device sees the same numbers.
    return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype)


class AttentionCase(Case):
    """``spatial_attention`` or ``temporal_attention`` on q, k, v unbound from one packed
    ``(B, T, H, W, 3, heads, d)`` projection: strided views, as ``SSTAttention`` makes them."""

    def __init__(self, name: str):
        self.name = name

    def leaves(self, level: Level, dtype: torch.dtype, device: torch.device,
               generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        shape = (level.batch, level.t, level.h, level.w, 3, level.heads, level.head_dim)
        return (_randn(shape, dtype, device, generator),)

    def arguments(self, leaves: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return leaves[0].unbind(4)

    def _sequences(self, level: Level) -> tuple[int, int]:
        """(number of independent sequences including heads, tokens per sequence)."""
        if self.name == "spatial_attention":
            return level.batch * level.t * level.heads, level.h * level.w
        return level.batch * level.h * level.w * level.heads, level.t

    def flops(self, level: Level, pass_: str) -> float:
        sequences, n = self._sequences(level)
        forward = 4.0 * n * n * level.head_dim * sequences
        return forward * (3.5 if pass_ == "forward+backward" else 1.0)

    def bytes(self, level: Level, dtype: torch.dtype, pass_: str) -> float:
        tensor = float(level.batch * level.t * level.h * level.w * level.channels * dtype.itemsize)
        return tensor * (4 + (8 if pass_ == "forward+backward" else 0))


class DeformConvCase(Case):
    """``deform_conv2d`` as the SST fusion runs it: every slice of ``(B, C, T, H, W)`` is an
    image, ``C -> C`` channels, ``3 x 3`` kernel, padding 1, one offset group, modulated.

    Inputs are contiguous NCHW (the layout torchvision wants), so no peer pays a copy here.
    """

    name = "deform_conv2d"
    kernel = 3
    offset_groups = 1

    def leaves(self, level: Level, dtype: torch.dtype, device: torch.device,
               generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        n, c, h, w = level.batch * level.t, level.channels, level.h, level.w
        taps = self.kernel * self.kernel * self.offset_groups
        x = _randn((n, c, h, w), dtype, device, generator)
        offset = _randn((n, 2 * taps, h, w), dtype, device, generator, scale=2.0)
        mask = torch.sigmoid(_randn((n, taps, h, w), torch.float32, torch.device("cpu"), generator))
        weight = _randn((c, c, self.kernel, self.kernel), dtype, device, generator, scale=(c * 9) ** -0.5)
        bias = _randn((c,), dtype, device, generator)
        return x, offset, mask.to(device=device, dtype=dtype), weight, bias

    def arguments(self, leaves: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return tuple(leaves)

    def _counts(self, level: Level) -> tuple[float, float]:
        """(convolution FLOPs, sampling FLOPs) of one forward pass."""
        outputs = level.batch * level.t * level.h * level.w
        taps = self.kernel * self.kernel
        conv = 2.0 * level.channels * taps * level.channels * outputs
        sampling = 9.0 * level.channels * taps * outputs
        return conv, sampling

    def flops(self, level: Level, pass_: str) -> float:
        conv, sampling = self._counts(level)
        if pass_ == "forward+backward":
            return 3 * conv + 3 * sampling
        return conv + sampling

    def bytes(self, level: Level, dtype: torch.dtype, pass_: str) -> float:
        pixels = level.batch * level.t * level.h * level.w
        taps = self.kernel * self.kernel * self.offset_groups
        c = level.channels
        tensors = pixels * (c + 3 * taps) + c * c * self.kernel * self.kernel + c  # x, offset, mask, weight, bias
        forward = tensors + pixels * c  # + out
        total = forward + (tensors + 2 * pixels * c if pass_ == "forward+backward" else 0)  # grads, dout
        return float(total * dtype.itemsize)


CASES: dict[str, Case] = {}


def register_case(case: Case) -> Case:
    """Add ``case`` to :data:`CASES` (its implementations register under the same name)."""
    if case.name in CASES:
        raise ValueError(f"case {case.name!r} is registered already")
    CASES[case.name] = case
    return case


register_case(AttentionCase("spatial_attention"))
register_case(AttentionCase("temporal_attention"))
register_case(DeformConvCase())
