"""The type of an implementation under test, and how it declines a combination."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Optional, Sequence

import torch

from .shapes import Level

KINDS = ("ours", "reference", "peer")


class Unsupported(Exception):
    """This implementation cannot run this combination (dtype, device, shape, pass); the
    message says why. The row is recorded as ``skipped``, the run goes on."""


def _runs_everywhere(device: torch.device, dtype: torch.dtype, pass_: str) -> Optional[str]:
    return None


@dataclass(frozen=True)
class Implementation:
    """One way to compute an op.

    ``call`` takes the case's arguments (``Case.arguments``) and returns the op's output in the
    op's own layout; any layout change a peer needs happens inside it, so it is timed.
    ``make_step``, instead of ``call``, for work that is not one differentiable call (a whole
    training step): given the level, the case's leaves and the pass, it does its set-up and
    returns the step to time.
    ``devices``: device types it is listed for at all. ``unsupported(device, dtype, pass)``: why
    it cannot run a combination it is listed for, or ``None``. ``context``: entered around
    every call (e.g. an SDPA backend choice).
    """

    name: str
    op: str
    kind: str
    call: Optional[Callable[..., torch.Tensor]] = None
    devices: tuple[str, ...] = ("cpu", "cuda")
    unsupported: Callable[[torch.device, torch.dtype, str], Optional[str]] = _runs_everywhere
    context: Callable[[], ContextManager[object]] = field(default=contextlib.nullcontext)
    make_step: Optional[Callable[[Level, Sequence[torch.Tensor], str], Callable[[], None]]] = None

    def __post_init__(self) -> None:
        if (self.call is None) == (self.make_step is None):
            raise ValueError(f"{self.name}: give exactly one of call and make_step")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
