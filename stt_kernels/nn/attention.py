"""The two attention branches of the SST module, as ``nn.Module`` front ends of the ops.

Both take and return channels-last features ``(B, T, H, W, C)``: one packed QKV projection
``Linear(C, 3C)`` whose output ``(B, T, H, W, 3, heads, d)`` feeds the kernels as three strided
views (no permute copies), attention, and an output projection ``Linear(C, C)``.

The modules script (``torch.jit.script``) and trace with ``torch.fx``, where the input check is
one node (:func:`check_features`) that runs when the graph runs.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx
from torch import nn

from ..backend import MAX_HEAD_DIM, requested_backend
from ..ops import spatial_attention, temporal_attention
from ..validation import shape_text


def check_heads(dim: int, heads: int) -> int:
    """The head dim ``dim // heads``, or a ValueError naming what is wrong. The limit is the
    largest any backend takes; the backend chosen at each call checks its own."""
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int; got {dim!r}")
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"heads must be a positive int; got {heads!r}")
    if dim % heads != 0:
        raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
    if dim // heads > MAX_HEAD_DIM:
        raise ValueError(
            f"dim / heads = {dim // heads} exceeds the head dim limit {MAX_HEAD_DIM} (the largest any "
            "backend takes); use more heads"
        )
    return dim // heads


def module_backend(backend: str) -> Optional[str]:
    """A module's ``backend`` as the ops take it: ``auto`` defers to the context and environment."""
    name = requested_backend(backend)
    return None if name == "auto" else name


def check_features(u: torch.Tensor, dim: int, module: str) -> torch.Tensor:
    """``u`` if it is channels-last ``(B, T, H, W, C=dim)``, else a ValueError naming ``module``."""
    if u.dim() != 5 or u.shape[-1] != dim:
        raise ValueError(f"{module} expects channels-last features (B, T, H, W, C={dim}); got shape {shape_text(u)}")
    return u


torch.fx.wrap("check_features")


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, *, backend: str = "auto"):
        super().__init__()
        self.heads = heads
        self.head_dim = check_heads(dim, heads)
        self.backend = module_backend(backend)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.label = type(self).__name__  # for the error message, which TorchScript cannot build from the type

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """``u (B, T, H, W, C)`` -> ``(B, T, H, W, C)``."""
        u = check_features(u, self.proj.in_features, self.label)
        qkv = self.qkv(u).unflatten(-1, (3, self.heads, self.head_dim))
        q, k, v = qkv.unbind(-3)
        return self.proj(self.attend(q, k, v).flatten(-2))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The branch's attention on ``(B, T, H, W, heads, d)`` views."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"dim={self.proj.in_features}, heads={self.heads}, backend={self.backend or 'auto'}"


class SpatialAttention(_Attention):
    """Self-attention among the ``H * W`` tokens of each slice (paper Eq. 1)."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return spatial_attention(q, k, v, backend=self.backend)


class TemporalAttention(_Attention):
    """Self-attention among the ``T`` tokens at each pixel (paper Eq. 2)."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return temporal_attention(q, k, v, backend=self.backend)
