"""A dependency-free progress line for long loops: done/total, rate, ETA and live values."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


class Progress:
    def __init__(
        self, total: int, label: str, start: int = 0, stream: Optional[TextIO] = None, min_interval: float = 0.5
    ):
        self.total, self.label, self.done = total, label, start
        self._start_done, self._started = start, time.monotonic()
        self._stream = stream if stream is not None else sys.stderr
        self._tty = getattr(self._stream, "isatty", lambda: False)()
        self._last = 0.0
        self._min_interval = min_interval if self._tty else 10.0

    def update(self, done: int, **values: float) -> None:
        self.done = done
        now = time.monotonic()
        if now - self._last < self._min_interval and done < self.total:
            return
        self._last = now
        elapsed = now - self._started
        rate = (done - self._start_done) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        shown = " ".join(f"{k}={v:.4g}" for k, v in values.items())
        line = f"{self.label} {done}/{self.total} [{rate:.2f}/s, ETA {_clock(eta)}] {shown}"
        self._stream.write(("\r" + line + "\x1b[K") if self._tty else line + "\n")
        self._stream.flush()

    def close(self) -> None:
        if self._tty:
            self._stream.write("\n")
            self._stream.flush()


def _clock(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"
