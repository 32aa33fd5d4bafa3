"""Split spatio-temporal attention in plain PyTorch (paper Eqs. 1 and 2).

``q, k, v`` have shape ``(B, T, H, W, heads, d)`` (channels-last views of one packed
projection). Both ops return the same shape.
"""

from __future__ import annotations

import torch


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` over the second-to-last axis: ``(..., N, d) -> (..., N, d)``."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def spatial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention among the ``H * W`` tokens of each slice, per ``(b, t, head)``."""
    b, t, h, w, heads, d = q.shape

    def tokens(x: torch.Tensor) -> torch.Tensor:  # (B, T, heads, H*W, d)
        return x.reshape(b, t, h * w, heads, d).transpose(2, 3)

    out = _attend(tokens(q), tokens(k), tokens(v), scale)
    return out.transpose(2, 3).reshape(b, t, h, w, heads, d)


def temporal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention among the ``T`` tokens at each pixel, per ``(b, h, w, head)``."""

    def tokens(x: torch.Tensor) -> torch.Tensor:  # (B, H, W, heads, T, d)
        return x.permute(0, 2, 3, 4, 1, 5)

    out = _attend(tokens(q), tokens(k), tokens(v), scale)
    return out.permute(0, 4, 1, 2, 3, 5)
