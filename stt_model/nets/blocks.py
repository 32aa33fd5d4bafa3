"""Building blocks of the Res-UNET-R style encoder-decoder (Li et al., ISBI 2022).

Volumes are ``(B, C, T, H, W)``; EM is anisotropic (thick sections), so sampling is 1x2x2:
T is never downsampled.
"""

from __future__ import annotations

import torch
from torch import nn

from .capture import capturing_graph
from .conv import Conv3d


class GroupNorm3d(nn.GroupNorm):
    """``nn.GroupNorm`` on ``(B, C, T, H, W)``, normalising in the channels-first layout.

    The network's activations are channels-last (for oneDNN's convolutions), where PyTorch's
    CPU GroupNorm backward is ~7x slower than on channels-first (8 ms against 1.2 ms at
    2 x 8 x 8 x 64 x 64): two copies cost less than that. The output keeps the input's layout.
    A recorded graph (:func:`.capture.capturing_graph`) normalises in whatever layout it gets.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            capturing_graph()
            or x.device.type != "cpu"
            or not x.is_contiguous(memory_format=torch.channels_last_3d)
            or x.is_contiguous()
        ):
            return self._normalise(x)
        return self._normalise(x.contiguous()).contiguous(memory_format=torch.channels_last_3d)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        # nn.GroupNorm.forward, called without super(), which TorchScript lacks.
        return nn.functional.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def norm3d(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "group":
        return GroupNorm3d(min(8, channels) if channels % min(8, channels) == 0 else 1, channels)
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    raise ValueError(f"norm must be 'batch', 'group' or 'instance'; got {kind!r}")


class ConvNormAct(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel: tuple[int, int, int], norm: str, act: bool = True):
        padding = tuple(k // 2 for k in kernel)
        layers: list[nn.Module] = [Conv3d(c_in, c_out, kernel, padding=padding, bias=False), norm3d(norm, c_out)]
        if act:
            layers.append(nn.ELU(inplace=True))
        super().__init__(*layers)


class AnisotropicResBlock(nn.Module):
    """ACB: convs of 1x3x3, 3x3x3, 3x3x3 with a skip from the first to the third."""

    def __init__(self, c_in: int, c_out: int, norm: str):
        super().__init__()
        self.first = ConvNormAct(c_in, c_out, (1, 3, 3), norm)
        self.second = ConvNormAct(c_out, c_out, (3, 3, 3), norm)
        self.third = ConvNormAct(c_out, c_out, (3, 3, 3), norm, act=False)
        self.act = nn.ELU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.first(x)
        return self.act(first + self.third(self.second(first)))


class Down(nn.Module):
    """1x2x2 downsampling by a strided 1x3x3 conv, then an ACB."""

    def __init__(self, c_in: int, c_out: int, norm: str):
        super().__init__()
        self.pool = Conv3d(c_in, c_in, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), bias=False)
        self.block = AnisotropicResBlock(c_in, c_out, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.pool(x))


class Up(nn.Module):
    """1x2x2 trilinear upsampling, a 1x1x1 conv to the skip's width, the skip added, an ACB."""

    def __init__(self, c_in: int, c_out: int, norm: str):
        super().__init__()
        self.reduce = Conv3d(c_in, c_out, 1, bias=False)
        self.block = AnisotropicResBlock(c_out, c_out, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = nn.functional.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
        return self.block(self.reduce(x) + skip)


class Refinement(nn.Module):
    """Full-resolution correction of logits upsampled from a pooled network.

    ``(B, in, T, H, W)`` input and ``(B, out, T, H, W)`` logits -> refined logits of the logits'
    shape: a 3x3x3 and a 1x3x3 conv over both, then a 1x1x1 conv added to the logits. The last conv
    starts at zero, so an untrained refinement leaves the logits as they are.
    """

    def __init__(self, c_in: int, c_out: int, width: int, norm: str):
        super().__init__()
        self.body = nn.Sequential(
            ConvNormAct(c_in + c_out, width, (3, 3, 3), norm), ConvNormAct(width, width, (1, 3, 3), norm)
        )
        self.correction = Conv3d(width, c_out, 1)
        nn.init.zeros_(self.correction.weight)
        nn.init.zeros_(self.correction.bias)

    def forward(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return logits + self.correction(self.body(torch.cat([x, logits], dim=1)))
