"""CPU figures of the split attention ops (issue 3), all in one run so the ratios compare
like with like: the ``cpu`` backend against torch's ``scaled_dot_product_attention`` and the
``reference`` backend, forward and forward+backward, median of several repeats; then the peak
resident memory of forward+backward over one 320 x 320 slice (102,400 tokens) in a fresh
subprocess.

    python benchmarks/bench_attention_cpu.py [--repeats 5] [--skip-reference] [--skip-memory | --skip-speed]

Inputs are views of one packed ``(B, T, H, W, 3, heads, d)`` projection, as the model makes
them. The SDPA peer gets ``(batch, heads, N, d)`` views of the same memory for spatial
attention (no copy needed), and pays the permute copies in and out for temporal attention,
whose sequences are strided across time slices.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import stt_kernels


def packed(b, t, h, w, heads, d, grad):
    x = torch.randn(b, t, h, w, 3, heads, d, requires_grad=grad)
    return x


def sdpa_spatial(q, k, v):
    b, t, h, w, heads, d = q.shape

    def tokens(x):  # (B*T, heads, H*W, d), a view
        return x.reshape(b * t, h * w, heads, d).transpose(1, 2)

    out = F.scaled_dot_product_attention(tokens(q), tokens(k), tokens(v))
    return out.transpose(1, 2).reshape(b, t, h, w, heads, d)


def sdpa_temporal(q, k, v):
    b, t, h, w, heads, d = q.shape

    def tokens(x):  # (B*H*W, heads, T, d): a copy, the sequences are strided across slices
        return x.permute(0, 2, 3, 4, 1, 5).reshape(b * h * w, heads, t, d)

    out = F.scaled_dot_product_attention(tokens(q), tokens(k), tokens(v))
    return out.reshape(b, h, w, heads, t, d).permute(0, 4, 1, 2, 3, 5).contiguous()


def implementations(kind):
    op = stt_kernels.spatial_attention if kind == "spatial" else stt_kernels.temporal_attention
    return {
        "cpu": lambda q, k, v: op(q, k, v, backend="cpu"),
        "sdpa": sdpa_spatial if kind == "spatial" else sdpa_temporal,
        "reference": lambda q, k, v: op(q, k, v, backend="reference"),
    }


def run_case(kind, shape, repeats, skip):
    """Median seconds per implementation, (forward, forward+backward). The implementations take
    turns within each repeat, so a change in the machine's load (a shared machine) falls on
    all of them alike rather than on whichever ran last."""
    x = packed(*shape, grad=True)
    q, k, v = x.unbind(4)
    grad = torch.randn(q.shape)
    impls = {name: fn for name, fn in implementations(kind).items() if name not in skip}

    def forward(fn):
        with torch.no_grad():
            fn(q, k, v)

    def forward_backward(fn):
        x.grad = None
        fn(q, k, v).backward(grad)

    times = {name: ([], []) for name in impls}
    for fn in impls.values():  # warm-up: first-touch allocations, thread pool start
        forward(fn)
        forward_backward(fn)
    for _ in range(repeats):
        for pass_index, step in enumerate((forward, forward_backward)):
            for name, fn in impls.items():
                start = time.perf_counter()
                step(fn)
                times[name][pass_index].append(time.perf_counter() - start)
    return {name: (statistics.median(f), statistics.median(b)) for name, (f, b) in times.items()}


# Peak resident memory of the process itself: VmHWM, which starts afresh at exec (ru_maxrss
# does not on Linux: a child started from a process that once held gigabytes reports those).
PEAK_RSS = """
def peak_rss():
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
"""

MEMORY_SNIPPET = PEAK_RSS + """
import torch, stt_kernels
x = torch.randn(1, 1, 320, 320, 3, 1, 32, requires_grad=True)
q, k, v = x.unbind(4)
stt_kernels.spatial_attention(q, k, v, backend="cpu").sum().backward()
print(peak_rss())
"""

IMPORT_SNIPPET = PEAK_RSS + """
import torch, stt_kernels
print(peak_rss())
"""


def peak_memory():
    baseline = subprocess.run([sys.executable, "-c", IMPORT_SNIPPET], capture_output=True, text=True, check=True)
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", MEMORY_SNIPPET], capture_output=True, text=True, check=True)
    return int(run.stdout.split()[-1]), int(baseline.stdout.split()[-1]), time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-reference", action="store_true", help="the reference takes ~15 s a repeat")
    parser.add_argument("--skip-memory", action="store_true", help="the 102,400-token run takes minutes")
    parser.add_argument("--skip-speed", action="store_true", help="only the 102,400-token memory run")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object too")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.backends.cpu.get_cpu_capability()}, median of {args.repeats}")

    cases = {
        # 32 sequences of N = 4096 (64 x 64 slices, 8 slices, 4 heads), d = 32
        "spatial": ("spatial", (1, 8, 64, 64, 4, 32)),
        # T = 32 at every pixel of 64 x 64, 4 heads, d = 32: 16,384 sequences of 32
        "temporal": ("temporal", (1, 32, 64, 64, 4, 32)),
    }
    skip = {"reference"} if args.skip_reference else set()
    results = {}
    for label, (kind, shape) in ({} if args.skip_speed else cases).items():
        rows = run_case(kind, shape, args.repeats, skip)
        results[label] = rows
        print(f"\n{label} {shape} (B, T, H, W, heads, d)")
        print(f"  {'impl':<10} {'fwd s':>8} {'fwd+bwd s':>10}   cpu speed-up fwd, fwd+bwd")
        for name, (fwd, both) in rows.items():
            cf, cb = rows["cpu"]
            print(f"  {name:<10} {fwd:8.3f} {both:10.3f}   {fwd / cf:5.2f}x {both / cb:5.2f}x")

    if not args.skip_memory:
        peak, base, seconds = peak_memory()
        results["memory"] = {"peak_rss": peak, "import_rss": base, "seconds": seconds}
        print(f"\nfwd+bwd over 102,400 tokens (1 x 1 x 320 x 320, 1 head, d = 32): peak RSS "
              f"{peak / 2**30:.2f} GiB (torch import alone {base / 2**30:.2f} GiB), {seconds:.1f} s")
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
