"""Lazy readers for EM volumes (Z, Y, X): HDF5, TIFF stacks, folders of slices and zarr.

``open_volume(spec)`` returns a :class:`Volume`: it knows its shape and dtype and reads only
what a window ``volume[z0:z1, y0:y1, x0:x1]`` touches, so volumes larger than memory can be
sampled and predicted. Specs: ``file.h5[:dataset]`` / ``file.hdf5[:dataset]``,
``stack.tif[f]``, a folder of ``.png``/``.tif`` slices (one per z, natural sort order, MitoEM's
layout), ``array.zarr[:path]``. An OME-Zarr image (a group with ``multiscales`` metadata,
OME-Zarr 0.4 on zarr v2 or 0.5 on zarr v3) opens at its level 0, the full resolution; another
level is named as ``image.ome.zarr:1`` or ``image.ome.zarr/1``, a label image as
``image.ome.zarr:labels/cells``, and its leading time/channel axes of size 1 are dropped, so a
``(1, 1, Z, Y, X)`` image reads as ``(Z, Y, X)``. N5 datasets (``vol.n5[:dataset]``, or the
dataset's folder) are read by :mod:`stt_model.data.n5`, zarr 3 having dropped N5. Readers open
their file on first use in each process (a forked DataLoader worker opens its own) and drop the
handle when pickled.

A volume with no voxels is refused at open. Damaged data (a truncated slice or stack, a chunk
that fails to decompress) raises :class:`VolumeReadError`, one line naming the file and the
window, and for chunked HDF5/zarr/N5 the first damaged chunk in it.
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

from ..errors import UserInputError
from .indexing import Key, normalise_key
from .scan import describe, refuse_empty

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
TIFF_SUFFIXES = (".tif", ".tiff")
SLICE_SUFFIXES = (".png", ".tif", ".tiff")
ZARR_SUFFIXES = (".zarr",)
N5_SUFFIXES = (".n5",)
ZARR_MARKERS = ("zarr.json", ".zarray", ".zgroup")
# Conventional names of the image dataset in EM files (CREMI/MitoEM use "main").
DEFAULT_DATASETS = ("main", "image", "raw", "data")
# What the readers' libraries raise for damaged or truncated data (h5py: OSError; PIL: OSError,
# SyntaxError; tifffile: ValueError, zlib.error; codecs: RuntimeError). IndexError and
# TypeError are the caller's key, not the data, and pass through.
DAMAGED_DATA = (OSError, ValueError, RuntimeError, EOFError, SyntaxError, zlib.error)


class VolumeReadError(UserInputError):
    """A window could not be read: the data on disk is damaged or truncated."""


def _window(key: Key, shape: tuple[int, ...]) -> Optional[list[tuple[int, int]]]:
    """The bounding ``[start, stop)`` per axis of ``key`` (ints, slices, one Ellipsis), or ``None``
    for keys this cannot describe."""
    items = list(key) if isinstance(key, tuple) else [key]
    if items.count(Ellipsis) == 1:
        at = items.index(Ellipsis)
        items[at : at + 1] = [slice(None)] * (len(shape) - len(items) + 1)
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
    names = (
        ["z", "y", "x"][-len(bounds) :]
        if len(bounds) <= 3
        else [f"axis {i}" for i in range(len(bounds) - 3)] + ["z", "y", "x"]
    )
    return ", ".join(f"{n} {a}:{b}" for n, (a, b) in zip(names, bounds))


def _damaged(name: str, what: str, exc: BaseException) -> VolumeReadError:
    reason = str(exc).splitlines()[0] if str(exc) else ""
    return VolumeReadError(
        f"{name}: cannot read {what}; the file is damaged or truncated "
        f"({type(exc).__name__}{': ' + reason if reason else ''})"
    )


def _first_bad_chunk(
    read: Callable[[tuple[slice, ...]], Any], bounds: list[tuple[int, int]], chunks: tuple[int, ...]
) -> Optional[list[tuple[int, int]]]:
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


def _read_chunked(
    name: str, read: Callable[[Key], Any], key: Key, shape: tuple[int, ...], chunks: Optional[tuple[int, ...]]
) -> np.ndarray:
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


class _Reader:
    """What the file readers share: the shape and dtype read from the header at open, and a repr
    naming the source. Subclasses set ``_shape``/``_dtype`` and implement ``__getitem__``."""

    _shape: tuple[int, ...]
    _dtype: np.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def source(self) -> str:
        """The file (and dataset) read, as errors and the repr name it."""
        return str(self.path)  # type: ignore[attr-defined]

    def __getitem__(self, key: Key) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}('{self.source}', shape={self.shape}, dtype={self.dtype})"


class _ChunkedReader(_Reader):
    """An HDF5 dataset or zarr array: its library reads the chunks a window touches, and a failing
    read is narrowed down to the first damaged chunk. ``_lead`` leading axes of size 1 in the
    stored array are hidden (an OME-Zarr image's time and channel axes)."""

    chunks: Optional[tuple[int, ...]]
    _lead = 0
    _what = "the array"

    def _stored(self) -> Any:
        """The array object of this process (opened on first use)."""
        raise NotImplementedError

    def __getitem__(self, key: Key) -> np.ndarray:
        try:
            array = self._stored()
        except DAMAGED_DATA as exc:
            raise _damaged(self.source, self._what, exc) from exc
        if self._lead:
            key = (0,) * self._lead + (key if isinstance(key, tuple) else (key,))
        return _read_chunked(self.source, array.__getitem__, key, (1,) * self._lead + self._shape, self.chunks)


class _PlaneReader(_Reader):
    """A stack read one z plane at a time (TIFF pages, slice files)."""

    def _stack(self, key: Key, read_plane: Callable[[int, tuple[slice, slice]], np.ndarray]) -> np.ndarray:
        """``key``'s window from ``read_plane(z, (ys, xs))`` of each z it touches."""
        zs, rest, squeeze = normalise_key(key, self._shape)
        planes = [read_plane(z, rest) for z in zs]
        out = np.stack(planes) if planes else np.empty((0, *_rest_shape(rest, self._shape)), self._dtype)
        return out[squeeze]


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

    The colon counts only after an HDF5, zarr or N5 suffix, so other paths with colons survive.
    """
    text = str(spec)
    suffixes = HDF5_SUFFIXES + ZARR_SUFFIXES + N5_SUFFIXES
    alternatives = "|".join(re.escape(s) for s in suffixes)
    match = re.match(rf"^(.*?(?:{alternatives}))(?::(.+))?$", text, flags=re.IGNORECASE)
    if match:
        return Path(match.group(1)), match.group(2)
    return Path(text), None


def _pick_dataset(path: Path, requested: Optional[str], available: list[str]) -> str:
    if requested is not None:
        if requested.strip("/") in available:
            return requested.strip("/")
        raise UserInputError(f"{path} has no dataset {requested!r}; available: {', '.join(available) or 'none'}")
    if len(available) == 1:
        return available[0]
    for name in DEFAULT_DATASETS:
        if name in available:
            return name
    raise UserInputError(
        f"{path} holds several datasets and none is called {'/'.join(DEFAULT_DATASETS)}; "
        f"name one as {path}:<dataset> (available: {', '.join(available) or 'none'})"
    )


class HDF5Volume(_ChunkedReader):
    """A dataset of an HDF5 file; h5py reads only the chunks a window touches."""

    _what = "the dataset"

    def __init__(self, path: Path, dataset: Optional[str] = None):
        import h5py

        self.path = path
        try:
            f = h5py.File(path, "r")
        except OSError as exc:
            raise UserInputError(f"{path} is not a readable HDF5 file ({exc})") from None
        with f:
            names: list[str] = []
            f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
            self.dataset = _pick_dataset(path, dataset, names)
            ds = f[self.dataset]
            self._shape, self._dtype = tuple(ds.shape), ds.dtype
            self.chunks: Optional[tuple[int, ...]] = ds.chunks
        self._file = _Handle(functools.partial(h5py.File, path, "r"))

    @property
    def source(self) -> str:
        return f"{self.path}:{self.dataset}"

    def _stored(self) -> Any:
        return self._file.get()[self.dataset]


class TiffVolume(_PlaneReader):
    """A multi-page TIFF stack (Z, Y, X), one page per z: memory-mapped when uncompressed, else read
    page by page."""

    def __init__(self, path: Path):
        import tifffile

        self.path = path
        with _quiet("tifffile"):
            try:
                tif = tifffile.TiffFile(path)
            except tifffile.TiffFileError as exc:
                raise UserInputError(f"{path}: {exc}") from None
            with tif:
                _check_complete(tif, path)
                series = tif.series[0]
                shape = tuple(series.shape)
                self._dtype = np.dtype(series.dtype)
                pages = len(series.pages)
        if len(shape) == 2:
            shape = (1, *shape)
        if len(shape) != 3 or pages != shape[0]:
            raise UserInputError(
                f"{path}: expected a grayscale stack with one page per z; got shape {shape} in {pages} page(s)"
            )
        self._shape: tuple[int, int, int] = shape  # type: ignore[assignment]
        self._data = _Handle(functools.partial(_open_tiff, path, shape))

    def __getitem__(self, key: Key) -> np.ndarray:
        try:
            data = self._data.get()
        except DAMAGED_DATA as exc:
            raise _damaged(self.source, "the stack", exc) from exc
        if isinstance(data, np.ndarray):
            try:
                return np.array(data[key])
            except DAMAGED_DATA as exc:
                raise _damaged(self.source, _describe_window(_window(key, self._shape), key), exc) from exc

        def page(z: int, rest: tuple[slice, slice]) -> np.ndarray:
            try:
                return data.pages[z].asarray()[rest]
            except DAMAGED_DATA as exc:
                raise _damaged(self.source, f"page z={z}", exc) from exc

        return self._stack(key, page)


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
        raise VolumeReadError(
            f"{path}: truncated or damaged: page z={len(pages) - 1} is the last one readable, but it "
            f"points to another at byte {following} of a {size}-byte file"
        )


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
            raise UserInputError(f"{path}: {exc}") from None
        with tif:
            page = tif.pages[0]
            return tuple(page.shape), np.dtype(page.dtype)
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(path)
    except UnidentifiedImageError:
        raise UserInputError(f"{path} is not a readable image") from None
    with im:
        modes = {
            "L": np.uint8,
            "I;16": np.uint16,
            "I;16B": np.uint16,
            "I": np.int32,
            "F": np.float32,
            "1": np.bool_,
            "P": np.uint8,
        }
        if im.mode not in modes:
            raise UserInputError(f"{path}: expected a grayscale image; got mode {im.mode}")
        return (im.height, im.width), np.dtype(modes[im.mode])


def _read_slice(path: Path) -> np.ndarray:
    if path.suffix.lower() in TIFF_SUFFIXES:
        import tifffile

        return tifffile.imread(path)
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)


class SliceFolderVolume(_PlaneReader):
    """A folder of 2-d slices, one file per z in natural sort order; reads only the slices a
    window touches."""

    def __init__(self, folder: Path):
        self.path = folder
        files = sorted(
            (p for p in folder.iterdir() if p.suffix.lower() in SLICE_SUFFIXES and p.is_file()),
            key=lambda p: natural_key(p.name),
        )
        if not files:
            raise UserInputError(f"{folder} holds no {'/'.join(SLICE_SUFFIXES)} slices")
        headers = [_slice_header(p) for p in files]
        shapes = {h[0] for h in headers}
        if len(shapes) > 1:
            first = headers[0][0]
            odd = next(p for p, h in zip(files, headers) if h[0] != first)
            raise UserInputError(
                f"{folder}: slices differ in shape ({files[0].name} is {first}, {odd.name} is {_slice_header(odd)[0]})"
            )
        (plane,) = shapes
        if len(plane) != 2:
            raise UserInputError(f"{folder}: expected grayscale slices; {files[0].name} has shape {plane}")
        self.files = files
        self._shape = (len(files), *plane)
        self._dtype = headers[0][1]

    def __getitem__(self, key: Key) -> np.ndarray:
        def plane(z: int, rest: tuple[slice, slice]) -> np.ndarray:
            try:
                return _read_slice(self.files[z])[rest]
            except DAMAGED_DATA as exc:
                raise _damaged(str(self.files[z]), f"slice z={z} of {self.path}", exc) from exc

        return self._stack(key, plane)


class N5Volume(_ChunkedReader):
    """A dataset of an N5 container; only the blocks a window touches are read."""

    _what = "the dataset"

    def __init__(self, path: Path, dataset: Optional[str] = None):
        from .n5 import N5Array, dataset_attributes, list_datasets

        self.path = path
        if not path.is_dir():
            raise UserInputError(f"{path} is not an N5 container: N5 is a folder (attributes.json, one file per block)")
        if dataset_attributes(path) is not None:
            if dataset is not None:
                raise UserInputError(f"{path} is a single N5 dataset; it has no dataset {dataset!r}")
            self.dataset: Optional[str] = None
            folder = path
        else:
            self.dataset = _pick_dataset(path, dataset, list_datasets(path))
            folder = path / self.dataset
        array = N5Array(folder)
        self._shape, self._dtype, self.chunks = array.shape, array.dtype, array.chunks
        self._array = _Handle(functools.partial(N5Array, folder))

    @property
    def source(self) -> str:
        return f"{self.path}:{self.dataset}" if self.dataset else str(self.path)

    def _stored(self) -> Any:
        return self._array.get()


class ZarrVolume(_ChunkedReader):
    """A zarr array (or an array inside a zarr group, or a level of an OME-Zarr image); zarr reads
    only the touched chunks."""

    def __init__(self, path: Path, dataset: Optional[str] = None):
        import zarr

        self.path = path
        node = zarr.open(str(path), mode="r")
        image: Optional[dict[str, Any]] = None  # the OME-Zarr multiscale image the array is a level of
        if isinstance(node, zarr.Array):
            if dataset is not None:
                raise UserInputError(f"{path} is a single zarr array; it has no dataset {dataset!r}")
            self.dataset: Optional[str] = None
            array = node
            image = _parent_multiscale(path)
        else:
            self.dataset, image = _pick_zarr_array(path, node, dataset)
            array = node[self.dataset]
        self.multiscale = image
        self._lead = _hidden_axes(tuple(array.shape), image)
        self._shape, self._dtype = tuple(array.shape)[self._lead :], np.dtype(array.dtype)
        self.chunks: Optional[tuple[int, ...]] = tuple(array.chunks)
        self._array = _Handle(functools.partial(_open_zarr, path, self.dataset))

    @property
    def source(self) -> str:
        return f"{self.path}:{self.dataset}" if self.dataset else str(self.path)

    def _stored(self) -> Any:
        return self._array.get()


def _multiscale(attrs: Any) -> Optional[dict[str, Any]]:
    """The first multiscale image described by a zarr group's attributes (OME-Zarr 0.5 nests
    them under ``ome``), or ``None``."""
    meta = attrs.get("ome", attrs) if hasattr(attrs, "get") else {}
    images = meta.get("multiscales") if hasattr(meta, "get") else None
    if not isinstance(images, list) or not images or not isinstance(images[0], dict):
        return None
    datasets = images[0].get("datasets")
    if not isinstance(datasets, list) or not datasets or not all(isinstance(d, dict) and "path" in d for d in datasets):
        return None
    return images[0]


def _levels(image: dict[str, Any], prefix: str = "") -> list[str]:
    """The arrays of a multiscale image, full resolution first, as paths below the opened group."""
    return [f"{prefix}{str(d['path']).strip('/')}" for d in image["datasets"]]


def _pick_zarr_array(path: Path, group: Any, requested: Optional[str]) -> tuple[str, Optional[dict[str, Any]]]:
    """The array a spec names in a zarr group, and the multiscale image it is a level of: a named
    array, the level 0 of a named (or the opened) OME-Zarr image, or the one conventional name."""
    import zarr

    arrays = sorted(name for name, member in group.members(max_depth=None) if isinstance(member, zarr.Array))
    target = group
    if requested is not None:
        name = requested.strip("/")
        if name in arrays:
            parent = name.rpartition("/")[0]
            image = _multiscale((group[parent] if parent else group).attrs)
            return name, image if image is not None and name.rpartition("/")[2] in _levels(image) else None
        member = group.get(name) if name else None
        if not isinstance(member, zarr.Group) or _multiscale(member.attrs) is None:
            levels = _levels(_multiscale(group.attrs)) if _multiscale(group.attrs) else []
            hint = f" (multiscale levels: {', '.join(levels)})" if levels else ""
            raise UserInputError(f"{path} has no dataset {requested!r}{hint}; available: {', '.join(arrays) or 'none'}")
        target, prefix = member, f"{name}/"
    else:
        prefix = ""
    image = _multiscale(target.attrs)
    if image is None:
        return _pick_dataset(path, None, arrays), None
    level0 = _levels(image, prefix)[0]
    if level0 not in arrays:
        raise UserInputError(
            f"{path}: its OME-Zarr multiscales metadata names level 0 {level0!r}, which is not an "
            f"array there (available: {', '.join(arrays) or 'none'})"
        )
    return level0, image


def _parent_multiscale(path: Path) -> Optional[dict[str, Any]]:
    """The multiscale image whose level the array at ``path`` is (``image.ome.zarr/0``), if any."""
    import zarr

    parent = path.parent
    if not any((parent / marker).exists() for marker in ZARR_MARKERS):
        return None
    try:
        image = _multiscale(zarr.open_group(str(parent), mode="r").attrs)
    except (OSError, ValueError, KeyError):  # zarr's own errors are ValueErrors
        return None
    return image if image is not None and path.name in _levels(image) else None


def _hidden_axes(shape: tuple[int, ...], image: Optional[dict[str, Any]]) -> int:
    """How many leading axes of an OME-Zarr level to hide: those of size 1 that the metadata says
    are not spatial (time, channel), while more than three axes are left."""
    axes = image.get("axes") if image is not None else None
    if not isinstance(axes, list) or len(axes) != len(shape):
        return 0
    lead = 0
    for axis, size in zip(axes, shape):
        kind = axis.get("type") if isinstance(axis, dict) else None
        name = axis.get("name") if isinstance(axis, dict) else axis
        spatial = kind == "space" if kind is not None else name in ("z", "y", "x")
        if len(shape) - lead <= 3 or size != 1 or spatial:
            break
        lead += 1
    return lead


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


def _n5_root(path: Path) -> Optional[Path]:
    """The N5 container ``path`` is or lies in (a ``.n5`` folder, or one whose attributes.json
    names an N5 version), or ``None``."""
    for folder in (path, *path.parents):
        if folder.suffix.lower() in N5_SUFFIXES:
            return folder
        if (
            folder.is_dir()
            and not any((folder / m).exists() for m in ZARR_MARKERS)
            and (folder / "attributes.json").is_file()
        ):
            try:
                import json

                if "n5" in json.loads((folder / "attributes.json").read_text()):
                    return folder
            except (OSError, ValueError):
                continue
    return None


def _open_file(spec: Union[str, Path]) -> Union[HDF5Volume, TiffVolume, SliceFolderVolume, ZarrVolume, N5Volume]:
    path, dataset = split_spec(spec)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    suffix = path.suffix.lower()
    if _n5_root(path) is not None:
        return N5Volume(path, dataset)
    if suffix in ZARR_SUFFIXES or (path.is_dir() and any((path / m).exists() for m in ZARR_MARKERS)):
        return ZarrVolume(path, dataset)
    if path.is_dir():
        return SliceFolderVolume(path)
    if suffix in HDF5_SUFFIXES:
        return HDF5Volume(path, dataset)
    if suffix in TIFF_SUFFIXES:
        return TiffVolume(path)
    raise UserInputError(
        f"{path}: unsupported volume format {suffix or '(no suffix)'}; expected "
        f"{'/'.join(HDF5_SUFFIXES)} [:dataset], .tif/.tiff, .zarr, .n5 or a folder of PNG/TIFF slices"
    )


class ZRange:
    """Slices ``[z0, z1)`` of another volume, as a volume (no data copied): training on some
    slices of a file and validating on the others."""

    def __init__(self, volume: Volume, z0: int, z1: int):
        if not 0 <= z0 < z1 <= volume.shape[0]:
            raise UserInputError(f"slice range {z0}:{z1} is not inside the volume's {volume.shape[0]} slices")
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
            return np.asarray(self.volume[self.z0 : self.z0, ys, xs])[squeeze]
        step = zs.step
        start = self.z0 + zs.start
        stop = self.z0 + zs[-1] + (1 if step > 0 else -1)
        return np.asarray(self.volume[start : stop if stop >= 0 else None : step, ys, xs])[squeeze]

    def __repr__(self) -> str:
        return f"ZRange({self.volume!r}, {self.z0}, {self.z1})"
