"""Peak memory of one step.

GPU: the caching allocator's peak (``torch.cuda.max_memory_allocated`` after a reset) minus
what was allocated before the inputs were made: inputs, outputs, gradients and temporaries.

CPU: a process's RSS cannot be reset, so every case runs once in a fresh subprocess
(``python -m stt_kernels.bench.worker``); its RSS once the interpreter, torch and the
implementation are loaded and the implementation ran once on a tiny input (lazy imports,
thread pools) is the baseline, reported on its own; the high-water mark's rise above it (the
mark reset through ``/proc/self/clear_refs``) is the case's peak. The subprocess also guards the run: a case over the memory cap (``RLIMIT_DATA``
set after the imports) or killed by the kernel's OOM killer is recorded as OOM there, and is
never run in the measuring process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch


def gpu_peak(step: Callable[[], None], device: torch.device, baseline: int) -> int:
    """Bytes the allocator held at its peak during ``step`` above ``baseline``."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - baseline


@dataclass(frozen=True)
class CpuProbe:
    """What the worker subprocess saw: ``status`` as in ``workload.STATUSES``."""

    status: str
    reason: str = ""
    peak_bytes: Optional[int] = None
    baseline_bytes: Optional[int] = None


def available_bytes() -> Optional[int]:
    """``MemAvailable`` from ``/proc/meminfo``, or ``None`` off Linux."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def default_cpu_cap() -> Optional[int]:
    """Three quarters of the memory available now: a case above it is OOM, and the machine
    (shared with others) keeps the rest."""
    free = available_bytes()
    return None if free is None else int(free * 0.75)


def _child_env(threads: Optional[int]) -> dict[str, str]:
    # The worker must import this very stt_kernels, also from a source tree not installed.
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def probe_cpu(spec: dict[str, Any], cap_bytes: Optional[int], timeout_s: float,
              threads: Optional[int] = None) -> CpuProbe:
    """Run the case described by ``spec`` (see ``worker.py``) once in a fresh interpreter."""
    payload = json.dumps({**spec, "cap_bytes": cap_bytes})
    try:
        done = subprocess.run([sys.executable, "-m", "stt_kernels.bench.worker", payload],
                              capture_output=True, text=True, timeout=timeout_s, env=_child_env(threads))
    except subprocess.TimeoutExpired:
        return CpuProbe("error", f"memory probe took more than {timeout_s:.0f} s")
    if done.returncode == -signal.SIGKILL:
        return CpuProbe("OOM", "memory probe killed by SIGKILL (the kernel's OOM killer)")
    lines = done.stdout.strip().splitlines()
    try:
        report = json.loads(lines[-1])
    except (IndexError, ValueError):
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
        status = "OOM" if "MemoryError" in done.stderr or "allocate memory" in done.stderr else "error"
        return CpuProbe(status, f"memory probe exited with {done.returncode}: {tail}")
    return CpuProbe(report["status"], report.get("reason", ""), report.get("peak_bytes"),
                    report.get("baseline_bytes"))
