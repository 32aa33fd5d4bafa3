"""Benchmarks of the stt_kernels ops against the reference and the peers, installed with the package::

    python -m stt_kernels.bench [--quick | --full] [--suite levels issue-shapes ...] --out DIR

or ``run(Options(out="bench_out", tier="quick"))``, which returns the path of ``results.json``
(``report.md`` beside it). ``stt bench`` is the same with ``stt_model``'s suites (``train-step``)
registered; ``benchmarks/test_bench_ops.py`` times the same rows under pytest-benchmark.

Modules: ``cases`` (shapes, work models, suites), ``impls`` (ours, the peers, one runnable
combination), ``measure`` (timers, ceilings, peak memory), ``engine`` (the run), ``report``, ``cli``.
A new case is a :class:`Case` given to :func:`register_case`, its implementations given to
:func:`register_implementation` or :func:`register_backends`, its shapes a suite given to
:func:`register_suite`.
"""

from .cases import CASES, SUITES, Case, Shape, register_case, register_suite
from .engine import NothingMeasured, Options, Row, read_results, run, run_measuring
from .impls import Implementation, Unsupported, differentiable, register_backends, register_implementation

__all__ = ["CASES", "SUITES", "Case", "Shape", "register_case", "register_suite", "NothingMeasured", "Options"]
__all__ += ["Row", "read_results", "run", "run_measuring", "Implementation", "Unsupported", "differentiable"]
__all__ += ["register_backends", "register_implementation"]
