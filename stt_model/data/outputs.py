"""Chunked outputs written window by window, published atomically.

``create_output(spec, shape, dtype, chunks)`` opens an HDF5 dataset (``out.h5[:dataset]``) or a
zarr array (``out.zarr[:path]``) under a temporary name beside the final one. Windows are
written with ``out[z0:z1, ...] = block``; ``close()`` (or leaving the ``with`` block normally)
renames it into place, while an exception inside the ``with`` block (or ``abort()``) deletes
it, so a crashed prediction never leaves a half-written file that looks finished.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import TracebackType
from typing import Any, Optional, Sequence, Union

import numpy as np

from .volumes import HDF5_SUFFIXES, ZARR_SUFFIXES, split_spec

DEFAULT_OUTPUT_DATASET = "main"


def default_chunks(shape: Sequence[int]) -> tuple[int, ...]:
    """16 x 128 x 128 voxel chunks (one per channel), clipped to the shape: thin in z because
    inference writes slabs of slices."""
    target = [16, 128, 128]
    lead = [1] * (len(shape) - 3)  # channel axes: one chunk per channel
    return tuple(max(1, min(int(n), c)) for n, c in zip(shape, lead + target[-min(3, len(shape)):]))


class OutputVolume:
    """A writable chunked array under a temporary name until :meth:`close`."""

    def __init__(self, path: Path, dataset: str, shape: Sequence[int], dtype: Any,
                 chunks: Optional[Sequence[int]], fmt: str):
        self.path, self.dataset, self.format = path, dataset, fmt
        self.tmp_path = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        shape = tuple(int(n) for n in shape)
        chunk_shape = tuple(int(c) for c in chunks) if chunks is not None else default_chunks(shape)
        if len(chunk_shape) != len(shape):
            raise ValueError(f"chunks {chunk_shape} must have one entry per axis of shape {shape}")
        chunk_shape = tuple(max(1, min(c, n)) for c, n in zip(chunk_shape, shape))
        _remove(self.tmp_path)
        if fmt == "hdf5":
            import h5py

            self._file: Any = h5py.File(self.tmp_path, "w")
            self._array: Any = self._file.create_dataset(dataset, shape=shape, dtype=dtype, chunks=chunk_shape,
                                                         compression="gzip", compression_opts=1)
        else:
            import zarr

            self._file = None
            root = zarr.open_group(str(self.tmp_path), mode="w")
            self._array = root.create_array(dataset, shape=shape, dtype=dtype, chunks=chunk_shape,
                                            fill_value=0)
        self.closed = False

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._array.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._array.dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self._array[key])

    def __setitem__(self, key: Any, value: Any) -> None:
        self._array[key] = value

    def close(self) -> Path:
        """Publish the output under its final name (replacing an older one) and return that path."""
        if self.closed:
            return self.path
        if self._file is not None:
            self._file.close()
        _remove(self.path)
        os.replace(self.tmp_path, self.path)
        self.closed = True
        return self.path

    def abort(self) -> None:
        """Drop the partial output; the final name is left as it was."""
        if self.closed:
            return
        if self._file is not None:
            self._file.close()
        _remove(self.tmp_path)
        self.closed = True

    def __enter__(self) -> "OutputVolume":
        return self

    def __exit__(self, kind: Optional[type], error: Optional[BaseException],
                 traceback: Optional[TracebackType]) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

    def __repr__(self) -> str:
        return f"OutputVolume('{self.path}:{self.dataset}', shape={self.shape}, dtype={self.dtype})"


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def create_output(spec: Union[str, Path], shape: Sequence[int], dtype: Any = np.uint8,
                  chunks: Optional[Sequence[int]] = None) -> OutputVolume:
    """A new chunked output ``(..., Z, Y, X)`` at ``spec`` (``out.h5[:dataset]`` or ``out.zarr[:path]``;
    dataset ``main`` by default), written under a temporary name until closed."""
    path, dataset = split_spec(spec)
    suffix = path.suffix.lower()
    if suffix in HDF5_SUFFIXES:
        fmt = "hdf5"
    elif suffix in ZARR_SUFFIXES[:1]:
        fmt = "zarr"
    else:
        raise ValueError(f"{path}: outputs are written as HDF5 ({'/'.join(HDF5_SUFFIXES)}) or zarr (.zarr); "
                         f"got {suffix or 'no suffix'}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"no such folder for the output: {path.parent}")
    return OutputVolume(path, dataset or DEFAULT_OUTPUT_DATASET, shape, dtype, chunks, fmt)
