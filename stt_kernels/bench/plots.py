"""PNG plots per op: time and peak memory against tokens, and speedup bars.

matplotlib is optional (``pip install stt-kernels[bench]``); without it :func:`write_plots`
returns a note saying so and the rest of the run is unaffected.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable, Optional

from .files import write_atomic_with
from .results import Row


def _plain_numbers(axis) -> None:
    # Log axes default to 6x10^1-style labels; plain numbers read faster. Minor ticks are
    # labelled at 2x and 5x a power of ten only, so short ranges still get a few labels.
    from matplotlib.ticker import FuncFormatter

    def minor(value: float, _: int) -> str:
        return f"{value:g}" if f"{value:.0e}"[0] in "25" else ""

    for which in (axis.xaxis, axis.yaxis):
        which.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        which.set_minor_formatter(FuncFormatter(minor))


def _lines(axis, rows: list[Row], value: Callable[[Row], Optional[float]], ylabel: str) -> None:
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in rows:
        y = value(r) if r.status == "ok" else None
        if y:
            series.setdefault((r.implementation, r.dtype), []).append((r.tokens, y))
    for (implementation, dtype), points in sorted(series.items()):
        points.sort()
        axis.plot(*zip(*points), marker="o", label=f"{implementation} {dtype}")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("tokens (B*T*H*W)")
    axis.set_ylabel(ylabel)
    axis.grid(True, which="both", alpha=0.3)
    _plain_numbers(axis)
    if series:
        axis.legend(fontsize=6)


def _against_tokens(plt, op: str, rows: list[Row], passes: list[str], value: Callable[[Row], Optional[float]],
                    ylabel: str, path: Path) -> Path:
    figure, axes = plt.subplots(1, len(passes), figsize=(6 * len(passes), 4.5), squeeze=False)
    for axis, pass_ in zip(axes[0], passes):
        _lines(axis, [r for r in rows if r.pass_ == pass_], value, ylabel)
        axis.set_title(f"{op}, {pass_}")
    figure.tight_layout()
    write_atomic_with(path, lambda tmp: figure.savefig(tmp, dpi=110, format="png"))
    plt.close(figure)
    return path


def _speedup_bars(plt, op: str, rows: list[Row], path: Path) -> Optional[Path]:
    timed = [r for r in rows if r.status == "ok" and r.kind != "reference" and r.speedup_vs_reference]
    if not timed:
        return None
    groups = list(dict.fromkeys((r.shape, r.dtype, r.pass_) for r in timed))
    names = list(dict.fromkeys(r.implementation for r in timed))
    width = 0.8 / len(names)
    figure, axis = plt.subplots(figsize=(max(6.0, 0.9 * len(groups) * max(1, len(names)) ** 0.5 + 2), 4.5))
    for i, name in enumerate(names):
        heights = [next((r.speedup_vs_reference for r in timed if r.implementation == name
                         and (r.shape, r.dtype, r.pass_) == g), 0.0) for g in groups]
        axis.bar([j + i * width for j in range(len(groups))], heights, width, label=name)
    axis.axhline(1.0, color="black", linewidth=0.8)
    axis.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    axis.set_xticklabels(["\n".join(g) for g in groups], fontsize=6)
    axis.set_yscale("log")
    _plain_numbers(axis)
    axis.set_ylabel("speedup vs reference (x)")
    axis.set_title(f"{op}: speedup over the reference")
    axis.legend(fontsize=6)
    figure.tight_layout()
    write_atomic_with(path, lambda tmp: figure.savefig(tmp, dpi=110, format="png"))
    plt.close(figure)
    return path


def write_plots(out: Path, rows: list[Row]) -> tuple[list[Path], Optional[str]]:
    """Write the plots into ``out``; returns (files, a note when plots were skipped)."""
    if importlib.util.find_spec("matplotlib") is None:
        return [], "Plots skipped: matplotlib is not installed (`pip install matplotlib`)."
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    for op in dict.fromkeys(r.op for r in rows):
        mine = [r for r in rows if r.op == op]
        passes = list(dict.fromkeys(r.pass_ for r in mine))
        written.append(_against_tokens(plt, op, mine, passes, lambda r: r.time_median_s and r.time_median_s * 1e3,
                                       "median time (ms)", out / f"{op}_time.png"))
        written.append(_against_tokens(plt, op, mine, passes,
                                       lambda r: r.peak_memory_bytes and r.peak_memory_bytes / 2 ** 20,
                                       "peak memory (MiB)", out / f"{op}_memory.png"))
        if (bars := _speedup_bars(plt, op, mine, out / f"{op}_speedup.png")) is not None:
            written.append(bars)
    return written, None
