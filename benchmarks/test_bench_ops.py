"""Each op x implementation x STT-UNET level x dtype x pass, timed by pytest-benchmark.

Unsupported combinations and out-of-memory ones are skipped with the reason; the work
models (FLOPs, bytes, tokens) go into ``extra_info`` so ``--benchmark-json`` carries them.
"""

from __future__ import annotations

import pytest
import torch

from stt_kernels.bench.implementation import Unsupported
from stt_kernels.bench.workload import classify, is_oom, prepare


def test_op(benchmark, combination, device: torch.device) -> None:
    case, implementation, level, dtype, pass_ = combination
    try:
        workload = prepare(case, implementation, level, dtype, device, pass_)
    except Unsupported as exc:
        pytest.skip(f"skipped: {exc}")
    except Exception as exc:
        if is_oom(exc):
            pytest.skip(f"OOM: {classify(exc)[1]}")
        raise

    def step() -> None:
        workload.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # pytest-benchmark reads a wall clock

    benchmark.extra_info.update(op=case.name, implementation=implementation.name, kind=implementation.kind,
                                shape=case.label(level), tokens=case.tokens(level), dtype=str(dtype),
                                pass_=pass_, flops=case.flops(level, pass_), bytes=case.bytes(level, dtype, pass_))
    benchmark.pedantic(step, rounds=5, warmup_rounds=1, iterations=1)
