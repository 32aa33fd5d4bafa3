"""``report.md``: the run's metadata, then one table per op, readable without the JSON."""

from __future__ import annotations

from typing import Any, Optional

from .cases import CASES
from .results import Row

_MIB = 1 << 20


def _num(value: Optional[float], digits: int = 3) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"


def _ms(seconds: Optional[float]) -> str:
    return _num(None if seconds is None else seconds * 1e3)


def _percent(fraction: Optional[float]) -> str:
    return "" if fraction is None else f" ({fraction * 100:.2g}%)"


def _speedup(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def header(metadata: dict[str, Any], ceilings: Optional[dict[str, Any]]) -> list[str]:
    """The metadata block: device, versions, commit, command, ceilings."""
    gpu = metadata.get("gpu")
    device = (f"{gpu} (compute {metadata.get('compute_capability')}, driver {metadata.get('driver') or metadata.get('rocm_driver')}, "
              f"CUDA {metadata.get('cuda')}, ROCm {metadata.get('rocm')})" if gpu else
              f"{metadata['cpu']}, {metadata['cpu_cores_usable']} usable cores, torch threads: {metadata['torch_threads']}")
    commit = metadata.get("commit")
    commit_text = "not a git checkout" if commit is None else (
        f"`{commit[:12]}`" + (" (uncommitted changes)" if metadata.get("dirty") else "")
        + (f" on `{metadata['branch']}`" if metadata.get("branch") else ""))
    backends = ", ".join(f"{name}: {'yes' if b['available'] else 'no'}" for name, b in metadata["backends"].items())
    lines = [
        f"- Device: {device}",
        f"- CPU: {metadata['cpu']}, {metadata['cpu_cores']} cores",
        f"- Versions: torch {metadata['torch']}, Triton {metadata.get('triton')}, torchvision "
        f"{metadata.get('torchvision')}, Python {metadata['python']}; flash-attn {metadata.get('flash_attn')}, "
        f"xformers {metadata.get('xformers')}, NATTEN {metadata.get('natten')}",
        f"- stt_kernels backends: {backends}",
        f"- Commit: {commit_text}",
        f"- Date: {metadata['date']}" + (f", measuring took {metadata['duration_s']:.0f} s"
                                          if "duration_s" in metadata else ""),
        f"- Command: `{metadata['command']}`",
    ]
    if ceilings:
        matmul = ", ".join(f"{dtype} {_num(v)} GFLOP/s" for dtype, v in ceilings["matmul_gflops"].items())
        lines.append(f"- Ceilings measured in this run: matmul {ceilings['matmul_n']}^3 {matmul}; "
                     f"copy {ceilings['copy_bytes'] >> 20} MiB {_num(ceilings['copy_gbps'])} GB/s")
    return lines


_LEGEND = (
    "Time: median over the repeats, with the interquartile range. Peak memory: allocator peak above "
    "what was allocated before the inputs (GPU), or max RSS of a fresh process running just that case "
    "above its RSS once torch and the implementation are loaded and warmed up on a tiny input (CPU); inputs, outputs and gradients included. GFLOP/s and GB/s: "
    "the work models in `stt_kernels/bench/cases.py` divided by the median time; in brackets, the share "
    "of the matmul and copy ceilings. Speedups: the reference's (resp. the fastest peer's) median time "
    "over this row's; above 1 means this row is faster.")


def _table(rows: list[Row]) -> list[str]:
    lines = ["| shape | dtype | pass | implementation | median ms | IQR ms | peak MiB | GFLOP/s | GB/s "
             "| vs reference | vs best peer |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r.status != "ok":
            lines.append(f"| {r.shape} | {r.dtype} | {r.pass_} | {r.implementation} | **{r.status}** | "
                         f"| {_num(r.peak_memory_bytes / _MIB if r.peak_memory_bytes else None)} | | | | |")
            continue
        iqr = f"{_ms(r.time_q1_s)}-{_ms(r.time_q3_s)}"
        memory = _num(r.peak_memory_bytes / _MIB) if r.peak_memory_bytes is not None else "-"
        peer = _speedup(r.speedup_vs_best_peer) + (f" ({r.best_peer})" if r.kind != "peer" and r.best_peer else "")
        lines.append(f"| {r.shape} | {r.dtype} | {r.pass_} | {r.implementation} | {_ms(r.time_median_s)} | {iqr} "
                     f"| {memory} | {_num(r.gflops_per_s)}{_percent(r.flops_fraction)} "
                     f"| {_num(r.gbytes_per_s)}{_percent(r.bandwidth_fraction)} "
                     f"| {_speedup(r.speedup_vs_reference)} | {peer} |")
    return lines


def _not_run(rows: list[Row]) -> list[str]:
    """Skips and failures, each reason once with the combinations it covers."""
    by_reason: dict[tuple[str, str, str], list[str]] = {}
    for r in rows:
        if r.status in ("skipped", "error", "OOM"):
            by_reason.setdefault((r.status, r.implementation, r.reason), []).append(f"{r.dtype} {r.pass_} {r.shape}")
    lines = []
    for (status, implementation, reason), where in sorted(by_reason.items()):
        scope = where[0] if len(where) == 1 else f"{len(where)} combinations"
        lines.append(f"- {status}: `{implementation}` ({scope}): {reason}")
    return lines


def _baselines(rows: list[Row]) -> list[str]:
    """The CPU subprocesses' baseline RSS, which the peak memory column leaves out."""
    cpu = [r.baseline_memory_bytes for r in rows if r.baseline_memory_bytes and r.memory_method.startswith("max RSS")]
    if not cpu:
        return []
    return [f"- Baseline RSS of a measuring subprocess (interpreter, torch, the implementation warmed up), "
            f"not in the peak memory column: {min(cpu) / _MIB:.0f}-{max(cpu) / _MIB:.0f} MiB"]


def _description(op: str) -> str:
    case = CASES.get(op)
    return case.description if case is not None else ""


def render(metadata: dict[str, Any], ceilings: Optional[dict[str, Any]], rows: list[Row],
           notes: list[str]) -> str:
    """The whole ``report.md``."""
    lines = ["# stt-kernels benchmark", "", *header(metadata, ceilings), *_baselines(rows), "", _LEGEND, ""]
    lines += [f"> {note}" for note in notes] + ([""] if notes else [])
    for op in dict.fromkeys(r.op for r in rows):
        mine = [r for r in rows if r.op == op]
        lines += [f"## {op}", ""]
        if description := _description(op):
            lines += [description, ""]
        lines += [*_table([r for r in mine if r.status != "skipped"]), ""]
        if not_run := _not_run(mine):
            lines += ["Not run:", "", *not_run, ""]
    return "\n".join(lines).rstrip() + "\n"
