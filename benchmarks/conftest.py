"""pytest-benchmark front end of ``stt_kernels.bench``: the rows ``stt bench`` runs (``engine.plan``),
timed by pytest-benchmark for CI's history and comparisons.

    pytest benchmarks/ --benchmark-only [--bench-tier quick|default|full] [--bench-device cpu|cuda]
                       [--bench-suite levels issue-shapes train-step]
"""

from __future__ import annotations

import pytest
import torch

import stt_model.train_step_bench  # noqa: F401  (registers the train-step suite)
from stt_kernels.bench.cases import SUITES, TIERS
from stt_kernels.bench.engine import default_dtypes, plan


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("stt-bench")
    group.addoption("--bench-tier", default="quick", choices=TIERS, help="problem sizes (default quick)")
    group.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda if visible)")
    group.addoption("--bench-suite", nargs="+", default=["levels"], choices=list(SUITES), help="default: levels")


def _device(config: pytest.Config) -> torch.device:
    return torch.device(config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu"))


@pytest.fixture
def device(request: pytest.FixtureRequest) -> torch.device:
    return _device(request.config)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "combination" in metafunc.fixturenames:
        device = _device(metafunc.config)
        suites, tier = metafunc.config.getoption("--bench-suite"), metafunc.config.getoption("--bench-tier")
        rows = plan(suites, tier, device, default_dtypes(device))
        metafunc.parametrize(
            "combination", rows, ids=[f"{c.name}-{i.name}-{c.label(s)}-{str(d)[6:]}-{p}" for c, i, s, d, p in rows]
        )
