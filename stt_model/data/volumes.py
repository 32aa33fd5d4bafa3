"""Lazy readers for EM volumes (Z, Y, X): HDF5, TIFF stacks, folders of slices and zarr.

``open_volume(spec)`` returns a :class:`Volume`: it knows its shape and dtype and reads only
what a window ``volume[z0:z1, y0:y1, x0:x1]`` touches, so volumes larger than memory can be
sampled and predicted. Specs: ``file.h5[:dataset]`` / ``file.hdf5[:dataset]``,
``stack.tif[f]``, a folder of ``.png``/``.tif`` slices (one per z, natural sort order, MitoEM's
layout), ``array.zarr[:path]``. Readers open their file on first use in each process (a forked
DataLoader worker opens its own) and drop the handle when pickled.

A volume with no voxels is refused at open. Damaged data (a truncated slice or stack, a chunk
that fails to decompress) raises :class:`VolumeReadError`, one line naming the file and the
window, and for chunked HDF5/zarr the first damaged chunk in it.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import re
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol, Union, runtime_checkable

import numpy as np

from .indexing import Key, normalise_key
from .scan import describe, refuse_empty

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
TIFF_SUFFIXES = (".tif", ".tiff")
SLICE_SUFFIXES = (".png", ".tif", ".tiff")
ZARR_SUFFIXES = (".zarr", ".n5")
# Conventional names of the image dataset in EM files (CREMI/MitoEM use "main").
DEFAULT_DATASETS = ("main", "image", "raw", "data")
# What the readers' libraries raise for damaged or truncated data (h5py: OSError; PIL: OSError,
# SyntaxError; tifffile: ValueError, zlib.error; codecs: RuntimeError). IndexError and
# TypeError are the caller's key, not the data, and pass through.
DAMAGED_DATA = (OSError, ValueError, RuntimeError, EOFError, SyntaxError, zlib.error)


class VolumeReadError(ValueError):
    """A window could not be read: the data on disk is damaged or truncated."""


def _window(key: Key, shape: tuple[int, ...]) -> Optional[list[tuple[int, int]]]:
    """The bounding ``[start, stop)`` per axis of ``key`` (ints, slices, one Ellipsis), or ``None``
    for keys this cannot describe."""
    items = list(key) if isinstance(key, tuple) else [key]
    if items.count(Ellipsis) == 1:
        at = items.index(Ellipsis)
        items[at:at + 1] = [slice(None)] * (len(shape) - len(items) + 1)
    items += [slice(None)] * (len(shape) - len(items))
    if len(items) != len(shape):
        return None
    bounds = []
    for item, n in zip(items, shape):
        if isinstance(item, slice):
            r = range(*item.indices(n))
            bounds.append((min(r), max(r) + 1) if len(r) else (0, 0))
        elif isinstance(item, (int, np.integer)):
            i = int(item) % n if n else 0
            bounds.append((i, i + 1))
        else:
            return None
    return bounds


def _describe_window(bounds: Optional[list[tuple[int, int]]], key: Key) -> str:
    if bounds is None:
        return f"window {key!r}"
    names = ["z", "y", "x"][-len(bounds):] if len(bounds) <= 3 else \
        [f"axis {i}" for i in range(len(bounds) - 3)] + ["z", "y", "x"]
    return ", ".join(f"{n} {a}:{b}" for n, (a, b) in zip(names, bounds))


def _damaged(name: str, what: str, exc: BaseException) -> VolumeReadError:
    reason = str(exc).splitlines()[0] if str(exc) else ""
    return VolumeReadError(f"{name}: cannot read {what}; the file is damaged or truncated "
                           f"({type(exc).__name__}{': ' + reason if reason else ''})")


def _first_bad_chunk(read: Callable[[tuple[slice, ...]], Any], bounds: list[tuple[int, int]],
                     chunks: tuple[int, ...]) -> Optional[list[tuple[int, int]]]:
    """The first chunk inside ``bounds`` that fails to read, or ``None`` (then the window's own
    error is all there is to say)."""
    grid = [range(a // c * c, b, c) for (a, b), c in zip(bounds, chunks)]
    for corner in itertools.product(*grid):
        region = tuple(slice(o, o + c) for o, c in zip(corner, chunks))
        try:
            read(region)
        except DAMAGED_DATA:
            return [(s.start, s.stop) for s in region]
    return None


def _read_chunked(name: str, read: Callable[[Key], Any], key: Key, shape: tuple[int, ...],
                  chunks: Optional[tuple[int, ...]]) -> np.ndarray:
    """``read(key)`` as an array, or a :class:`VolumeReadError` naming the window and, when the
    data is chunked, the first damaged chunk in it."""
    try:
        return np.asarray(read(key))
    except DAMAGED_DATA as exc:
        bounds = _window(key, shape)
        where = _describe_window(bounds, key)
        bad = _first_bad_chunk(read, bounds, chunks) if bounds is not None and chunks else None
        if bad is None and type(exc) is ValueError:
            raise  # every chunk reads: the key, not the data, is at fault
        what = f"chunk {_describe_window(bad, key)} (reading {where})" if bad else where
        raise _damaged(name, what, exc) from exc


@runtime_checkable
class Volume(Protocol):
    """A lazily read array: ``volume[key]`` reads only the window the key selects."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> np.dtype: ...

    def __getitem__(self, key: Key) -> np.ndarray: ...


class _Handle:
    """An open file handle made on first use and remade in each new process. A forked DataLoader
    worker must not share its parent's HDF5 handle or file offset: reads would interleave and
    corrupt each other. Pickling drops the handle."""

    def __init__(self, opener: Callable[[], Any]):
        self._opener = opener
        self._pid: Optional[int] = None
        self._value: Any = None

    def get(self) -> Any:
        if self._pid != os.getpid():
            self._value, self._pid = self._opener(), os.getpid()
        return self._value

    def __getstate__(self) -> dict[str, Any]:
        return {"_opener": self._opener, "_pid": None, "_value": None}


def split_spec(spec: Union[str, Path]) -> tuple[Path, Optional[str]]:
    """``"a/b.h5:image"`` -> ``(Path("a/b.h5"), "image")``; the dataset part is optional.

    The colon counts only after an HDF5 or zarr suffix, so other paths with colons survive.
    """
    text = str(spec)
    match = re.match(r"^(.*?(?:%s))(?::(.+))?$" % "|".join(re.escape(s) for s in HDF5_SUFFIXES + ZARR_SUFFIXES),
                     text, flags=re.IGNORECASE)
    if match:
        return Path(match.group(1)), match.group(2)
    return Path(text), None


def _pick_dataset(path: Path, requested: Optional[str], available: list[str]) -> str:
    if requested is not None:
        if requested.strip("/") in available:
            return requested.strip("/")
        raise ValueError(f"{path} has no dataset {requested!r}; available: {', '.join(available) or 'none'}")
    if len(available) == 1:
        return available[0]
    for name in DEFAULT_DATASETS:
        if name in available:
            return name
    raise ValueError(f"{path} holds several datasets and none is called {'/'.join(DEFAULT_DATASETS)}; "
                     f"name one as {path}:<dataset> (available: {', '.join(available) or 'none'})")


class HDF5Volume:
    """A dataset of an HDF5 file; h5py reads only the chunks a window touches."""

    def __init__(self, path: Path, dataset: Optional[str] = None):
        import h5py

        self.path = path
        try:
            f = h5py.File(path, "r")
        except OSError as exc:
            raise ValueError(f"{path} is not a readable HDF5 file ({exc})") from None
        with f:
            names: list[str] = []
            f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
            self.dataset = _pick_dataset(path, dataset, names)
            ds = f[self.dataset]
            self._shape, self._dtype = tuple(ds.shape), ds.dtype
            self.chunks: Optional[tuple[int, ...]] = ds.chunks
        self._file = _Handle(functools.partial(h5py.File, path, "r"))

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    def __getitem__(self, key: Key) -> np.ndarray:
        name = f"{self.path}:{self.dataset}"
        try:
            dataset = self._file.get()[self.dataset]
        except DAMAGED_DATA as exc:
            raise _damaged(name, "the dataset", exc) from exc
        return _read_chunked(name, dataset.__getitem__, key, self._shape, self.chunks)

    def __repr__(self) -> str:
        return f"HDF5Volume('{self.path}:{self.dataset}', shape={self.shape}, dtype={self.dtype})"


class TiffVolume:
    """A multi-page TIFF stack (Z, Y, X), one page per z: memory-mapped when uncompressed, else read
    page by page."""

    def __init__(self, path: Path):
        import tifffile

        self.path = path
        with _quiet("tifffile"):
            try:
                tif = tifffile.TiffFile(path)
            except tifffile.TiffFileError as exc:
                raise ValueError(f"{path}: {exc}") from None
            with tif:
                _check_complete(tif, path)
                series = tif.series[0]
                shape = tuple(series.shape)
                self._dtype = np.dtype(series.dtype)
                pages = len(series.pages)
        if len(shape) == 2:
            shape = (1, *shape)
        if len(shape) != 3 or pages != shape[0]:
            raise ValueError(f"{path}: expected a grayscale stack with one page per z; "
                             f"got shape {shape} in {pages} page(s)")
        self._shape: tuple[int, int, int] = shape  # type: ignore[assignment]
        self._data = _Handle(functools.partial(_open_tiff, path, shape))

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    def __getitem__(self, key: Key) -> np.ndarray:
        try:
            data = self._data.get()
        except DAMAGED_DATA as exc:
            raise _damaged(str(self.path), "the stack", exc) from exc
        if isinstance(data, np.ndarray):
            try:
                return np.array(data[key])
            except DAMAGED_DATA as exc:
                raise _damaged(str(self.path), _describe_window(_window(key, self._shape), key), exc) from exc
        zs, rest, squeeze = normalise_key(key, self._shape)
        pages = []
        for z in zs:
            try:
                pages.append(data.pages[z].asarray()[rest])
            except DAMAGED_DATA as exc:
                raise _damaged(str(self.path), f"page z={z}", exc) from exc
        out = np.stack(pages) if pages else np.empty((0, *_rest_shape(rest, self._shape)), self._dtype)
        return out[squeeze]

    def __repr__(self) -> str:
        return f"TiffVolume('{self.path}', shape={self.shape}, dtype={self.dtype})"


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Hold back a library's warnings while this module checks the same things and reports them
    in its own one-line error."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _check_complete(tif: Any, path: Path) -> None:
    """Refuse a truncated or damaged TIFF at open. tifffile stops at the first page it cannot
    reach and only logs it, so a cut stack would otherwise pass for a shorter one."""
    import struct

    import tifffile

    size = path.stat().st_size
    try:
        pages = list(tif.pages)
    except tifffile.TiffFileError as exc:
        raise VolumeReadError(f"{path}: damaged or truncated TIFF ({exc})") from None
    for z, page in enumerate(pages):
        end = max((o + c for o, c in zip(page.dataoffsets, page.databytecounts)), default=0)
        if end > size:
            raise VolumeReadError(f"{path}: truncated: page z={z} needs bytes up to {end} but the file has {size}")
    last, fmt = pages[-1], tif.tiff
    fh = tif.filehandle
    fh.seek(last.offset)
    (count,) = struct.unpack(tif.byteorder + fmt.tagnoformat[-1], fh.read(fmt.tagnosize))
    fh.seek(last.offset + fmt.tagnosize + count * fmt.tagsize)
    raw = fh.read(fmt.offsetsize)
    following = struct.unpack(tif.byteorder + fmt.offsetformat[-1], raw)[0] if len(raw) == fmt.offsetsize else -1
    if following != 0:
        raise VolumeReadError(f"{path}: truncated or damaged: page z={len(pages) - 1} is the last one readable, but it "
                         f"points to another at byte {following} of a {size}-byte file")


def _open_tiff(path: Path, shape: tuple[int, ...]) -> Any:
    """The stack memory-mapped, or a ``TiffFile`` to read page by page when it is compressed or tiled."""
    import tifffile

    try:
        return tifffile.memmap(path, mode="r").reshape(shape)
    except ValueError:  # no contiguous image data to map
        return tifffile.TiffFile(path)


def _rest_shape(rest: tuple[slice, slice], shape: tuple[int, ...]) -> tuple[int, int]:
    return tuple(len(range(*s.indices(n))) for s, n in zip(rest, shape[1:]))  # type: ignore[return-value]


def natural_key(name: str) -> list[Union[int, str]]:
    """Sort key that puts ``im2.png`` before ``im10.png``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _slice_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one slice from its header alone."""
    if path.suffix.lower() in TIFF_SUFFIXES:
        import tifffile

        try:
            tif = tifffile.TiffFile(path)
        except tifffile.TiffFileError as exc:
            raise ValueError(f"{path}: {exc}") from None
        with tif:
            page = tif.pages[0]
            return tuple(page.shape), np.dtype(page.dtype)
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(path)
    except UnidentifiedImageError:
        raise ValueError(f"{path} is not a readable image") from None
    with im:
        modes = {"L": np.uint8, "I;16": np.uint16, "I;16B": np.uint16, "I": np.int32, "F": np.float32,
                 "1": np.bool_, "P": np.uint8}
        if im.mode not in modes:
            raise ValueError(f"{path}: expected a grayscale image; got mode {im.mode}")
        return (im.height, im.width), np.dtype(modes[im.mode])


def _read_slice(path: Path) -> np.ndarray:
    if path.suffix.lower() in TIFF_SUFFIXES:
        import tifffile

        return tifffile.imread(path)
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)


class SliceFolderVolume:
    """A folder of 2-d slices, one file per z in natural sort order; reads only the slices a
    window touches."""

    def __init__(self, folder: Path):
        self.path = folder
        files = sorted((p for p in folder.iterdir() if p.suffix.lower() in SLICE_SUFFIXES and p.is_file()),
                       key=lambda p: natural_key(p.name))
        if not files:
            raise ValueError(f"{folder} holds no {'/'.join(SLICE_SUFFIXES)} slices")
        headers = [_slice_header(p) for p in files]
        shapes = {h[0] for h in headers}
        if len(shapes) > 1:
            first = headers[0][0]
            odd = next(p for p, h in zip(files, headers) if h[0] != first)
            raise ValueError(f"{folder}: slices differ in shape ({files[0].name} is {first}, "
                             f"{odd.name} is {_slice_header(odd)[0]})")
        (plane,) = shapes
        if len(plane) != 2:
            raise ValueError(f"{folder}: expected grayscale slices; {files[0].name} has shape {plane}")
        self.files = files
        self._shape = (len(files), *plane)
        self._dtype = headers[0][1]

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    def __getitem__(self, key: Key) -> np.ndarray:
        zs, rest, squeeze = normalise_key(key, self._shape)
        planes = []
        for z in zs:
            try:
                planes.append(_read_slice(self.files[z])[rest])
            except DAMAGED_DATA as exc:
                raise _damaged(str(self.files[z]), f"slice z={z} of {self.path}", exc) from exc
        out = np.stack(planes) if planes else np.empty((0, *_rest_shape(rest, self._shape)), self._dtype)
        return out[squeeze]

    def __repr__(self) -> str:
        return f"SliceFolderVolume('{self.path}', shape={self.shape}, dtype={self.dtype})"


class ZarrVolume:
    """A zarr array (or an array inside a zarr group); zarr reads only the touched chunks."""

    def __init__(self, path: Path, dataset: Optional[str] = None):
        import zarr

        self.path = path
        node = zarr.open(str(path), mode="r")
        if isinstance(node, zarr.Array):
            if dataset is not None:
                raise ValueError(f"{path} is a single zarr array; it has no dataset {dataset!r}")
            self.dataset: Optional[str] = None
            array = node
        else:
            names = sorted(name for name, member in node.members(max_depth=None) if isinstance(member, zarr.Array))
            self.dataset = _pick_dataset(path, dataset, names)
            array = node[self.dataset]
        self._shape, self._dtype = tuple(array.shape), np.dtype(array.dtype)
        self.chunks: Optional[tuple[int, ...]] = tuple(array.chunks)
        self._array = _Handle(functools.partial(_open_zarr, path, self.dataset))

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    def __getitem__(self, key: Key) -> np.ndarray:
        name = f"{self.path}:{self.dataset}" if self.dataset else str(self.path)
        try:
            array = self._array.get()
        except DAMAGED_DATA as exc:
            raise _damaged(name, "the array", exc) from exc
        return _read_chunked(name, array.__getitem__, key, self._shape, self.chunks)

    def __repr__(self) -> str:
        name = f"{self.path}:{self.dataset}" if self.dataset else str(self.path)
        return f"ZarrVolume('{name}', shape={self.shape}, dtype={self.dtype})"


def _open_zarr(path: Path, dataset: Optional[str]) -> Any:
    import zarr

    node = zarr.open(str(path), mode="r")
    return node if dataset is None else node[dataset]


def open_volume(spec: Union[str, Path, np.ndarray, Volume]) -> Volume:
    """A lazy :class:`Volume` for ``spec`` (see the module doc); arrays and volumes pass through."""
    if isinstance(spec, np.ndarray) or (not isinstance(spec, (str, Path)) and isinstance(spec, Volume)):
        return spec
    volume = _open_file(spec)
    refuse_empty(volume, describe(volume)[0])
    return volume


def _open_file(spec: Union[str, Path]) -> Union[HDF5Volume, TiffVolume, SliceFolderVolume, ZarrVolume]:
    path, dataset = split_spec(spec)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    suffix = path.suffix.lower()
    if suffix in ZARR_SUFFIXES or (path.is_dir() and any((path / m).exists() for m in
                                                         ("zarr.json", ".zarray", ".zgroup"))):
        return ZarrVolume(path, dataset)
    if path.is_dir():
        return SliceFolderVolume(path)
    if suffix in HDF5_SUFFIXES:
        return HDF5Volume(path, dataset)
    if suffix in TIFF_SUFFIXES:
        return TiffVolume(path)
    raise ValueError(f"{path}: unsupported volume format {suffix or '(no suffix)'}; expected "
                     f"{'/'.join(HDF5_SUFFIXES)} [:dataset], .tif/.tiff, .zarr or a folder of PNG/TIFF slices")


class ZRange:
    """Slices ``[z0, z1)`` of another volume, as a volume (no data copied): training on some
    slices of a file and validating on the others."""

    def __init__(self, volume: Volume, z0: int, z1: int):
        if not 0 <= z0 < z1 <= volume.shape[0]:
            raise ValueError(f"slice range {z0}:{z1} is not inside the volume's {volume.shape[0]} slices")
        self.volume, self.z0, self.z1 = volume, z0, z1

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.z1 - self.z0, *self.volume.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.volume.dtype

    def __getitem__(self, key: Key) -> np.ndarray:
        zs, (ys, xs), squeeze = normalise_key(key, self.shape)
        if len(zs) == 0:
            return np.asarray(self.volume[self.z0:self.z0, ys, xs])[squeeze]
        step = zs.step
        start = self.z0 + zs.start
        stop = self.z0 + zs[-1] + (1 if step > 0 else -1)
        return np.asarray(self.volume[start:stop if stop >= 0 else None:step, ys, xs])[squeeze]

    def __repr__(self) -> str:
        return f"ZRange({self.volume!r}, {self.z0}, {self.z1})"
