"""Backend choice: which implementation of an op runs, and why another cannot.

Precedence, first match wins: the ``backend=`` argument of a call (or of a module), the
innermost :func:`use_backend` context, the ``STT_BACKEND`` environment variable, ``"auto"``.
``"auto"`` picks by device and dtype: a GPU tensor gets ``triton``, else ``cuda``; a CPU tensor
gets ``cpu``; in each case the first one that is available, implements the op and takes the
tensors' dtype and (attention) head dim (:data:`CAPABILITIES`), else ``reference``. A backend
asked for by name that cannot run raises :class:`BackendUnavailableError` saying why and how to
get it; one that cannot take the dtype raises ``TypeError``, or the head dim ``ValueError``,
naming the backends that can, on that device; one that runs but lacks the op raises
``NotImplementedError``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from ._extension import EXTENSION

BACKENDS = ("triton", "cuda", "cpu", "reference")
_CHOICES = BACKENDS + ("auto",)
_AUTO_GPU = ("triton", "cuda")
_AUTO_CPU = ("cpu", "reference")

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Capability:
    """What one backend's kernels take: device types, and dtypes per op. The only place these
    facts live; the ops, the benchmark and the tests read them from here."""

    devices: tuple[str, ...]
    dtypes: dict[str, tuple[torch.dtype, ...]]
    # The largest attention head dim d its kernels take (their register tiles are sized for it).
    max_head_dim: int
    # Ops whose backward accumulates with atomics (sums in a run-dependent order): under
    # torch.use_deterministic_algorithms(True) they raise torch's standard error.
    atomic_backward: tuple[str, ...] = ()


CAPABILITIES: dict[str, Capability] = {
    # Triton's float64 dot is not worth a kernel; the CUDA kernels cover float64 on GPUs.
    "triton": Capability(
        ("cuda",),
        {"attention": _FLOATS[:1] + _FLOATS[2:], "deform_conv2d": _FLOATS[:1] + _FLOATS[2:]},
        max_head_dim=256,
        atomic_backward=("deform_conv2d",),
    ),
    # The CUDA attention backward owns its rows of dQ (a pass of its own) and of dK, dV: no atomics.
    # Its deform_conv2d backward scatters grad_x with atomics (grad_weight: cuBLAS, fixed order).
    "cuda": Capability(
        ("cuda",),
        {"attention": _FLOATS, "deform_conv2d": _FLOATS},
        max_head_dim=256,
        atomic_backward=("deform_conv2d",),
    ),
    # The CPU kernels compute 16-bit inputs in float32; attention takes d up to 256 (tiles sized
    # from the cache, tests/test_attention_cpu.py).
    "cpu": Capability(("cpu",), {"attention": _FLOATS, "deform_conv2d": _FLOATS}, max_head_dim=256),
    # Plain PyTorch takes any d; 256 is the cap the ops promise (flash-attention's), so every
    # backend can be brought to it.
    "reference": Capability(
        ("cpu", "cuda", "meta"), {"attention": _FLOATS, "deform_conv2d": _FLOATS}, max_head_dim=256
    ),
}

# The largest head dim any backend takes: what validation and the nn modules accept before a
# backend is chosen.
MAX_HEAD_DIM = max(capability.max_head_dim for capability in CAPABILITIES.values())


def claimed_dtypes(name: str, op: str) -> tuple[torch.dtype, ...]:
    """The dtypes backend ``name`` takes for ``op`` (``attention`` or ``deform_conv2d``) here.
    Triton's interpreter computes bfloat16 products wrongly, so it is not claimed there."""
    dtypes = CAPABILITIES[name].dtypes[_op_family(op)]
    if name == "triton" and _interpreting():
        dtypes = tuple(d for d in dtypes if d != torch.bfloat16)
    return dtypes


def check_deterministic_backward(name: str, op: str) -> None:
    """torch's standard error (or warning, with ``warn_only``) when deterministic algorithms are
    asked for and backend ``name``'s backward of ``op`` is not one."""
    if _op_family(op) in CAPABILITIES[name].atomic_backward and torch.are_deterministic_algorithms_enabled():
        # The helper torch's own meta kernels call: the same message, warn_only honoured.
        from torch._prims_common import alert_not_deterministic

        alert_not_deterministic(
            f"stt::{op} backward on the '{name}' backend (atomic accumulation; "
            "the 'cpu' and 'reference' backends are deterministic)"
        )


def _op_family(op: str) -> str:
    return "attention" if op.endswith("attention") else op


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


_context_backend: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("stt_backend", default=None)


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run here; the message says why."""


@dataclass(frozen=True)
class BackendStatus:
    """One line of :func:`backends`: is the backend usable now, and if not, why."""

    name: str
    available: bool
    reason: str
    built: bool

    def __str__(self) -> str:
        state = "available" if self.available else "unavailable"
        return f"{self.name:<9} {state:<11} {self.reason}"


def _gpu_visible() -> bool:
    return torch.cuda.is_available()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _status(name: str) -> BackendStatus:
    if name == "reference":
        return BackendStatus(name, True, "plain PyTorch, runs on every device", True)
    if name == "cpu":
        return BackendStatus(name, EXTENSION.with_cpu, EXTENSION.cpu_report, EXTENSION.with_cpu)
    if name == "cuda":
        if not EXTENSION.loaded:
            return BackendStatus(name, False, EXTENSION.error or "stt_kernels._C is not built", False)
        if not (EXTENSION.with_cuda or EXTENSION.with_hip):
            return BackendStatus(
                name,
                False,
                (
                    "stt_kernels._C was built without CUDA/HIP kernels: install a CUDA or ROCm build of "
                    "torch, put nvcc on PATH (or set CUDA_HOME) and rebuild with STT_BUILD_CUDA=1"
                ),
                False,
            )
        kind = "HIP" if EXTENSION.with_hip else "CUDA"
        archs = EXTENSION.info.get("archs", "")
        if not _gpu_visible():
            return BackendStatus(name, False, f"{kind} kernels compiled ({archs}) but no GPU is visible", True)
        return BackendStatus(name, True, f"{kind} kernels compiled ({archs})", True)
    if name == "triton":
        if not _triton_installed():
            return BackendStatus(
                name, False, "Triton is not installed: `pip install triton` (on ROCm, `pytorch-triton-rocm`)", False
            )
        if _gpu_visible():
            return BackendStatus(name, True, "Triton kernels on the GPU", True)
        if _interpreting():
            return BackendStatus(
                name,
                True,
                "interpreter only (TRITON_INTERPRET=1): CPU tensors, slow, "
                "for tests, float32 only (bfloat16 is refused); use 'cpu' for real work",
                True,
            )
        return BackendStatus(
            name,
            False,
            "no GPU is visible; on CPU tensors use 'cpu' (Triton's interpreter, "
            "TRITON_INTERPRET=1, is for tests, float32 only)",
            True,
        )
    raise ValueError(f"backend must be one of {', '.join(_CHOICES)}; got {name!r}")


def backends() -> dict[str, BackendStatus]:
    """Report every backend: ``{name: BackendStatus(available, reason, built)}``."""
    return {name: _status(name) for name in BACKENDS}


def _check_name(backend: str, source: str) -> str:
    name = backend.strip().lower()
    if name not in _CHOICES:
        raise ValueError(f"{source} must be one of {', '.join(_CHOICES)}; got {backend!r}")
    return name


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Run the ops inside the ``with`` block on ``backend`` unless a call names its own.

    Under ``torch.compile`` and ``torch.export`` the choice in force when a function is traced
    is part of its graph; without one the graph records ``auto``, resolved when the op runs.
    """
    token = _context_backend.set(_check_name(backend, "use_backend(backend)"))
    try:
        yield
    finally:
        _context_backend.reset(token)


@torch.compiler.assume_constant_result
def _context_choice() -> str:
    # torch.compile bakes the backend choice into the graph at trace time anyway; saying so
    # also spares Dynamo the ContextVar, which torch < 2.14 cannot trace.
    return _context_backend.get() or ""


def requested_backend(backend: Optional[str]) -> str:
    """The backend name in force for one call, before ``auto`` is resolved."""
    if backend is not None:
        return _check_name(backend, "backend")
    if name := _context_choice():
        return name
    if env := os.environ.get("STT_BACKEND"):
        return _check_name(env, "the STT_BACKEND environment variable")
    return "auto"


def _runs_on(name: str, device: torch.device) -> Optional[str]:
    """``None`` if backend ``name`` can take tensors on ``device``, else the reason it cannot."""
    status = _status(name)
    if not status.available:
        return status.reason
    on_gpu = device.type == "cuda"
    if name == "cpu" and on_gpu:
        return "it runs on CPU tensors only; move the tensors with .cpu() or pick 'cuda'/'triton'"
    if name == "cuda" and not on_gpu:
        return "it runs on GPU tensors only; move the tensors with .cuda() or pick 'cpu'"
    if name == "triton" and not on_gpu and not _interpreting():
        return (
            "it runs on GPU tensors; use 'cpu' for CPU tensors (TRITON_INTERPRET=1 runs Triton on the CPU "
            "for tests, float32 only)"
        )
    if name == "triton" and on_gpu and _interpreting():
        return "TRITON_INTERPRET=1 is set, which runs Triton on CPU tensors only"
    if device.type not in ("cpu", "cuda", "meta") and name != "reference":
        return f"it does not run on {device.type} tensors; use backend='reference'"
    return None


def resolve(
    backend: Optional[str],
    device: torch.device,
    op: str,
    implemented: frozenset[str],
    dtype: Optional[torch.dtype] = None,
    head_dim: Optional[int] = None,
) -> str:
    """Pick the concrete backend for one call of ``op`` on ``dtype`` tensors living on ``device``.

    ``implemented`` names the backends that have a kernel for ``op``; ``dtype=None`` skips the
    dtype check (callers that have no tensor yet), ``head_dim=None`` the head dim check (ops
    other than attention).
    """

    def fits(candidate: str) -> bool:
        return head_dim is None or head_dim <= CAPABILITIES[candidate].max_head_dim

    def takes(candidate: str) -> bool:
        return (dtype is None or dtype in claimed_dtypes(candidate, op)) and fits(candidate)

    name = requested_backend(backend)
    if name == "auto":
        for candidate in (_AUTO_GPU if device.type == "cuda" else _AUTO_CPU) + ("reference",):
            if candidate in implemented and _runs_on(candidate, device) is None and takes(candidate):
                return candidate
        raise AssertionError("the reference backend runs everywhere")  # pragma: no cover
    why_not = _runs_on(name, device)
    if why_not is not None:
        raise BackendUnavailableError(f"backend '{name}' cannot run {op} on {device.type} tensors: {why_not}")
    if name not in implemented:
        raise NotImplementedError(
            f"{op} has no '{name}' kernel yet; available for it: {', '.join(sorted(implemented))}"
        )
    able = [c for c in BACKENDS if c != name and c in implemented and _runs_on(c, device) is None and takes(c)]
    if not fits(name):
        raise ValueError(
            f"backend '{name}' takes head dims d up to {CAPABILITIES[name].max_head_dim} for {op}; got "
            f"d = {head_dim}: on {device.type} tensors use {' or '.join(repr(c) for c in able)}, or 'auto'"
        )
    if not takes(name):
        why = (
            " under TRITON_INTERPRET=1: Triton's interpreter computes bfloat16 tl.dot wrongly (errors of ~1e9)"
            if name == "triton" and _interpreting() and dtype == torch.bfloat16
            else ""
        )
        raise TypeError(
            f"backend '{name}' does not take {_dtype_name(dtype)} tensors for {op}{why} (it takes "
            f"{', '.join(map(_dtype_name, claimed_dtypes(name, op)))}); on {device.type} tensors "
            f"use {' or '.join(repr(c) for c in able)}, or 'auto'"
        )
    return name
