"""Split spatio-temporal attention in plain PyTorch (paper Eqs. 1 and 2).

``q, k, v`` have shape ``(B, T, H, W, heads, d)`` (channels-last views of one packed
projection). Both ops return the same shape.

Non-finite numbers (every backend follows this; ``tests/test_reliability_numerics.py``): the
result is plain ``softmax(q k^T * scale) v`` in IEEE arithmetic, the softmax shifted by its row
maximum, within each sequence (a slice's ``H*W`` tokens, or a pixel's ``T``) and head:

- NaN or +-inf in query ``i``: row ``i`` of the output is NaN (an infinite score meets
  ``inf - inf`` in the shift, or ``inf * 0`` in the product).
- NaN in key ``j``: every row of that sequence is NaN. +-inf in key ``j``: the rows whose
  score with it is +inf or NaN are NaN; those whose score is -inf are finite, key ``j``
  taking weight 0, also when other keys score -inf too (a row all -inf is NaN).
- NaN in ``v[j, e]``: column ``e`` of every row of that sequence is NaN; +-inf there gives
  +-inf (NaN where a row's weight for ``j`` underflows to 0).

Gradients are autograd's of the same arithmetic: a NaN row's query gradient is NaN, and so
are the key and value gradients of its whole sequence. (For a row made NaN by an infinite
query, the fused backends' ``exp(s - lse)`` may instead give the keys it scores -inf weight 0,
so that their gradients stay finite; those of its other keys are NaN everywhere.)
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
