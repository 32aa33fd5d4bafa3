"""Subprocess entry point: run one CPU case once and print its memory as one JSON line.

    python -m stt_kernels.bench.worker '{"op": ..., "implementation": ..., "level": {...},
                                         "dtype": "float32", "pass": "forward", "seed": 0,
                                         "cap_bytes": null}'

Prints ``{"status", "reason", "peak_bytes", "baseline_bytes"}``. Used by ``memory.probe_cpu``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import resource
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from .cases import CASES
from .registry import find
from .shapes import Level
from .workload import classify, prepare


def _status(field: str) -> Optional[int]:
    """A ``/proc/self/status`` size in bytes (``VmRSS``, ``VmHWM``, ``VmData``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc), so the case's allocations show in the RSS
    instead of landing in pages the warm-up left resident."""
    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _start_peak() -> int:
    """Reset the RSS high-water mark (the imports' transient peak is not the case's) and
    return the RSS now. Where that is impossible, the max RSS so far is the baseline."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status("VmRSS") or 0
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _peak() -> int:
    return _status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cap(extra: int) -> None:
    """Let the process map at most ``extra`` more bytes of data than it has now."""
    now = _status("VmData")
    if now is not None:
        resource.setrlimit(resource.RLIMIT_DATA, (now + extra, resource.getrlimit(resource.RLIMIT_DATA)[1]))


def run(spec: dict[str, Any]) -> dict[str, Any]:
    case = CASES[spec["op"]]
    implementation = find(spec["op"], spec["implementation"])
    device, dtype, level = torch.device("cpu"), getattr(torch, spec["dtype"]), Level(**spec["level"])
    try:
        # What the implementation loads on first use (modules, thread pools, dispatch
        # tables) belongs to the baseline, not to the case: run it once on a tiny input.
        prepare(case, implementation, case.small(level), dtype, device, spec["pass"])
    except Exception:
        pass  # the real call below reports what is wrong
    _release_free_memory()
    baseline = _start_peak()
    if spec.get("cap_bytes") is not None:
        _cap(int(spec["cap_bytes"]))
    try:
        prepare(case, implementation, level, dtype, device, spec["pass"], spec.get("seed", 0))
    except Exception as exc:
        status, reason = classify(exc)
        if status == "OOM" and spec.get("cap_bytes") is not None:
            reason = f"over the memory cap of {int(spec['cap_bytes']) / 2 ** 20:.0f} MiB: {reason}"
        return {"status": status, "reason": reason}
    return {"status": "ok", "peak_bytes": _peak() - baseline, "baseline_bytes": baseline}


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))), flush=True)
