"""Which build of the CPU kernels runs on this machine.

The CPU kernels (``csrc/cpu``) are compiled once per x86 capability into separate libraries,
``stt_kernels/_cpu_default``, ``_cpu_avx2`` and ``_cpu_avx512``, each registering the same
``torch.ops.stt`` CPU kernels; ``_C`` holds the schemas, the Python binding and the CUDA kernels,
compiled for the x86-64 baseline. At import exactly one kernel library is loaded: the best one
this CPU runs, capped by torch's own ``ATEN_CPU_CAPABILITY`` (``default``, ``avx2``, ``avx512``)
when it is set. So a wheel built on an AVX-512 machine runs on any x86-64 CPU, and never meets
an instruction the CPU lacks.

Separate libraries, loaded ``RTLD_LOCAL``, rather than per-file flags inside one library: inline
functions of the c10/std headers are emitted as weak symbols by every translation unit, and
the linker keeps one copy, possibly the AVX-512 one, for the baseline code as well.

``STT_NATIVE=1`` at build time makes one library, ``_cpu_native`` (``-march=native``), for the
machine that builds it; no check can tell whether another CPU runs it.

``setup.py`` reads this file by path for the compile flags (before the package can be imported),
so it uses the standard library alone.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence


@dataclass(frozen=True)
class Capability:
    """One build of the CPU kernels: its name (torch's ``ATEN_CPU_CAPABILITY`` names), the
    compiler flags of its library and the CPU features it needs, named as GCC's
    ``__builtin_cpu_supports`` names them."""

    name: str
    flags: tuple[str, ...]
    features: tuple[str, ...]


# Ascending. The features are every instruction set the flags enable beyond the x86-64
# baseline (tests/test_isa_dispatch.py asks the compiler); a CPU must have all of them.
# -march=x86-64 first, so that an -march in the user's CFLAGS cannot raise the baseline.
_AVX2_FEATURES = ("sse3", "ssse3", "sse4.1", "sse4.2", "popcnt", "avx", "avx2", "fma", "f16c")
X86_CAPABILITIES = (
    Capability("default", ("-march=x86-64",), ()),
    Capability("avx2", ("-march=x86-64", "-mavx2", "-mfma", "-mf16c"), _AVX2_FEATURES),
    Capability(
        "avx512",
        ("-march=x86-64", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mfma", "-mf16c"),
        (*_AVX2_FEATURES, "avx512f", "avx512bw", "avx512dq", "avx512vl"),
    ),
)
NATIVE = Capability("native", ("-march=native",), ())
_PORTABLE = {c.name: c for c in X86_CAPABILITIES}
_RANK = {c.name: rank for rank, c in enumerate(X86_CAPABILITIES)}
_LIBRARIES: list[ctypes.CDLL] = []  # loaded kernel libraries stay referenced for the process' life


def build_capabilities(machine: str, native: bool) -> tuple[Capability, ...]:
    """The kernel libraries ``setup.py`` builds on a machine (``platform.machine()``)."""
    if native:
        return (NATIVE,)
    if machine.lower() in ("x86_64", "amd64"):
        return X86_CAPABILITIES
    return (Capability("default", (), ()),)


def baseline_flags(machine: str) -> tuple[str, ...]:
    """Flags of the code that every CPU of ``machine`` must run (``_C``)."""
    return _PORTABLE["default"].flags if machine.lower() in ("x86_64", "amd64") else ()


@dataclass(frozen=True)
class Choice:
    """The kernel library to load, or why none can be."""

    name: Optional[str]
    note: str  # what decided it, for the backend report; the reason when name is None


def choose(built: Sequence[str], cpu_features: Mapping[str, bool], environ: Mapping[str, str] = os.environ) -> Choice:
    """The best of the ``built`` kernel libraries this CPU runs, capped by ATEN_CPU_CAPABILITY."""
    if not built:
        return Choice(None, "stt_kernels._C lists no CPU kernel library (it predates them)")
    if list(built) == [NATIVE.name]:
        return Choice(NATIVE.name, "built with -march=native for the machine that built it")
    unknown = [name for name in built if name not in _PORTABLE]
    if unknown:
        return Choice(None, f"stt_kernels._C lists unknown CPU kernel libraries {unknown}")
    runnable = [name for name in built if all(cpu_features.get(f, False) for f in _PORTABLE[name].features)]
    if not runnable:
        return Choice(None, f"this CPU runs none of the CPU kernel libraries built ({', '.join(built)})")
    best = max(runnable, key=_RANK.__getitem__)
    requested = environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    if not requested:
        return Choice(best, f"the best this CPU runs of {', '.join(built)}")
    if requested not in _RANK:
        # torch warns about the value too and ignores it; so do we.
        return Choice(
            best,
            f"the best this CPU runs of {', '.join(built)}; ATEN_CPU_CAPABILITY="
            f"{requested!r} ignored (expected one of {', '.join(_RANK)})",
        )
    capped = [name for name in runnable if _RANK[name] <= _RANK[requested]]
    if not capped:
        return Choice(
            None,
            f"ATEN_CPU_CAPABILITY={requested} but no CPU kernel library at or below it was built ({', '.join(built)})",
        )
    chosen = max(capped, key=_RANK.__getitem__)
    if chosen != best:
        return Choice(chosen, f"capped by ATEN_CPU_CAPABILITY={requested}; this CPU runs {best}")
    if chosen == requested:
        return Choice(chosen, f"ATEN_CPU_CAPABILITY={requested}, the best this CPU runs")
    return Choice(chosen, f"ATEN_CPU_CAPABILITY={requested}, but this CPU runs at most {best}")


@dataclass(frozen=True)
class CpuKernels:
    """The loaded CPU kernel library, or why there is none."""

    capability: Optional[str]
    description: str  # one line for the backend report
    error: Optional[str] = None
    compiled_for: Optional[str] = None  # the at::vec capability the library reports it was built with
    cache_bytes: Optional[dict[str, int]] = None  # {"l1d": ..., "l2": ...}: what the kernels size tiles by

    def as_info(self) -> dict[str, Any]:
        return {"cpu_capability": self.capability, "cpu_compiled_for": self.compiled_for, "cpu_cache": self.cache_bytes}


def load_cpu_kernels(
    built: Sequence[str], cpu_features: Mapping[str, bool], environ: Mapping[str, str] = os.environ
) -> CpuKernels:
    """Load the one kernel library :func:`choose` picks; it registers the CPU kernels with torch."""
    choice = choose(built, cpu_features, environ)
    if choice.name is None:
        return CpuKernels(None, choice.note, error=choice.note)
    module = f"stt_kernels._cpu_{choice.name}"
    # Beside this file, where _C was found: an import finder could answer with another copy of
    # the package (an editable install's mapping), whose library belongs to another build.
    candidates = [Path(__file__).with_name(f"_cpu_{choice.name}{suffix}") for suffix in EXTENSION_SUFFIXES]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        error = f"{module} is missing although stt_kernels._C lists it"
        return CpuKernels(None, error, error=error)
    try:
        library = ctypes.CDLL(str(path), mode=os.RTLD_NOW | os.RTLD_LOCAL)
    except OSError as exc:
        error = f"{module} failed to load ({exc})"
        return CpuKernels(None, error, error=error)
    _LIBRARIES.append(library)
    report = library.stt_cpu_kernels_capability
    report.restype = ctypes.c_char_p
    compiled_for = report().decode().removeprefix("stt_")
    cache = library.stt_cpu_cache_bytes
    cache.restype, cache.argtypes = ctypes.c_int64, [ctypes.c_int]
    return CpuKernels(
        choice.name,
        f"C++ kernels in {module} ({choice.note})",
        compiled_for=compiled_for,
        cache_bytes={"l1d": cache(1), "l2": cache(2)},
    )
