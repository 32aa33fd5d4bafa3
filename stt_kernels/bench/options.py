"""What a run measures and how hard it tries: :class:`Options`, shared by the CLI, ``stt bench``
and the tests."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .cases import PASSES
from .shapes import TIERS

OUR_BACKENDS = ("triton", "cuda", "cpu", "reference")
GPU_DTYPES = ("float32", "float16", "bfloat16")
CPU_DTYPES = ("float32",)
# What --dtypes may name: the floating dtypes every op takes (each backend declines what it lacks).
DTYPES = ("float32", "float16", "bfloat16", "float64")

# (warm-up calls, repeats at most, seconds of timed calls per row before stopping early)
_EFFORT = {"quick": (1, 5, 1.0), "default": (2, 10, 10.0), "full": (3, 20, 20.0)}


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass
class Options:
    """A benchmark run. ``None`` means "the tier's / device's default".

    - ``tier``: ``quick`` (smoke test, minutes on a laptop CPU), ``default``, ``full`` (the
      paper's 32 x 320 x 320 patch; for GPUs). Sizes: ``shapes.py``.
    - ``ops``: case names (``cases.CASES``); ``backends``: which of ours run (``triton``,
      ``cuda``, ``cpu``, ``reference``); ``peers``: peer names or prefixes (``sdpa``,
      ``sdpa:flash``, ``torchvision``...), ``[]`` for none.
    - ``dtypes``: names (``float32``...); default every dtype the device's backends claim.
    - ``memory_cap_bytes``: CPU: per-case working memory allowed above the worker's baseline
      (default three quarters of the memory available); GPU: a per-process limit of the
      allocator. Cases above it are recorded as OOM.
    - ``cpu_memory``: measure CPU peak memory in a fresh subprocess per row (slower, and the
      guard that keeps an OOM case out of this process).
    - ``threads``: torch's CPU threads for the run and its subprocesses (default: torch's own
      choice). On a machine shared with other work, fewer threads than cores avoids OpenMP
      waiting for descheduled threads, which can cost whole scheduler time slices per call.
    - ``results_md``: also update this device's section of a ``RESULTS.md``.
    - ``overwrite``: replace the results of an earlier run in ``out`` (refused without it).
    """

    out: Path
    tier: str = "default"
    ops: Optional[Sequence[str]] = None
    backends: Optional[Sequence[str]] = None
    peers: Optional[Sequence[str]] = None
    dtypes: Optional[Sequence[str]] = None
    passes: Sequence[str] = PASSES
    device: Optional[str] = None
    warmup: Optional[int] = None
    repeats: Optional[int] = None
    budget_s: Optional[float] = None
    memory_cap_bytes: Optional[int] = None
    cpu_memory: bool = True
    probe_timeout_s: float = 600.0
    threads: Optional[int] = None
    plots: bool = True
    results_md: Optional[Path] = None
    command: Optional[list[str]] = None
    seed: int = 0
    overwrite: bool = False
    progress: Callable[[str], None] = field(default=_stderr, repr=False)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.tier not in TIERS:
            raise ValueError(f"tier must be one of {', '.join(TIERS)}; got {self.tier!r}")
        for p in self.passes:
            if p not in PASSES:
                raise ValueError(f"passes must be among {', '.join(PASSES)}; got {p!r}")
        for b in self.backends or ():
            if b not in OUR_BACKENDS:
                raise ValueError(f"backends must be among {', '.join(OUR_BACKENDS)}; got {b!r}")
        for name in self.dtypes or ():
            if name not in DTYPES:
                raise ValueError(f"dtypes (--dtypes) must be among {', '.join(DTYPES)}; got {name!r}")
        # Refused here, before anything is measured: each would make a run that measures nothing
        # or fails at its end.
        for name, value, minimum in (("repeats", self.repeats, 1), ("warmup", self.warmup, 0),
                                     ("threads", self.threads, 1)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
                raise ValueError(f"{name} (--{name}) must be an int >= {minimum}; got {value!r}")
        for name, value in (("budget_s", self.budget_s), ("memory_cap_bytes (--memory-cap-mb)", self.memory_cap_bytes),
                            ("probe_timeout_s", self.probe_timeout_s)):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive; got {value!r}")
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"out (--out) must be a directory for results.json, report.md and the plots; "
                             f"{str(self.out)!r} is an existing file")
        earlier = [name for name in ("results.json", "report.md") if (self.out / name).exists()]
        if earlier and not self.overwrite:
            raise ValueError(f"out (--out) {str(self.out)!r} already holds an earlier run's {', '.join(earlier)}; "
                             "give another folder, or --overwrite to replace them")

    def torch_device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def torch_dtypes(self, device: torch.device) -> list[torch.dtype]:
        names = self.dtypes or (GPU_DTYPES if device.type == "cuda" else CPU_DTYPES)
        return [getattr(torch, name) for name in names]

    def effort(self) -> tuple[int, int, float]:
        """(warm-up calls, repeats, per-row time budget in seconds)."""
        warmup, repeats, budget = _EFFORT[self.tier]
        return (self.warmup if self.warmup is not None else warmup,
                self.repeats if self.repeats is not None else repeats,
                self.budget_s if self.budget_s is not None else budget)

    def wants(self, implementation_name: str, kind: str) -> bool:
        """Whether the ``backends``/``peers`` filters keep this implementation."""
        if kind == "peer":
            return self.peers is None or any(
                implementation_name == p or implementation_name.startswith(p + ":") for p in self.peers)
        backend = implementation_name.removeprefix("ours:")
        return self.backends is None or backend in self.backends

    def as_dict(self) -> dict[str, object]:
        return {"tier": self.tier, "ops": self.ops, "backends": self.backends, "peers": self.peers,
                "dtypes": self.dtypes, "passes": list(self.passes), "device": self.device,
                "effort": self.effort(), "memory_cap_bytes": self.memory_cap_bytes,
                "cpu_memory": self.cpu_memory, "threads": self.threads, "seed": self.seed}
