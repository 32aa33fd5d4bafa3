"""Chunked outputs written window by window, published atomically, never destroying anything.

An output is either a whole file (``out.h5``, ``out.zarr``: the array is dataset ``main``
inside) or one dataset of a file (``out.h5:probs``, ``out.zarr:probs``). ``create_output(spec,
shape, dtype, chunks)`` returns an :class:`OutputVolume` written with ``out[z0:z1, ...] =
block`` under a temporary name beside the final one; ``close()`` (or leaving the ``with`` block
normally) publishes it, while any exception inside the ``with`` block, Ctrl-C included (or
``abort()``), deletes the temporary, so a crashed run never leaves a half-written output that
looks finished, and the final name keeps what it held before.

- A dataset written into an existing HDF5 file is added (or, with ``overwrite``, replaced)
  copy-on-write: the file is copied to ``.<name>.tmp-<pid>`` beside it, the dataset written into
  the copy, the copy fsynced and renamed over the original. The user's file is never opened for
  writing, because an HDF5 file open ``r+`` is corrupted by kill -9; every other dataset comes
  through bit for bit. (A replaced dataset's old space stays in the file, as HDF5 never reclaims
  space; ``h5repack`` does.)
- A dataset written into an existing zarr store is written as a standalone array
  ``.<store>.tmp-<pid>`` beside the store and its folder renamed into place; a replaced array is
  first renamed to ``.<name>.old-<pid>`` beside itself and deleted once the new one is in.
- HDF5 temporaries are given their whole estimated size up front (``posix_fallocate``): a full
  disk is then reported before the first window instead of mid-write, where the HDF5 library
  cannot recover (it crashes the process at exit).

:func:`check_outputs` and :func:`check_space` refuse, before any work, outputs that would
destroy an input, each other or something that is not an output, and outputs with no room;
:func:`remove_leftovers` deletes the temporaries that killed runs left beside an output.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from ..errors import UserInputError
from .volumes import HDF5_SUFFIXES, split_spec

DEFAULT_OUTPUT_DATASET = "main"
# errnos of a disk that cannot take the output: reported as one line, never as a traceback
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG})
_COPY_BUFFER = 16 * 2**20


class OutputError(UserInputError):
    """An output refused before any work: it would destroy something, or it cannot be written."""


def default_chunks(shape: Sequence[int]) -> tuple[int, ...]:
    """16 x 128 x 128 voxel chunks (one per channel), clipped to the shape: thin in z because
    inference writes slabs of slices."""
    target = [16, 128, 128]
    lead = [1] * (len(shape) - 3)  # channel axes: one chunk per channel
    return tuple(max(1, min(int(n), c)) for n, c in zip(shape, lead + target[-min(3, len(shape)) :]))


def reserved_bytes(nbytes: int) -> int:
    """Disk space set aside for an array of ``nbytes`` uncompressed bytes: gzip makes
    incompressible data slightly larger, and chunk indices and metadata need room too."""
    return int(nbytes) + int(nbytes) // 64 + 2**20


@dataclass(frozen=True)
class OutputTarget:
    """Where an output goes: ``dataset`` inside the file at ``path``, or (``dataset`` None)
    the whole file, holding one dataset ``main``."""

    path: Path
    dataset: Optional[str]
    format: str  # "hdf5" or "zarr"

    @property
    def name(self) -> str:
        return self.dataset or DEFAULT_OUTPUT_DATASET

    @property
    def temporary(self) -> Path:
        """This process's temporary file (or zarr folder) for the output, beside the file."""
        return self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")

    def __str__(self) -> str:
        return f"{self.path}:{self.dataset}" if self.dataset else str(self.path)


def output_target(spec: Union[str, Path]) -> OutputTarget:
    """Parse ``out.h5[:dataset]`` / ``out.zarr[:path]`` (symbolic links resolved, so the file
    they point at is what gets written)."""
    path, dataset = split_spec(spec)
    suffix = path.suffix.lower()
    if suffix in HDF5_SUFFIXES:
        fmt = "hdf5"
    elif suffix == ".zarr":
        fmt = "zarr"
    else:
        raise OutputError(
            f"{path}: outputs are written as HDF5 ({'/'.join(HDF5_SUFFIXES)}) or zarr (.zarr); "
            f"got {suffix or 'no suffix'}"
        )
    if dataset is not None:
        dataset = dataset.strip("/")
        if any(part in ("", ".", "..") for part in dataset.split("/")):
            raise OutputError(f"{spec}: {dataset!r} is not a dataset name")
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    return OutputTarget(path, dataset, fmt)


def is_zarr_store(path: Path) -> bool:
    return path.is_dir() and any((path / m).exists() for m in ("zarr.json", ".zgroup", ".zarray"))


def _node_kind(target: OutputTarget) -> Optional[str]:
    """What the existing file holds at the target's dataset: None (nothing), "dataset",
    "group", or "blocked" (a dataset or array sits where a group on the way should be)."""
    assert target.dataset is not None
    if target.format == "hdf5":
        import h5py

        with h5py.File(target.path, "r") as f:
            node: Any = f
            for part in target.dataset.split("/"):
                if not isinstance(node, h5py.Group):
                    return "blocked"
                if part not in node:
                    return None
                node = node.get(part)
                if node is None:  # a dangling link: something is there, and it is not ours
                    return "blocked"
            return "dataset" if isinstance(node, h5py.Dataset) else "group"
    import zarr

    node = zarr.open(str(target.path), mode="r")
    for part in target.dataset.split("/"):
        if not isinstance(node, zarr.Group):
            return "blocked"
        if part not in node:
            return None
        node = node[part]
    return "dataset" if isinstance(node, zarr.Array) else "group"


def check_target(target: OutputTarget, overwrite: bool = False) -> None:
    """Refuse (:class:`OutputError`) a target whose writing would destroy what it was not told
    to replace: a folder, a file of another kind, a group, or (without ``overwrite``) an
    existing output."""
    path = target.path
    hint = "--overwrite replaces it"
    if target.format == "hdf5":
        if path.is_dir():
            raise OutputError(f"{path} is a folder, not an HDF5 file; it is left alone (choose another output name)")
        if not path.exists():
            return
        if target.dataset is None:
            if not overwrite:
                raise OutputError(
                    f"{path} already exists; {hint} (the whole file), or name a dataset to add to it ({path}:<dataset>)"
                )
            return
        import h5py

        if not h5py.is_hdf5(path):
            raise OutputError(f"{path} exists and is not an HDF5 file; a dataset cannot be added to it")
    else:
        if path.exists() and not path.is_dir():
            raise OutputError(f"{path} exists and is a file, not a zarr store; it is left alone")
        if not path.exists():
            return
        if not is_zarr_store(path):
            raise OutputError(
                f"{path} is a folder that is not a zarr store; it is left alone (choose another output name)"
            )
        if target.dataset is None:
            if not overwrite:
                raise OutputError(
                    f"{path} already exists; {hint} (the whole store), or name an array to add to it ({path}:<name>)"
                )
            return
    kind = _node_kind(target)
    if kind == "group":
        raise OutputError(f"{target} is a group in {path}, not a dataset; it is left alone")
    if kind == "blocked":
        raise OutputError(f"{target}: part of the path {target.dataset!r} is a dataset in {path}, not a group")
    if kind == "dataset" and not overwrite:
        raise OutputError(f"{path} already holds dataset {target.dataset!r}; {hint}")
    if not os.access(path, os.W_OK):
        raise OutputError(
            f"{path} is read-only (or on a read-only file system); its dataset {target.dataset!r} cannot be written"
        )


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return os.path.realpath(a) == os.path.realpath(b)


def _input_location(volume: Any) -> tuple[Optional[Path], Optional[str]]:
    if isinstance(volume, (str, Path)):
        return split_spec(volume)
    path = getattr(volume, "path", None)
    return (Path(path) if path is not None else None), getattr(volume, "dataset", None)


def check_outputs(
    outputs: Mapping[str, Union[str, Path]],
    inputs: Optional[Mapping[str, Any]] = None,
    overwrite: bool = False,
    strict: bool = True,
) -> dict[str, OutputTarget]:
    """Refuse, before any work, outputs that would destroy an input or each other, or
    something they were not told to replace; returns the parsed targets, in order.

    ``outputs``/``inputs`` map argument names (``--out``) to specs; an input may also be an
    opened volume (its ``path`` and resolved ``dataset`` are compared). Outputs written one
    after another into one file must name different datasets. ``strict`` also refuses to
    replace an existing file that is not HDF5 (a whole-file output would otherwise swallow it).
    """
    targets = {}
    for label, spec in outputs.items():
        try:
            targets[label] = output_target(spec)
        except OutputError as exc:
            raise OutputError(f"{label} {exc}") from None
    for label, target in targets.items():
        for in_label, volume in (inputs or {}).items():
            in_path, in_dataset = _input_location(volume)
            if in_path is None or not _same_file(target.path, in_path):
                continue
            if target.dataset is None or in_dataset is None:
                raise OutputError(
                    f"{label} {target} would replace the file {in_label} reads ({in_path}); "
                    f"name a new dataset ({target.path}:<name>) or another file"
                )
            if target.dataset == in_dataset.strip("/"):
                raise OutputError(f"{label} {target} is the input dataset itself ({in_label}); choose another name")
    labels = list(targets)
    for i, first in enumerate(labels):
        for second in labels[i + 1 :]:
            a, b = targets[first], targets[second]
            if _same_file(a.path, b.path) and (a.dataset is None or b.dataset is None or a.dataset == b.dataset):
                raise OutputError(
                    f"{first} {a} and {second} {b} would overwrite each other; give them different "
                    f"files or different datasets ({a.path}:probs, {b.path}:instances)"
                )
    for label, target in targets.items():
        try:
            if strict and target.format == "hdf5" and target.path.is_file():
                import h5py

                if not h5py.is_hdf5(target.path):
                    raise OutputError(
                        f"{target.path} exists and is not an HDF5 file; it is left alone "
                        f"(move it away or choose another output name)"
                    )
            check_target(target, overwrite)
            _check_writable(target)
        except OutputError as exc:
            raise OutputError(f"{label} {exc}") from None
    return targets


def _check_writable(target: OutputTarget) -> None:
    """The folder of the temporary (and a zarr store that gets a new array) takes new files."""
    folders = [target.path.parent]
    if target.format == "zarr" and target.dataset is not None and target.path.is_dir():
        folders.append(target.path)
    for folder in folders:
        if not folder.is_dir():
            raise OutputError(f"no such folder for the output: {folder}")
        probe = folder / f".stt-probe-{os.getpid()}"
        try:
            probe.mkdir()
            probe.rmdir()
        except OSError as exc:
            raise OutputError(f"cannot write in {folder}: {exc.strerror or exc}") from None
    if target.dataset is not None and target.path.is_file() and not os.access(target.path, os.R_OK):
        raise OutputError(f"{target.path} cannot be read, so a dataset cannot be added to it")


def _existing_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return 0


def check_space(plans: Sequence[tuple[str, OutputTarget, int]]) -> None:
    """Refuse outputs the disk has no room for. ``plans``: (argument name, target, uncompressed
    bytes of the array), in the order they are written; counts each array's reservation and
    each copy-on-write copy of an existing HDF5 file (with what earlier outputs added to it),
    per file system (an upper bound: compression only shrinks the arrays)."""
    projected: dict[str, int] = {}  # file -> its size once the earlier outputs are in
    need: dict[int, tuple[int, Path, list[str]]] = {}
    for label, target, nbytes in plans:
        key = os.path.realpath(target.path)
        new = reserved_bytes(nbytes)
        copy = 0
        if target.dataset is not None and target.format == "hdf5":
            copy = projected.get(key, _existing_size(target.path))
        projected[key] = copy + new
        folder = target.path.parent
        device = os.stat(folder).st_dev
        total, _, labels = need.get(device, (0, folder, []))
        need[device] = (total + new + copy, folder, labels + [label])
    for total, folder, labels in need.values():
        free = shutil.disk_usage(folder).free
        if total > free:
            raise OutputError(
                f"{' and '.join(labels)} need about {_mb(total)} (an upper bound) but only "
                f"{_mb(free)} are free in {folder}"
            )


def _mb(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.1f} MiB"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    try:  # a killed child its parent has not reaped yet is dead too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _dead_leftovers(folder: Path, name: str, kinds: str) -> list[tuple[Path, str]]:
    """``.<name>.<kind>-<pid>`` entries in ``folder`` whose process is gone."""
    pattern = re.compile(rf"^\.{re.escape(name)}\.({kinds})-(\d+)$")
    found = []
    if folder.is_dir():
        for entry in sorted(folder.iterdir()):
            match = pattern.match(entry.name)
            if match and not _pid_alive(int(match.group(2))):
                found.append((entry, match.group(1)))
    return found


def remove_leftovers(target: OutputTarget) -> list[str]:
    """Delete what killed runs left for this output: their temporaries beside the file and the
    backups of replaced zarr arrays (put back when the new array never arrived). Entries of live
    processes are never touched. Returns one description per entry, for the user."""
    done = []
    for entry, _ in _dead_leftovers(target.path.parent, target.path.name, "tmp"):
        _remove(entry)
        done.append(f"removed {entry}")
    backups = [(target.path, entry) for entry, _ in _dead_leftovers(target.path.parent, target.path.name, "old")]
    if target.format == "zarr" and target.dataset is not None:
        final = target.path / target.dataset
        backups += [(final, entry) for entry, _ in _dead_leftovers(final.parent, final.name, "old")]
    for final, entry in backups:
        if final.exists():
            _remove(entry)
            done.append(f"removed {entry}")
        else:
            os.rename(entry, final)
            done.append(f"restored {final} from {entry.name}")
    return done


def _reserve(fd: int, size: int) -> None:
    """Allocate ``size`` bytes of the file now, so its later writes cannot find the disk full."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return  # a file system without allocation: the free-space check has to do
        raise


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class OutputVolume:
    """A writable chunked array under a temporary name until :meth:`close`."""

    def __init__(
        self,
        target: OutputTarget,
        shape: Sequence[int],
        dtype: Any,
        chunks: Optional[Sequence[int]] = None,
        overwrite: bool = True,
        reserve: Optional[int] = None,
    ):
        self.target, self.path, self.dataset, self.format = target, target.path, target.name, target.format
        self.tmp_path = target.temporary
        shape = tuple(int(n) for n in shape)
        if not shape or min(shape) < 1:
            raise ValueError(f"an output needs a positive size along every axis; got shape {shape}")
        chunk_shape = tuple(int(c) for c in chunks) if chunks is not None else default_chunks(shape)
        if len(chunk_shape) != len(shape):
            raise ValueError(f"chunks {chunk_shape} must have one entry per axis of shape {shape}")
        chunk_shape = tuple(max(1, min(c, n)) for c, n in zip(chunk_shape, shape))
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        self._file: Any = None
        self._source: Optional[tuple[int, int, int]] = None  # (inode, size, mtime) of the copied file
        self._replaces = overwrite
        self.closed = False
        _remove(self.tmp_path)  # only a process with our pid, long dead, can have left it
        try:
            if self.format == "hdf5":
                self._open_hdf5(shape, dtype, chunk_shape, reserved_bytes(nbytes) if reserve is None else reserve)
            else:
                self._open_zarr(shape, dtype, chunk_shape)
        except BaseException:
            self._drop()
            raise

    def _open_hdf5(self, shape: tuple[int, ...], dtype: Any, chunks: tuple[int, ...], reserve: int) -> None:
        import h5py

        copy = self.target.dataset is not None and self.path.exists()
        if copy:
            stat = self.path.stat()
            self._source = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
            with open(self.path, "rb") as src, open(self.tmp_path, "xb") as dst:
                _reserve(dst.fileno(), stat.st_size + reserve)
                shutil.copyfileobj(src, dst, _COPY_BUFFER)  # writes into the reservation, never truncates it
            shutil.copymode(self.path, self.tmp_path)
            if os.geteuid() == 0 and (stat.st_uid, stat.st_gid) != (0, 0):
                os.chown(self.tmp_path, stat.st_uid, stat.st_gid)
        else:
            h5py.File(self.tmp_path, "w").close()
            # Reserved after creation and reopened below: HDF5 then sees the file longer than its
            # data and trims the unused reservation when it closes.
            with open(self.tmp_path, "r+b") as handle:
                _reserve(handle.fileno(), reserve)
        self._file = h5py.File(self.tmp_path, "r+")
        if copy and self.dataset in self._file:
            if not self._replaces:
                raise OutputError(f"{self.path} already holds dataset {self.dataset!r}")
            del self._file[self.dataset]
        self._array: Any = self._file.create_dataset(
            self.dataset, shape=shape, dtype=dtype, chunks=chunks, compression="gzip", compression_opts=1
        )

    def _open_zarr(self, shape: tuple[int, ...], dtype: Any, chunks: tuple[int, ...]) -> None:
        import zarr

        self._into_store = self.target.dataset is not None and self.path.exists()
        if self._into_store:
            root = zarr.open_group(str(self.path), mode="r")
            self._array = zarr.create_array(
                store=str(self.tmp_path),
                shape=shape,
                dtype=dtype,
                chunks=chunks,
                fill_value=0,
                zarr_format=root.metadata.zarr_format,
            )
        else:
            group = zarr.open_group(str(self.tmp_path), mode="w")
            self._array = group.create_array(self.dataset, shape=shape, dtype=dtype, chunks=chunks, fill_value=0)

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
        """Publish the output under its final name (adding or replacing only its own dataset)
        and return the file's path."""
        if self.closed:
            return self.path
        try:
            if self.format == "hdf5":
                self._file.close()
                self._file = None
                _fsync(self.tmp_path)
                if self._source is not None:
                    self._check_source_unchanged()
                os.replace(self.tmp_path, self.path)
            elif self._into_store:
                self._publish_into_store()
            else:
                self._swap(self.tmp_path, self.path)
            _fsync(self.path.parent)
        except BaseException:
            self._drop()
            raise
        self.closed = True
        return self.path

    def _check_source_unchanged(self) -> None:
        try:
            stat = self.path.stat()
            now: Optional[tuple[int, int, int]] = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        except FileNotFoundError:
            now = None
        if now != self._source:
            raise OutputError(
                f"{self.path} was changed by someone else while {self.dataset!r} was written; "
                f"it is left as they made it and this output is dropped"
            )

    def _swap(self, new: Path, final: Path) -> None:
        """Rename the folder ``new`` to ``final``; an existing ``final`` goes aside first and is
        deleted once the new one is in (a kill in between leaves it for :func:`remove_leftovers`)."""
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if final.exists():
            os.rename(final, old)
        try:
            os.rename(new, final)
        except BaseException:
            if old.exists() and not final.exists():
                os.rename(old, final)
            raise
        _remove(old)

    def _publish_into_store(self) -> None:
        import zarr

        final = self.path / self.dataset
        root = zarr.open_group(str(self.path), mode="r+")
        if "/" in self.dataset:
            root.require_group(self.dataset.rsplit("/", 1)[0])
        self._swap(self.tmp_path, final)
        if root.metadata.consolidated_metadata is not None:
            zarr.consolidate_metadata(str(self.path))  # readers of the consolidated listing see the new array

    def abort(self) -> None:
        """Drop the partial output; the final name is left as it was."""
        if not self.closed:
            self._drop()
            self.closed = True

    def _drop(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except Exception:  # the temporary is deleted next; a failing close must not hide why we stopped
                pass
            self._file = None
        _remove(self.tmp_path)

    def __enter__(self) -> OutputVolume:
        return self

    def __exit__(
        self, kind: Optional[type], error: Optional[BaseException], traceback: Optional[TracebackType]
    ) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

    def __repr__(self) -> str:
        return f"OutputVolume('{self.target}', shape={self.shape}, dtype={self.dtype})"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def create_output(
    spec: Union[str, Path],
    shape: Sequence[int],
    dtype: Any = np.uint8,
    chunks: Optional[Sequence[int]] = None,
    overwrite: bool = True,
    reserve: Optional[int] = None,
) -> OutputVolume:
    """A new chunked output ``(..., Z, Y, X)`` at ``spec``: ``out.h5`` / ``out.zarr`` (the whole
    file, dataset ``main``) or ``out.h5:dataset`` / ``out.zarr:path`` (that dataset only, added
    to the file if it exists), written under a temporary name until closed. ``overwrite=False``
    refuses an existing output (:class:`OutputError`); folders, groups and non-HDF5 files holding
    a dataset are refused always. ``reserve``: bytes of disk set aside for an HDF5 output
    (default: the uncompressed size and some)."""
    target = output_target(spec)
    if not target.path.parent.is_dir():
        raise FileNotFoundError(f"no such folder for the output: {target.path.parent}")
    check_target(target, overwrite)
    return OutputVolume(target, shape, dtype, chunks, overwrite, reserve)
