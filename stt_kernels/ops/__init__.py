"""The ops, each a ``torch.library`` custom op in the ``stt`` namespace with a Python front end."""

from .attention import spatial_attention, temporal_attention
from .deform_conv2d import deform_conv2d

__all__ = ["spatial_attention", "temporal_attention", "deform_conv2d"]
