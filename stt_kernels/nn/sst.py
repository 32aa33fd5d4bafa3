"""``SSTAttention``: the split spatio-temporal attention block of STT-UNET (paper Fig. 2b)."""

from __future__ import annotations

import torch
import torch.fx
from torch import nn

from ..validation import shape_text
from .attention import SpatialAttention, TemporalAttention, check_heads, module_backend
from .fusion import make_fusion

FUSIONS = ("deformable", "add", "concat")
ORDERS = ("split", "spatial_temporal", "temporal_spatial")


def check_volume(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` if it is a floating ``(B, C=dim, T, H, W)`` with ``T, H, W >= 1``, else the error saying why.

    A function of its own so that a ``torch.fx`` graph holds it as one node (run when the graph
    runs) and TorchScript compiles it.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 5 or x.shape[1] != dim:
        shape = shape_text(x) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"SSTAttention expects x of shape (B, C={dim}, T, H, W); got {shape}")
    # An empty slice or sequence has nothing to attend to, and would fail deep in the
    # fusion's convolutions instead (an empty batch is fine: no sample, no work).
    empty: list[str] = []
    for name, size in zip(["T", "H", "W"], x.shape[2:]):
        if size == 0:
            empty.append(f"{name} = 0")
    if len(empty) > 0:
        raise ValueError(
            f"SSTAttention expects x of shape (B, C={dim}, T, H, W) with T, H, W >= 1; "
            f"got {shape_text(x)} ({', '.join(empty)})"
        )
    if not x.is_floating_point():
        raise TypeError(f"SSTAttention expects a floating x; got {x.dtype}")
    return x


torch.fx.wrap("check_volume")


class SSTAttention(nn.Module):
    """Split spatio-temporal attention: ``(B, C, T, H, W)`` in, the same out.

    ``u = LayerNorm_C(x)``; the spatial branch attends among the ``H*W`` tokens of each slice and
    the temporal branch among the ``T`` tokens at each pixel; ``fusion`` merges them and the
    result is added to ``x``.

    Args:
        dim: channels ``C``; ``heads`` must divide it (head dim ``C / heads`` <= 256).
        offset_groups: offset groups ``G`` of the deformable fusion (must divide ``dim``).
        fusion: ``"deformable"`` (the paper's), ``"add"`` or ``"concat"`` (Table 4 ablations).
        order: ``"split"`` (both branches from ``u``, in parallel: the paper's), or a cascade,
            ``"spatial_temporal"`` (temporal attention runs on the spatial output) or
            ``"temporal_spatial"`` (Table 5 ablations); the fusion then merges the two outputs.
        backend: for every op inside; ``"auto"`` defers to ``use_backend``/``STT_BACKEND``/device.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        offset_groups: int = 1,
        fusion: str = "deformable",
        order: str = "split",
        backend: str = "auto",
    ):
        super().__init__()
        check_heads(dim, heads)
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}; got {fusion!r}")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}; got {order!r}")
        self.dim, self.fusion_kind, self.order = dim, fusion, order
        backend_name = module_backend(backend) or "auto"
        self.norm = nn.LayerNorm(dim)
        self.spatial = SpatialAttention(dim, heads, backend=backend_name)
        self.temporal = TemporalAttention(dim, heads, backend=backend_name)
        self.fusion = make_fusion(fusion, dim, offset_groups, backend_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, C, T, H, W)`` with ``T, H, W >= 1`` -> the same shape."""
        x = check_volume(x, self.dim)
        u = self.norm(x.permute(0, 2, 3, 4, 1))  # (B, T, H, W, C)
        if self.order == "split":
            spatial, temporal = self.spatial(u), self.temporal(u)
        elif self.order == "spatial_temporal":
            spatial = self.spatial(u)
            temporal = self.temporal(spatial)
        else:
            temporal = self.temporal(u)
            spatial = self.spatial(temporal)
        return x + self.fusion(spatial, temporal)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, fusion={self.fusion_kind}, order={self.order}"
