"""The run: every (case, shape) of the chosen suites x implementation x dtype x pass, one row
each, then ``results.json``, ``report.md`` and, if asked, this device's section of a
``RESULTS.md``. No row can stop the run: a combination an implementation declines is
``skipped``, an allocation failure ``OOM``, anything else an ``error`` row with its first line.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

import stt_kernels

from ..atomic_file import atomic_write_text
from .cases import CASES, PASSES, SUITES, TIERS
from .impls import IMPLEMENTATIONS, Unsupported, classify, prepare
from .measure import ceilings, default_cpu_cap, gpu_peak, probe_cpu, time_step

OUR_BACKENDS = ("triton", "cuda", "cpu", "reference")
DTYPES = ("float32", "float16", "bfloat16", "float64")  # what --dtypes may name
# (warm-up calls, samples at least, seconds per timing round)
_EFFORT = {"quick": (1, 3, 0.1), "default": (2, 5, 0.5), "full": (3, 5, 1.0)}


class NothingMeasured(RuntimeError):
    """A run finished without timing a single row."""


@dataclass
class Options:
    """A run; ``None`` means the tier's or the device's default. ``suites``: names in
    ``cases.SUITES`` (default ``levels``, at the tier's sizes); ``ops``, ``backends`` (ours, and
    ``reference``), ``peers`` (names or prefixes: ``sdpa``, ``sdpa:flash``; ``[]`` for none) filter
    them. ``memory_cap_bytes``: per-row working memory beyond which a row is OOM (CPU default: three
    quarters of what is available). ``cpu_memory``: measure CPU peak memory in a fresh process per
    row (also the OOM guard). ``threads``: torch's CPU threads (on a shared machine, fewer than the
    cores: OpenMP otherwise waits for descheduled threads). ``overwrite``: replace an earlier run's
    files in ``out``."""

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
    probe_timeout_s: float = 3600.0
    threads: Optional[int] = None
    results_md: Optional[Path] = None
    command: Optional[list[str]] = None
    seed: int = 0
    overwrite: bool = False
    progress: Callable[[str], None] = field(default=lambda line: print(line, file=sys.stderr, flush=True), repr=False)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        for name, values, allowed in (("tier", [self.tier], TIERS), ("suites (--suite)", self.suites, list(SUITES)),
                                      ("ops (--ops)", self.ops or (), list(CASES)), ("passes", self.passes, PASSES),
                                      ("backends", self.backends or (), OUR_BACKENDS),
                                      ("dtypes (--dtypes)", self.dtypes or (), DTYPES)):
            for value in values:
                if value not in allowed:
                    raise ValueError(f"{name} must be among {', '.join(allowed)}; got {value!r}")
        for name, value, minimum in (("repeats", self.repeats, 1), ("warmup", self.warmup, 0),
                                     ("threads", self.threads, 1)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
                raise ValueError(f"{name} (--{name}) must be an int >= {minimum}; got {value!r}")
        for name, value in (("memory_cap_bytes (--memory-cap-mb)", self.memory_cap_bytes),
                            ("probe_timeout_s", self.probe_timeout_s)):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive; got {value!r}")
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"out (--out) must be a directory for results.json and report.md; "
                             f"{str(self.out)!r} is an existing file")
        earlier = [name for name in ("results.json", "report.md") if (self.out / name).exists()]
        if earlier and not self.overwrite:
            raise ValueError(f"out (--out) {str(self.out)!r} already holds an earlier run's {', '.join(earlier)}; "
                             "give another folder, or --overwrite to replace them")

    def torch_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def wants(self, name: str, kind: str) -> bool:
        if kind == "peer":
            return self.peers is None or any(name == p or name.startswith(p + ":") for p in self.peers)
        return self.backends is None or name.removeprefix("ours:") in self.backends


@dataclass
class Row:
    op: str
    implementation: str
    kind: str  # ours | reference | peer
    shape: str
    dims: dict[str, Any]
    tokens: int
    dtype: str
    pass_: str
    status: str = "ok"  # ok | OOM | skipped | error
    reason: str = ""
    timer: str = ""
    time_median_s: Optional[float] = None
    time_q1_s: Optional[float] = None
    time_q3_s: Optional[float] = None
    repeats: int = 0
    peak_memory_bytes: Optional[int] = None
    baseline_memory_bytes: Optional[int] = None
    flops: float = 0.0
    bytes: Optional[float] = 0.0  # None: no traffic model (a whole network)
    gflops_per_s: Optional[float] = None
    gbytes_per_s: Optional[float] = None
    flops_fraction: Optional[float] = None  # of this dtype's matmul ceiling
    bandwidth_fraction: Optional[float] = None  # of the copy ceiling
    speedup_vs_reference: Optional[float] = None
    best_peer: Optional[str] = None
    speedup_vs_best_peer: Optional[float] = None


def add_speedups(rows: list[Row]) -> None:
    """Per op, shape, dtype and pass: the reference's and the fastest peer's median time over
    each timed row's (above 1: this row is faster)."""
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


def _version(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _output(command: list[str]) -> Optional[str]:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=20,
                              cwd=Path(stt_kernels.__file__).resolve().parent.parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _cpu() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def environment(device: torch.device, command: Optional[list[str]]) -> dict[str, Any]:
    """What a reader needs to trust or reproduce the figures."""
    cpu = _cpu()
    gpu = torch.cuda.get_device_properties(device) if device.type == "cuda" else None
    commit = _output(["git", "rev-parse", "HEAD"])
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(command if command is not None else [sys.executable, *sys.argv]),
        "device": gpu.name if gpu else cpu, "cpu": cpu, "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "load_average_start": list(os.getloadavg()),
        "gpu_compute_capability": f"{gpu.major}.{gpu.minor}" if gpu else None,
        "driver": _output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) if gpu else None,
        "cuda": torch.version.cuda, "rocm": torch.version.hip, "python": platform.python_version(),
        "torch": torch.__version__, "triton": _version("triton") or _version("pytorch-triton-rocm"),
        "torchvision": _version("torchvision"), "flash_attn": _version("flash-attn"), "xformers": _version("xformers"),
        "stt_kernels": stt_kernels.__version__,
        "backends": {name: {"available": s.available, "reason": s.reason} for name, s in stt_kernels.backends().items()},
        "commit": commit, "dirty": bool(_output(["git", "status", "--porcelain", "--untracked-files=no"])) if commit else None,
    }


def _free(device: torch.device) -> None:
    if device.type == "cuda":  # an OOM's traceback frames hold tensors in reference cycles
        gc.collect()
        torch.cuda.empty_cache()


def _measure(row: Row, case, implementation, shape, dtype: torch.dtype, device: torch.device, options: Options,
             ceiling: dict[str, Any], cpu_cap: Optional[int], declined: dict) -> None:
    """Fill ``row``: first whether the implementation declines (asked on a tiny input, once per
    combination: cheap, and it spares the memory probe), then memory, then time."""
    key = (implementation.name, case.name, case.small(shape), dtype, row.pass_)
    if key not in declined:
        try:
            prepare(case, implementation, case.small(shape), dtype, device, row.pass_)
            declined[key] = None
        except Unsupported as exc:
            declined[key] = str(exc)
        except Exception:  # failures that depend on size show at the real size, in the row
            declined[key] = None
        _free(device)
    if declined[key] is not None:
        row.status, row.reason = "skipped", declined[key]
        return
    if device.type == "cpu" and options.cpu_memory:
        probe = probe_cpu({"module": type(case).__module__, "op": case.name, "implementation": implementation.name,
                           "shape": dataclasses.asdict(shape), "dtype": row.dtype, "pass": row.pass_,
                           "seed": options.seed}, cpu_cap, options.probe_timeout_s, options.threads)
        row.peak_memory_bytes, row.baseline_memory_bytes = probe.get("peak_bytes"), probe.get("baseline_bytes")
        if probe["status"] != "ok":
            row.status, row.reason = probe["status"], probe["reason"]
            return
    warmup, repeats, min_run_time = _EFFORT[options.tier]
    step = None
    try:
        baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        step = prepare(case, implementation, shape, dtype, device, row.pass_, options.seed)
        timing = time_step(step, device, options.warmup if options.warmup is not None else warmup,
                           options.repeats or repeats, min_run_time)
        row.timer, row.repeats = timing.timer, timing.repeats
        row.time_median_s, row.time_q1_s, row.time_q3_s = timing.median, timing.q1, timing.q3
        row.gflops_per_s = row.flops / timing.median / 1e9
        row.gbytes_per_s = None if row.bytes is None else row.bytes / timing.median / 1e9
        if peak := ceiling["matmul_gflops"].get(row.dtype):
            row.flops_fraction = row.gflops_per_s / peak
        if row.gbytes_per_s is not None:
            row.bandwidth_fraction = row.gbytes_per_s / ceiling["copy_gbps"]
        if device.type == "cuda":
            row.baseline_memory_bytes, row.peak_memory_bytes = baseline, gpu_peak(step, device, baseline)
    except Exception as exc:  # recorded in the row; the run goes on
        row.status, row.reason = classify(exc)
    finally:
        del step
        _free(device)


def default_dtypes(device: torch.device, names: Optional[Sequence[str]] = None) -> list[torch.dtype]:
    """``names``, or float32 on a CPU and float32, float16, bfloat16 on a GPU."""
    names = names or (("float32", "float16", "bfloat16") if device.type == "cuda" else ("float32",))
    return [getattr(torch, name) for name in names]


def plan(suites: Sequence[str], tier: str, device: torch.device, dtypes: Sequence[torch.dtype],
         ops: Optional[Sequence[str]] = None, passes: Sequence[str] = PASSES,
         wants: Callable[[str, str], bool] = lambda name, kind: True) -> list[tuple]:
    """The rows of a run, in order: ``(case, implementation, shape, dtype, pass)`` for every entry
    of ``suites`` at ``tier`` whose case is in ``ops`` and every implementation listed for
    ``device`` that ``wants(name, kind)``; the pytest-benchmark suite runs the same list."""
    rows = []
    for suite in suites:
        for op, shape, only in SUITES[suite](tier):
            if ops is not None and op not in ops:
                continue
            chosen = [i for i in IMPLEMENTATIONS if i.op == op and device.type in i.devices and wants(i.name, i.kind)]
            rows += [(CASES[op], implementation, shape, dtype, pass_) for dtype in dtypes
                     for pass_ in passes if only is None or pass_ in only for implementation in chosen]
    return rows


def run(options: Options) -> Path:
    """Run ``options``; returns the path of ``results.json`` (written with ``report.md`` into
    ``options.out``, each atomically)."""
    device = options.torch_device()
    dtypes = default_dtypes(device, options.dtypes)
    threads = torch.get_num_threads()
    torch.set_num_threads(options.threads or threads)
    cpu_cap = options.memory_cap_bytes
    if device.type == "cpu" and cpu_cap is None:
        cpu_cap = default_cpu_cap()
    elif device.type == "cuda" and cpu_cap is not None:
        torch.cuda.set_per_process_memory_fraction(min(1.0, cpu_cap / torch.cuda.get_device_properties(device).total_memory), device)
    started = time.monotonic()
    metadata = environment(device, options.command)
    options.progress(f"stt bench: {', '.join(options.suites)} ({options.tier}) on {metadata['device']} -> {options.out}")
    rows: list[Row] = []
    try:
        ceiling = ceilings(device, dtypes, options.tier)
        declined: dict = {}
        for case, implementation, shape, dtype, pass_ in plan(options.suites, options.tier, device, dtypes, options.ops,
                                                              options.passes, options.wants):
            op = case.name
            row = Row(op, implementation.name, implementation.kind, case.label(shape), dataclasses.asdict(shape),
                      shape.tokens, str(dtype).removeprefix("torch."), pass_,
                      flops=case.flops(shape, pass_), bytes=case.bytes(shape, dtype, pass_))
            began = time.perf_counter()
            _measure(row, case, implementation, shape, dtype, device, options, ceiling, cpu_cap, declined)
            figure = f"{row.time_median_s * 1e3:.3g} ms" if row.status == "ok" else row.reason[:100]
            options.progress(f"[{time.perf_counter() - began:5.1f}s] {op} {row.shape} {row.dtype} {pass_} "
                             f"{implementation.name}: {row.status} {figure}")
            rows.append(row)
    finally:
        torch.set_num_threads(threads)
        if device.type == "cuda" and options.memory_cap_bytes is not None:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    add_speedups(rows)
    metadata.update(load_average_end=list(os.getloadavg()), duration_s=round(time.monotonic() - started, 1))
    settings = {k: v for k, v in dataclasses.asdict(options).items() if k not in ("progress", "command")}
    document = {"schema": 2, "metadata": metadata, "options": {**settings, "memory_cap_bytes": cpu_cap},
                "ceilings": ceiling, "rows": [{("pass" if k == "pass_" else k): v for k, v in dataclasses.asdict(r).items()}
                                              for r in rows]}
    results = atomic_write_text(options.out / "results.json", json.dumps(document, indent=1, default=str) + "\n")
    report = render(metadata, ceiling, rows)
    atomic_write_text(options.out / "report.md", report)
    if options.results_md is not None:
        update_results_md(options.results_md, metadata["device"], report)
    return results


def run_measuring(options: Options) -> Path:
    """:func:`run`, then :class:`NothingMeasured` naming the first reasons if no row was timed
    (the files are written either way)."""
    path = run(options)
    rows = read_results(path)["rows"]
    if not any(row.status == "ok" for row in rows):
        reasons = list(dict.fromkeys(f"{row.implementation}: {row.reason or row.status}" for row in rows))
        why = "; ".join(reasons[:3]) + (f"; and {len(reasons) - 3} more" if len(reasons) > 3 else "")
        raise NothingMeasured(f"nothing was measured: {len(rows)} rows, none timed"
                              + (f" ({why})" if why else " (no implementation matched the filters)")
                              + f"; see {path.parent / 'report.md'}")
    return path


def _num(value: Optional[float]) -> str:
    return "-" if value is None else ("0" if value == 0 else f"{value:.3g}" if abs(value) < 1e3 else f"{value:.0f}")


def _times(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _share(fraction: Optional[float]) -> str:
    return "" if fraction is None else f" ({fraction * 100:.2g}%)"


def render(metadata: dict[str, Any], ceiling: dict[str, Any], rows: list[Row]) -> str:
    """``report.md``: the metadata, a legend, then per case a table and what did not run."""
    m = metadata
    device = (f"{m['device']} (compute {m['gpu_compute_capability']}, driver {m['driver']}, CUDA {m['cuda']}, ROCm {m['rocm']})"
              if m["gpu_compute_capability"] else f"{m['cpu']}, {m['cpu_cores_usable']} usable cores, torch threads: {m['torch_threads']}")
    commit = "not a git checkout" if not m["commit"] else f"`{m['commit'][:12]}`" + (" (uncommitted changes)" if m["dirty"] else "")
    matmul = ", ".join(f"{dtype} {_num(v)} GFLOP/s" for dtype, v in ceiling["matmul_gflops"].items())
    baselines = [r.baseline_memory_bytes for r in rows if r.baseline_memory_bytes and m["gpu_compute_capability"] is None]
    lines = ["# stt-kernels benchmark", "", f"- Device: {device}",
             f"- Versions: torch {m['torch']}, Triton {m['triton']}, torchvision {m['torchvision']}, Python {m['python']}; "
             f"flash-attn {m['flash_attn']}, xformers {m['xformers']}",
             "- stt_kernels backends: " + ", ".join(f"{n}: {'yes' if b['available'] else 'no'}" for n, b in m["backends"].items()),
             f"- Commit: {commit}", f"- Date: {m['date']}, measuring took {m['duration_s']:.0f} s", f"- Command: `{m['command']}`",
             f"- Timer: {', '.join(sorted({r.timer for r in rows if r.timer})) or 'none (nothing timed)'}",
             f"- Ceilings measured in this run: matmul {ceiling['matmul_n']}^3 {matmul}; "
             f"copy {ceiling['copy_bytes'] >> 20} MiB {_num(ceiling['copy_gbps'])} GB/s"]
    if baselines:
        lines.append(f"- Baseline RSS of a measuring process (interpreter, torch, the implementation warmed up), not in "
                     f"the peak memory column: {min(baselines) >> 20}-{max(baselines) >> 20} MiB")
    lines += ["", "Time: median of the samples, with the interquartile range. Peak memory: the allocator's peak above "
              "what was allocated before the inputs (GPU), or the max RSS of a fresh process running just that row "
              "above its RSS once torch and the implementation are loaded and warmed up (CPU); inputs, outputs and "
              "gradients included. GFLOP/s and GB/s: the work models of `stt_kernels/bench/cases.py` over the median "
              "time; in brackets, the share of the ceilings. Speedups: the reference's (resp. the fastest peer's) "
              "median time over this row's; above 1 means this row is faster.", ""]
    loads = [m["load_average_start"][0], m["load_average_end"][0]]
    if m["gpu_compute_capability"] is None and max(loads) > m["cpu_cores_usable"]:
        lines += [f"> The machine was busy with other work (1-minute load average up to {max(loads):.1f} on "
                  f"{m['cpu_cores_usable']} cores): CPU times are noisy, compare within a run only.", ""]
    for op in dict.fromkeys(r.op for r in rows):
        mine = [r for r in rows if r.op == op]
        lines += [f"## {op}", ""] + ([CASES[op].description, ""] if CASES[op].description else [])
        lines += ["| shape | dtype | pass | implementation | median ms | IQR ms | peak MiB | GFLOP/s | GB/s | vs reference "
                  "| vs best peer |", "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in mine:
            memory = _num(r.peak_memory_bytes / 2 ** 20) if r.peak_memory_bytes is not None else "-"
            if r.status == "ok":
                peer = _times(r.speedup_vs_best_peer) + (f" ({r.best_peer})" if r.best_peer and r.kind != "peer" else "")
                lines.append(f"| {r.shape} | {r.dtype} | {r.pass_} | {r.implementation} | {_num(r.time_median_s * 1e3)} "
                             f"| {_num(r.time_q1_s * 1e3)}-{_num(r.time_q3_s * 1e3)} | {memory} "
                             f"| {_num(r.gflops_per_s)}{_share(r.flops_fraction)} | {_num(r.gbytes_per_s)}"
                             f"{_share(r.bandwidth_fraction)} | {_times(r.speedup_vs_reference)} | {peer} |")
            elif r.status != "skipped":
                lines.append(f"| {r.shape} | {r.dtype} | {r.pass_} | {r.implementation} | **{r.status}** | | {memory} | | | | |")
        reasons: dict[tuple[str, str, str], list[Row]] = {}
        for r in mine:
            if r.status != "ok":
                reasons.setdefault((r.status, r.implementation, r.reason), []).append(r)
        lines += [""] + (["Not run:", ""] if reasons else [])
        for (status, name, reason), where in sorted(reasons.items()):
            scope = f"{where[0].dtype} {where[0].pass_} {where[0].shape}" if len(where) == 1 else f"{len(where)} combinations"
            lines.append(f"- {status}: `{name}` ({scope}): {reason}")
        lines += [""] if reasons else []
    return "\n".join(lines).rstrip() + "\n"


def update_results_md(path: Path, device: str, report: str) -> Path:
    """Put ``report`` into ``path`` as ``device``'s section (between ``<!-- results: DEVICE -->``
    markers), keeping the other devices' sections and all text outside the markers."""
    body = re.sub(r"^(#+) ", r"#\1 ", report.strip(), flags=re.MULTILINE).replace("## stt-kernels benchmark",
                                                                                  f"## {device}", 1)
    section = f"<!-- results: {device} -->\n{body}\n<!-- end results: {device} -->"
    text = Path(path).read_text() if Path(path).exists() else "# Benchmark results\n"
    pattern = re.compile(rf"<!-- results: {re.escape(device)} -->.*?<!-- end results: {re.escape(device)} -->", re.DOTALL)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    return atomic_write_text(path, text)
