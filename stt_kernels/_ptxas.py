"""What ``ptxas -v`` says about each CUDA kernel: registers, static shared memory, stack, spills.

``setup.py`` compiles the CUDA sources with ``--resource-usage`` (``-Xptxas -v``), keeps each
source's ptxas report under ``build/`` (ninja rebuilds only what changed, so a report lives as
long as its object) and records the parsed figures in ``_build_info.json`` as
``cuda_resources``. ``tests/test_cuda_resources.py`` fails on a spill or a figure over the
target's limits. Stdlib only at import: ``setup.py`` loads this file by path while the package is
being built. As a command it prints the table of ``benchmarks/RESULTS.md``:

    python -m stt_kernels._ptxas                      # the figures of the last build
    python -m stt_kernels._ptxas build.log            # a saved build log (make gpu-check's)
    python -m stt_kernels._ptxas --results-md benchmarks/RESULTS.md   # replace its section

A build log is the output of ``setup.py build_ext`` with the CUDA kernels. Exits 1 when a kernel
spills or exceeds its target's limits (:data:`LIMITS`).
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path
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


HEADING = "## CUDA kernels: registers, shared memory, spills (ptxas, no GPU needed)"
_MARK = "<!-- results: cuda-resources -->"
_PACKAGE = Path(__file__).resolve().parent


def figures(log: Optional[Path]) -> dict[str, list[KernelResources]]:
    """The kernels by source file: of a build log, or of the last build's ``_build_info.json``."""
    if log is not None:
        by_source = split_by_source(log.read_text(errors="replace"))
        return {source.rsplit("/", 1)[-1]: parse(text) for source, text in by_source.items()}
    resources = json.loads((_PACKAGE / "_build_info.json").read_text()).get("cuda_resources")
    if not resources:
        sys.exit(
            "stt_kernels/_build_info.json has no cuda_resources: build with the CUDA kernels "
            "(STT_BUILD_CUDA=1 python setup.py build_ext --inplace)"
        )
    if missing := [source for source, records in resources.items() if records is None]:
        sys.exit(f"no ptxas report for {', '.join(missing)}: rebuild them (rm -r build/temp-cuda-*)")
    return {source: from_records(records) for source, records in resources.items()}


def _provenance() -> str:
    """The toolkit and commit the figures come from."""

    def run(*command: str) -> str:
        try:
            return subprocess.run(command, cwd=_PACKAGE.parent, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    nvcc = run("nvcc", "--version").splitlines()
    commit = run("git", "rev-parse", "--short=12", "HEAD")
    return f"nvcc: {nvcc[-1] if nvcc else 'unknown'}; commit: `{commit or 'unknown'}`"


def section(by_source: dict[str, list[KernelResources]]) -> str:
    """The table's section of ``benchmarks/RESULTS.md``, with its heading, provenance and command."""
    archs = ", ".join(sorted({k.arch for kernels in by_source.values() for k in kernels}))
    prose = textwrap.fill(
        f"From `-Xptxas -v` (`--resource-usage`) of the build for {archs}, recorded by `setup.py` in "
        "`stt_kernels/_build_info.json` and checked by `tests/test_cuda_resources.py` (no spills, at most "
        "255 registers, static shared memory within 48 KB). The attention kernels' tiles are dynamic "
        "shared memory, sized at launch to the device (`choose_tiling` in `csrc/cuda/attention_kernel.cu`), "
        "so ptxas reports none. Spills are bytes stored plus bytes loaded.",
        100,
    )
    command = "`python -m stt_kernels._ptxas --results-md benchmarks/RESULTS.md`"
    command += " (after `STT_BUILD_CUDA=1 python setup.py build_ext --inplace`)"
    return f"{_MARK}\n{HEADING}\n\n{prose}\n\n- {_provenance()}\n- Command: {command}\n\n" + markdown_table(by_source)


def replace_section(results: Path, text: str) -> None:
    """Replaces this table's section of ``results`` (up to the next ``<!-- results:`` mark or
    the end), or appends it; written atomically."""
    from stt_kernels.atomic_file import atomic_write_text  # the package, not needed by setup.py

    old = results.read_text() if results.exists() else ""
    if _MARK in old:
        before, _, after = old.partition(_MARK)
        rest = after.find("<!-- results:")
        new = before + text + ("\n" + after[rest:] if rest >= 0 else "")
    else:
        new = old.rstrip("\n") + "\n\n" + text
    atomic_write_text(results, new)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stt_kernels._ptxas", description=__doc__.split("\n\n")[0])
    parser.add_argument("log", nargs="?", type=Path, help="a build log (default: the last build's record)")
    parser.add_argument("--results-md", type=Path, help="replace the table's section of this file")
    args = parser.parse_args(argv)
    by_source = figures(args.log)
    text = section(by_source)
    if args.results_md:
        replace_section(args.results_md, text)
    print(text)
    problems = violations(k for kernels in by_source.values() for k in kernels)
    for problem in problems:
        print(f"over the limits: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
