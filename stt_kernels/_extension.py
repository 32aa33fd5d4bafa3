"""Loading the compiled libraries and explaining why they are missing.

``stt_kernels._C`` registers the ops (``torch.ops.stt.*``: schemas, C++ autograd, the public ops'
CPU/CUDA kernels) and the CUDA kernels when it loads; then one CPU kernel library, the best this
CPU runs, registers the CPU kernels (``_isa.py``).
A library built against another torch usually fails to load with an undefined-symbol
error; we turn that into a sentence naming both versions, read from the build record
``_build_info.json`` that ``setup.py`` writes beside the library.
"""

from __future__ import annotations

import importlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from . import _isa

_BUILD_INFO_FILE = Path(__file__).with_name("_build_info.json")
_REBUILD_HINT = "rebuild it with `pip install --no-build-isolation -e .` in the source tree (or `make build`)"
_REINSTALL_HINT = (
    "rebuild it against your torch: `pip install --no-build-isolation --no-deps --force-reinstall "
    "--no-binary stt-kernels stt-kernels`"
)


def _in_source_tree() -> bool:
    """Whether this package is a checkout's (``setup.py`` beside it), where no library is the
    normal state before the first build, rather than an installed copy."""
    return (Path(__file__).resolve().parent.parent / "setup.py").exists()


def _fix_hint() -> str:
    return _REBUILD_HINT if _in_source_tree() else _REINSTALL_HINT


@dataclass(frozen=True)
class Extension:
    """What is known about ``stt_kernels._C``: loaded or not, and what it was built with."""

    loaded: bool
    error: Optional[str]
    info: dict[str, Any] = field(default_factory=dict)
    broken: bool = False  # a library was expected but is unusable (another torch, bad load, missing)
    cpu: Optional[_isa.CpuKernels] = None  # the CPU kernel library, once _C has loaded

    @property
    def with_cpu(self) -> bool:
        return self.loaded and self.cpu is not None and self.cpu.capability is not None

    @property
    def cpu_report(self) -> str:
        """Where the CPU kernels come from, or why there are none."""
        if not self.loaded:
            return self.error or "stt_kernels._C is not built"
        assert self.cpu is not None
        return self.cpu.description if self.cpu.error is None else f"{self.cpu.error}; {_fix_hint()}"

    @property
    def with_cuda(self) -> bool:
        return self.loaded and bool(self.info.get("with_cuda"))

    @property
    def with_hip(self) -> bool:
        return self.loaded and bool(self.info.get("with_hip"))


def _read_build_record() -> dict[str, Any]:
    try:
        return json.loads(_BUILD_INFO_FILE.read_text())
    except (OSError, ValueError):
        return {}


def _runtime_description() -> str:
    gpu = (
        f"CUDA {torch.version.cuda}"
        if torch.version.cuda
        else (f"ROCm {torch.version.hip}" if getattr(torch.version, "hip", None) else "no CUDA")
    )
    return f"torch {torch.__version__}, {gpu}"


def _built_description(record: dict[str, Any]) -> str:
    gpu = (
        record.get("cuda_version")
        and f"CUDA {record['cuda_version']}"
        or (record.get("hip_version") and f"ROCm {record['hip_version']}" or "no CUDA")
    )
    return f"torch {record.get('torch_version', '?')}, {gpu}"


def _mismatch(record: dict[str, Any]) -> Optional[str]:
    built = record.get("torch_version")
    if built is None:
        return None

    # The C++ ABI follows major.minor (and the local build tag such as +cu130).
    def key(version: str) -> tuple[str, str]:
        public, _, local = version.partition("+")
        return ".".join(public.split(".")[:2]), local

    if key(built) != key(torch.__version__):
        return (
            f"stt_kernels._C was built for {_built_description(record)}; "
            f"you have {_runtime_description()}: {_fix_hint()}"
        )
    return None


def _load() -> Extension:
    record = _read_build_record()
    try:
        module = importlib.import_module("stt_kernels._C")
    except ModuleNotFoundError as exc:
        if exc.name != "stt_kernels._C":
            raise
        if record or not _in_source_tree():
            # Built or installed, so the compiled backends were expected: their absence must
            # not pass for the normal state of a fresh checkout.
            return Extension(
                loaded=False,
                error=f"stt_kernels._C is missing from {Path(__file__).parent}; {_fix_hint()}",
                broken=True,
            )
        return Extension(loaded=False, error=f"stt_kernels._C is not built; {_REBUILD_HINT}")
    except ImportError as exc:
        reason = _mismatch(record) or f"stt_kernels._C failed to load; {_fix_hint()}"
        return Extension(loaded=False, error=f"{reason} (the loader said: {exc})", broken=True)
    info = dict(module.build_info())
    reason = _mismatch({**record, **info})
    if reason is not None:
        # It loaded, but the C++ ABI of another torch version can crash later: refuse it.
        return Extension(loaded=False, error=reason, info=info, broken=True)
    features = module.cpu_features() if hasattr(module, "cpu_features") else {}
    cpu = _isa.load_cpu_kernels(info.get("cpu_capabilities", []), features)
    return Extension(loaded=True, error=None, info={**info, **cpu.as_info()}, cpu=cpu)


EXTENSION = _load()

if EXTENSION.broken:
    # A library was expected (it exists, or the package was built or installed) but cannot
    # be used: say so once, at import, or 'auto' would quietly run the slow reference. In a
    # checkout that was never built the backend report is enough.
    warnings.warn(
        f"{EXTENSION.error}; the 'cpu' and 'cuda' backends are off, 'reference' and 'triton' still work",
        RuntimeWarning,
        stacklevel=2,
    )
elif EXTENSION.loaded and not EXTENSION.with_cpu:
    warnings.warn(
        f"{EXTENSION.cpu_report}; the 'cpu' backend is off, 'reference' runs CPU tensors", RuntimeWarning, stacklevel=2
    )
