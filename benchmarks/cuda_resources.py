"""The CUDA kernels' resource table (registers, static shared memory, stack, spills per target)
from what ``ptxas -v`` printed during the build, as markdown for ``benchmarks/RESULTS.md``.

    python benchmarks/cuda_resources.py                      # the figures of the last build
    python benchmarks/cuda_resources.py build.log            # a saved build log (make gpu-check's)
    python benchmarks/cuda_resources.py --results-md benchmarks/RESULTS.md   # replace its section

The last build's figures are ``cuda_resources`` in ``stt_kernels/_build_info.json`` (setup.py
records them); a build log is the output of ``setup.py build_ext`` with the CUDA kernels.
Exits 1 when a kernel spills or exceeds its target's limits (``stt_kernels._ptxas.LIMITS``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stt_kernels import _ptxas  # noqa: E402
from stt_kernels.atomic_file import atomic_write_text  # noqa: E402

HEADING = "## CUDA kernels: registers, shared memory, spills (ptxas, no GPU needed)"
_MARK = "<!-- results: cuda-resources -->"


def figures(log: Optional[Path]) -> dict[str, list[_ptxas.KernelResources]]:
    if log is not None:
        return {
            source.rsplit("/", 1)[-1]: _ptxas.parse(text)
            for source, text in _ptxas.split_by_source(log.read_text(errors="replace")).items()
        }
    record = json.loads((ROOT / "stt_kernels" / "_build_info.json").read_text())
    resources = record.get("cuda_resources")
    if not resources:
        sys.exit(
            "stt_kernels/_build_info.json has no cuda_resources: build with the CUDA kernels "
            "(STT_BUILD_CUDA=1 python setup.py build_ext --inplace)"
        )
    missing = [source for source, records in resources.items() if records is None]
    if missing:
        sys.exit(f"no ptxas report for {', '.join(missing)}: rebuild them (rm -r build/temp-cuda-*)")
    return {source: _ptxas.from_records(records) for source, records in resources.items()}


def _provenance() -> str:
    """The toolkit and commit the figures come from."""

    def run(*command: str) -> str:
        try:
            return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
        except OSError:
            return ""

    nvcc = run("nvcc", "--version").splitlines()
    commit = run("git", "rev-parse", "--short=12", "HEAD")
    return f"nvcc: {nvcc[-1] if nvcc else 'unknown'}; commit: `{commit or 'unknown'}`"


def section(by_source: dict[str, list[_ptxas.KernelResources]], archs: str) -> str:
    prose = textwrap.fill(
        f"From `-Xptxas -v` (`--resource-usage`) of the build for {archs}, recorded by `setup.py` in "
        "`stt_kernels/_build_info.json` and checked by `tests/test_cuda_resources.py` (no spills, at most "
        "255 registers, static shared memory within 48 KB). The attention kernels' tiles are dynamic "
        "shared memory, sized at launch to the device (`choose_tiling` in `csrc/cuda/attention_kernel.cu`), "
        "so ptxas reports none. Spills are bytes stored plus bytes loaded.",
        100,
    )
    return (
        f"{_MARK}\n{HEADING}\n\n{prose}\n\n- {_provenance()}\n"
        "- Command: `python benchmarks/cuda_resources.py --results-md benchmarks/RESULTS.md` "
        "(after `STT_BUILD_CUDA=1 python setup.py build_ext --inplace`)\n\n" + _ptxas.markdown_table(by_source)
    )


def replace_section(results: Path, text: str) -> None:
    """Replaces this table's section of ``results`` (up to the next ``<!-- results:`` mark or
    the end), or appends it."""
    old = results.read_text() if results.exists() else ""
    if _MARK in old:
        before, _, after = old.partition(_MARK)
        rest = after.find("<!-- results:")
        new = before + text + ("\n" + after[rest:] if rest >= 0 else "")
    else:
        new = old.rstrip("\n") + "\n\n" + text
    atomic_write_text(results, new)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log", nargs="?", type=Path, help="a build log (default: the last build's record)")
    parser.add_argument("--results-md", type=Path, help="replace the table's section of this file")
    args = parser.parse_args(argv)
    by_source = figures(args.log)
    archs = ", ".join(sorted({k.arch for kernels in by_source.values() for k in kernels}))
    text = section(by_source, archs)
    if args.results_md:
        replace_section(args.results_md, text)
    print(text)
    problems = _ptxas.violations(k for kernels in by_source.values() for k in kernels)
    for problem in problems:
        print(f"over the limits: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
