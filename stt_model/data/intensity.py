"""Stored intensities to the network's [0, 1]: one rule, the same in training and prediction.

The rule is ``data.intensity`` in the config, so it travels inside every checkpoint:

- ``"dtype"`` (the default, and what checkpoints from before the field mean): integers are
  divided by their dtype's maximum (uint8 / 255, uint16 / 65535), booleans are 0 and 1, and
  floats are taken as they are, so they must already lie in [0, 1];
- ``[lo, hi]``: ``(v - lo) / (hi - lo)``, so ``lo`` maps to 0 and ``hi`` to 1, whatever the
  dtype; values outside the stated range are clipped to it (the range says they are saturated).

Nothing is clipped in silence: under ``"dtype"`` a float outside [0, 1] or a negative signed
integer is refused, naming the range found and the ``data.intensity: [lo, hi]`` that maps it.
:func:`check_image` finds such values, and NaN/Inf anywhere, with one streaming pass before
training or prediction starts.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import numpy as np

from ..errors import UserInputError
from .scan import InputError, at, describe, find_first, refuse_empty

IntensitySpec = Union[str, Sequence[float]]


def parse_intensity(spec: IntensitySpec) -> Optional[tuple[float, float]]:
    """``None`` for ``"dtype"``, else the stated ``(lo, hi)``; anything else is a ``ValueError``."""
    if isinstance(spec, str):
        if spec == "dtype":
            return None
        raise UserInputError(f"intensity must be 'dtype' or [min, max]; got {spec!r}")
    values = list(spec) if isinstance(spec, (list, tuple)) else None
    if (
        values is None
        or len(values) != 2
        or any(isinstance(v, bool) or not isinstance(v, (int, float, np.number)) for v in values)
    ):
        raise UserInputError(f"intensity must be 'dtype' or [min, max] (two numbers); got {spec!r}")
    lo, hi = float(values[0]), float(values[1])
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise UserInputError(f"intensity [min, max] must be finite with min < max; got [{lo:g}, {hi:g}]")
    return lo, hi


def _name(value: Any) -> str:
    return "NaN" if np.isnan(value) else ("+Inf" if value > 0 else "-Inf")


def _suggestion(lo: float, hi: float) -> str:
    return f"set data.intensity: [{lo:g}, {hi:g}] in the training config to map that range to [0, 1]"


def to_unit_range(image: np.ndarray, intensity: IntensitySpec = "dtype") -> np.ndarray:
    """``image`` as float32 in [0, 1] by the ``intensity`` rule (see the module doc); same shape.

    Values the rule cannot map (NaN/Inf, floats outside [0, 1] or negative integers under
    ``"dtype"``) raise :class:`InputError`: :func:`check_image` reports them with their location
    before this ever sees them.
    """
    data = np.asarray(image)
    stated = parse_intensity(intensity)
    floating = np.issubdtype(data.dtype, np.floating)
    if floating and data.size and not np.isfinite(data).all():
        raise InputError("the image holds NaN or Inf; images must be finite")
    if stated is not None:
        lo, hi = stated
        out = (data.astype(np.float32) - np.float32(lo)) / np.float32(hi - lo)
        return np.clip(out, 0, 1, out=out)
    if data.dtype == np.bool_:
        return data.astype(np.float32)
    if np.issubdtype(data.dtype, np.integer):
        if data.size and np.issubdtype(data.dtype, np.signedinteger) and data.min() < 0:
            raise InputError(
                f"{data.dtype} intensities go down to {data.min()}, below 0, under data.intensity "
                f"'dtype'; {_suggestion(float(data.min()), float(data.max()))}"
            )
        return (data.astype(np.float32) / np.iinfo(data.dtype).max).astype(np.float32)
    if not floating:
        raise InputError(f"images must be integer, boolean or float; got dtype {data.dtype}")
    if data.size and (data.min() < 0 or data.max() > 1):
        lo, hi = float(data.min()), float(data.max())
        raise InputError(
            f"float intensities span [{lo:g}, {hi:g}], outside [0, 1], under data.intensity 'dtype' "
            f"(floats must already lie in [0, 1]); {_suggestion(lo, hi)}"
        )
    return data.astype(np.float32)


def check_image(
    volume: Any, intensity: IntensitySpec = "dtype", *, block: Optional[Sequence[int]] = None, name: str = "the image"
) -> None:
    """Refuse an image volume (Z, Y, X) that :func:`to_unit_range` cannot map, naming the file
    and the first bad voxel: NaN/Inf anywhere, and under ``"dtype"`` floats outside [0, 1] or
    negative signed integers. One pass over the volume in ``block``-sized reads (default
    :func:`~stt_model.data.scan.default_block`); unsigned and boolean images under ``"dtype"``
    and integer images under a stated range cannot hold a bad value and are not read at all.
    """
    label, z_offset = describe(volume, name)
    if len(volume.shape) != 3:
        raise InputError(f"{label} must be (Z, Y, X); got shape {tuple(volume.shape)}")
    refuse_empty(volume, label)
    stated = parse_intensity(intensity)
    dtype = np.dtype(volume.dtype)
    if np.issubdtype(dtype, np.floating):
        span = [math.inf, -math.inf]

        def visit(data: np.ndarray) -> None:
            span[0], span[1] = min(span[0], float(data.min())), max(span[1], float(data.max()))

        found = find_first(volume, lambda data: ~np.isfinite(data), block, visit if stated is None else None)
        if found is not None:
            where, value = found
            raise InputError(
                f"{label}: {_name(value)} at {at(where, z_offset)} (the first non-finite voxel); "
                "images must be finite: repair or fill those voxels first"
            )
        if stated is None and (span[0] < 0 or span[1] > 1):
            raise InputError(
                f"{label}: float intensities span [{span[0]:g}, {span[1]:g}], outside [0, 1], under "
                f"data.intensity 'dtype' (floats must already lie in [0, 1]); "
                f"{_suggestion(span[0], span[1])}"
            )
    elif stated is None and np.issubdtype(dtype, np.signedinteger):
        found = find_first(volume, lambda data: data < 0, block)
        if found is not None:
            where, value = found
            raise InputError(
                f"{label}: intensity {value} at {at(where, z_offset)} is negative, and data.intensity "
                f"'dtype' divides {dtype} by {np.iinfo(dtype).max}; state the range instead, "
                f"e.g. data.intensity: [{np.iinfo(dtype).min}, {np.iinfo(dtype).max}]"
            )
    elif not (np.issubdtype(dtype, np.integer) or dtype == np.bool_):
        raise InputError(f"{label}: images must be integer, boolean or float; got dtype {dtype}")
