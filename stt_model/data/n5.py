"""Reading N5 datasets (the format of Janelia's and BigDataViewer's tools), which zarr 3 no longer
reads: a folder per dataset with ``attributes.json`` (``dimensions``, ``blockSize``, ``dataType``,
``compression``, all in X, Y, Z order) and one file per block at ``<x>/<y>/<z>``, each a
big-endian header (mode, rank, the block's own size) followed by the block's voxels, compressed,
big-endian, X fastest. Blocks that were never written read as zeros; edge blocks may be stored
cropped (Java N5) or padded to the full block size (zarr 2), both are read.
"""

from __future__ import annotations

import bz2
import itertools
import json
import lzma
import operator
import os
import struct
import zlib
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np

from ..errors import UserInputError

DATA_TYPES = ("uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64", "float32", "float64")
DEFAULT_MODE, VARLENGTH_MODE = 0, 1


def _gzip(config: dict[str, Any]) -> Callable[[bytes], bytes]:
    # 16 + MAX_WBITS: a gzip stream; useZlib: a bare zlib one.
    wbits = zlib.MAX_WBITS if config.get("useZlib") else 16 + zlib.MAX_WBITS
    return lambda data: zlib.decompress(data, wbits)


def _numcodec(name: str) -> Callable[[dict[str, Any]], Callable[[bytes], bytes]]:
    def make(config: dict[str, Any]) -> Callable[[bytes], bytes]:
        import numcodecs

        codec = {"blosc": numcodecs.Blosc, "zstd": numcodecs.Zstd}[name]()
        return lambda data: bytes(codec.decode(data))

    return make


DECOMPRESSORS: dict[str, Callable[[dict[str, Any]], Callable[[bytes], bytes]]] = {
    "raw": lambda config: bytes,
    "gzip": _gzip,
    "bzip2": lambda config: bz2.decompress,
    "xz": lambda config: lzma.decompress,
    "blosc": _numcodec("blosc"),
    "zstd": _numcodec("zstd"),
}


def dataset_attributes(folder: Path) -> Optional[dict[str, Any]]:
    """The attributes of the N5 dataset in ``folder``, or ``None`` if it is not one (a group)."""
    try:
        attributes = json.loads((folder / "attributes.json").read_text())
    except (OSError, ValueError):
        return None
    return attributes if isinstance(attributes, dict) and "dimensions" in attributes else None


def list_datasets(root: Path) -> list[str]:
    """The datasets below the N5 group ``root``, as ``/``-joined paths, without walking into them
    (their block folders can number millions)."""
    found = []
    for folder, subfolders, _ in os.walk(root):
        here = Path(folder)
        if here != root and dataset_attributes(here) is not None:
            found.append(here.relative_to(root).as_posix())
            subfolders.clear()
        else:
            subfolders.sort()
    return sorted(found)


class N5Array:
    """One N5 dataset as a numpy-indexable array in (Z, Y, X) order: ``array[key]`` (ints, slices
    with any step, one Ellipsis) reads only the blocks the key's bounding box touches."""

    def __init__(self, folder: Path):
        attributes = dataset_attributes(folder)
        if attributes is None:
            raise UserInputError(f"{folder} is not an N5 dataset (no attributes.json with dimensions)")
        self.folder = folder
        try:
            self.shape = tuple(int(n) for n in reversed(attributes["dimensions"]))
            self.chunks = tuple(int(n) for n in reversed(attributes["blockSize"]))
            data_type = str(attributes["dataType"])
        except (KeyError, TypeError, ValueError) as exc:
            raise UserInputError(f"{folder}/attributes.json: not N5 dataset attributes ({exc!r})") from None
        if data_type not in DATA_TYPES:
            raise UserInputError(
                f"{folder}: N5 dataType {data_type!r} is not supported; expected one of {', '.join(DATA_TYPES)}"
            )
        if len(self.chunks) != len(self.shape) or min(self.chunks, default=1) < 1:
            raise UserInputError(
                f"{folder}/attributes.json: blockSize {attributes['blockSize']} does not fit "
                f"dimensions {attributes['dimensions']}"
            )
        self.dtype = np.dtype(data_type)
        self._stored = self.dtype.newbyteorder(">")
        # Format 1.x and later: {"compression": {"type": ...}}; format 0.x: {"compressionType": ...}.
        compression = attributes.get("compression") or {"type": attributes.get("compressionType", "raw")}
        kind = compression.get("type") if isinstance(compression, dict) else None
        if kind not in DECOMPRESSORS:
            raise UserInputError(
                f"{folder}: N5 compression {kind!r} is not supported (supported: "
                f"{', '.join(DECOMPRESSORS)}); rewrite the dataset with one of those"
            )
        self._decompress = DECOMPRESSORS[kind](compression)

    def __getitem__(self, key: Any) -> np.ndarray:
        box, local = self._box(key)
        return self._read_box(box)[local]

    def _box(self, key: Any) -> tuple[list[tuple[int, int]], tuple[Union[int, slice], ...]]:
        """The bounding box ``[start, stop)`` per axis of ``key`` and the key relative to it."""
        items = list(key) if isinstance(key, tuple) else [key]
        if items.count(Ellipsis) > 1:
            raise IndexError("an index can only have a single ellipsis ('...')")
        if Ellipsis in items:
            at = items.index(Ellipsis)
            items[at : at + 1] = [slice(None)] * (len(self.shape) - len(items) + 1)
        if len(items) > len(self.shape):
            raise IndexError(f"too many indices for an array of {len(self.shape)} dimensions")
        items += [slice(None)] * (len(self.shape) - len(items))
        box: list[tuple[int, int]] = []
        local: list[Union[int, slice]] = []
        for item, n in zip(items, self.shape):
            if isinstance(item, slice):
                r = range(*item.indices(n))
                if not r:
                    box.append((0, 0))
                    local.append(slice(0, 0))
                    continue
                low = min(r)
                box.append((low, max(r) + 1))
                stop = r.stop - low
                local.append(slice(r.start - low, stop if stop >= 0 else None, r.step))
            else:
                index = operator.index(item)  # TypeError for anything but an integer
                if not -n <= index < n:
                    raise IndexError(f"index {index} is out of bounds for an axis of size {n}")
                box.append((index % n, index % n + 1))
                local.append(0)
        return box, tuple(local)

    def _read_box(self, box: list[tuple[int, int]]) -> np.ndarray:
        out = np.zeros([b - a for a, b in box], self.dtype)
        if out.size == 0:
            return out
        grid = [range(a // c, (b - 1) // c + 1) for (a, b), c in zip(box, self.chunks)]
        for index in itertools.product(*grid):
            block = self.read_block(index)
            if block is None:
                continue  # never written: zeros
            corner = [i * c for i, c in zip(index, self.chunks)]
            source, target = [], []
            for (a, b), origin, size in zip(box, corner, block.shape):
                lo, hi = max(a, origin), min(b, origin + size)
                if hi <= lo:
                    break
                source.append(slice(lo - origin, hi - origin))
                target.append(slice(lo - a, hi - a))
            else:
                out[tuple(target)] = block[tuple(source)]
        return out

    def read_block(self, index: tuple[int, ...]) -> Optional[np.ndarray]:
        """The block at grid ``index`` (Z, Y, X order) in (Z, Y, X) order, or ``None`` if it was never
        written. A damaged block raises ``ValueError`` (or the decompressor's error)."""
        path = self.folder.joinpath(*(str(i) for i in reversed(index)))
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        if len(raw) < 4:
            raise UserInputError(f"block {path} is truncated: {len(raw)} bytes, no header")
        mode, rank = struct.unpack(">HH", raw[:4])
        if mode not in (DEFAULT_MODE, VARLENGTH_MODE) or rank != len(self.shape):
            raise UserInputError(
                f"block {path}: header says mode {mode}, {rank} dimensions; expected mode 0 or 1 and {len(self.shape)}"
            )
        start = 4 + 4 * rank + (4 if mode == VARLENGTH_MODE else 0)
        if len(raw) < start:
            raise UserInputError(f"block {path} is truncated inside its header")
        size = struct.unpack(f">{rank}I", raw[4 : 4 + 4 * rank])[::-1]
        data = np.frombuffer(self._decompress(raw[start:]), self._stored)
        count = int(np.prod(size))
        if data.size < count:
            raise UserInputError(f"block {path} holds {data.size} voxels; its header says {size} = {count}")
        return data[:count].reshape(size).astype(self.dtype)
