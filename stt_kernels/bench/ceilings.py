"""What this machine can do at best, measured in the same run: the yardsticks for GFLOP/s
and GB/s. FLOP/s: a large square matmul per dtype benchmarked (float32 as torch is set
up, TF32 only if the user enabled it). Bandwidth: a large copy (read plus write counted)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from .timing import measure

# (matmul size n, copy size in bytes) per device type and tier: large enough to reach
# the plateau, small enough for --quick on two shared cores.
_SIZES = {
    ("cpu", "quick"): (1024, 64 << 20),
    ("cpu", "default"): (2048, 256 << 20),
    ("cpu", "full"): (2048, 256 << 20),
    ("cuda", "quick"): (4096, 256 << 20),
    ("cuda", "default"): (8192, 1 << 30),
    ("cuda", "full"): (8192, 1 << 30),
}


@dataclass(frozen=True)
class Ceilings:
    matmul_gflops: dict[str, float]  # dtype name -> GFLOP/s
    copy_gbps: float
    matmul_n: int
    copy_bytes: int
    allow_tf32: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_ceilings(device: torch.device, dtypes: list[torch.dtype], tier: str) -> Ceilings:
    n, copy_bytes = _SIZES[(device.type, tier)]
    matmul: dict[str, float] = {}
    for dtype in dtypes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        best = measure(lambda: torch.mm(a, b), device, warmup=2, repeats=5, budget_s=5.0).min
        matmul[str(dtype).removeprefix("torch.")] = 2.0 * n ** 3 / best / 1e9
        del a, b
    src = torch.ones(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    best = measure(lambda: dst.copy_(src), device, warmup=2, repeats=5, budget_s=5.0).min
    del src, dst
    return Ceilings(matmul, 2.0 * copy_bytes / best / 1e9, n, copy_bytes,
                    bool(torch.backends.cuda.matmul.allow_tf32))
