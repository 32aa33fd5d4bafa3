"""stt-kernels: fused split spatio-temporal attention and deformable convolution for PyTorch.

Ops (``(B, T, H, W, heads, d)`` attention layout, ``(N, C, H, W)`` convolution layout):
:func:`spatial_attention`, :func:`temporal_attention`, :func:`deform_conv2d`. Backends:
:func:`backends` reports them, :func:`use_backend` picks one for a block of code. Modules:
:class:`SSTAttention` (``(B, C, T, H, W)`` in and out) and its parts; :class:`DeformConv2d` and
:mod:`stt_kernels.tv`, torchvision's deformable convolution API on these kernels.
"""

from importlib import metadata as _metadata

from ._compile_cache import tag_compile_caches as _tag_compile_caches
from .backend import BACKENDS, BackendStatus, BackendUnavailableError, backends, use_backend
from .nn import DeformableFusion, SpatialAttention, SSTAttention, TemporalAttention
from .ops import deform_conv2d, spatial_attention, temporal_attention
from .tv import DeformConv2d

try:
    # The one source of the version is pyproject.toml, through the installed metadata.
    __version__ = _metadata.version("stt-kernels")
except _metadata.PackageNotFoundError:  # a source tree put on sys.path, never installed
    __version__ = "0+unknown"

_tag_compile_caches()

__all__ = [
    "BACKENDS",
    "BackendStatus",
    "BackendUnavailableError",
    "backends",
    "use_backend",
    "spatial_attention",
    "temporal_attention",
    "deform_conv2d",
    "SSTAttention",
    "SpatialAttention",
    "TemporalAttention",
    "DeformableFusion",
    "DeformConv2d",
    "__version__",
]
