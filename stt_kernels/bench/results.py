"""Result rows, the figures derived from them (rates, speedups), and ``results.json``.

``results.json``::

    {"schema": 1, "metadata": {...environment...}, "options": {...}, "ceilings": {...},
     "rows": [Row, ...]}

One row per op x implementation x shape x dtype x pass. Times are seconds, memory bytes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from .ceilings import Ceilings
from .files import write_atomic
from .timing import Timing

SCHEMA = 1


@dataclass
class Row:
    op: str
    implementation: str
    kind: str  # ours | reference | peer
    shape: str
    dims: dict[str, int]
    tokens: int
    dtype: str
    pass_: str
    status: str = "ok"  # ok | OOM | skipped | error
    reason: str = ""
    time_median_s: Optional[float] = None
    time_q1_s: Optional[float] = None
    time_q3_s: Optional[float] = None
    time_min_s: Optional[float] = None
    time_max_s: Optional[float] = None
    repeats: int = 0
    peak_memory_bytes: Optional[int] = None
    baseline_memory_bytes: Optional[int] = None
    memory_method: str = ""
    flops: float = 0.0
    bytes: Optional[float] = 0.0       # None: no traffic model (a whole network)
    gflops_per_s: Optional[float] = None
    gbytes_per_s: Optional[float] = None
    flops_fraction: Optional[float] = None  # of the matmul ceiling for this dtype
    bandwidth_fraction: Optional[float] = None  # of the copy ceiling
    speedup_vs_reference: Optional[float] = None
    best_peer: Optional[str] = None
    speedup_vs_best_peer: Optional[float] = None

    def set_timing(self, timing: Timing, ceilings: Optional[Ceilings]) -> None:
        self.time_median_s, self.time_q1_s, self.time_q3_s = timing.median, timing.q1, timing.q3
        self.time_min_s, self.time_max_s, self.repeats = timing.min, timing.max, timing.repeats
        self.gflops_per_s = self.flops / timing.median / 1e9
        self.gbytes_per_s = None if self.bytes is None else self.bytes / timing.median / 1e9
        if ceilings is not None:
            peak = ceilings.matmul_gflops.get(self.dtype)
            self.flops_fraction = self.gflops_per_s / peak if peak else None
            self.bandwidth_fraction = (self.gbytes_per_s / ceilings.copy_gbps
                                       if ceilings.copy_gbps and self.gbytes_per_s is not None else None)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["pass"] = data.pop("pass_")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Row":
        data = dict(data)
        data["pass_"] = data.pop("pass")
        return cls(**data)


def group_key(row: Row) -> tuple[str, str, str, str]:
    """Rows comparable with each other: same op, shape, dtype and pass."""
    return row.op, row.shape, row.dtype, row.pass_


def add_speedups(rows: list[Row]) -> None:
    """Fill ``speedup_vs_reference`` (reference time / this time) and ``speedup_vs_best_peer``
    (fastest peer's time / this time) for every timed row; > 1 means this row is faster."""
    groups: dict[tuple[str, str, str, str], list[Row]] = {}
    for row in rows:
        groups.setdefault(group_key(row), []).append(row)
    for members in groups.values():
        timed = [r for r in members if r.status == "ok" and r.time_median_s]
        reference = next((r for r in timed if r.kind == "reference"), None)
        peers = [r for r in timed if r.kind == "peer"]
        best = min(peers, key=lambda r: r.time_median_s) if peers else None
        for row in timed:
            if reference is not None:
                row.speedup_vs_reference = reference.time_median_s / row.time_median_s
            if best is not None:
                row.best_peer = best.implementation
                row.speedup_vs_best_peer = best.time_median_s / row.time_median_s


def write_results(path: Path, metadata: dict[str, Any], options: dict[str, Any],
                  ceilings: Optional[Ceilings], rows: list[Row]) -> Path:
    document = {"schema": SCHEMA, "metadata": metadata, "options": options,
                "ceilings": ceilings.as_dict() if ceilings else None,
                "rows": [row.as_dict() for row in rows]}
    return write_atomic(path, json.dumps(document, indent=1, default=str) + "\n")


def read_results(path: Path) -> dict[str, Any]:
    """``results.json`` as written, with ``rows`` turned back into :class:`Row` objects."""
    document = json.loads(Path(path).read_text())
    document["rows"] = [Row.from_dict(row) for row in document["rows"]]
    return document
