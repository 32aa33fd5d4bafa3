"""Command line of the benchmark, ``python -m stt_kernels.bench``; ``stt bench`` reuses
:func:`add_arguments` and :func:`options_from_args`, with ``stt_model``'s suites registered."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Optional, Sequence

from .cases import PASSES, SUITES
from .engine import OUR_BACKENDS, NothingMeasured, Options, run_measuring


def mib(text: str) -> int:
    """Bytes of a number of MiB (argparse names the type, ``invalid mib value``, when it is none)."""
    return int(float(text) * 2**20)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options, each stored under the name of its :class:`Options` field."""
    tier = parser.add_mutually_exclusive_group()
    tier.add_argument("--quick", dest="tier", action="store_const", const="quick", help="small shapes, short timing")
    tier.add_argument("--full", dest="tier", action="store_const", const="full", help="the paper's sizes (GPUs)")
    parser.set_defaults(tier="default")
    add = parser.add_argument
    add("--out", type=Path, required=True, help="folder for results.json and report.md")
    suites = f"what to run (default: levels): {', '.join(SUITES)}; stt bench adds train-step, predict-volume"
    add("--suite", dest="suites", metavar="SUITE", nargs="+", default=["levels"], help=suites)
    add("--ops", nargs="+", help="only these cases of the suites (default: all)")
    add("--backends", nargs="+", choices=OUR_BACKENDS, help="which of ours, and the reference (default: all)")
    peers = "sdpa, sdpa:flash, flex_attention, torchvision, stock"
    add("--peers", nargs="*", help=f"peers by name or prefix: {peers}; the flag alone for none (default: all)")
    add("--dtypes", nargs="+", help="default: float32 on a CPU; float32 float16 bfloat16 on a GPU")
    add("--passes", nargs="+", choices=PASSES, default=list(PASSES))
    add("--device", help="cpu, cuda, cuda:1 ... (default: cuda if visible)")
    add("--repeats", type=int, help="timing samples per row at least")
    add("--warmup", type=int, help="untimed calls per row first")
    cap = "MiB of working memory per row beyond which it counts as OOM"
    add("--memory-cap-mb", dest="memory_cap_bytes", metavar="MIB", type=mib, help=cap)
    no_probe = "CPU: no fresh process per row (no peak memory, no OOM guard)"
    add("--no-memory-subprocess", dest="cpu_memory", action="store_false", help=no_probe)
    add("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    add("--overwrite", action="store_true", help="replace an earlier run's results in --out")
    add("--results-md", type=Path, help="also replace this device's section of this file (benchmarks/RESULTS.md)")


def options_from_args(args: argparse.Namespace, command: Optional[list[str]] = None) -> Options:
    """The :class:`Options` of parsed arguments; ``ValueError`` naming the option if one is bad."""
    names = {f.name for f in dataclasses.fields(Options)} - {"command", "progress"}
    return Options(**{name: value for name, value in vars(args).items() if name in names}, command=command)


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
