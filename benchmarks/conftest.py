"""pytest-benchmark front end of ``stt_kernels.bench``: the same cases, implementations and
workloads, timed by pytest-benchmark instead of the engine's own loop.

    pytest benchmarks/ --benchmark-only [--bench-tier quick|default|full] [--bench-device cpu|cuda]
"""

from __future__ import annotations

import pytest
import torch

from stt_kernels.bench.cases import CASES, PASSES
from stt_kernels.bench.options import CPU_DTYPES, GPU_DTYPES
from stt_kernels.bench.registry import implementations_for


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("stt-bench")
    group.addoption("--bench-tier", default="quick", choices=("quick", "default", "full"),
                    help="problem sizes (stt_kernels/bench/shapes.py); default quick")
    group.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda if visible)")


def _device(config: pytest.Config) -> torch.device:
    name = config.getoption("--bench-device")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


@pytest.fixture
def device(request: pytest.FixtureRequest) -> torch.device:
    return _device(request.config)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """One test per case x implementation x level x dtype x pass (the engine's rows)."""
    if "combination" not in metafunc.fixturenames:
        return
    device = _device(metafunc.config)
    tier = metafunc.config.getoption("--bench-tier")
    dtypes = GPU_DTYPES if device.type == "cuda" else CPU_DTYPES
    params, ids = [], []
    for case in CASES.values():
        for implementation in implementations_for(case.name, device):
            for level in case.levels(tier):
                for dtype in dtypes:
                    for pass_ in PASSES:
                        params.append((case, implementation, level, getattr(torch, dtype), pass_))
                        ids.append(f"{case.name}-{implementation.name}-L{level.level}-{dtype}-{pass_}")
    metafunc.parametrize("combination", params, ids=ids)
