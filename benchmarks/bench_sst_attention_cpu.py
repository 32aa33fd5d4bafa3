"""CPU figures of the SSTAttention block (issue 5), in one run: the same module (one
state_dict) on the ``cpu`` backend against the ``reference`` backend, forward+backward,
median of several repeats, and each one's peak resident memory in a fresh subprocess; with
``--scale``, also the forward peak memory of one full-resolution block (C = 32, T = 32,
320 x 320), which the reference cannot run (its spatial scores alone would be
32 x 4 x 102,400^2 floats) and which takes about half an hour on 2 CPU cores.

    python benchmarks/bench_sst_attention_cpu.py [--repeats 3] [--scale | --scale-only]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

import stt_kernels

SMALL = dict(batch=1, channels=32, t=8, h=64, w=64, heads=4)
SCALE = dict(batch=1, channels=32, t=32, h=320, w=320, heads=4)


def _block(shape: dict) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    module = stt_kernels.SSTAttention(shape["channels"], shape["heads"])
    with torch.no_grad():  # non-zero offsets, so the deformable path samples between pixels
        module.fusion.predictor.weight.normal_(0, 0.05)
    x = torch.randn(shape["batch"], shape["channels"], shape["t"], shape["h"], shape["w"])
    return module, x


def _step(module: torch.nn.Module, x: torch.Tensor, backend: str, backward: bool) -> None:
    with stt_kernels.use_backend(backend):
        if backward:
            module.zero_grad(set_to_none=True)
            module(x.requires_grad_()).square().mean().backward()
        else:
            with torch.no_grad():
                module(x)


def _peak_mib(shape: dict, backend: str, backward: bool) -> float:
    """Peak RSS (VmHWM) of a fresh process doing one step, minus the same process before it."""
    code = f"""
import sys, torch
sys.path.insert(0, {repr(sys.path[0])})
from bench_sst_attention_cpu import _block, _step
def hwm():
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024
module, x = _block({shape!r})
_step(module, x[..., :8, :8].contiguous(), {backend!r}, {backward!r})
before = hwm()
_step(module, x, {backend!r}, {backward!r})
print(hwm() - before, before)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return float(out.split()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scale", action="store_true", help="also the full-resolution block (slow on a CPU)")
    parser.add_argument("--scale-only", action="store_true", help="only the full-resolution block")
    args = parser.parse_args()
    figures: dict[str, float] = {}
    if not args.scale_only:
        figures.update(_small(args.repeats))
    if args.scale or args.scale_only:
        start = time.perf_counter()
        figures["scale_forward_peak_mib_cpu"] = _peak_mib(SCALE, "cpu", False)
        figures["scale_forward_s_cpu"] = time.perf_counter() - start
        print(f"scale: {SCALE}, forward on the cpu backend, {torch.get_num_threads()} threads")
    print(json.dumps(figures, indent=1))


def _small(repeats: int) -> dict[str, float]:
    module, x = _block(SMALL)
    figures: dict[str, float] = {}
    for backend in ("cpu", "reference"):
        _step(module, x, backend, True)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            _step(module, x, backend, True)
            times.append(time.perf_counter() - start)
        figures[f"{backend}_fwd_bwd_s"] = statistics.median(times)
        figures[f"{backend}_fwd_bwd_peak_mib"] = _peak_mib(SMALL, backend, True)
    figures["speedup_vs_reference"] = figures["reference_fwd_bwd_s"] / figures["cpu_fwd_bwd_s"]
    figures["memory_vs_reference"] = figures["cpu_fwd_bwd_peak_mib"] / figures["reference_fwd_bwd_peak_mib"]
    print(f"SSTAttention {SMALL}, forward+backward, {torch.get_num_threads()} threads, median of {repeats}")
    return figures


if __name__ == "__main__":
    main()
