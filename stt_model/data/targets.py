"""Training targets from labels (Z, Y, X): the binary mask, the instance contour, and instance
ids for binary labels.

The contour follows the MitoEM baseline (pytorch_connectomics ``seg_to_instance_bd``): a voxel is
contour when the ``(2w+1)``-wide window around it holds some instance and is not all one id.
That marks both sides of every interface, instance against instance and instance against
background, ``w`` = ``contour_width`` voxels deep on each side. By default it is computed per
slice in 2-d (``mode="2d"``) as the baseline does: EM volumes are anisotropic, and a 3-d window
would mark whole slices at the top and bottom of each object. ``mode="3d"`` uses a cube.

Labels are instance ids (or a binary mask): non-negative integers, 0 the background.
:func:`check_labels` refuses anything else before training, with its location: a -1 "ignore"
marker or a float probability map would otherwise be trained on as foreground.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Sequence

import numpy as np
from scipy import ndimage

from .scan import InputError, at, describe, find_first, refuse_empty


def check_labels(volume: Any, *, block: Optional[Sequence[int]] = None, name: str = "the labels") -> None:
    """Refuse a label volume (Z, Y, X) that is not non-negative integer ids, naming the file, the
    first bad value and its voxel. One streaming pass (see :mod:`stt_model.data.scan`);
    unsigned and boolean labels cannot be wrong and are not read."""
    label, z_offset = describe(volume, name)
    refuse_empty(volume, label)
    dtype = np.dtype(volume.dtype)
    if dtype == np.bool_ or np.issubdtype(dtype, np.unsignedinteger):
        return
    if np.issubdtype(dtype, np.signedinteger):
        found = find_first(volume, lambda data: data < 0, block)
        problem = "is negative"
    elif np.issubdtype(dtype, np.floating):
        found = find_first(volume, lambda data: ~np.isfinite(data) | (data < 0) | (data != np.round(data)), block)
        problem = "is not a non-negative whole number"
    else:
        raise InputError(f"{label}: labels must be integer instance ids (or a binary mask); got dtype {dtype}")
    if found is not None:
        where, value = found
        raise InputError(
            f"{label}: label {value} at {at(where, z_offset)} {problem}; labels must be instance ids "
            "(0 = background, 1, 2, ... = objects) or a binary mask. There is no ignore label: "
            "set such voxels to 0 or crop them out"
        )


def binary_mask(labels: np.ndarray) -> np.ndarray:
    """Foreground (any nonzero id) as uint8 {0, 1}, same shape."""
    return (np.asarray(labels) != 0).astype(np.uint8)


def instance_contour(labels: np.ndarray, width: int = 1, mode: Literal["2d", "3d"] = "2d") -> np.ndarray:
    """Instance boundaries of ``labels`` (Z, Y, X) as uint8 {0, 1}; see the module doc."""
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be (Z, Y, X); got shape {labels.shape}")
    if width < 1:
        raise ValueError(f"contour width must be >= 1; got {width}")
    if mode not in ("2d", "3d"):
        raise ValueError(f"contour mode must be '2d' or '3d'; got {mode!r}")
    size = 2 * width + 1
    footprint = (1, size, size) if mode == "2d" else (size, size, size)
    # Reflect at the volume border, as the baseline pads: a cut-off object gets no contour there.
    high = ndimage.maximum_filter(labels, size=footprint, mode="reflect")
    low = ndimage.minimum_filter(labels, size=footprint, mode="reflect")
    return ((high != 0) & (high != low)).astype(np.uint8)


def instances_from_binary(mask: np.ndarray, connectivity: Literal[6, 18, 26] = 26) -> np.ndarray:
    """Instance ids (uint32, 1..n, 0 = background) of a binary mask (Z, Y, X) by 3-d connected
    components, for labels that only mark foreground (Lucchi)."""
    mask = np.asarray(mask) != 0
    if mask.ndim != 3:
        raise ValueError(f"mask must be (Z, Y, X); got shape {mask.shape}")
    rank = {6: 1, 18: 2, 26: 3}.get(connectivity)
    if rank is None:
        raise ValueError(f"connectivity must be 6, 18 or 26; got {connectivity}")
    structure = ndimage.generate_binary_structure(3, rank)
    ids = np.zeros(mask.shape, np.uint32)
    ndimage.label(mask, structure=structure, output=ids)
    return ids


def make_targets(
    labels: np.ndarray, out_channels: int, contour_width: int = 1, mode: Literal["2d", "3d"] = "2d"
) -> np.ndarray:
    """Float32 targets (out_channels, Z, Y, X): the mask, plus the contour when out_channels = 2.

    Binary labels work for both: their contour is the foreground/background boundary.
    """
    if out_channels not in (1, 2):
        raise ValueError(f"out_channels must be 1 (mask) or 2 (mask + contour); got {out_channels}")
    planes = [binary_mask(labels)]
    if out_channels == 2:
        planes.append(instance_contour(labels, contour_width, mode))
    return np.stack(planes).astype(np.float32)
