"""Ctrl-C and SIGTERM as exceptions.

SIGTERM raises :class:`Terminated`, a ``KeyboardInterrupt``, so whatever already cleans up
after Ctrl-C (``with`` blocks, ``finally``, ``except BaseException``) cleans up after a
``kill`` too. Training holds both signals back while a step is in flight
(:class:`HeldInterrupts`): a checkpoint written on the way out is then always a state that
resumes exactly. A second signal during the same step is not held.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator, Optional


class Terminated(KeyboardInterrupt):
    """SIGTERM was received (raised in the main thread)."""


def interrupt_for(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def describe(exc: KeyboardInterrupt) -> str:
    """``SIGTERM`` or ``Ctrl-C``: what the user sees in ``stt <cmd>: interrupted (...)``."""
    return "SIGTERM" if isinstance(exc, Terminated) else "Ctrl-C"


def exit_code(exc: KeyboardInterrupt) -> int:
    """128 + the signal number, as a shell reports a process its signal ended."""
    return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)


def _in_main_thread() -> bool:
    # signal.signal may only be called there; elsewhere the default behaviour stays.
    return threading.current_thread() is threading.main_thread()


def _install(handler: Any, signums: tuple[int, ...]) -> dict[int, Any]:
    previous = {}
    for signum in signums:
        current = signal.getsignal(signum)
        if current is signal.SIG_IGN:
            continue  # the user (nohup, a background job) asked for this signal to be ignored
        previous[signum] = current
        signal.signal(signum, handler)
    return previous


def _restore(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def raising_on_sigterm() -> Iterator[None]:
    """Inside the block SIGTERM raises :class:`Terminated` in the main thread."""
    if not _in_main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise interrupt_for(signum)

    previous = _install(handler, (signal.SIGTERM,))
    try:
        yield
    finally:
        _restore(previous)


class HeldInterrupts:
    """While installed (``with HeldInterrupts() as held:``), SIGINT and SIGTERM raise their
    exception at once, except inside ``with held.section():``, where the first one is kept
    and raised when the section ends; a second one inside the section is raised at once."""

    def __init__(self) -> None:
        self._inside = False
        self._pending: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> HeldInterrupts:
        if _in_main_thread():
            self._previous = _install(self._handle, (signal.SIGINT, signal.SIGTERM))
        return self

    def __exit__(self, *exc: Any) -> None:
        _restore(self._previous)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self._inside and self._pending is None:
            self._pending = signum
            return
        raise interrupt_for(signum)

    @contextlib.contextmanager
    def section(self) -> Iterator[None]:
        self._inside = True
        try:
            yield
        finally:
            self._inside = False
        pending, self._pending = self._pending, None
        if pending is not None:
            raise interrupt_for(pending)
