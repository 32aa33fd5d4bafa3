"""How the SST module merges its spatial and temporal branches (paper Eq. 3 and Table 4).

Every fusion takes the branch outputs ``spatial, temporal`` as channels-last ``(B, T, H, W, C)``
and returns the residual update in the module layout ``(B, C, T, H, W)`` (possibly a strided view).
Convolutions run per slice on ``(B*T, C, H, W)`` channels-last views of the branch outputs.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops import deform_conv2d
from .attention import module_backend


def _slices(x: torch.Tensor) -> torch.Tensor:
    """``(B, T, H, W, C)`` -> ``(B*T, C, H, W)``: a channels-last view in eager, a contiguous
    copy under ``torch.compile``."""
    b, t, h, w, c = x.shape
    y = x.reshape(b * t, h, w, c).permute(0, 3, 1, 2)
    if not torch.jit.is_scripting() and torch.compiler.is_compiling():
        # Traced with dynamic H, W, a channels-last view saved for backward makes inductor
        # (torch 2.14) compare symbolic strides it cannot order ("cannot determine truth value
        # of Relational", pytorch#185510). A channels-last clone is removed as a no-op, so the
        # copy is contiguous. Dynamo shows sizes as ints, so static traces copy too.
        y = y.contiguous()
    return y


def _volume(y: torch.Tensor, b: int, t: int) -> torch.Tensor:
    """``(B*T, C, H, W)`` -> ``(B, C, T, H, W)``, a view."""
    return y.unflatten(0, (b, t)).transpose(1, 2)


class DeformableFusion(nn.Module):
    """Aligns the spatial features with offsets read from the temporal features (Eq. 3).

    A 3x3 conv on the temporal branch predicts, per slice, ``2*G*K*K`` offsets and ``G*K*K``
    modulation masks (sigmoid); a modulated deformable ``K x K`` conv samples the spatial
    branch with them. The predictor starts at zero, so a fresh module is an aligned conv with
    masks of 0.5 and trains stably from there (as DCNv2 initialises).
    """

    def __init__(self, dim: int, *, offset_groups: int = 1, kernel_size: int = 3, backend: str = "auto"):
        super().__init__()
        if (
            isinstance(offset_groups, bool)
            or not isinstance(offset_groups, int)
            or offset_groups < 1
            or dim % offset_groups != 0
        ):
            raise ValueError(f"offset_groups must be a positive int dividing dim ({dim}); got {offset_groups!r}")
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int; got {kernel_size!r}")
        self.offset_groups = offset_groups
        self.kernel_size = kernel_size
        self.backend = module_backend(backend)
        taps = kernel_size * kernel_size
        self.predictor = nn.Conv2d(dim, 3 * offset_groups * taps, 3, padding=1)
        nn.init.zeros_(self.predictor.weight)
        nn.init.zeros_(self.predictor.bias)
        self.weight = nn.Parameter(torch.empty(dim, dim, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(dim))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Conv2d's default

    def forward(self, spatial: torch.Tensor, temporal: torch.Tensor) -> torch.Tensor:
        b, t = spatial.shape[:2]
        x = _slices(spatial)
        predicted = self.predictor(_slices(temporal))
        split = 2 * self.offset_groups * self.kernel_size * self.kernel_size
        # The kernels read offsets contiguous anyway; a contiguous offset is also not a view,
        # which inductor's stride ordering needs under dynamic shapes (see _slices).
        offset, mask = predicted[:, :split].contiguous(), torch.sigmoid(predicted[:, split:])
        # Under autocast the branches may be half precision while parameters stay float32.
        dtype = x.dtype
        y = deform_conv2d(
            x,
            offset.to(dtype),
            mask.to(dtype),
            self.weight.to(dtype),
            self.bias.to(dtype),
            padding=self.kernel_size // 2,
            backend=self.backend,
        )
        return _volume(y, b, t)


class AddFusion(nn.Module):
    """``spatial + temporal`` (Table 4, "addition")."""

    def forward(self, spatial: torch.Tensor, temporal: torch.Tensor) -> torch.Tensor:
        return (spatial + temporal).permute(0, 4, 1, 2, 3)


class ConcatFusion(nn.Module):
    """A 3x3 conv over ``concat(spatial, temporal)`` per slice (Table 4, "concat"); 3x3 so it
    sees the same neighbourhood as the deformable fusion."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(2 * dim, dim, 3, padding=1)

    def forward(self, spatial: torch.Tensor, temporal: torch.Tensor) -> torch.Tensor:
        b, t = spatial.shape[:2]
        return _volume(self.conv(_slices(torch.cat([spatial, temporal], dim=-1))), b, t)


def make_fusion(kind: str, dim: int, offset_groups: int, backend: Optional[str]) -> nn.Module:
    if kind == "deformable":
        return DeformableFusion(dim, offset_groups=offset_groups, backend=backend or "auto")
    if kind == "add":
        return AddFusion()
    if kind == "concat":
        return ConcatFusion(dim)
    raise ValueError(f"fusion must be 'deformable', 'add' or 'concat'; got {kind!r}")
