"""Command line of the benchmark, ``python -m stt_kernels.bench``; ``stt bench`` reuses
:func:`add_arguments` and :func:`options_from_args`, with ``stt_model``'s suites registered."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from .cases import PASSES, SUITES
from .engine import OUR_BACKENDS, NothingMeasured, Options, run_measuring

_ARGUMENTS = [  # (flags, argparse settings)
    ("--out", dict(type=Path, required=True, help="folder for results.json and report.md")),
    (
        "--suite",
        dict(
            dest="suites",
            nargs="+",
            default=["levels"],
            help=f"what to run (default: levels): {', '.join(SUITES)}; stt bench adds train-step",
        ),
    ),
    ("--ops", dict(nargs="+", help="only these cases of the suites (default: all)")),
    ("--backends", dict(nargs="+", choices=OUR_BACKENDS, help="which of ours, and the reference (default: all)")),
    (
        "--peers",
        dict(
            nargs="*",
            help="peers by name or prefix: sdpa, sdpa:flash, flex_attention, torchvision; "
            "the flag alone for none (default: all)",
        ),
    ),
    ("--dtypes", dict(nargs="+", help="default: float32 on a CPU; float32 float16 bfloat16 on a GPU")),
    ("--passes", dict(nargs="+", choices=PASSES, default=list(PASSES))),
    ("--device", dict(help="cpu, cuda, cuda:1 ... (default: cuda if visible)")),
    ("--repeats", dict(type=int, help="timing samples per row at least")),
    ("--warmup", dict(type=int, help="untimed calls per row first")),
    ("--memory-cap-mb", dict(type=float, help="working memory per row beyond which it counts as OOM")),
    (
        "--no-memory-subprocess",
        dict(
            dest="cpu_memory", action="store_false", help="CPU: no fresh process per row (no peak memory, no OOM guard)"
        ),
    ),
    ("--threads", dict(type=int, help="CPU threads for torch (default: torch's choice)")),
    ("--overwrite", dict(action="store_true", help="replace an earlier run's results in --out")),
    ("--results-md", dict(type=Path, help="also replace this device's section of this file (benchmarks/RESULTS.md)")),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    tier = parser.add_mutually_exclusive_group()
    tier.add_argument("--quick", dest="tier", action="store_const", const="quick", help="small shapes, short timing")
    tier.add_argument("--full", dest="tier", action="store_const", const="full", help="the paper's sizes (GPUs)")
    parser.set_defaults(tier="default")
    for flag, settings in _ARGUMENTS:
        parser.add_argument(flag, **settings)


def options_from_args(args: argparse.Namespace, command: Optional[list[str]] = None) -> Options:
    """The :class:`Options` of parsed arguments; ``ValueError`` naming the option if one is bad."""
    memory_cap = None if args.memory_cap_mb is None else int(args.memory_cap_mb * 2**20)
    names = "tier suites ops backends peers dtypes passes device warmup repeats cpu_memory threads results_md"
    names += " overwrite out"
    return Options(
        **{name: getattr(args, name) for name in names.split()}, memory_cap_bytes=memory_cap, command=command
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit status 0, 1 when no row was timed, 2 for a bad option (one line on stderr)."""
    parser = argparse.ArgumentParser(prog="python -m stt_kernels.bench", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    command = [sys.executable, "-m", "stt_kernels.bench", *(sys.argv[1:] if argv is None else argv)]
    try:
        options = options_from_args(args, command)
    except ValueError as exc:  # a bad option; a ValueError from the run itself is a bug and keeps its traceback
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    try:
        print(run_measuring(options))
    except NothingMeasured as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    return 0
