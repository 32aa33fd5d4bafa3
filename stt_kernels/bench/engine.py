"""The run: every (case, shape) of the chosen suites x implementation x dtype x pass, one row each,
then ``results.json``, ``report.md`` and, if asked, this device's section of a ``RESULTS.md``. No
row stops the run: what an implementation declines is ``skipped``, an allocation failure ``OOM``,
anything else an ``error`` row with its first line."""

from __future__ import annotations

import dataclasses
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

import stt_kernels

from .._extension import EXTENSION
from ..atomic_file import atomic_write_text
from .cases import CASES, PASSES, SUITES, TIERS
from .impls import IMPLEMENTATIONS, Implementation, Unsupported, classify, prepare
from .measure import ceilings, default_cpu_cap, gpu_peak, probe_cpu, time_step
from .report import render, update_results_md

OUR_BACKENDS = ("triton", "cuda", "cpu", "reference")
DTYPES = ("float32", "float16", "bfloat16", "float64")  # what --dtypes may name
EFFORT = {"quick": (1, 3, 0.1), "default": (2, 5, 0.5), "full": (3, 5, 1.0)}  # warm-up, samples, s per round
_FLAGS = {"suites": "--suite", "memory_cap_bytes": "--memory-cap-mb", "tier": "--quick/--full"}


class NothingMeasured(RuntimeError):
    """A run finished without timing a single row."""


def _named(name: str) -> str:
    return f"{name} ({_FLAGS.get(name, '--' + name)})"


@dataclass
class Options:
    """A run; ``None`` is the tier's or the device's default. ``ops``, ``backends`` (ours and the
    reference), ``peers`` (names or prefixes, ``[]``: none) and ``passes`` filter the ``suites``.
    ``memory_cap_bytes``: per-row working memory beyond which a row is OOM (CPU default: 3/4 of what is
    available). ``cpu_memory``: CPU peak memory from a fresh process per row (also the OOM guard)."""

    out: Path
    tier: str = "default"
    suites: Sequence[str] = ("levels",)
    ops: Optional[Sequence[str]] = None
    backends: Optional[Sequence[str]] = None
    peers: Optional[Sequence[str]] = None
    dtypes: Optional[Sequence[str]] = None
    passes: Sequence[str] = PASSES
    device: Optional[str] = None
    warmup: Optional[int] = None
    repeats: Optional[int] = None
    memory_cap_bytes: Optional[int] = None
    cpu_memory: bool = True
    threads: Optional[int] = None
    results_md: Optional[Path] = None
    command: Optional[list[str]] = None
    overwrite: bool = False
    progress: Callable[[str], None] = field(default=lambda line: print(line, file=sys.stderr), repr=False)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        choices = dict(tier=TIERS, suites=SUITES, ops=CASES, passes=PASSES, backends=OUR_BACKENDS, dtypes=DTYPES)
        for name, allowed in choices.items():
            values = [self.tier] if name == "tier" else getattr(self, name) or ()
            if bad := [value for value in values if value not in allowed]:
                raise ValueError(f"{_named(name)} must be among {', '.join(allowed)}; got {bad[0]!r}")
        for name, least in (("repeats", 1), ("warmup", 0), ("threads", 1), ("memory_cap_bytes", 1)):
            if (value := getattr(self, name)) is not None and (type(value) is not int or value < least):
                raise ValueError(f"{_named(name)} must be an int >= {least}; got {value!r}")
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(
                f"out (--out) must be a directory for results.json and report.md; {str(self.out)!r} is an existing file"
            )
        if (earlier := [n for n in ("results.json", "report.md") if (self.out / n).exists()]) and not self.overwrite:
            raise ValueError(
                f"out (--out) {str(self.out)!r} already holds an earlier run's {', '.join(earlier)}; "
                "give another folder, or --overwrite to replace them"
            )

    def keep(self, op: str, implementation: Implementation, pass_: str) -> bool:
        """Whether the filters keep this row."""
        if (self.ops is not None and op not in self.ops) or pass_ not in self.passes:
            return False
        name = implementation.name
        if implementation.kind == "peer":
            return self.peers is None or any(name == p or name.startswith(p + ":") for p in self.peers)
        return self.backends is None or name.removeprefix("ours:") in self.backends


@dataclass
class Row:
    op: str
    implementation: str
    kind: str  # ours | reference | peer
    shape: str
    dims: dict[str, Any]  # the Shape's fields
    dtype: str
    pass_: str
    flops: float
    bytes: Optional[float]  # None: no traffic model (a whole network)
    status: str = "ok"  # ok | OOM | skipped | error
    reason: str = ""
    timer: str = ""
    time_median_s: Optional[float] = None
    time_q1_s: Optional[float] = None
    time_q3_s: Optional[float] = None
    repeats: int = 0
    peak_memory_bytes: Optional[int] = None
    baseline_memory_bytes: Optional[int] = None
    gflops_per_s: Optional[float] = None
    gbytes_per_s: Optional[float] = None
    speedup_vs_reference: Optional[float] = None
    best_peer: Optional[str] = None
    speedup_vs_best_peer: Optional[float] = None


def add_speedups(rows: list[Row]) -> None:
    """Per op, shape, dtype and pass: the reference's and the fastest peer's median time over each
    timed row's (above 1: this row is faster)."""
    groups: dict[tuple[str, str, str, str], list[Row]] = {}
    for row in rows:
        if row.status == "ok" and row.time_median_s:
            groups.setdefault((row.op, row.shape, row.dtype, row.pass_), []).append(row)
    for timed in groups.values():
        reference = next((r for r in timed if r.kind == "reference"), None)
        best = min((r for r in timed if r.kind == "peer"), key=lambda r: r.time_median_s, default=None)
        for row in timed:
            if reference is not None:
                row.speedup_vs_reference = reference.time_median_s / row.time_median_s
            if best is not None:
                row.best_peer, row.speedup_vs_best_peer = best.implementation, best.time_median_s / row.time_median_s


def read_results(path: Path) -> dict[str, Any]:
    """``results.json`` with its rows as :class:`Row` objects."""
    document = json.loads(Path(path).read_text())
    document["rows"] = [Row(**{("pass_" if k == "pass" else k): v for k, v in r.items()}) for r in document["rows"]]
    return document


def _output(*command: str) -> Optional[str]:
    source = Path(stt_kernels.__file__).resolve().parent.parent
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=20, cwd=source)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _version(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu() -> str:
    """The CPU's name with its family and model numbers and widest vector ISA: vendors give one name
    ("AMD EPYC") to generations on which the same kernel runs at different speeds."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine()
    fields: dict[str, str] = {}
    for line in lines:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name", platform.machine())
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']} model {fields['model']}"
        flags = set(fields.get("flags", "").split())
        vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None
        isa = [vector] if vector else []
        isa += [label for flag, label in (("avx512_bf16", "AVX512-BF16"), ("amx_tile", "AMX")) if flag in flags]
        name += "".join(f", {label}" for label in isa) + ")"
    return name


def environment(device: torch.device, command: Optional[list[str]]) -> dict[str, Any]:
    """What a reader needs to trust or reproduce the figures."""
    gpu = torch.cuda.get_device_properties(device) if device.type == "cuda" else None
    commit = _output("git", "rev-parse", "HEAD")
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(command if command is not None else [sys.executable, *sys.argv]),
        "device": gpu.name if gpu else _cpu(),
        "cpu": _cpu(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)),
        "cpu_cache": EXTENSION.info.get("cpu_cache"),  # the per-core sizes the CPU kernels tile by
        "torch_threads": torch.get_num_threads(),
        "load_average": [os.getloadavg()[0]],
        "gpu_compute_capability": gpu and f"{gpu.major}.{gpu.minor}",
        "driver": gpu and _output("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"),
        **{"cuda": torch.version.cuda, "rocm": torch.version.hip, "torch": torch.__version__},
        **{name: _version(name) for name in ("triton", "torchvision", "stt-kernels")},
        "python": platform.python_version(),
        "backends": {name: None if s.available else s.reason for name, s in stt_kernels.backends().items()},
        "commit": commit,
        "dirty": bool(commit and _output("git", "status", "--porcelain", "--untracked-files=no")),
    }


def default_dtypes(device: torch.device, names: Optional[Sequence[str]] = None) -> list[torch.dtype]:
    """``names``, or float32 on a CPU and float32, float16, bfloat16 on a GPU."""
    names = names or (("float32", "float16", "bfloat16") if device.type == "cuda" else ("float32",))
    return [getattr(torch, name) for name in names]


Keep = Callable[[str, Implementation, str], bool]  # (case name, implementation, pass) -> whether to run it


def plan(suites: Sequence[str], tier: str, device: torch.device, dtypes: list, keep: Optional[Keep] = None) -> list:
    """The rows of a run in order, ``(case, implementation, shape, dtype, pass)``: every entry of
    ``suites`` at ``tier``, in the ``dtypes`` its case runs in, by every implementation listed for
    ``device``, that ``keep``s. The pytest-benchmark suite runs the same list."""
    rows = []
    for op, shape, only in [entry for suite in suites for entry in SUITES[suite](tier)]:
        case, passes = CASES[op], [p for p in PASSES if only is None or p in only]
        for dtype in [d for d in dtypes if case.dtypes is None or d in case.dtypes]:
            for pass_, i in [(p, i) for p in passes for i in IMPLEMENTATIONS if i.op == op]:
                if device.type in i.devices and (keep is None or keep(op, i, pass_)):
                    rows.append((case, i, shape, dtype, pass_))
    return rows


def _measure(row: Row, planned: tuple, device: torch.device, options: Options, cap: Optional[int]) -> None:
    """Fills in ``row`` of ``planned`` (an entry of :func:`plan`): its figures, or its status and reason."""
    case, implementation, shape, dtype, _ = planned
    if device.type == "cpu" and options.cpu_memory:
        # Whether the implementation declines is asked on a tiny input first: cheap, and it spares
        # the memory probe. Failures that depend on the size show at the real size.
        try:
            prepare(case, implementation, case.small(shape), dtype, device, row.pass_)
        except Unsupported as exc:
            row.status, row.reason = "skipped", str(exc)
            return
        except Exception:
            pass
        spec = {"module": type(case).__module__, "op": case.name, "implementation": implementation.name}
        probe = probe_cpu({**spec, "shape": row.dims, "dtype": row.dtype, "pass": row.pass_}, cap, options.threads)
        row.peak_memory_bytes, row.baseline_memory_bytes = probe.get("peak_bytes"), probe.get("baseline_bytes")
        if probe["status"] != "ok":
            row.status, row.reason = probe["status"], probe["reason"]
            return
    warmup, repeats, min_run_time = EFFORT[options.tier]
    warmup, repeats = warmup if options.warmup is None else options.warmup, options.repeats or repeats
    step = None
    try:
        baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        step = prepare(case, implementation, shape, dtype, device, row.pass_)
        timing = time_step(step, device, warmup, repeats, min_run_time)
        row.timer, row.repeats = timing.timer, timing.repeats
        row.time_median_s, row.time_q1_s, row.time_q3_s = timing.median, timing.q1, timing.q3
        row.gflops_per_s = row.flops / timing.median / 1e9 if row.flops else None
        row.gbytes_per_s = None if row.bytes is None else row.bytes / timing.median / 1e9
        if device.type == "cuda":
            row.baseline_memory_bytes, row.peak_memory_bytes = baseline, gpu_peak(step, device, baseline)
    except Exception as exc:  # recorded in the row; the run goes on
        row.status, row.reason = classify(exc)
    finally:
        del step
        if device.type == "cuda":  # an OOM's traceback frames hold tensors in reference cycles
            gc.collect()
            torch.cuda.empty_cache()


def run(options: Options) -> Path:
    """Run ``options``; returns the path of ``results.json`` (``report.md`` beside it, each
    written atomically)."""
    device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtypes, threads, cap = default_dtypes(device, options.dtypes), torch.get_num_threads(), options.memory_cap_bytes
    if device.type == "cpu" and cap is None:
        cap = default_cpu_cap()
    elif device.type == "cuda" and cap is not None:
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / torch.cuda.mem_get_info(device)[1]), device)
    started, metadata = time.monotonic(), environment(device, options.command)
    options.progress(f"stt bench: {' '.join(options.suites)} ({options.tier}) on {metadata['device']} -> {options.out}")
    rows: list[Row] = []
    try:
        torch.set_num_threads(options.threads or threads)
        ceiling = ceilings(device, dtypes, options.tier)
        for planned in plan(options.suites, options.tier, device, dtypes, options.keep):
            case, impl, shape, dtype, pass_ = planned
            dims, flops, traffic = dataclasses.asdict(shape), case.flops(shape, pass_), case.bytes(shape, dtype, pass_)
            row = Row(case.name, impl.name, impl.kind, case.label(shape), dims, str(dtype)[6:], pass_, flops, traffic)
            began = time.perf_counter()
            _measure(row, planned, device, options, cap)
            figure = f"{row.time_median_s * 1e3:.3g} ms" if row.status == "ok" else row.reason[:100]
            took = time.perf_counter() - began
            options.progress(f"[{took:5.1f}s] {row.op} {row.shape} {row.dtype} {pass_} {row.implementation}: {figure}")
            rows.append(row)
    finally:
        torch.set_num_threads(threads)
        if device.type == "cuda" and options.memory_cap_bytes is not None:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    add_speedups(rows)
    metadata["load_average"].append(os.getloadavg()[0])
    metadata["duration_s"] = round(time.monotonic() - started, 1)
    settings = {k: v for k, v in dataclasses.asdict(options).items() if k not in ("progress", "command")}
    settings["memory_cap_bytes"] = cap
    document = {"schema": 2, "metadata": metadata, "options": settings, "ceilings": ceiling}
    document["rows"] = [{("pass" if k == "pass_" else k): v for k, v in vars(r).items()} for r in rows]
    results = atomic_write_text(options.out / "results.json", json.dumps(document, indent=1, default=str) + "\n")
    report = render(metadata, ceiling, rows, {name: CASES[name].description for name in CASES})
    atomic_write_text(options.out / "report.md", report)
    if options.results_md is not None:
        update_results_md(options.results_md, metadata["device"], report)
    return results


def run_measuring(options: Options) -> Path:
    """:func:`run`, then :class:`NothingMeasured` naming the first reasons if no row was timed (the
    files are written either way)."""
    path = run(options)
    rows = read_results(path)["rows"]
    if not any(row.status == "ok" for row in rows):
        reasons = list(dict.fromkeys(f"{row.implementation}: {row.reason or row.status}" for row in rows))
        why = "; ".join(reasons[:3]) + (f"; and {len(reasons) - 3} more" if len(reasons) > 3 else "")
        why = f" ({why})" if why else " (no implementation matched the filters)"
        raise NothingMeasured(
            f"nothing was measured: {len(rows)} rows, none timed{why}; see {path.parent / 'report.md'}"
        )
    return path
