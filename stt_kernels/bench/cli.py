"""Command line of the benchmark: ``python -m stt_kernels.bench``; ``stt bench`` reuses
:func:`add_arguments` and :func:`options_from_args`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from .cases import CASES, PASSES
from .options import OUR_BACKENDS, Options
from .results import read_results
from .runner import run


class NothingMeasured(RuntimeError):
    """A run finished without timing a single row: every one was skipped, OOM or an error."""


def run_measuring(options: Options) -> Path:
    """:func:`run`, then :class:`NothingMeasured` (naming the first reasons) if no row was
    timed; the files are written either way. Returns the path of ``results.json``."""
    path = run(options)
    rows = read_results(path)["rows"]
    if not any(row.status == "ok" for row in rows):
        reasons = list(dict.fromkeys(f"{row.implementation}: {row.reason or row.status}" for row in rows))
        why = "; ".join(reasons[:3]) + (f"; and {len(reasons) - 3} more" if len(reasons) > 3 else "")
        raise NothingMeasured(f"nothing was measured: {len(rows)} rows, none timed"
                              + (f" ({why})" if why else " (no implementation matched the filters)")
                              + f"; see {path.parent / 'report.md'}")
    return path


def _list(text: str) -> list[str]:
    return [item for item in text.replace(",", " ").split() if item]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    tier = parser.add_mutually_exclusive_group()
    tier.add_argument("--quick", dest="tier", action="store_const", const="quick",
                      help="tiny shapes: checks the whole engine in minutes on a CPU")
    tier.add_argument("--full", dest="tier", action="store_const", const="full",
                      help="the paper's 32x320x320 patch at every STT-UNET level (for GPUs)")
    parser.set_defaults(tier="default")
    parser.add_argument("--out", type=Path, required=True, help="directory for results.json, report.md, plots")
    parser.add_argument("--ops", nargs="+", type=str, choices=list(CASES), help="cases to run (default: all)")
    parser.add_argument("--backends", nargs="+", choices=OUR_BACKENDS,
                        help="which of our backends (and the reference) to run (default: all available)")
    parser.add_argument("--peers", nargs="*", help="peers to run, by name or prefix (sdpa, sdpa:flash, "
                        "torchvision, flash-attn, xformers, natten); give none for no peers (default: all)")
    parser.add_argument("--dtypes", nargs="+", help="default: float32 on CPU; float32 float16 bfloat16 on GPU")
    parser.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES))
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if visible)")
    parser.add_argument("--repeats", type=int, help="timed calls per row at most")
    parser.add_argument("--warmup", type=int, help="untimed calls per row first")
    parser.add_argument("--memory-cap-mb", type=float,
                        help="working memory per case beyond which it counts as OOM")
    parser.add_argument("--no-memory-subprocess", dest="cpu_memory", action="store_false",
                        help="CPU: skip the per-case subprocess (no peak memory, no OOM guard)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--no-plots", dest="plots", action="store_false")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run's results in --out")
    parser.add_argument("--results-md", type=Path, help="also update this device's section of this file "
                        "(benchmarks/RESULTS.md)")


def options_from_args(args: argparse.Namespace, command: Optional[list[str]] = None) -> Options:
    return Options(
        out=args.out, tier=args.tier, ops=args.ops, backends=args.backends, peers=args.peers,
        dtypes=args.dtypes, passes=args.passes, device=args.device, warmup=args.warmup, repeats=args.repeats,
        memory_cap_bytes=None if args.memory_cap_mb is None else int(args.memory_cap_mb * 2 ** 20),
        cpu_memory=args.cpu_memory, threads=args.threads, plots=args.plots, results_md=args.results_md, command=command,
        overwrite=args.overwrite)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stt_kernels.bench", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    try:
        options = options_from_args(args, [sys.executable, "-m", "stt_kernels.bench", *argv_list])
    except ValueError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    try:
        path = run_measuring(options)
    except NothingMeasured as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0
