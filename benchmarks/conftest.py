"""pytest-benchmark front end of ``stt_kernels.bench``: its options; ``test_bench_ops.py`` times
the rows ``stt bench`` runs, for CI's history and comparisons.

    pytest benchmarks/ --benchmark-only [--bench-tier quick|default|full] [--bench-device cpu|cuda]
                       [--bench-suite levels issue-shapes train-step]
"""

from __future__ import annotations

import pytest

import stt_model.train_step_bench  # noqa: F401  (registers the train-step suite)
from stt_kernels.bench.cases import SUITES, TIERS


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("stt-bench")
    group.addoption("--bench-tier", default="quick", choices=TIERS, help="problem sizes (default quick)")
    group.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda if visible)")
    group.addoption("--bench-suite", nargs="+", default=["levels"], choices=list(SUITES), help="default: levels")
