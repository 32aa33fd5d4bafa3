"""How each figure is taken. Time: ``triton.testing.do_bench`` on a GPU (CUDA events, L2 flushed
between repeats; ``torch.utils.benchmark.Timer`` where Triton is missing), ``Timer.blocked_autorange``
on the CPU, rounds added until there are ``repeats`` samples. Peak memory: on a GPU the allocator's
peak above what was allocated before the inputs; on the CPU, where an RSS peak cannot be reset, a
fresh interpreter per row (``python -m stt_kernels.bench.measure SPEC``), its high-water mark above
its RSS once the implementation ran on a tiny input. That process is also the OOM guard: a row over
the cap (``RLIMIT_DATA``) or killed by the OOM killer is an OOM row there, never in the run's process.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import importlib
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

try:
    from triton.testing import do_bench
except ImportError:  # a GPU build of torch without Triton
    do_bench = None


@dataclass(frozen=True)
class Timing:
    """Seconds per call: the median and quartiles of ``repeats`` samples, and the timer."""

    median: float
    q1: float
    q3: float
    repeats: int
    timer: str


def summarise(samples: list[float], timer: str = "") -> Timing:
    ordered = sorted(samples)
    q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else ordered * 3
    return Timing(statistics.median(ordered), q1, q3, len(ordered), timer)


def time_step(
    step: Callable[[], object], device: torch.device, warmup: int, repeats: int, min_run_time: float
) -> Timing:
    """``warmup`` untimed calls, then rounds of at least ``min_run_time`` seconds until there are
    ``repeats`` samples (each the mean of one block of calls)."""
    for _ in range(warmup):
        step()
    samples: list[float] = []
    if device.type == "cuda" and do_bench is not None:
        while len(samples) < repeats:
            samples += [ms / 1e3 for ms in do_bench(step, warmup=1, rep=min_run_time * 1e3, return_mode="all")]
        return summarise(samples, "triton.testing.do_bench (L2 flushed)")
    # Imported here: torch.utils.benchmark imports cpp_extension, which warns on CUDA builds of
    # torch without a GPU, and every `stt` command builds the bench parser.
    from torch.utils import benchmark

    timer = benchmark.Timer("step()", globals={"step": step}, num_threads=torch.get_num_threads())
    first = timer.blocked_autorange(min_run_time=min_run_time)
    samples = list(first.times)
    while len(samples) < repeats:
        samples += timer.timeit(first.number_per_run).times
    return summarise(samples, "torch.utils.benchmark.Timer" + (".blocked_autorange" if device.type == "cpu" else ""))


# (matmul size, copy bytes) per device type, quick and otherwise: on the plateau, yet quick on two cores.
CEILING_SIZES = {"cpu": ((1024, 64 << 20), (2048, 256 << 20)), "cuda": ((4096, 256 << 20), (8192, 1 << 30))}


def ceilings(device: torch.device, dtypes: list[torch.dtype], tier: str) -> dict[str, Any]:
    """The yardsticks of GFLOP/s and GB/s, measured in the run: a square matmul per dtype (TF32
    only if the user enabled it) and a large copy (read plus write counted)."""
    n, copy_bytes = CEILING_SIZES[device.type][tier != "quick"]
    matmul = {}
    for dtype in dtypes:
        a = torch.randn(n, n, device=device).to(dtype)
        seconds = time_step(functools.partial(torch.mm, a, a.T), device, 1, 3, 0.2).median
        matmul[str(dtype)[6:]] = 2.0 * n**3 / seconds / 1e9
    src = torch.ones(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    copy = 2.0 * copy_bytes / time_step(lambda: dst.copy_(src), device, 1, 3, 0.2).median / 1e9
    tf32 = torch.backends.cuda.matmul.allow_tf32
    return dict(matmul_gflops=matmul, copy_gbps=copy, matmul_n=n, copy_bytes=copy_bytes, allow_tf32=tf32)


def gpu_peak(step: Callable[[], object], device: torch.device, baseline: int) -> int:
    """Bytes the allocator held at its peak during ``step`` above ``baseline``."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - baseline


def _proc(file: str, field: str) -> Optional[int]:
    """A size from ``/proc`` in bytes (``VmRSS``, ``VmHWM``, ``VmData``, ``MemAvailable``)."""
    try:
        line = next(line for line in Path(file).read_text().splitlines() if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) * 1024


def default_cpu_cap() -> Optional[int]:
    """Three quarters of the memory available now: a row above it is OOM, the rest stays free."""
    free = _proc("/proc/meminfo", "MemAvailable")
    return None if free is None else int(free * 0.75)


PROBE_TIMEOUT_S = 3600.0  # the issue-scale block forward takes half an hour on two cores


def probe_cpu(spec: dict[str, Any], cap_bytes: Optional[int], threads: Optional[int] = None) -> dict[str, Any]:
    """Run the row ``spec`` (``module`` registering its case, ``op``, ``implementation``, ``shape``,
    ``dtype``, ``pass``) once in a fresh interpreter: its ``status``, ``reason``, ``peak_bytes``
    and ``baseline_bytes``."""
    root = str(Path(__file__).resolve().parents[2])  # this very stt_kernels, installed or not
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))}
    env.update({"OMP_NUM_THREADS": str(threads)} if threads else {})
    command = [sys.executable, "-m", "stt_kernels.bench.measure", json.dumps({**spec, "cap_bytes": cap_bytes})]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "error", "reason": f"memory probe took more than {PROBE_TIMEOUT_S:.0f} s"}
    if done.returncode == -signal.SIGKILL:
        return {"status": "OOM", "reason": "memory probe killed by SIGKILL (the kernel's OOM killer)"}
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
        status = "OOM" if "MemoryError" in done.stderr or "allocate memory" in done.stderr else "error"
        return {"status": status, "reason": f"memory probe exited with {done.returncode}: {tail}"}


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    from .cases import CASES, Shape
    from .impls import IMPLEMENTATIONS, classify, prepare

    importlib.import_module(spec["module"])
    case = CASES[spec["op"]]
    implementation = next(i for i in IMPLEMENTATIONS if i.op == case.name and i.name == spec["implementation"])
    cpu, dtype, shape = torch.device("cpu"), getattr(torch, spec["dtype"]), Shape(**spec["shape"])
    try:  # what the implementation loads on first use (modules, thread pools) is baseline
        prepare(case, implementation, case.small(shape), dtype, cpu, spec["pass"])
    except Exception:
        pass  # the real call below reports what is wrong
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # freed heap pages back to the OS
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets the high-water mark
        baseline = _proc("/proc/self/status", "VmRSS") or 0
    except OSError:
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if (cap := spec.get("cap_bytes")) is not None and (data := _proc("/proc/self/status", "VmData")) is not None:
        resource.setrlimit(resource.RLIMIT_DATA, (data + int(cap), resource.getrlimit(resource.RLIMIT_DATA)[1]))
    try:
        prepare(case, implementation, shape, dtype, cpu, spec["pass"])
    except Exception as exc:
        status, reason = classify(exc)
        over = f"over the memory cap of {int(cap) / 2**20:.0f} MiB: " if status == "OOM" and cap is not None else ""
        return {"status": status, "reason": over + reason}
    peak = _proc("/proc/self/status", "VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"status": "ok", "peak_bytes": peak - baseline, "baseline_bytes": baseline}


if __name__ == "__main__":
    print(json.dumps(_worker(json.loads(sys.argv[1]))), flush=True)
