"""STT-UNET (paper Fig. 2a): interpolation network, then a 3D residual U-Net with an
``SSTAttention`` after the block of every encoder and decoder level.

``(B, in, T, H, W)`` -> logits ``(B, out, T, H, W)``; H and W must be divisible by
``input_downsample * 2 ** (levels - 1)`` and T by its factor. With ``input_downsample`` other
than 1 the U-Net proper runs on the average-pooled input and its logits are upsampled back
(trilinear), then refined at full resolution if ``refine_channels`` is set. With every
``sst_levels`` entry false it is the Res-UNET-R-style baseline of Table 3 (same network, no SST).
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from stt_kernels import SSTAttention
from stt_kernels.validation import shape_text

from ..config import ModelConfig
from .blocks import AnisotropicResBlock, Down, Refinement, Up
from .capture import capturing_graph
from .conv import Conv3d
from .interpolation import InterpolationNet


def check_input(x: torch.Tensor, multiple: Tuple[int, int, int]) -> torch.Tensor:
    """``x`` if it is ``(B, C, T, H, W)`` with ``T, H, W`` divisible by ``multiple``, else a ValueError.

    A function of its own so that a ``torch.fx`` graph holds it as one node (run when the graph
    runs) and TorchScript compiles it.
    """
    if x.dim() != 5:
        raise ValueError(f"STTUNet expects (B, C, T, H, W); got shape {shape_text(x)}")
    t, h, w = x.shape[2], x.shape[3], x.shape[4]
    if t % multiple[0] != 0 or h % multiple[1] != 0 or w % multiple[2] != 0:
        raise ValueError(f"STTUNet needs (T, H, W) divisible by {multiple}; got ({t}, {h}, {w})")
    return x


torch.fx.wrap("check_input")


class STTUNet(nn.Module):
    """The network of the module docstring; it scripts (``torch.jit.script``), traces
    (``torch.jit.trace``, ``torch.fx``) and exports, without the eager-only layout changes
    (:func:`.capture.capturing_graph`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        channels, levels = cfg.channels, len(cfg.channels)
        self.levels = levels
        self.input_downsample = tuple(cfg.input_downsample)
        self.interpolation = InterpolationNet(cfg.interpolation_kernel) if cfg.interpolation != "none" else None
        if cfg.interpolation == "frozen":
            self.interpolation.requires_grad_(False)
        self.frozen_interpolation = cfg.interpolation == "frozen"

        def sst(level: int) -> nn.Module:
            if not cfg.sst_levels[level]:
                return nn.Identity()
            return SSTAttention(
                channels[level],
                cfg.heads[level],
                offset_groups=cfg.offset_groups,
                fusion=cfg.fusion,
                order=cfg.order,
                backend=cfg.backend,
            )

        self.stem = AnisotropicResBlock(cfg.in_channels, channels[0], cfg.norm)
        self.down = nn.ModuleList(Down(channels[i - 1], channels[i], cfg.norm) for i in range(1, levels))
        self.encoder_sst = nn.ModuleList(sst(i) for i in range(levels))
        decoder_levels = list(reversed(range(levels - 1)))
        self.up = nn.ModuleList(Up(channels[i + 1], channels[i], cfg.norm) for i in decoder_levels)
        self.decoder_sst = nn.ModuleList(sst(i) for i in decoder_levels)
        self.head = Conv3d(channels[0], cfg.out_channels, 1)
        self.refine = None
        if cfg.refine_channels:
            self.refine = Refinement(cfg.in_channels, cfg.out_channels, cfg.refine_channels, cfg.norm)
        # Channels-last 3D: oneDNN's Conv3d is ~8x faster so on CPUs (its backward above all),
        # and the SST blocks then see (B, T, H, W, C) without a permute copy.
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last_3d)

    def train(self, mode: bool = True) -> STTUNet:
        super().train(mode)
        if self.frozen_interpolation:
            self.interpolation.eval()  # a frozen network keeps its behaviour in training too
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down = 1 << (self.levels - 1)
        ft, fh, fw = self.input_downsample
        x = check_input(x, (ft, fh * down, fw * down))
        if self.interpolation is not None:
            x = self.interpolation(x)
        if self.input_downsample == (1, 1, 1):
            return self._unet(x)
        logits = self._unet(F.avg_pool3d(x, self.input_downsample))
        logits = F.interpolate(logits, size=x.shape[-3:], mode="trilinear", align_corners=False)
        if self.refine is not None:
            if not capturing_graph():
                x = x.contiguous(memory_format=torch.channels_last_3d)
                logits = logits.contiguous(memory_format=torch.channels_last_3d)
            logits = self.refine(x, logits)
        return logits

    def _unet(self, x: torch.Tensor) -> torch.Tensor:
        if not capturing_graph():
            # A recorded graph keeps the caller's layout: the legacy ONNX exporter refuses
            # memory_format, and other runtimes choose their own layouts.
            x = x.contiguous(memory_format=torch.channels_last_3d)
        h = self.stem(x)
        skips: List[torch.Tensor] = []
        for level, sst in enumerate(self.encoder_sst):
            # self.down[level - 1], found by a loop: TorchScript indexes a ModuleList by literals
            # only, and scripts no ModuleList slice.
            for i, down in enumerate(self.down):
                if i == level - 1:
                    h = down(h)
            h = sst(h)
            skips.append(h)
        for level, (up, sst) in enumerate(zip(self.up, self.decoder_sst)):
            h = sst(up(h, skips[-2 - level]))  # the skips from the finest but one back to the finest
        return self.head(h)
