"""Modulated deformable convolution (DCNv2) in plain PyTorch, torchvision's semantics.

Kernel tap ``k = (i, j)`` of output pixel ``(y, x)`` in offset group ``g`` samples the input at

    py = y * stride_h - pad_h + i * dil_h + offset[:, 2 * (g * K + k)]
    px = x * stride_w - pad_w + j * dil_w + offset[:, 2 * (g * K + k) + 1]

bilinearly, each of the four neighbours outside the image counting as zero (so a point
with ``py <= -1``, ``py >= H``, ``px <= -1`` or ``px >= W`` samples zero); the
sample is multiplied by ``mask[:, g * K + k]`` and the columns go through the weight as an
ordinary (grouped) convolution.
"""

from __future__ import annotations

from typing import Optional

import torch


def _bilinear(x: torch.Tensor, py: torch.Tensor, px: torch.Tensor) -> torch.Tensor:
    """Sample ``x (N, G, Cg, H, W)`` at points ``py, px (N, G, P)`` -> ``(N, G, Cg, P)``."""
    n, g, cg, h, w = x.shape
    y0, x0 = torch.floor(py), torch.floor(px)
    fy, fx = py - y0, px - x0  # fractional parts; their gradient is the offsets' gradient
    flat = x.reshape(n, g, cg, h * w)
    out = x.new_zeros(n, g, cg, py.shape[-1])
    for dy in (0, 1):
        for dx in (0, 1):
            yc, xc = y0 + dy, x0 + dx
            weight = (fy if dy else 1 - fy) * (fx if dx else 1 - fx)
            valid = (yc >= 0) & (yc < h) & (xc >= 0) & (xc < w)
            index = (yc.clamp(0, h - 1) * w + xc.clamp(0, w - 1)).long()
            corner = flat.gather(3, index.unsqueeze(2).expand(n, g, cg, -1))
            out = out + corner * (weight * valid).unsqueeze(2)
    return out


def deform_conv2d(
    x: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor], weight: torch.Tensor,
    bias: Optional[torch.Tensor], stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
) -> torch.Tensor:
    """``x (N, C, H, W)``, ``offset (N, 2*G*K, Ho, Wo)``, ``mask (N, G*K, Ho, Wo)`` or None,
    ``weight (C_out, C / weight_groups, Kh, Kw)``, ``bias (C_out,)`` -> ``(N, C_out, Ho, Wo)``,
    with ``K = Kh * Kw``."""
    n, c, h, w = x.shape
    c_out, c_per_group, kh, kw = weight.shape
    ho, wo = offset.shape[-2:]
    taps = kh * kw
    groups = offset.shape[1] // (2 * taps)
    weight_groups = c // c_per_group

    # Undeformed sampling grid: (K, Ho, Wo) for each axis.
    base_y = (torch.arange(ho, device=x.device, dtype=x.dtype) * stride[0] - padding[0]).view(1, ho, 1) \
        + (torch.arange(kh, device=x.device, dtype=x.dtype) * dilation[0]).repeat_interleave(kw).view(taps, 1, 1)
    base_x = (torch.arange(wo, device=x.device, dtype=x.dtype) * stride[1] - padding[1]).view(1, 1, wo) \
        + (torch.arange(kw, device=x.device, dtype=x.dtype) * dilation[1]).repeat(kh).view(taps, 1, 1)
    off = offset.reshape(n, groups, taps, 2, ho, wo)
    py = (base_y + off[:, :, :, 0]).reshape(n, groups, taps * ho * wo)
    px = (base_x + off[:, :, :, 1]).reshape(n, groups, taps * ho * wo)

    columns = _bilinear(x.reshape(n, groups, c // groups, h, w), py, px)  # (N, G, Cg, K*Ho*Wo)
    columns = columns.reshape(n, groups, c // groups, taps, ho * wo)
    if mask is not None:
        columns = columns * mask.reshape(n, groups, 1, taps, ho * wo)
    # (N, weight_groups, C/wg * K, Ho*Wo) against weight (wg, C_out/wg, C/wg * K)
    columns = columns.reshape(n, weight_groups, c_per_group * taps, ho * wo)
    kernel = weight.reshape(weight_groups, c_out // weight_groups, c_per_group * taps)
    out = torch.einsum("gok,ngkp->ngop", kernel, columns).reshape(n, c_out, ho, wo)
    if bias is not None:
        out = out + bias.view(1, c_out, 1, 1)
    return out
