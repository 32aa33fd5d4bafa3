"""One runnable combination (case x implementation x level x dtype x pass), and what its
failures mean: out of memory, unsupported, or a real error."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..backend import BackendUnavailableError
from .cases import Case
from .implementation import Implementation, Unsupported
from .shapes import Level

STATUSES = ("ok", "OOM", "skipped", "error")

_OOM_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory")


def is_oom(exc: BaseException) -> bool:
    """Allocation failure on any device: CUDA/HIP OOM, Python's MemoryError, or the CPU
    allocator failing (under a memory cap it raises a plain RuntimeError)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MESSAGES)


def classify(exc: BaseException) -> tuple[str, str]:
    """``(status, reason)`` for an exception raised while preparing or running a workload."""
    first_line = (str(exc).strip().splitlines() or [""])[0][:300]
    if is_oom(exc):
        return "OOM", f"{type(exc).__name__}: {first_line}"
    if isinstance(exc, Unsupported):
        return "skipped", first_line
    return "error", f"{type(exc).__name__}: {first_line}"


@dataclass
class Workload:
    """``step()`` runs one pass: the forward, or the forward and the backward (gradients of
    every input, taken with ``torch.autograd.grad`` so nothing accumulates between steps)."""

    step: Callable[[], None]
    leaves: tuple[torch.Tensor, ...]


def prepare(case: Case, implementation: Implementation, level: Level, dtype: torch.dtype,
            device: torch.device, pass_: str, seed: int = 0) -> Workload:
    """Make the inputs and run one step, so a combination that cannot run fails here.

    Raises :class:`Unsupported` for combinations the implementation declines (including any
    failure of a peer's first call: their limits are theirs to document), and lets OOM and
    our own errors through.
    """
    reason = implementation.unsupported(device, dtype, pass_)
    if reason is not None:
        raise Unsupported(reason)
    generator = torch.Generator().manual_seed(seed)
    leaves = case.leaves(level, dtype, device, generator)
    backward = pass_ == "forward+backward"

    def forward() -> torch.Tensor:
        with implementation.context():
            return implementation.call(*case.arguments(leaves))

    try:
        if implementation.make_step is not None:
            step = implementation.make_step(level, leaves, pass_)
        elif not backward:
            def step() -> None:
                with torch.no_grad():
                    forward()
        else:
            for leaf in leaves:
                leaf.requires_grad_(True)
            with torch.no_grad():
                shape = forward().shape
            grad_out = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)

            def step() -> None:
                with implementation.context():
                    torch.autograd.grad(forward(), leaves, grad_out)
        step()
    except (NotImplementedError, BackendUnavailableError) as exc:
        raise Unsupported(str(exc)) from None
    except Exception as exc:
        if implementation.kind == "peer" and not is_oom(exc) and not isinstance(exc, Unsupported):
            raise Unsupported(f"{type(exc).__name__}: {str(exc).strip()[:300]}") from None
        raise
    return Workload(step, leaves)
