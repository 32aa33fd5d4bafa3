"""Each row of ``stt bench`` (``engine.plan``: case x implementation x shape x dtype x pass) timed by
pytest-benchmark; unsupported and out-of-memory rows are skipped with the reason, the work models
go into ``extra_info``."""

from __future__ import annotations

import pytest
import torch

from stt_kernels.bench.engine import default_dtypes, plan
from stt_kernels.bench.impls import classify, prepare


def _device(config: pytest.Config) -> torch.device:
    return torch.device(config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu"))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    device, option = _device(metafunc.config), metafunc.config.getoption
    rows = plan(option("--bench-suite"), option("--bench-tier"), device, default_dtypes(device))
    ids = [f"{c.name}-{i.name}-{c.label(s)}-{str(d)[6:]}-{p}" for c, i, s, d, p in rows]
    metafunc.parametrize("combination", rows, ids=ids)


def test_op(benchmark, combination, request: pytest.FixtureRequest) -> None:
    case, implementation, shape, dtype, pass_ = combination
    device = _device(request.config)
    try:
        step = prepare(case, implementation, shape, dtype, device, pass_)
    except Exception as exc:
        if (status := classify(exc))[0] == "error":
            raise
        pytest.skip(": ".join(status))

    def synchronised() -> None:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # pytest-benchmark reads a wall clock

    work = dict(flops=case.flops(shape, pass_), bytes=case.bytes(shape, dtype, pass_), tokens=shape.tokens)
    benchmark.extra_info.update(op=case.name, implementation=implementation.name, kind=implementation.kind, **work)
    benchmark.extra_info.update(shape=case.label(shape), dtype=str(dtype), pass_=pass_)
    benchmark.pedantic(synchronised, rounds=5, warmup_rounds=1, iterations=1)
