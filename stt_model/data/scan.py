"""Streaming checks of whole volumes, block by block, before any training or prediction runs.

A volume larger than memory is read once in blocks (full (Y, X) planes, as many z-slices as fit
in :data:`SCAN_BYTES`, a whole number of the file's z-chunks; or the blocks the caller names),
so a bad voxel is refused up front, with its location, instead of surfacing hours later as a
non-finite loss or, worse, as a finite but meaningless probability.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from ..errors import UserInputError

# Source bytes read per block when the caller does not name a block.
SCAN_BYTES = 32 * 2**20

Location = tuple[int, int, int]


class InputError(UserInputError):
    """An input volume holds values that cannot be used as they are; the message names the
    volume, the first offending voxel and what to do."""


def describe(volume: Any, fallback: str = "the volume") -> tuple[str, int]:
    """How messages name ``volume`` (its file and dataset where it has one, else ``fallback``)
    and the z offset that turns its coordinates into the file's (a ``ZRange`` of a file)."""
    inner = getattr(volume, "volume", None)
    if inner is not None and hasattr(volume, "z0"):
        name, offset = describe(inner, fallback)
        return name, offset + int(volume.z0)
    path = getattr(volume, "path", None)
    if path is None:
        return fallback, 0
    dataset = getattr(volume, "dataset", None)
    return (f"{path}:{dataset}" if dataset else str(path)), 0


def _chunks(volume: Any) -> Optional[Sequence[int]]:
    chunks = getattr(volume, "chunks", None)
    if chunks is None and hasattr(volume, "volume"):
        chunks = getattr(volume.volume, "chunks", None)
    return chunks if chunks is not None and len(chunks) == 3 else None


def default_block(volume: Any, budget: int = SCAN_BYTES) -> tuple[int, int, int]:
    """Whole planes, as many z-slices as ``budget`` bytes hold (at least one), rounded down to a
    whole number of z-chunks so that a compressed chunk is decompressed once."""
    z, y, x = (int(n) for n in volume.shape)
    plane = max(1, y * x * np.dtype(volume.dtype).itemsize)
    depth = max(1, budget // plane)
    chunks = _chunks(volume)
    if chunks is not None:
        depth = max(int(chunks[0]), depth // int(chunks[0]) * int(chunks[0]))
    return min(depth, z), y, x


def blocks(shape: Sequence[int], block: Sequence[int]) -> Iterator[tuple[slice, slice, slice]]:
    """The blocks tiling ``shape``, in (z, y, x) order."""
    ranges = [[slice(a, min(a + b, n)) for a in range(0, n, b)] for n, b in zip(shape, block)]
    yield from itertools.product(*ranges)  # type: ignore[misc]


def find_first(
    volume: Any,
    bad: Callable[[np.ndarray], np.ndarray],
    block: Optional[Sequence[int]] = None,
    visit: Optional[Callable[[np.ndarray], None]] = None,
) -> Optional[tuple[Location, Any]]:
    """The first voxel of ``volume`` (Z, Y, X) in (z, y, x) order where ``bad(window)`` (a boolean
    array of the window's shape) holds, and its value; ``None`` when there is none. ``visit``
    sees every window read. Reads stop at the end of the first band of blocks (one z range)
    that holds a bad voxel: the first one overall lies in that band."""
    shape = tuple(int(n) for n in volume.shape)
    block = tuple(int(b) for b in (block or default_block(volume)))
    found: Optional[tuple[Location, Any]] = None
    band: Optional[int] = None
    for region in blocks(shape, block):
        if band is not None and region[0].start != band:
            break
        data = np.asarray(volume[region])
        if visit is not None:
            visit(data)
        mask = bad(data)
        if not mask.any():
            continue
        local = np.unravel_index(int(np.argmax(mask)), mask.shape)
        where = tuple(int(s.start + i) for s, i in zip(region, local))
        if found is None or where < found[0]:
            found = (where, data[local])  # type: ignore[assignment]
        band = region[0].start
    return found


def refuse_empty(volume: Any, name: str) -> None:
    """An empty volume has nothing to learn from or to predict: say so where it is opened."""
    if 0 in tuple(volume.shape):
        raise InputError(
            f"{name} is empty (shape {tuple(volume.shape)}); expected a volume with at least one voxel along every axis"
        )


def at(location: Location, z_offset: int = 0) -> str:
    z, y, x = location
    return f"z={z + z_offset}, y={y}, x={x}"
