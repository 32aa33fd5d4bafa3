"""``benchmarks/RESULTS.md``: the latest report per device, one section each.

A run replaces its device's section (between ``<!-- results: DEVICE -->`` markers) and keeps
the others and any text outside the markers.
"""

from __future__ import annotations

import re
from pathlib import Path

from .files import write_atomic

_TITLE = ("# Benchmark results\n\nLatest figures per device, written by `python -m stt_kernels.bench "
          "--results-md benchmarks/RESULTS.md` (see `benchmarks/README.md`).\n")


def _section(device: str, report: str) -> str:
    # The report's own headings move one level down, under the device's.
    body = re.sub(r"^(#+) ", r"#\1 ", report.strip(), flags=re.MULTILINE)
    body = body.replace("## stt-kernels benchmark", f"## {device}", 1)
    return f"<!-- results: {device} -->\n{body}\n<!-- end results: {device} -->"


def update_results_md(path: Path, device: str, report: str) -> Path:
    """Put ``report`` (a ``report.md``) into ``path`` as the section of ``device``."""
    path = Path(path)
    text = path.read_text() if path.exists() else _TITLE
    section = _section(device, report)
    pattern = re.compile(rf"<!-- results: {re.escape(device)} -->.*?<!-- end results: {re.escape(device)} -->",
                         re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    return write_atomic(path, text)
