"""deform_conv2d on the CPU: the `cpu` backend against torchvision and the reference, in one run.

Times are medians over --repeats; the float32 matmul rate is measured in the same run, and each
implementation's peak memory (resident set growth over the inputs alone) in a fresh subprocess.
Figures are printed as ratios, since absolute times on a shared machine move from run to run.

    PYTHONPATH=. python benchmarks/bench_deform_conv2d_cpu.py [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

IMPLEMENTATIONS = ("cpu", "torchvision", "reference")


def make_inputs(args, requires_grad: bool):
    torch.manual_seed(0)
    n, c, size, k, groups = args.frames, args.channels, args.size, 3, args.groups
    x = torch.randn(n, c, size, size)
    offset = torch.randn(n, 2 * groups * k * k, size, size) * 2
    mask = torch.rand(n, groups * k * k, size, size)
    weight = torch.randn(args.channels_out, c, k, k) / (c * k * k) ** 0.5
    bias = torch.randn(args.channels_out)
    return [t.requires_grad_(requires_grad) for t in (x, offset, mask, weight, bias)]


def call(impl: str, x, offset, mask, weight, bias):
    if impl == "torchvision":
        import torchvision
        return torchvision.ops.deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)
    import stt_kernels
    return stt_kernels.deform_conv2d(x, offset, mask, weight, bias, padding=1, backend=impl)


def forward_backward(impl: str, inputs) -> None:
    out = call(impl, *inputs)
    torch.autograd.grad(out, inputs, torch.ones_like(out))


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, lazy imports, thread pool
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_rate(repeats: int) -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    return 2 * 2048**3 / median_time(lambda: torch.mm(a, b), repeats)


def child(args) -> None:
    """Peak RSS growth of one forward+backward of one implementation, in this fresh process."""
    inputs = make_inputs(args, requires_grad=True)
    call(args.child, *[t.detach()[:1] for t in inputs[:3]], inputs[3].detach(), None)  # imports, thread pool
    # Against the resident set now, not the lifetime peak: start-up transients (imports, the
    # inputs' temporaries) may have pushed that higher than the call itself will.
    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1]) * resource.getpagesize() // 1024
    forward_backward(args.child, inputs)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_kib": max(after - before, 0)}))


def peak_memory(impl: str, args) -> float:
    command = [sys.executable, __file__, "--child", impl, "--frames", str(args.frames), "--channels",
               str(args.channels), "--channels-out", str(args.channels_out), "--size", str(args.size),
               "--groups", str(args.groups)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_kib"] / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--channels-out", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--groups", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    impls = [i for i in IMPLEMENTATIONS if not (args.skip_reference and i == "reference")]
    flops = 2 * args.frames * args.channels_out * args.channels * 9 * args.size**2
    rate = matmul_rate(args.repeats)
    rows = {}
    for impl in impls:
        with torch.no_grad():
            plain = make_inputs(args, requires_grad=False)
            forward = median_time(lambda: call(impl, *plain), args.repeats)
        inputs = make_inputs(args, requires_grad=True)
        both = median_time(lambda: forward_backward(impl, inputs), args.repeats)
        rows[impl] = {"forward_s": forward, "forward_backward_s": both, "peak_mib": peak_memory(impl, args)}

    print(f"deform_conv2d, {args.frames} frames, C = {args.channels} -> {args.channels_out}, "
          f"{args.size} x {args.size}, K = 3, G = {args.groups}, mask; {torch.get_num_threads()} threads")
    print(f"float32 matmul (2048^3): {rate / 1e9:.1f} GFLOP/s; forward arithmetic {flops / 1e9:.2f} GFLOP")
    print(f"{'impl':<12} {'forward':>10} {'fwd+bwd':>10} {'peak MiB':>9} {'fwd % matmul':>13}")
    for impl, r in rows.items():
        print(f"{impl:<12} {r['forward_s'] * 1e3:>8.1f}ms {r['forward_backward_s'] * 1e3:>8.1f}ms "
              f"{r['peak_mib']:>9.1f} {flops / r['forward_s'] / rate * 100:>12.0f}%")
    ours, tv = rows["cpu"], rows["torchvision"]
    ratios = {
        "forward_speedup_vs_torchvision": tv["forward_s"] / ours["forward_s"],
        "forward_backward_speedup_vs_torchvision": tv["forward_backward_s"] / ours["forward_backward_s"],
        "forward_fraction_of_matmul_rate": flops / ours["forward_s"] / rate,
        "peak_memory_vs_torchvision": ours["peak_mib"] / tv["peak_mib"],
    }
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"matmul_flops": rate, "forward_flops": flops, "rows": rows, "ratios": ratios}, f, indent=1)


if __name__ == "__main__":
    main()
