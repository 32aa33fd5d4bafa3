"""``nn.Module`` front ends: thin wrappers over the ops that hold the parameters."""

from .attention import SpatialAttention, TemporalAttention
from .fusion import AddFusion, ConcatFusion, DeformableFusion
from .sst import SSTAttention

__all__ = ["SSTAttention", "SpatialAttention", "TemporalAttention", "DeformableFusion", "AddFusion", "ConcatFusion"]
