"""The run: every case x implementation x level x dtype x pass, one row each, then the files.

No single combination can stop the run: unsupported ones become ``skipped`` rows, allocation
failures ``OOM`` rows, anything else an ``error`` row with the exception's first line.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Optional

import torch

from . import environment
from .cases import CASES, Case
from .ceilings import Ceilings, measure_ceilings
from .files import write_atomic
from .implementation import Implementation, Unsupported
from .memory import default_cpu_cap, gpu_peak, probe_cpu
from .options import Options
from .plots import write_plots
from .registry import implementations_for
from .report import render
from .results import Row, add_speedups, write_results
from .results_md import update_results_md
from .shapes import Level
from .timing import measure
from .workload import classify, prepare


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _free(device: torch.device) -> None:
    """Give a row's GPU memory back before the next row measures its peak. (On the CPU
    reference counting frees the tensors, and a full collection costs 0.1 s a row.)"""
    if device.type == "cuda":
        gc.collect()  # an OOM's traceback frames hold tensors in reference cycles
        torch.cuda.empty_cache()


_Declines = dict[tuple[str, str, Level, torch.dtype, str], Optional[str]]


def _declined(case: Case, implementation: Implementation, level: Level, dtype: torch.dtype,
              device: torch.device, pass_: str, seen: _Declines) -> Optional[str]:
    """Why ``implementation`` declines this combination, asked on a tiny input of the same
    channels and heads in this process: cheap, and it spares the CPU memory subprocess for
    combinations that cannot run at any size. Remembered per combination in ``seen``."""
    small = case.small(level)
    key = (implementation.name, case.name, small, dtype, pass_)
    if key not in seen:
        try:
            prepare(case, implementation, small, dtype, device, pass_)
            seen[key] = None
        except Unsupported as exc:
            seen[key] = str(exc)
        except Exception:  # failures that depend on size show up at the real size, in the row
            seen[key] = None
        finally:
            _free(device)
    return seen[key]


def _measure_row(row: Row, case: Case, implementation: Implementation, level: Level, dtype: torch.dtype,
                 device: torch.device, options: Options, ceilings: Optional[Ceilings],
                 cpu_cap: Optional[int], seen: _Declines) -> None:
    """Fill ``row`` in place: timing, memory, status."""
    reason = _declined(case, implementation, level, dtype, device, row.pass_, seen)
    if reason is not None:
        row.status, row.reason = "skipped", reason
        return
    if device.type == "cpu" and options.cpu_memory:
        probe = probe_cpu({"op": case.name, "implementation": implementation.name, "level": level.__dict__,
                           "dtype": row.dtype, "pass": row.pass_, "seed": options.seed},
                          cpu_cap, options.probe_timeout_s, options.threads)
        row.memory_method = "max RSS of a fresh subprocess above its baseline"
        row.peak_memory_bytes, row.baseline_memory_bytes = probe.peak_bytes, probe.baseline_bytes
        if probe.status != "ok":
            row.status, row.reason = probe.status, probe.reason
            return
    warmup, repeats, budget = options.effort()
    workload = None
    try:
        baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        workload = prepare(case, implementation, level, dtype, device, row.pass_, options.seed)
        row.set_timing(measure(workload.step, device, warmup, repeats, budget), ceilings)
        if device.type == "cuda":
            row.memory_method = "CUDA caching allocator peak above the allocation before the inputs"
            row.baseline_memory_bytes = baseline
            row.peak_memory_bytes = gpu_peak(workload.step, device, baseline)
    except Exception as exc:  # recorded in the row; the run goes on
        row.status, row.reason = classify(exc)
    finally:
        del workload
        _free(device)


def _rows(options: Options, device: torch.device, dtypes: list[torch.dtype],
          ceilings: Optional[Ceilings], cpu_cap: Optional[int]) -> list[Row]:
    rows: list[Row] = []
    seen: _Declines = {}
    for op in options.ops or list(CASES):
        if op not in CASES:
            raise ValueError(f"unknown op {op!r}; known: {', '.join(CASES)}")
        case = CASES[op]
        chosen = [i for i in implementations_for(op, device) if options.wants(i.name, i.kind)]
        for level in case.levels(options.tier):
            for dtype in dtypes:
                for pass_ in options.passes:
                    for implementation in chosen:
                        row = Row(op, implementation.name, implementation.kind, case.label(level),
                                  dict(level.__dict__), case.tokens(level), _dtype_name(dtype), pass_,
                                  flops=case.flops(level, pass_), bytes=case.bytes(level, dtype, pass_))
                        started = time.perf_counter()
                        _measure_row(row, case, implementation, level, dtype, device, options, ceilings, cpu_cap, seen)
                        took = time.perf_counter() - started
                        timing = f"{row.time_median_s * 1e3:.3g} ms" if row.status == "ok" else row.reason[:100]
                        options.progress(f"[{took:5.1f}s] {op} {row.shape} {row.dtype} {pass_} "
                                         f"{implementation.name}: {row.status} {timing}")
                        rows.append(row)
    return rows


def run(options: Options) -> Path:
    """Run the benchmark described by ``options``; returns the path of ``results.json``.

    Writes into ``options.out``: ``results.json``, ``report.md`` and the PNG plots (see
    the package docstring), each atomically; with ``options.results_md``, also updates that
    file's section for this device.
    """
    device = options.torch_device()
    dtypes = options.torch_dtypes(device)
    threads = torch.get_num_threads()
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    try:
        return _run(options, device, dtypes)
    finally:
        torch.set_num_threads(threads)


def _run(options: Options, device: torch.device, dtypes: list[torch.dtype]) -> Path:
    started = time.monotonic()
    metadata = environment.collect(device, options.command)
    options.progress(f"stt bench: {options.tier} on {metadata['device']} -> {options.out}")
    cpu_cap = None
    if device.type == "cpu":
        cpu_cap = options.memory_cap_bytes if options.memory_cap_bytes is not None else default_cpu_cap()
    elif options.memory_cap_bytes is not None:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, options.memory_cap_bytes / total), device)
    try:
        ceilings = measure_ceilings(device, dtypes, options.tier)
        options.progress(f"ceilings: matmul {ceilings.matmul_gflops} GFLOP/s, copy {ceilings.copy_gbps:.3g} GB/s")
        rows = _rows(options, device, dtypes, ceilings, cpu_cap)
    finally:
        if device.type == "cuda" and options.memory_cap_bytes is not None:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    add_speedups(rows)
    metadata["load_average_end"] = environment.load_average()
    metadata["duration_s"] = round(time.monotonic() - started, 1)
    settings = {**options.as_dict(), "memory_cap_bytes": cpu_cap or options.memory_cap_bytes}

    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    notes = []
    if options.plots:
        _, note = write_plots(out, rows)
        if note:
            notes.append(note)
    if device.type == "cpu" and (busy := environment.busy_note(metadata)):
        notes.append(busy)
    if not any(r.kind == "ours" and r.status == "ok" for r in rows):
        notes.append("None of our kernels ran in this run (see 'Not run' per op): "
                     "the figures compare the reference with the peers.")
    results = write_results(out / "results.json", metadata, settings, ceilings, rows)
    report = render(metadata, ceilings.as_dict(), rows, notes)
    write_atomic(out / "report.md", report)
    if options.results_md is not None:
        update_results_md(options.results_md, metadata["device"], report)
    return results
