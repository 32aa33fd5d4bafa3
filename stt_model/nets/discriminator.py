"""The FG-BG discriminator of the semantic adversarial loss (paper Sec. 2.2, Fig. 2c)."""

from __future__ import annotations

import torch
from torch import nn


class FgBgDiscriminator(nn.Module):
    """``D(concat(image, mask))``: two stride-2 Conv3d layers and a head.

    Input ``(B, 1 + 1, T, H, W)``. Strides are 2 in every axis when T allows, else 1x2x2, so
    thin patches work. ``output="volume"``: features averaged over the volume, a linear head,
    ``(B,)`` logits. ``output="patch"``: a 1x1x1 convolution head, one logit per position of
    the stride-4 feature map, ``(B, T', H', W')``: each judges the 7-voxel neighbourhood it
    sees, so a mistake is judged where it is rather than diluted into a volume average.
    ``D = sigmoid(logit)``; the losses average over every logit.
    """

    def __init__(self, in_channels: int = 2, width: int = 16, output: str = "volume"):
        super().__init__()
        if output not in ("volume", "patch"):
            raise ValueError(f"output must be 'volume' or 'patch'; got {output!r}")
        self.output = output
        self.conv1 = nn.Conv3d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv3d(width, 2 * width, 3, padding=1)
        self.act = nn.LeakyReLU(0.2, inplace=True)
        self.head = nn.Linear(2 * width, 1) if output == "volume" else nn.Conv3d(2 * width, 1, 1)

    @staticmethod
    def _stride(x: torch.Tensor) -> tuple[int, int, int]:
        return (2 if x.shape[2] >= 2 else 1, 2, 2)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = torch.cat([image, mask], dim=1)
        x = self.act(nn.functional.conv3d(x, self.conv1.weight, self.conv1.bias, self._stride(x), 1))
        x = self.act(nn.functional.conv3d(x, self.conv2.weight, self.conv2.bias, self._stride(x), 1))
        if self.output == "patch":
            return self.head(x).squeeze(1)
        return self.head(x.mean(dim=(2, 3, 4))).squeeze(1)
