"""``make gpu-check``: everything a first GPU session must prove, in one call under 9 minutes.

Run on the GPU machine with its own ``python3`` and torch, from the repository root:

    OUT=/path/to/evidence python3 benchmarks/gpu_check.py          # or: make gpu-check OUT=...
    python3 benchmarks/gpu_check.py --dry                           # what CI runs: every GPU step skips

Each step runs in its own process under its own deadline, so one hang or crash costs only that
step; the evidence goes to ``$OUT`` (each file capped at 16 MB):

    build.log       the CUDA build with ``-Xptxas -v`` (registers, shared memory, spills)
    report.txt      ``python -m stt_kernels``
    gpu_tests.txt   the kernel tests of the GPU backends (``-k "cuda or triton"``; trimmed
                    autotuning, ``STT_TRITON_QUICK_TUNE=1``): values, gradients, dtypes, TF32,
                    bitwise-repeatable backwards, the CUDA backward above 48 KB of shared memory
    sanitizer.txt   ``compute-sanitizer`` memcheck and racecheck on tiny calls of every kernel
    bench/          ``stt_kernels.bench`` (results.json, report.md), bfloat16: spatial, temporal,
                    deformable and the SST block at the issues' shapes forward, and temporal
                    attention at the paper's scale (2 x 32 x 320 x 320, 4 heads) forward+backward,
                    against SDPA (flash, efficient), FlexAttention, torchvision and the stock block;
                    ``triton.testing.do_bench`` (CUDA events, L2 flushed), peak memory, OOM rows
    bench.log       what the bench step printed
    summary.txt     one line per step: ok / failed / timed out / skipped, with the reason
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
MAX_FILE_BYTES = 16 * 2**20
TOTAL_SECONDS = 540
KERNEL_TESTS = ["test_attention.py", "test_attention_triton.py", "test_deform_conv2d.py"]
KERNEL_TESTS += ["test_deform_conv2d_triton.py", "test_deterministic.py", "test_sst_attention.py"]


def _gpu_reason() -> Optional[str]:
    """Why the GPU steps cannot run here, or None when they can."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    return None if torch.cuda.is_available() else "no GPU is visible (torch.cuda.is_available() is False)"


def _run(command: list[str], log: Path, deadline: float, env: Optional[dict[str, str]] = None) -> str:
    """Run ``command`` with output appended to ``log`` (cut to its head and tail past the cap);
    returns a one-word verdict.

    The checkout is put first on ``PYTHONPATH``: the GPU machine's python3 has the package built
    in place (``build_ext --inplace``), never installed, and a script's own folder is what Python
    puts on ``sys.path``."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    with log.open("ab") as handle:
        handle.write(f"$ {' '.join(command)}\n".encode())
        handle.flush()
        try:
            env = {**os.environ, "PYTHONPATH": path, **(env or {})}
            code = subprocess.run(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, timeout=deadline, env=env)
        except subprocess.TimeoutExpired:
            return f"timed out after {deadline:.0f} s"
    if log.stat().st_size > MAX_FILE_BYTES:
        data = log.read_bytes()
        log.write_bytes(data[: MAX_FILE_BYTES // 2] + b"\n[... cut ...]\n" + data[-MAX_FILE_BYTES // 2 + 64 :])
    return "ok" if code.returncode == 0 else f"failed (exit {code.returncode})"


Step = tuple[str, float, list[str], str, dict[str, str]]  # name, deadline (s), command, log file, environment


def _steps(out: Path, python: str) -> list[Step]:
    me = [python, str(Path(__file__).resolve())]
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0")
    build_env = dict(STT_BUILD_CUDA="1", TORCH_CUDA_ARCH_LIST=arch, NVCC_APPEND_FLAGS="-Xptxas -v")
    build_env["MAX_JOBS"] = str(os.cpu_count() or 4)
    tests = [python, "-m", "pytest", *(f"tests/{name}" for name in KERNEL_TESTS), "-k", "cuda or triton"]
    quick_tune = {"STT_TRITON_QUICK_TUNE": "1"}
    sanitize = ["compute-sanitizer", "--error-exitcode", "3", "--tool"]
    return [
        ("build", 200, [python, "setup.py", "build_ext", "--inplace"], "build.log", build_env),
        ("report", 20, [python, "-m", "stt_kernels"], "report.txt", {}),
        ("gpu tests", 150, [*tests, "-q", "-x", "-p", "no:cacheprovider"], "gpu_tests.txt", quick_tune),
        ("memcheck", 30, [*sanitize, "memcheck", *me, "tiny"], "sanitizer.txt", {}),
        ("racecheck", 30, [*sanitize, "racecheck", *me, "tiny"], "sanitizer.txt", {}),
        ("bench", 110, [*me, "bench", str(out / "bench")], "bench.log", {}),
    ]


def orchestrate(out: Path, dry: bool) -> int:
    out.mkdir(parents=True, exist_ok=True)
    reason, started, lines = "dry run" if dry else _gpu_reason(), time.monotonic(), []
    for name, deadline, command, log, env in _steps(out, sys.executable):
        left = TOTAL_SECONDS - (time.monotonic() - started)
        if reason is not None:
            verdict = f"skipped: {reason}"
        elif shutil.which(command[0]) is None:
            verdict = f"skipped: {command[0]} is not on PATH"
        elif left < deadline:
            verdict = f"skipped: {left:.0f} s left of the {TOTAL_SECONDS} s budget, the step needs {deadline:.0f} s"
        else:
            verdict = _run(command, out / log, deadline, env)
        lines.append(f"{name:<10} {verdict}")
        print(lines[-1], flush=True)
    with (out / "summary.txt").open("a") as handle:
        handle.write("\n".join(lines) + f"\ntotal {time.monotonic() - started:.0f} s\n")
    return 1 if any("failed" in line or "timed out" in line for line in lines) else 0


# -- the steps that run inside this file ------------------------------------------------------


def tiny() -> int:
    """Tiny calls of every GPU kernel, forward and backward, for compute-sanitizer."""
    import torch

    import stt_kernels

    for backend in ("cuda", "triton"):
        for op in (stt_kernels.spatial_attention, stt_kernels.temporal_attention):
            qkv = torch.randn(1, 3, 5, 7, 3, 2, 9, device="cuda", requires_grad=True)
            op(*qkv.unbind(4), backend=backend).sum().backward()
        shapes = ((1, 4, 9, 11), (1, 18, 9, 11), (1, 9, 9, 11), (4, 4, 3, 3))
        x, offset, mask, weight = (torch.rand(*s, device="cuda", requires_grad=True) for s in shapes)
        stt_kernels.deform_conv2d(x, offset, mask, weight, backend=backend).sum().backward()
    torch.cuda.synchronize()
    return 0


def suite(tier: str) -> list:
    """The bench step's rows: the issues' shapes forward, and temporal attention at the paper's
    scale (the first level of ``--full``, 2 x 32 x 320 x 320) forward+backward."""
    from stt_kernels.bench.cases import SUITES, levels

    issue = [(op, shape, ("forward",)) for op, shape, _ in SUITES["issue-shapes"](tier)]
    return [*issue, ("temporal_attention", levels("full")[0], ("forward+backward",))]


def bench(out: Path) -> int:
    """The benchmark engine on :func:`suite` in bfloat16, against SDPA (flash, efficient),
    FlexAttention, torchvision and the stock block: ``out/results.json`` and ``out/report.md``."""
    from stt_kernels.bench import Options, register_suite, run_measuring

    register_suite("gpu-check", suite)
    peers = ["sdpa:flash", "sdpa:efficient", "flex_attention", "torchvision", "stock"]
    settings = dict(tier="quick", suites=["gpu-check"], dtypes=["bfloat16"], peers=peers, device="cuda")
    run_measuring(Options(out=out, overwrite=True, **settings))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", nargs="?", choices=("all", "bench", "tiny"), default="all")
    parser.add_argument("path", nargs="?", type=Path, help="the output folder of the bench step")
    parser.add_argument("--dry", action="store_true", help="skip every GPU step with its reason (CI)")
    args = parser.parse_args(argv)
    if args.step == "all":
        return orchestrate(Path(os.environ.get("OUT") or "gpu_check_out"), args.dry)
    return bench(args.path) if args.step == "bench" else tiny()


if __name__ == "__main__":
    sys.exit(main())
