"""Timing one step: warm-up, repeats, median and spread.

On a GPU each repeat is bracketed by CUDA events (the same API on ROCm) and synchronised; on
the CPU it is wall-clock ``perf_counter`` around a call that returns when the work is done.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Timing:
    """Seconds per step over ``repeats`` measured steps."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    repeats: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def summarise(samples: list[float]) -> Timing:
    """Median, quartiles (IQR) and extremes of ``samples`` (seconds)."""
    if not samples:
        raise ValueError("no samples to summarise")
    ordered = sorted(samples)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return Timing(statistics.median(ordered), q1, q3, ordered[0], ordered[-1], len(ordered))


def _time_once(step: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    step()
    return time.perf_counter() - begin


def measure(step: Callable[[], None], device: torch.device, warmup: int, repeats: int,
            budget_s: float, min_repeats: int = 3) -> Timing:
    """Time ``step``: ``warmup`` untimed calls, then up to ``repeats`` timed ones.

    Stops early once ``budget_s`` seconds went into timed calls and ``min_repeats`` are done,
    so one slow implementation cannot eat the run's time; ``Timing.repeats`` says how many ran.
    """
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    samples: list[float] = []
    while len(samples) < repeats:
        samples.append(_time_once(step, device))
        if sum(samples) > budget_s and len(samples) >= min(min_repeats, repeats):
            break
    return summarise(samples)
