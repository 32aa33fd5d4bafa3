"""Publishing a file all at once or not at all, the one writer every output of the project goes
through (benchmark results, checkpoints, logs, the demo's files).

The content goes to a temporary file in the target's own folder (a rename is atomic only within
one file system), is flushed to disk, gets the permissions a plain ``open(path, "w")`` would have
given it under the process's umask, and is renamed over the target; the folder is then flushed
too, so that after a crash the name points at the old file or the complete new one, never at a
truncated one. On any failure the temporary file is removed and the target left as it was.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Union


def _umask() -> int:
    # /proc gives the umask without changing it; os.umask can only read it by setting it, which
    # for a moment gives every other thread's new files no umask at all.
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: Union[str, Path], directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Union[str, Path], write: Callable[[str], object]) -> Path:
    """Call ``write(tmp)`` to produce the file under the temporary name ``tmp`` (a ``str``, as
    ``torch.save``, ``savefig`` and ``tifffile`` take), then publish it as ``path``; returns ``path``.

    Temporary names are ``.<name>.<random>.tmp`` beside ``path`` (``stt train`` recognises and
    removes those a killed process left).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        _fsync(path.parent, directory=True)
    except OSError:
        pass  # folders cannot be opened for fsync on every platform; the rename has happened
    return path


def atomic_write_text(path: Union[str, Path], text: Union[str, bytes]) -> Path:
    """:func:`atomic_write` of ``text`` (``str`` as UTF-8, or ``bytes``)."""
    data = text.encode() if isinstance(text, str) else text
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
