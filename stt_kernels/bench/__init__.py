"""Benchmarks of the stt_kernels ops against the reference and peer libraries.

Installed with the package, so anyone who ran ``pip install`` can measure their machine::

    python -m stt_kernels.bench [--quick | --full] [--ops ...] [--backends ...] --out DIR

or from Python (``stt bench`` does this)::

    from stt_kernels.bench import Options, run
    results_json = run(Options(out="bench_out", tier="quick"))

``DIR`` receives ``results.json`` (one row per op x implementation x shape x dtype x pass:
median time and spread, peak memory, GFLOP/s, GB/s, speedups; plus the environment),
``report.md`` (a table per op) and PNG plots (``<op>_time.png``, ``<op>_memory.png``,
``<op>_speedup.png``; skipped with a note without matplotlib).

Where to extend: a new workload is a :class:`~.cases.Case` passed to
:func:`~.cases.register_case`; its implementations are :class:`~.implementation.Implementation`
objects passed to :func:`~.registry.register_implementation` under the case's name. Another
package adds cases by naming the module that registers them under the ``stt_kernels.bench``
entry-point group (``stt_model`` adds its STT-UNET training step that way).
Module map: ``shapes`` (sizes), ``cases`` (inputs, work models), ``ours``/``peers``
(implementations), ``workload`` (one runnable combination), ``timing``, ``memory`` +
``worker`` (peak memory), ``ceilings``, ``environment`` (metadata), ``results``, ``report``,
``plots``, ``results_md``, ``runner`` (the loop), ``cli``.
"""

from .cases import CASES, Case, register_case
from .implementation import Implementation, Unsupported
from .options import Options
from .registry import register_implementation
from .runner import run
from . import sst_block  # noqa: F401,E402  (registers the SSTAttention block case)
from .plugins import load_plugins

load_plugins()

__all__ = ["run", "Options", "CASES", "Case", "register_case", "Implementation", "Unsupported",
           "register_implementation"]
