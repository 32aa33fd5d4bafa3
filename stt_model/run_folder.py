"""A training run folder: ``last.pt`` and ``train_log.csv`` of exactly one run.

:class:`RunFolder` claims the folder before any work: it takes ``.lock`` (an ``flock`` the
kernel releases when the process dies, so a killed run never blocks the next), refuses a
folder that already holds a run unless told to continue it (``resume``) or to replace it
(``overwrite``), and removes the temporary files killed runs left behind.

Replacing is atomic at the first new checkpoint: until then the old ``last.pt`` and
``train_log.csv`` stay as they were and the new run logs into a temporary file beside them;
the first checkpoint is renamed over ``last.pt`` and the new log over ``train_log.csv``. A new
run that fails or is interrupted before its first checkpoint leaves the old run untouched.
"""

from __future__ import annotations

import csv
import fcntl
import os
from pathlib import Path
from typing import Any, Optional, Union

from stt_kernels.atomic_file import atomic_write

from .checkpoint import atomic_save

CHECKPOINT = "last.pt"
LOG = "train_log.csv"
LOCK = ".lock"
# What atomic_write names its temporary files ('.<name>.<random>.tmp'), and the replacing
# run's log before its first checkpoint.
_TEMPORARY = (f".{CHECKPOINT}.*.tmp", f".{LOG}.*.tmp")
_PENDING_LOG = f".{LOG}.replacing.tmp"


class RunFolderError(Exception):
    """The run folder cannot be used as asked; the message says why and what to pass."""


class RunLog:
    """``train_log.csv``: appends one row per call; new columns rewrite the file (atomically)
    with the longer header."""

    def __init__(self, path: Path):
        self.path = path
        self.columns: list[str] = []
        if path.exists():
            with path.open(newline="") as handle:
                self.columns = next(csv.reader(handle), [])

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as handle:
                writer = csv.DictWriter(handle, self.columns)
                writer.writeheader()
                writer.writerows(rows)

        atomic_write(self.path, write)

    def _rows(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open(newline="") as handle:
            return list(csv.DictReader(handle))

    def write(self, **row: Any) -> None:
        new = [k for k in row if k not in self.columns]
        if new:
            rows = self._rows()
            self.columns += new
            self._rewrite(rows)
        with self.path.open("a", newline="") as handle:
            csv.DictWriter(handle, self.columns).writerow(row)

    def keep_through(self, step: int) -> int:
        """Drop the rows of steps after ``step`` (re-run after a resume from it) and rows a
        kill cut short; returns how many were dropped."""
        if not self.path.exists():
            return 0
        rows = self._rows()
        kept = [row for row in rows if _complete(row, self.columns) and int(row["step"]) <= step]
        self._rewrite(kept)
        return len(rows) - len(kept)


def _complete(row: dict[str, Any], columns: list[str]) -> bool:
    # DictReader fills the fields a short row lacks with None and files surplus ones under None.
    if None in row or any(row.get(c) is None for c in columns):
        return False
    try:
        int(row["step"])
    except (KeyError, TypeError, ValueError):
        return False
    return True


class RunFolder:
    """Claims ``path`` for one training run; :meth:`release` (or leaving the ``with`` block)
    gives it back.

    ``resume``: the checkpoint the run continues from. The folder may hold a run only if it is
    the one being continued (``resume`` lies in it) or ``overwrite`` is set.
    """

    def __init__(self, path: Union[str, Path], resume: Optional[Union[str, Path]] = None, overwrite: bool = False):
        self.path = Path(path)
        self.removed: list[Path] = []  # temporary files of killed runs, removed
        self._fd: Optional[int] = None
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"--out {self.path} is a file; a run folder is a directory")
        self._created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            self._lock()
            self._check(resume, overwrite)
            self._remove_leftovers()
        except BaseException:
            self.release()
            raise
        self.replacing = overwrite and self.holds_run()
        self.log = RunLog(self.path / (_PENDING_LOG if self.replacing else LOG))

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    def holds_run(self) -> bool:
        return (self.path / CHECKPOINT).exists() or (self.path / LOG).exists()

    def _lock(self) -> None:
        lock = self.path / LOCK
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunFolderError(
                    f"{self.path} is in use by another training run (PID {holder}, "
                    f"lock {lock}); wait for it to end or choose another --out"
                ) from None
            # A holder unlinks the lock file as it releases it: a lock taken on that old file
            # guards nothing, so take the one now at the path instead.
            try:
                current = os.stat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        self._fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    def _check(self, resume: Optional[Union[str, Path]], overwrite: bool) -> None:
        if overwrite or not self.holds_run():
            return
        found = ", ".join(n for n in (CHECKPOINT, LOG) if (self.path / n).exists())
        if resume is None:
            resumable = (self.path / CHECKPOINT).exists()
            how = (
                f"continue it with --resume {self.path / CHECKPOINT}, "
                if resumable
                else "it has no checkpoint to continue from; "
            )
            raise RunFolderError(
                f"{self.path} already holds a run ({found}); {how}replace it with --overwrite, or choose another --out"
            )
        if Path(resume).resolve().parent != self.path.resolve():
            raise RunFolderError(
                f"{self.path} already holds another run ({found}) than the one "
                f"--resume {resume} continues; resume into the checkpoint's own folder, "
                "replace the run with --overwrite, or choose another --out"
            )

    def _remove_leftovers(self) -> None:
        for pattern in _TEMPORARY:
            for leftover in sorted(self.path.glob(pattern)):
                leftover.unlink(missing_ok=True)
                self.removed.append(leftover)

    def save(self, state: dict[str, Any]) -> Path:
        """Write ``state`` to ``last.pt`` atomically; the first save of a replacing run also
        puts its log in place of the old one."""
        path = atomic_save(state, self.checkpoint)
        if self.replacing:
            if self.log.path.exists():
                os.replace(self.log.path, self.path / LOG)
            else:
                (self.path / LOG).unlink(missing_ok=True)
            self.log.path = self.path / LOG
            self.replacing = False
        return path

    def release(self) -> None:
        """Give the folder back: a replacing run that never saved drops its log (the old run
        stays); a folder made here that is still empty is removed."""
        if getattr(self, "replacing", False):
            self.log.path.unlink(missing_ok=True)
            self.replacing = False
        if self._fd is not None:
            # Unlink before unlocking, so a waiter that opened this file sees it is stale.
            (self.path / LOCK).unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None
        if self._created:
            try:
                self.path.rmdir()
            except OSError:
                pass  # not empty: it holds the run
            self._created = False

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
