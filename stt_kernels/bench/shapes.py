"""Problem sizes: the STT-UNET levels, scaled per tier.

STT-UNET (``stt_model`` preset ``mitoem-r``, the paper's settings) runs an ``SSTAttention`` at
each of its 4 levels on a ``32 x 320 x 320`` patch, batch 2. Downsampling is ``1 x 2 x 2``, so T
stays 32 while H = W halves; the channels are those of the preset, 4 heads everywhere:

    level   H = W   C    heads   d = C / heads
    0       320     28   4       7
    1       160     36   4       9
    2        80     48   4      12
    3        40     64   4      16

``full`` is exactly that (for GPUs; the reference's N x N scores at level 0 do not fit anywhere
and are recorded as OOM). ``default`` keeps the channels and heads on a ``16 x 64 x 64`` patch,
batch 1 (H = W = 64/32/16/8): the level structure at sizes where the reference still fits in a
workstation's memory and a CPU finishes. ``quick`` keeps the first two levels' channels at
T = 8, H = W = 16 and 8: the whole engine end to end in a few minutes on two CPU cores.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

TIERS = ("quick", "default", "full")


@dataclass(frozen=True)
class Level:
    """One STT-UNET level as the SST block sees it: input ``(B, C, T, H, W)``, ``heads`` heads."""

    level: int
    batch: int
    t: int
    h: int
    w: int
    channels: int
    heads: int

    @property
    def head_dim(self) -> int:
        return self.channels // self.heads


_CHANNELS = (28, 36, 48, 64)
_HEADS = 4


def levels(tier: str) -> list[Level]:
    """The levels benchmarked in ``tier`` (one of :data:`TIERS`), finest first."""
    if tier == "full":
        return [Level(i, 2, 32, 320 >> i, 320 >> i, c, _HEADS) for i, c in enumerate(_CHANNELS)]
    if tier == "default":
        return [Level(i, 1, 16, 64 >> i, 64 >> i, c, _HEADS) for i, c in enumerate(_CHANNELS)]
    if tier == "quick":
        return [Level(i, 1, 8, 16 >> i, 16 >> i, c, _HEADS) for i, c in enumerate(_CHANNELS[:2])]
    raise ValueError(f"tier must be one of {', '.join(TIERS)}; got {tier!r}")


def tiny(level: Level) -> Level:
    """``level`` with its channels and heads but a handful of tokens: for asking an
    implementation whether it runs at all, and for loading what it loads on first use."""
    return dataclasses.replace(level, batch=1, t=2, h=4, w=4)
