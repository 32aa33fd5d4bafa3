"""``make gpu-check``: everything a first GPU session must prove, in one call under 9 minutes.

Run on the GPU machine with its own ``python3`` and torch, from the repository root:

    OUT=/path/to/evidence python3 benchmarks/gpu_check.py          # or: make gpu-check OUT=...
    python3 benchmarks/gpu_check.py --dry                           # what CI runs: every GPU step skips

Each step runs in its own process under its own deadline, so one hang or crash costs only that
step; the evidence goes to ``$OUT`` (9 files, each capped at 16 MB):

    build.log       the CUDA build with ``-Xptxas -v`` (registers, shared memory, spills)
    report.txt      ``python -m stt_kernels``
    gpu_tests.txt   the GPU tests (CUDA and Triton; trimmed autotuning, ``STT_TRITON_QUICK_TUNE=1``)
    probe.json      float64 under ``auto``; temporal attention 2 x 32 x 320 x 320, 4 heads, bfloat16
                    forward+backward on both GPU backends; a CUDA backward above 48 KB of shared
                    memory; every backward twice, compared bitwise; the TF32 error
    sanitizer.txt   ``compute-sanitizer`` memcheck and racecheck on tiny cases
    bench/          ``stt_kernels.bench`` (results.json, report.md): bfloat16 spatial, temporal,
                    deformable and the SST block at the issues' shapes against SDPA (flash,
                    efficient), FlexAttention and torchvision; ``triton.testing.do_bench`` (CUDA
                    events, L2 flushed between repeats)
    steps.log       what the probe and bench steps printed
    summary.txt     one line per step: ok / failed / timed out / skipped, with the reason
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
MAX_FILE_BYTES = 16 * 2**20
TOTAL_SECONDS = 540


def _gpu_reason() -> Optional[str]:
    """Why the GPU steps cannot run here, or None when they can."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no GPU is visible (torch.cuda.is_available() is False)"
    return None


def _cap(path: Path) -> None:
    if path.exists() and path.stat().st_size > MAX_FILE_BYTES:
        data = path.read_bytes()
        path.write_bytes(data[: MAX_FILE_BYTES // 2] + b"\n[... cut ...]\n" + data[-MAX_FILE_BYTES // 2 + 64 :])


def _run(command: list[str], log: Path, deadline: float, env: Optional[dict[str, str]] = None) -> str:
    """Run ``command`` with output appended to ``log``; returns a one-word verdict.

    The checkout is put first on ``PYTHONPATH``: the GPU machine's python3 has the package built
    in place (``build_ext --inplace``), never installed, and a script's own folder is what Python
    puts on ``sys.path``."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    with log.open("ab") as handle:
        handle.write(f"$ {' '.join(command)}\n".encode())
        handle.flush()
        try:
            code = subprocess.run(
                command,
                cwd=ROOT,
                stdout=handle,
                stderr=subprocess.STDOUT,
                timeout=deadline,
                env={**os.environ, "PYTHONPATH": path, **(env or {})},
            ).returncode
        except subprocess.TimeoutExpired:
            return f"timed out after {deadline:.0f} s"
    _cap(log)
    return "ok" if code == 0 else f"failed (exit {code})"


def _steps(out: Path, python: str) -> list[tuple[str, float, Callable[[], str]]]:
    me = [python, str(Path(__file__).resolve())]
    sanitizer = shutil.which("compute-sanitizer")
    build_env = {
        "STT_BUILD_CUDA": "1",
        "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"),
        "NVCC_APPEND_FLAGS": "-Xptxas -v",
        "MAX_JOBS": str(os.cpu_count() or 4),
    }

    def sanitize() -> str:
        if sanitizer is None:
            return "skipped: compute-sanitizer is not on PATH"
        verdicts = [
            _run([sanitizer, "--tool", tool, "--error-exitcode", "3", *me, "tiny"], out / "sanitizer.txt", 30)
            for tool in ("memcheck", "racecheck")
        ]
        return ", ".join(f"{tool} {v}" for tool, v in zip(("memcheck", "racecheck"), verdicts))

    return [
        ("build", 200, lambda: _run([python, "setup.py", "build_ext", "--inplace"], out / "build.log", 200, build_env)),
        ("report", 20, lambda: _run([python, "-m", "stt_kernels"], out / "report.txt", 20)),
        (
            "gpu tests",
            120,
            lambda: _run(
                [python, "-m", "pytest", "tests", "-m", "gpu", "-q", "-x", "-p", "no:cacheprovider"],
                out / "gpu_tests.txt",
                120,
                {"STT_TRITON_QUICK_TUNE": "1"},
            ),
        ),
        ("probe", 60, lambda: _run([*me, "probe", str(out / "probe.json")], out / "steps.log", 60)),
        ("sanitizer", 60, sanitize),
        ("bench", 80, lambda: _run([*me, "bench", str(out / "bench")], out / "steps.log", 80)),
    ]


def orchestrate(out: Path, dry: bool) -> int:
    out.mkdir(parents=True, exist_ok=True)
    summary = out / "summary.txt"
    reason = "dry run" if dry else _gpu_reason()
    started = time.monotonic()
    failed = False
    lines = []
    for name, deadline, step in _steps(out, sys.executable):
        left = TOTAL_SECONDS - (time.monotonic() - started)
        if reason is not None:
            verdict = f"skipped: {reason}"
        elif left < deadline:
            verdict = f"skipped: {left:.0f} s left of the {TOTAL_SECONDS} s budget, the step needs {deadline:.0f} s"
        else:
            verdict = step()
        failed |= "failed" in verdict or "timed out" in verdict
        line = f"{name:<10} {verdict}"
        lines.append(line)
        print(line, flush=True)
    with summary.open("a") as handle:
        handle.write("\n".join(lines) + f"\ntotal {time.monotonic() - started:.0f} s\n")
    return 1 if failed else 0


# -- the steps that run inside this file ------------------------------------------------------


def _attention_inputs(shape, dtype, device, grad=True):
    import torch

    qkv = torch.randn(*shape[:4], 3, *shape[4:], dtype=dtype, device=device, requires_grad=grad)
    return qkv, qkv.unbind(4)


def probe(path: Path) -> int:
    import torch

    import stt_kernels

    results: dict[str, object] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}

    def record(name: str, fn: Callable[[], object]) -> None:
        try:
            results[name] = fn()
        except Exception as exc:  # the probe reports every failure and goes on
            results[name] = f"error: {type(exc).__name__}: {exc}"
        torch.cuda.synchronize()

    def float64_auto() -> dict[str, float]:
        _, (q, k, v) = _attention_inputs((1, 2, 8, 8, 2, 16), torch.float64, "cuda")
        out = stt_kernels.spatial_attention(q, k, v)
        ref = stt_kernels.spatial_attention(q, k, v, backend="reference")
        return {"max_abs_error": float((out - ref).abs().max())}

    def temporal_bf16(backend: str) -> dict[str, float]:
        qkv, (q, k, v) = _attention_inputs((2, 32, 320, 320, 4, 8), torch.bfloat16, "cuda")
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = stt_kernels.temporal_attention(q, k, v, backend=backend)
        out.float().square().mean().backward()
        torch.cuda.synchronize()
        return {
            "seconds_first_call": time.perf_counter() - start,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "grad_finite": bool(torch.isfinite(qkv.grad).all()),
        }

    def big_backward() -> dict[str, float]:
        qkv, (q, k, v) = _attention_inputs((1, 1, 16, 16, 1, 128), torch.float32, "cuda")
        stt_kernels.spatial_attention(q, k, v, backend="cuda").sum().backward()
        grad = qkv.grad.clone()
        qkv.grad = None
        with stt_kernels.use_backend("reference"):
            stt_kernels.spatial_attention(q, k, v).sum().backward()
        return {"max_abs_grad_error": float((grad - qkv.grad).abs().max())}

    def bitwise(backend: str) -> dict[str, bool]:
        torch.use_deterministic_algorithms(True)
        try:
            grads = []
            for _ in range(2):
                qkv, (q, k, v) = _attention_inputs((1, 4, 24, 24, 2, 16), torch.float32, "cuda")
                torch.manual_seed(0)
                qkv.data.copy_(torch.randn_like(qkv))
                stt_kernels.spatial_attention(q, k, v, backend=backend).sum().backward()
                grads.append(qkv.grad.clone())
            return {"identical": bool(torch.equal(grads[0], grads[1]))}
        except RuntimeError as exc:
            return {"raised": str(exc).splitlines()[0]}
        finally:
            torch.use_deterministic_algorithms(False)

    def tf32() -> dict[str, float]:
        _, (q, k, v) = _attention_inputs((1, 2, 32, 32, 2, 32), torch.float32, "cuda", grad=False)
        exact = stt_kernels.spatial_attention(q.double(), k.double(), v.double(), backend="reference")
        errors = {}
        for precision in ("highest", "high"):
            torch.set_float32_matmul_precision(precision)
            for backend in ("triton", "cuda"):
                out = stt_kernels.spatial_attention(q, k, v, backend=backend)
                errors[f"{backend}_{precision}"] = float((out.double() - exact).abs().max())
        torch.set_float32_matmul_precision("highest")
        return errors

    record("float64_auto", float64_auto)
    for backend in ("triton", "cuda"):
        record(f"temporal_bf16_2x32x320x320_{backend}", lambda b=backend: temporal_bf16(b))
        record(f"bitwise_backward_{backend}", lambda b=backend: bitwise(b))
    record("cuda_backward_d128_float32", big_backward)
    record("tf32_max_abs_error", tf32)
    path.write_text(json.dumps(results, indent=1) + "\n")
    return 0


def tiny() -> int:
    """Tiny calls of every GPU kernel, forward and backward, for compute-sanitizer."""
    import torch

    import stt_kernels

    for backend in ("cuda", "triton"):
        for op in (stt_kernels.spatial_attention, stt_kernels.temporal_attention):
            qkv, (q, k, v) = _attention_inputs((1, 3, 5, 7, 2, 9), torch.float32, "cuda")
            op(q, k, v, backend=backend).sum().backward()
        x = torch.randn(1, 4, 9, 11, device="cuda", requires_grad=True)
        offset = torch.randn(1, 18, 9, 11, device="cuda", requires_grad=True)
        mask = torch.rand(1, 9, 9, 11, device="cuda", requires_grad=True)
        weight = torch.randn(4, 4, 3, 3, device="cuda", requires_grad=True)
        stt_kernels.deform_conv2d(x, offset, mask, weight, backend=backend).sum().backward()
    torch.cuda.synchronize()
    return 0


def bench(out: Path) -> int:
    """The benchmark engine on the issues' shapes, bfloat16 forward, against SDPA (flash, efficient),
    FlexAttention and torchvision: ``out/results.json`` and ``out/report.md``."""
    from stt_kernels.bench import Options, run_measuring

    run_measuring(
        Options(
            out=out,
            tier="quick",
            suites=["issue-shapes"],
            dtypes=["bfloat16"],
            passes=["forward"],
            peers=["sdpa:flash", "sdpa:efficient", "flex_attention", "torchvision"],
            device="cuda",
            overwrite=True,
        )
    )
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", nargs="?", choices=("all", "probe", "bench", "tiny"), default="all")
    parser.add_argument("path", nargs="?", type=Path, help="output file of the probe step, folder of the bench step")
    parser.add_argument("--dry", action="store_true", help="skip every GPU step with its reason (CI)")
    args = parser.parse_args(argv)
    if args.step == "probe":
        return probe(args.path)
    if args.step == "bench":
        return bench(args.path)
    if args.step == "tiny":
        return tiny()
    out = Path(os.environ.get("OUT") or "gpu_check_out")
    return orchestrate(out, args.dry)


if __name__ == "__main__":
    sys.exit(main())
