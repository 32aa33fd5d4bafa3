"""Modulated deformable convolution (DCNv2) in plain PyTorch, torchvision's semantics.

Kernel tap ``k = (i, j)`` of output pixel ``(y, x)`` in offset group ``g`` samples the input at

    py = y * stride_h - pad_h + i * dil_h + offset[:, 2 * (g * K + k)]
    px = x * stride_w - pad_w + j * dil_w + offset[:, 2 * (g * K + k) + 1]

bilinearly from its four neighbours ``(floor(py) + {0, 1}, floor(px) + {0, 1})``, each
neighbour outside the image counting as zero (so a point with ``py <= -1``, ``py >= H``,
``px <= -1`` or ``px >= W`` samples zero); the sample is multiplied by ``mask[:, g * K + k]``
and the columns go through the weight as an ordinary (grouped) convolution.

Non-finite numbers (every backend follows this; ``tests/test_reliability_numerics.py``):

- NaN or +-inf in ``x``: IEEE arithmetic on the neighbours inside the image, so it reaches
  the samples whose in-image neighbours it is, even at bilinear weight 0 (``0 * NaN`` and
  ``0 * inf`` are NaN), and from them every output channel that reads those samples. A
  neighbour outside the image is never read, so it brings no NaN.
- NaN in ``offset``: the sampling point is undefined. Its sample is NaN (whatever the mask),
  so every output channel that reads it is NaN at that pixel; it is never taken for a point
  outside the image.
- Finite but far, or +-inf, ``offset``: the point is outside the image and samples 0, as in
  torchvision (an infinite coordinate with a NaN other one is a NaN point).
- NaN or +-inf in ``mask``: multiplies the sample, so that output pixel's channels become NaN
  or +-inf (``inf * 0`` is NaN). NaN or +-inf in ``weight`` or ``bias``: propagates into the
  output channels it belongs to, at every pixel.

Gradients are those of the same arithmetic, with one point to note: a NaN sampling point reads
no pixel, so it adds nothing to ``grad_x``, while its own ``grad_offset`` (both coordinates),
its ``grad_mask`` and the ``grad_weight`` entries that multiply its sample are NaN. A point
outside the image (far or infinite offset) gets zero ``grad_offset``, adds nothing to
``grad_x`` and contributes zero to ``grad_weight``.
"""

from __future__ import annotations

from typing import Optional

import torch


class _Moved(torch.autograd.Function):
    """``where(keep, v, 0)`` with derivative 1 everywhere. A point moved to 0 reads no pixel
    there, so the gradient that reaches it is 0 times its upstream, as IEEE arithmetic gives
    (0, or NaN where the mask or grad_out is NaN); where()'s derivative would drop it."""

    @staticmethod
    def forward(ctx, v: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return torch.where(keep, v, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def _undefined(nan_point: torch.Tensor, py: torch.Tensor, px: torch.Tensor) -> torch.Tensor:
    """NaN at the NaN points and 0 elsewhere, with a NaN derivative in both coordinates at
    the NaN points (``d s**2 = 2 s``, ``s`` NaN) and 0 elsewhere: ``(N, G, P)``."""
    s = torch.where(nan_point, py + px, 0)
    return s * s


def _bilinear(x: torch.Tensor, py: torch.Tensor, px: torch.Tensor) -> torch.Tensor:
    """Sample ``x (N, G, Cg, H, W)`` at points ``py, px (N, G, P)`` -> ``(N, G, Cg, P)``."""
    n, g, cg, h, w = x.shape
    # Beyond one pixel past the border every neighbour is outside. Such points (also the
    # infinite and NaN ones, for which the comparisons are false) move to 0 before floor(),
    # whose result would not fit the index type, and sample nothing from there.
    near = (py > -2) & (py < h + 1) & (px > -2) & (px < w + 1)
    sy, sx = _Moved.apply(py, near), _Moved.apply(px, near)
    y0, x0 = torch.floor(sy), torch.floor(sx)
    fy, fx = sy - y0, sx - x0  # fractional parts; their gradient is the offsets' gradient
    flat = x.reshape(n, g, cg, h * w)
    out = x.new_zeros(n, g, cg, py.shape[-1])
    for dy in (0, 1):
        for dx in (0, 1):
            yc, xc = y0 + dy, x0 + dx
            weight = (fy if dy else 1 - fy) * (fx if dx else 1 - fx)
            valid = near & (yc >= 0) & (yc < h) & (xc >= 0) & (xc < w)
            index = (yc.clamp(0, h - 1) * w + xc.clamp(0, w - 1)).long()
            corner = flat.gather(3, index.unsqueeze(2).expand(n, g, cg, -1))
            # A neighbour outside the image is zero, not the clamped pixel read in its place.
            corner = torch.where(valid.unsqueeze(2), corner, 0)
            out = out + corner * weight.unsqueeze(2)
    nan_point = torch.isnan(py) | torch.isnan(px)
    return out + _undefined(nan_point, py, px).unsqueeze(2)


def deform_conv2d(
    x: torch.Tensor,
    offset: torch.Tensor,
    mask: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
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
    base_y = (torch.arange(ho, device=x.device, dtype=x.dtype) * stride[0] - padding[0]).view(1, ho, 1) + (
        torch.arange(kh, device=x.device, dtype=x.dtype) * dilation[0]
    ).repeat_interleave(kw).view(taps, 1, 1)
    base_x = (torch.arange(wo, device=x.device, dtype=x.dtype) * stride[1] - padding[1]).view(1, 1, wo) + (
        torch.arange(kw, device=x.device, dtype=x.dtype) * dilation[1]
    ).repeat(kh).view(taps, 1, 1)
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
