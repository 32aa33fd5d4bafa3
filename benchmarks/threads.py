"""Training steps/s of a preset (tiny-cpu) with 1 or 2 threads, with and without a busy process on
one of the two cores, under libgomp's wait policies: the table of docs/threads.md.

    python benchmarks/threads.py                      # on an otherwise idle machine, ~6 minutes
    python benchmarks/threads.py --seconds 1 --repeats 1 --only "1 thread" --config tiny.yaml  # dry

Each run is a fresh process (libgomp reads OMP_WAIT_POLICY/GOMP_SPINCOUNT when it loads) pinned to
--cores; the hog is a Python busy loop pinned to the last of them. Runs are interleaved and the
median of --repeats is shown.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = {  # name: (threads, hog, environment)
    "2 threads": (2, False, {}),
    "2 threads, PASSIVE": (2, False, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "1 thread": (1, False, {}),
    "2 threads + hog": (2, True, {}),
    "2 threads + hog, PASSIVE": (2, True, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "2 threads + hog, GOMP_SPINCOUNT=0": (2, True, {"GOMP_SPINCOUNT": "0"}),
    "2 threads + hog, ACTIVE": (2, True, {"OMP_WAIT_POLICY": "ACTIVE"}),
    "1 thread + hog": (1, True, {}),
}


def worker(config_name: str, seconds: float, warmup: int) -> None:
    """Print the training steps/s of ``config_name`` measured over about ``seconds``."""
    from pathlib import Path

    import torch

    from stt_model.config import load_config
    from stt_model.train import Trainer, TrainOptions

    config = load_config(config_name)
    (t, h, w), b, gen = config.data.patch, config.train.batch_size, torch.Generator().manual_seed(0)
    image = torch.randn(b, config.model.in_channels, t, h, w, generator=gen)
    target = (torch.rand(b, config.model.out_channels, t, h, w, generator=gen) < 0.2).float()
    options = TrainOptions(out_dir=Path(tempfile.gettempdir()), device="cpu", progress=False)
    trainer = Trainer(config, source=None, options=options)  # batches are given to train_step
    for _ in range(warmup):
        trainer.train_step(image, target)
    steps, start = 0, time.perf_counter()
    while steps == 0 or time.perf_counter() - start < seconds:
        trainer.train_step(image, target)
        steps += 1
    print(steps / (time.perf_counter() - start))


def pinned(cores: list[int]):
    return lambda: os.sched_setaffinity(0, cores)


def run(args: argparse.Namespace, name: str) -> float:
    """Steps/s of one run of variant ``name``, in a fresh process pinned to ``args.cores``."""
    threads, hog, extra = VARIANTS[name]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    env.update(extra, OMP_NUM_THREADS=str(threads))
    spin = [sys.executable, "-c", "while True: pass"]
    busy = subprocess.Popen(spin, preexec_fn=pinned(args.cores[-1:])) if hog else None
    command = [sys.executable, __file__, "--worker", f"--config={args.config}", f"--seconds={args.seconds}"]
    try:
        done = subprocess.run(
            [*command, f"--warmup={args.warmup}"],
            env=env,
            preexec_fn=pinned(args.cores),
            capture_output=True,
            text=True,
        )
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    if done.returncode != 0:
        sys.exit(f"{name}: the worker failed:\n{done.stderr}")
    return float(done.stdout.split()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny-cpu", help="preset or YAML (default: tiny-cpu)")
    p.add_argument("--cores", type=int, nargs=2, default=[0, 1], help="the two CPUs to run on (default: 0 1)")
    p.add_argument("--seconds", type=float, default=15.0, help="measured time per run (default: 15)")
    p.add_argument("--warmup", type=int, default=2, help="steps before measuring (default: 2)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each variant, interleaved (default: 2)")
    p.add_argument("--only", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), help="these variants")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.config, args.seconds, args.warmup)
    if not set(args.cores) <= os.sched_getaffinity(0) or len(set(args.cores)) != 2:
        p.error(f"--cores must be two different CPUs this process may use ({sorted(os.sched_getaffinity(0))})")
    load = os.getloadavg()[0]
    rates = {name: [] for name in args.only}
    for _ in range(args.repeats):
        for name in args.only:
            rates[name].append(run(args, name))
    base = statistics.median(rates[args.only[0]])
    print(f"{args.config}, cores {args.cores}, {args.seconds:g} s x {args.repeats}; "
          f"load average {load:.2f} before, {os.getloadavg()[0]:.2f} after\n")  # fmt: skip
    print(f"| variant | steps/s | vs {args.only[0]} |\n| --- | ---: | ---: |")
    for name, values in rates.items():
        print(f"| {name} | {statistics.median(values):.2f} | {statistics.median(values) / base:.2f} |")


if __name__ == "__main__":
    main()
