"""``report.md``, readable without the JSON, and a device's section of ``benchmarks/RESULTS.md``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

from ..atomic_file import atomic_write_text

LEGEND = (
    "Time: median of the samples, with the interquartile range. Peak memory: the allocator's peak above what was "
    "allocated before the inputs (GPU), or the max RSS of a fresh process running just that row above its RSS once "
    "torch and the implementation are loaded and warmed up (CPU); inputs, outputs and gradients included. GFLOP/s "
    "and GB/s: the work models of `stt_kernels/bench/cases.py` over the median time; in brackets, their share of "
    "the ceilings. Speedups: the reference's (resp. the fastest peer's) median time over this row's; above 1 means "
    "this row is faster."
)
HEADER = "| shape | dtype | pass | implementation | median ms | IQR ms | peak MiB | GFLOP/s | GB/s | vs reference "
HEADER += "| vs best peer |\n| --- | --- | --- | --- |" + " ---: |" * 7


def _num(value: Optional[float], unit: float = 1.0) -> str:
    if value is None:
        return "-"
    value /= unit
    return "0" if value == 0 else f"{value:.3g}" if abs(value) < 1e3 else f"{value:.0f}"


def _rate(value: Optional[float], ceiling: Optional[float]) -> str:
    return _num(value) + (f" ({value / ceiling * 100:.2g}%)" if value is not None and ceiling else "")


def _times(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _row(r: Any, ceiling: dict[str, Any]) -> str:
    """One table line of ``r`` (an ``engine.Row``)."""
    head, peak = f"| {r.shape} | {r.dtype} | {r.pass_} | {r.implementation} |", _num(r.peak_memory_bytes, 2**20)
    if r.status != "ok":
        return f"{head} **{r.status}** | | {peak} | | | | |"
    peer = _times(r.speedup_vs_best_peer) + (f" ({r.best_peer})" if r.best_peer and r.kind != "peer" else "")
    cells = [_num(r.time_median_s, 1e-3), f"{_num(r.time_q1_s, 1e-3)}-{_num(r.time_q3_s, 1e-3)}", peak]
    cells += [_rate(r.gflops_per_s, ceiling["matmul_gflops"].get(r.dtype)), _rate(r.gbytes_per_s, ceiling["copy_gbps"])]
    return f"{head} {' | '.join([*cells, _times(r.speedup_vs_reference), peer])} |"


def render(m: dict[str, Any], ceiling: dict[str, Any], rows: list, descriptions: dict[str, str]) -> str:
    """The metadata ``m``, the legend, then per case a table of ``rows`` (``engine.Row``) and what
    did not run, each reason once."""
    gpu = m["gpu_compute_capability"]
    device = f"{m['device']} (compute {gpu}, driver {m['driver']}, CUDA {m['cuda']}, ROCm {m['rocm']})"
    device = device if gpu else f"{m['cpu']}, {m['cpu_cores_usable']} usable cores, torch threads: {m['torch_threads']}"
    if not gpu and (cache := m.get("cpu_cache")):
        device += f"; per core as the kernels read them: L1d {cache['l1d'] >> 10} KiB, L2 {cache['l2'] >> 10} KiB"
    matmul = ", ".join(f"{dtype} {_num(v)} GFLOP/s" for dtype, v in ceiling["matmul_gflops"].items())
    commit = f"`{(m['commit'] or 'not a git checkout')[:12]}`" + (" (uncommitted changes)" if m["dirty"] else "")
    lines = [
        "# stt-kernels benchmark",
        "",
        f"- Device: {device}",
        f"- Versions: torch {m['torch']}, Triton {m['triton']}, torchvision {m['torchvision']}, Python {m['python']}",
        "- stt_kernels backends: " + ", ".join(f"{n}: {'no' if r else 'yes'}" for n, r in m["backends"].items()),
        f"- Commit: {commit}",
        f"- Date: {m['date']}, measuring took {m['duration_s']:.0f} s",
        f"- Command: `{m['command']}`",
        f"- Timer: {', '.join(sorted({r.timer for r in rows if r.timer})) or 'none (nothing timed)'}",
        f"- Ceilings measured in this run: matmul {ceiling['matmul_n']}^3 {matmul}; "
        f"copy {ceiling['copy_bytes'] >> 20} MiB {_num(ceiling['copy_gbps'])} GB/s",
    ]
    if baselines := [r.baseline_memory_bytes >> 20 for r in rows if r.baseline_memory_bytes and not gpu]:
        lines.append(
            "- Baseline RSS of a measuring process (interpreter, torch, the implementation warmed up), "
            f"not in the peak memory column: {min(baselines)}-{max(baselines)} MiB"
        )
    lines += ["", LEGEND, ""]
    if not gpu and (load := max(m["load_average"])) > m["cpu_cores_usable"]:
        lines.append(
            f"> The machine was busy with other work (1-minute load average up to {load:.1f} on "
            f"{m['cpu_cores_usable']} cores): CPU times are noisy, compare within a run only.\n"
        )
    for op in dict.fromkeys(r.op for r in rows):
        ran = [r for r in rows if r.op == op]
        lines += [f"## {op}", ""] + ([descriptions[op], ""] if descriptions.get(op) else []) + [HEADER]
        lines += [_row(r, ceiling) for r in ran if r.status != "skipped"]
        reasons: dict[tuple[str, str, str], list] = {}
        for r in ran:
            if r.status != "ok":
                reasons.setdefault((r.status, r.implementation, r.reason), []).append(r)
        lines += ["", "Not run:", ""] if reasons else []
        for (status, name, reason), where in sorted(reasons.items()):
            first = where[0]
            scope = f"{first.dtype} {first.pass_} {first.shape}" if len(where) == 1 else f"{len(where)} combinations"
            lines.append(f"- {status}: `{name}` ({scope}): {reason}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def update_results_md(path: Path, device: str, report: str) -> Path:
    """Put ``report`` into ``path`` as ``device``'s section (between ``<!-- results: DEVICE -->``
    markers), keeping the other devices' sections and all the text around them."""
    body = re.sub(r"^(#+) ", r"#\1 ", report.strip(), flags=re.MULTILINE)
    body = body.replace("## stt-kernels benchmark", f"## {device}", 1)
    section = f"<!-- results: {device} -->\n{body}\n<!-- end results: {device} -->"
    text = Path(path).read_text() if Path(path).exists() else "# Benchmark results\n"
    marked = re.compile(
        rf"<!-- results: {re.escape(device)} -->.*?<!-- end results: {re.escape(device)} -->", re.DOTALL
    )
    text = marked.sub(lambda _: section, text) if marked.search(text) else f"{text.rstrip()}\n\n{section}\n"
    return atomic_write_text(path, text)
