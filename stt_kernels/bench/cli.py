"""Command line of the benchmark: ``python -m stt_kernels.bench``; ``stt bench`` reuses
:func:`add_arguments` and :func:`options_from_args` (and registers ``stt_model``'s suites first)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from .cases import PASSES, SUITES
from .engine import OUR_BACKENDS, NothingMeasured, Options, run_measuring


def add_arguments(parser: argparse.ArgumentParser) -> None:
    tier = parser.add_mutually_exclusive_group()
    tier.add_argument("--quick", dest="tier", action="store_const", const="quick",
                      help="tiny shapes and short timing: the whole engine in minutes on a CPU")
    tier.add_argument("--full", dest="tier", action="store_const", const="full",
                      help="the paper's 2 x 32 x 320 x 320 batch at every STT-UNET level (for GPUs)")
    parser.set_defaults(tier="default")
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json and report.md")
    parser.add_argument("--suite", dest="suites", nargs="+", default=["levels"],
                        help=f"what to run (default: levels): {', '.join(SUITES)}; stt bench adds train-step")
    parser.add_argument("--ops", nargs="+", help="only these cases of the suites (default: all)")
    parser.add_argument("--backends", nargs="+", choices=OUR_BACKENDS,
                        help="which of our backends (and the reference) to run (default: all available)")
    parser.add_argument("--peers", nargs="*", help="peers by name or prefix (sdpa, sdpa:flash, flex_attention, "
                        "torchvision, flash-attn, xformers); none after the flag for no peers (default: all)")
    parser.add_argument("--dtypes", nargs="+", help="default: float32 on a CPU; float32 float16 bfloat16 on a GPU")
    parser.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES))
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if visible)")
    parser.add_argument("--repeats", type=int, help="timing samples per row at least")
    parser.add_argument("--warmup", type=int, help="untimed calls per row first")
    parser.add_argument("--memory-cap-mb", type=float, help="working memory per row beyond which it counts as OOM")
    parser.add_argument("--no-memory-subprocess", dest="cpu_memory", action="store_false",
                        help="CPU: skip the fresh process per row (no peak memory, no OOM guard)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run's results in --out")
    parser.add_argument("--results-md", type=Path, help="also replace this device's section of this file "
                        "(benchmarks/RESULTS.md)")


def options_from_args(args: argparse.Namespace, command: Optional[list[str]] = None) -> Options:
    """The :class:`Options` of parsed arguments; ``ValueError`` naming the option if one is bad."""
    return Options(
        out=args.out, tier=args.tier, suites=args.suites, ops=args.ops, backends=args.backends, peers=args.peers,
        dtypes=args.dtypes, passes=args.passes, device=args.device, warmup=args.warmup, repeats=args.repeats,
        memory_cap_bytes=None if args.memory_cap_mb is None else int(args.memory_cap_mb * 2 ** 20),
        cpu_memory=args.cpu_memory, threads=args.threads, results_md=args.results_md, command=command,
        overwrite=args.overwrite)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit status 0, 1 when no row was timed, 2 for a bad option (one line on stderr)."""
    parser = argparse.ArgumentParser(prog="python -m stt_kernels.bench", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        options = options_from_args(args, [sys.executable, "-m", "stt_kernels.bench",
                                           *(sys.argv[1:] if argv is None else argv)])
        path = run_measuring(options)
    except ValueError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except NothingMeasured as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0
