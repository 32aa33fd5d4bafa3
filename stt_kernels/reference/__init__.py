"""Plain-PyTorch implementations of every op: the readable specification that the fused
kernels are tested against. They materialise what the kernels avoid (the N x N score
matrix, the im2col column buffer), so they are for small inputs and for checking."""

from .attention import spatial_attention, temporal_attention
from .deform_conv2d import deform_conv2d

__all__ = ["spatial_attention", "temporal_attention", "deform_conv2d"]
