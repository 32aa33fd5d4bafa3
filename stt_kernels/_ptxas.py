"""What ``ptxas -v`` says about each CUDA kernel: registers, static shared memory, stack, spills.

``setup.py`` compiles the CUDA sources with ``--resource-usage`` (``-Xptxas -v``), keeps each
source's ptxas report under ``build/`` (ninja rebuilds only what changed, so a report lives as
long as its object) and records the parsed figures in ``_build_info.json`` as
``cuda_resources``. ``tests/test_cuda_resources.py`` fails on a spill or a figure over the
target's limits; ``benchmarks/cuda_resources.py`` prints the table of ``benchmarks/RESULTS.md``.
Stdlib only: ``setup.py`` loads this file by path while the package is being built.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from typing import Iterable, Optional

# Per-thread registers and static shared memory per block that a kernel may use, per target.
# Dynamic shared memory is sized at launch (csrc/cuda/attention_kernel.cu checks it then).
LIMITS = {
    "sm_80": {"registers": 255, "static_smem": 48 * 1024},
    "sm_86": {"registers": 255, "static_smem": 48 * 1024},
    "sm_89": {"registers": 255, "static_smem": 48 * 1024},
    "sm_90": {"registers": 255, "static_smem": 48 * 1024},
}

_STATUS = re.compile(r"^\[\d+/\d+\] (.*)$")
_SOURCE = re.compile(r"\s-c\s+(\S+\.cu)\b")
_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


@dataclass
class KernelResources:
    """One kernel (entry function) compiled for one target."""

    kernel: str  # mangled name, as ptxas prints it
    arch: str
    registers: int = 0
    static_smem: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0


def split_by_source(ninja_output: str) -> dict[str, str]:
    """``ninja -v`` output -> the text each CUDA compile printed, by source path. Piped ninja
    prints ``[k/n] <command>`` as a command finishes, followed by what it printed."""
    sections: dict[str, list[str]] = {}
    current: Optional[list[str]] = None
    for line in ninja_output.splitlines():
        status = _STATUS.match(line)
        if status:
            source = _SOURCE.search(status.group(1))
            current = sections.setdefault(source.group(1), []) if source else None
            if current is not None:
                current.clear()
        elif current is not None:
            current.append(line)
    return {source: "\n".join(lines) + "\n" for source, lines in sections.items()}


def parse(report: str) -> list[KernelResources]:
    """The kernels of one or more ptxas reports, in the order ptxas compiled them."""
    kernels: dict[tuple[str, str], KernelResources] = {}
    arch, current = None, None
    for line in report.splitlines():
        if entry := _ENTRY.search(line):
            name, arch = entry.groups()
            current = kernels.setdefault((name, arch), KernelResources(name, arch))
        elif (props := _PROPERTIES.search(line)) and arch is not None:
            # A device function ptxas did not inline has properties (its own spills) but no entry line.
            name = props.group(1)
            current = kernels.setdefault((name, arch), KernelResources(name, arch))
        elif current is not None and (frame := _FRAME.search(line)):
            current.stack, current.spill_stores, current.spill_loads = map(int, frame.groups())
        elif current is not None and (used := _USED.search(line)):
            current.registers = int(used.group(1))
            if smem := _SMEM.search(line):
                current.static_smem = int(smem.group(1))
    return list(kernels.values())


def violations(kernels: Iterable[KernelResources]) -> list[str]:
    """One sentence per kernel that spills or exceeds its target's limits."""
    problems = []
    for k in kernels:
        limits = LIMITS.get(k.arch)
        if limits is None:
            problems.append(f"{k.kernel} ({k.arch}): no limits known for {k.arch}")
            continue
        if k.spill_stores or k.spill_loads:
            problems.append(
                f"{demangle(k.kernel)} ({k.arch}): spills {k.spill_stores} bytes stored, {k.spill_loads} loaded"
            )
        for field, limit in limits.items():
            if getattr(k, field) > limit:
                problems.append(f"{demangle(k.kernel)} ({k.arch}): {field} {getattr(k, field)} > {limit}")
    return problems


def as_records(kernels: Iterable[KernelResources]) -> list[dict]:
    return [asdict(k) for k in kernels]


def from_records(records: Iterable[dict]) -> list[KernelResources]:
    return [KernelResources(**r) for r in records]


@functools.cache
def demangle(name: str) -> str:
    """The kernel's C++ name without namespaces' noise or parameter list (c++filt where installed)."""
    tool = shutil.which("c++filt")
    if tool is None:
        return name
    text = subprocess.run([tool, name], capture_output=True, text=True, check=False).stdout.strip() or name
    # "void stt::(anonymous namespace)::kernel<float, float>(float const*, ...)" -> "stt::kernel<float, float>"
    text = text.removeprefix("void ").replace("(anonymous namespace)::", "")
    depth = 0
    for i, ch in enumerate(text):
        depth += (ch == "<") - (ch == ">")
        if ch == "(" and depth == 0:
            return text[:i]
    return text


def markdown_table(by_source: dict[str, list[KernelResources]]) -> str:
    """Kernels as rows, targets as column groups: registers, static shared memory, stack, spills."""
    archs = sorted({k.arch for kernels in by_source.values() for k in kernels})
    fields = ("regs", "smem B", "stack B", "spills B")
    header = ["source", "kernel"] + [f"{a} {field}" for a in archs for field in fields]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---", "---"] + ["---:"] * 4 * len(archs)) + " |"]
    for source in sorted(by_source):
        rows: dict[str, dict[str, KernelResources]] = {}
        for k in by_source[source]:
            rows.setdefault(k.kernel, {})[k.arch] = k
        for kernel, per_arch in rows.items():
            cells = [f"`{source.rsplit('/', 1)[-1]}`", f"`{demangle(kernel)}`"]
            for a in archs:
                k = per_arch.get(a)
                cells += (
                    ["-"] * 4
                    if k is None
                    else [str(k.registers), str(k.static_smem), str(k.stack), str(k.spill_stores + k.spill_loads)]
                )
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
