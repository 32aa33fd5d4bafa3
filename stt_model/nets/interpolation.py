"""The interpolation (denoising) network (paper Sec. 2.1, after Huang et al., ECCV-W 2020).

For every slice t it predicts per-pixel ``k x k`` kernels that convolve slices t-1 and t+1;
the sum of the two results is a restoration of slice t from its neighbours, which replaces
(``blend`` = 1) or mixes with the observed slice. Pretrained self-supervised on raw EM by
:func:`restoration_loss` (restore a held-out slice from its neighbours), then frozen or
trained with the rest.
"""

from __future__ import annotations

import torch
from torch import nn

from stt_kernels.validation import shape_text


class KernelPredictor(nn.Module):
    """A small 2D encoder-decoder: ``(N, 2, H, W)`` neighbours -> ``(N, 2*k*k, H, W)`` kernels."""

    def __init__(self, kernel: int, width: int = 16):
        super().__init__()

        def conv(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True))

        self.enc1, self.enc2 = conv(2, width), conv(width, 2 * width)
        self.dec = conv(3 * width, width)
        self.head = nn.Conv2d(width, 2 * kernel * kernel, 3, padding=1)
        # Zero kernels-logits: a fresh network averages both neighbourhoods, a sane start.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(pair)
        e2 = self.enc2(nn.functional.avg_pool2d(e1, 2, ceil_mode=True))
        up = nn.functional.interpolate(e2, size=e1.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(self.dec(torch.cat([e1, up], dim=1)))


class InterpolationNet(nn.Module):
    """``(B, 1, T, H, W)`` -> ``(B, 1, T, H, W)``, each slice restored from its neighbours.

    Border slices use their one neighbour twice. The kernels of each pixel are normalised by
    a softmax over the ``2 k^2`` taps, so a fresh network averages the neighbourhoods.
    """

    def __init__(self, kernel: int = 5, blend: float = 0.5):
        super().__init__()
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"kernel must be a positive odd int; got {kernel}")
        self.kernel, self.blend = kernel, blend
        self.predictor = KernelPredictor(kernel)

    def restore(self, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        """Slice t from ``before`` (t-1) and ``after`` (t+1), each ``(N, 1, H, W)``."""
        n, _, h, w = before.shape
        taps = self.kernel * self.kernel
        weights = torch.softmax(self.predictor(torch.cat([before, after], dim=1)), dim=1)
        patches = [
            nn.functional.unfold(s, self.kernel, padding=self.kernel // 2).view(n, taps, h, w) for s in (before, after)
        ]
        return (weights * torch.cat(patches, dim=1)).sum(dim=1, keepdim=True)

    def neighbours(self, volume: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slices t-1 and t+1 for every t, as ``(B*T, 1, H, W)``; borders replicate."""
        b, c, t, h, w = volume.shape
        if t == 1:
            flat = volume.transpose(1, 2).reshape(b * t, c, h, w)
            return flat, flat
        before = torch.cat([volume[:, :, 1:2], volume[:, :, :-1]], dim=2)
        after = torch.cat([volume[:, :, 1:], volume[:, :, -2:-1]], dim=2)
        return before.transpose(1, 2).reshape(b * t, c, h, w), after.transpose(1, 2).reshape(b * t, c, h, w)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = volume.shape
        if c != 1:
            raise ValueError(f"InterpolationNet expects one channel (B, 1, T, H, W); got {shape_text(volume)}")
        before, after = self.neighbours(volume)
        restored = self.restore(before, after).view(b, t, 1, h, w).transpose(1, 2)
        return self.blend * restored + (1 - self.blend) * volume

    def restoration_loss(self, volume: torch.Tensor) -> torch.Tensor:
        """Self-supervised pretraining loss: L1 between each slice and its restoration."""
        b, c, t, h, w = volume.shape
        restored = self.restore(*self.neighbours(volume)).view(b, t, 1, h, w).transpose(1, 2)
        return (restored - volume).abs().mean()
