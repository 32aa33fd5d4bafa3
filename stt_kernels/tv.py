"""``torchvision.ops``-compatible deformable convolution on this package's kernels.

:func:`deform_conv2d` takes torchvision's arguments in torchvision's order and with its defaults
(``padding=0``, ``mask`` last), and :class:`DeformConv2d` has torchvision's constructor,
parameter names (``weight``, ``bias``) and initialisation, so code written for
``torchvision.ops`` runs on these kernels by changing the import::

    from stt_kernels.tv import DeformConv2d, deform_conv2d

Both script (``torch.jit.script``), are single nodes of ``torch.fx`` graphs, and choose their
backend as every op here does (``stt_kernels.use_backend``, ``STT_BACKEND``, else by device
and dtype: 16-bit CPU inputs run the reference). Bad input raises ``ValueError``/``TypeError``
naming the argument, where torchvision raises ``RuntimeError``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .fx import leaf_call
from .ops import deform_conv2d as _stt_deform_conv2d
from .validation import IntPair, pair

__all__ = ["deform_conv2d", "DeformConv2d"]


def deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntPair = (1, 1),
    padding: IntPair = (0, 0),
    dilation: IntPair = (1, 1),
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Deformable convolution (DCNv1; DCNv2 when ``mask`` is given), ``torchvision.ops.deform_conv2d``'s call.

    ``input (N, C, H, W)``, ``offset (N, 2*G*Kh*Kw, H_out, W_out)`` (``G`` offset groups, read
    off it), ``weight (C_out, C / groups, Kh, Kw)`` (``groups`` weight groups, read off it),
    ``bias (C_out,)`` or None, ``mask (N, G*Kh*Kw, H_out, W_out)`` or None.
    Returns ``(N, C_out, H_out, W_out)``.
    """
    if not torch.jit.is_scripting():
        traced = leaf_call(
            deform_conv2d, input, offset, weight, bias, stride=stride, padding=padding, dilation=dilation, mask=mask
        )
        if traced is not None:
            return traced
    return _stt_deform_conv2d(input, offset, mask, weight, bias, stride, padding, dilation)


class DeformConv2d(nn.Module):
    """``torchvision.ops.DeformConv2d``'s module: ``forward(input, offset, mask=None)``.

    Args as ``nn.Conv2d``'s (``groups`` splits the channels into weight groups); the offset
    groups are read off ``offset`` at each call.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        bias: bool = True,
    ):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if in_channels % groups != 0:
            raise ValueError(f"in_channels ({in_channels}) must be divisible by groups ({groups})")
        if out_channels % groups != 0:
            raise ValueError(f"out_channels ({out_channels}) must be divisible by groups ({groups})")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = pair("kernel_size", kernel_size, 1)
        self.stride = pair("stride", stride, 1)
        self.padding = pair("padding", padding, 0)
        self.dilation = pair("dilation", dilation, 1)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Conv2d``'s initialisation, as torchvision's module has it."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.kernel_size[0] * self.kernel_size[1]
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``input (N, C_in, H, W)``, ``offset (N, 2*G*Kh*Kw, H_out, W_out)``, ``mask
        (N, G*Kh*Kw, H_out, W_out)`` or None -> ``(N, C_out, H_out, W_out)``."""
        return deform_conv2d(
            input,
            offset,
            self.weight,
            self.bias,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            mask=mask,
        )

    def extra_repr(self) -> str:
        text = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}"
        )
        if self.groups != 1:
            text += f", groups={self.groups}"
        if self.bias is None:
            text += ", bias=False"
        return text
