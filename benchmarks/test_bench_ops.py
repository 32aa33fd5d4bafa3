"""Each row of ``stt bench`` (case x implementation x shape x dtype x pass) timed by pytest-benchmark;
unsupported and out-of-memory rows are skipped with the reason, the work models go into ``extra_info``."""

from __future__ import annotations

import pytest
import torch

from stt_kernels.bench.impls import Unsupported, classify, is_oom, prepare


def test_op(benchmark, combination, device: torch.device) -> None:
    case, implementation, shape, dtype, pass_ = combination
    try:
        step = prepare(case, implementation, shape, dtype, device, pass_)
    except Unsupported as exc:
        pytest.skip(f"skipped: {exc}")
    except Exception as exc:
        if is_oom(exc):
            pytest.skip(f"OOM: {classify(exc)[1]}")
        raise

    def synchronised() -> None:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # pytest-benchmark reads a wall clock

    benchmark.extra_info.update(
        op=case.name,
        implementation=implementation.name,
        kind=implementation.kind,
        shape=case.label(shape),
        tokens=shape.tokens,
        dtype=str(dtype),
        pass_=pass_,
        flops=case.flops(shape, pass_),
        bytes=case.bytes(shape, dtype, pass_),
    )
    benchmark.pedantic(synchronised, rounds=5, warmup_rounds=1, iterations=1)
