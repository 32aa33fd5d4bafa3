"""Sliding-window inference over volumes larger than memory.

Windows of the model's input size ``(T, H, W)`` tile the volume with a stride of
``window - overlap``; each prediction is weighted by a Gaussian that peaks at the window's
centre, and the weighted sum is normalised, so seams disappear. The volume is processed in
output *blocks*: for each block, every window that touches it is predicted over the block's
halo, the block's voxels are final (they have seen all their windows) and are written,
as uint8 probabilities (``round(255 p)``), to the output array (a numpy array, an h5py or
zarr dataset). Peak memory is set by the block and window sizes, never by the volume size;
windows that straddle a block border are predicted once per block they touch (the price of
that bound, ``(1 + window / block)`` per axis).

Test-time augmentation (``InferOptions.tta``) predicts each window under 4 variants (the flips
of the (H, W) plane), 8 (those, with and without a flip of T) or 16 (those, with and without a
transpose of H and W: the window must be square in the plane), maps every prediction back to
the window's own orientation and reduces them voxel by voxel (``tta_reduce``: mean, min or
max) before blending; the variants run one after another on the same batch, so memory stays
that of one batch of windows.

Several processes (``torchrun``) split the blocks between them (block ``i`` goes to rank
``i % world``); blocks are independent, so seams between ranks blend like any other.

The input is mapped to [0, 1] by ``InferOptions.intensity``, the rule the model was trained
with (``data.intensity``; :mod:`stt_model.data.intensity`), and checked first in one pass over
the volume in output blocks: NaN/Inf, or values the rule cannot map, are refused with their
location before any window runs. Probabilities that come out non-finite (a diverged model)
are refused too, naming the block, rather than written as 0.

Missing sections (``InferOptions.bridge_blank``, on by default): a slice of the input that is
blank or nearly constant (its standard deviation, in the [0, 1] range, under
``BLANK_SLICE_STD``) holds nothing the model can read, so its probabilities drop and any 3D
decoding cuts every object that crosses it in two. Such a slice's probabilities are replaced
by those interpolated linearly in z between the nearest non-blank slices below and above
(copied from the one there is at the volume's ends), before anything decodes them; the
indices are kept in :attr:`SlidingWindow.bridged`. A real section with structure has a
standard deviation tens of times larger than the threshold.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .data.intensity import IntensitySpec, check_image, parse_intensity, to_unit_range
from .errors import UserInputError
from .progress import Progress

Triple = tuple[int, int, int]
TTA_VARIANTS = (1, 4, 8, 16)
TTA_REDUCTIONS = ("mean", "min", "max")
# A slice whose intensities (mapped to [0, 1]) vary by less than this is a missing section: an
# EM section with membranes has a standard deviation of about 0.05-0.2; a blank one, filled
# with one value (0, 255, or the stack's mean) or with faint compression noise, stays under
# 1 % of the range.
BLANK_SLICE_STD = 0.01


@dataclass(frozen=True)
class Variant:
    """One test-time augmentation of ``(N, C, T, H, W)`` windows: flip the axes ``flips``, then
    (``transpose``) swap H and W. :meth:`invert` maps a prediction on the variant back."""

    flips: tuple[int, ...] = ()
    transpose: bool = False

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flip(self.flips) if self.flips else x
        return x.transpose(3, 4) if self.transpose else x

    def invert(self, y: torch.Tensor) -> torch.Tensor:
        y = y.transpose(3, 4) if self.transpose else y
        return y.flip(self.flips) if self.flips else y


def tta_variants(count: int) -> list[Variant]:
    """The ``count`` (1, 4, 8 or 16) variants of ``InferOptions.tta``, the identity first."""
    if count not in TTA_VARIANTS:
        raise UserInputError(f"tta must be one of {', '.join(map(str, TTA_VARIANTS))} variants; got {count}")
    planes = [(), (3,), (4,), (3, 4)] if count >= 4 else [()]
    flips = planes + [(2, *dims) for dims in planes] if count >= 8 else planes
    return [Variant(dims, transpose) for transpose in ((False, True) if count == 16 else (False,)) for dims in flips]


@dataclass
class InferOptions:
    window: Triple  # (T, H, W) of one model input
    overlap: float = 0.25  # fraction of the window shared by neighbours, per axis
    batch_size: int = 2
    block: Optional[Triple] = None  # output block; default: about 4 windows per axis, capped by the volume
    tta: int = 1  # test-time variants per window: 1 (none), 4, 8 or 16 (module doc)
    tta_reduce: Literal["mean", "min", "max"] = "mean"
    flip_tta: bool = False  # the former switch for tta=4, kept for callers that set it
    amp: bool = True  # bfloat16/float16 autocast on GPU
    device: Optional[str] = None
    rank: int = 0
    world: int = 1
    progress: bool = True
    intensity: IntensitySpec = "dtype"  # the model's data.intensity: how stored values map to [0, 1]
    bridge_blank: bool = True  # fill blank input slices' probabilities from their neighbours (module doc)

    def __post_init__(self) -> None:
        if len(self.window) != 3 or min(self.window) < 1:
            raise UserInputError(f"window must be three positive sizes (T, H, W); got {self.window}")
        if not 0 <= self.overlap < 1:
            raise UserInputError(f"overlap must be in [0, 1); got {self.overlap}")
        if self.block is not None and (len(self.block) != 3 or min(self.block) < 1):
            raise UserInputError(f"block must be three positive sizes (Z, Y, X); got {self.block}")
        if self.batch_size < 1:
            raise UserInputError(f"batch_size must be >= 1; got {self.batch_size}")
        if not 0 <= self.rank < self.world:
            raise UserInputError(f"rank must be in [0, world); got rank {self.rank} of {self.world}")
        parse_intensity(self.intensity)
        if self.flip_tta and self.tta == 1:
            self.tta = 4
        tta_variants(self.tta)
        if self.tta == 16 and self.window[1] != self.window[2]:
            raise UserInputError(
                f"tta=16 transposes the (H, W) plane of each window, which needs a square window; "
                f"the window is {tuple(self.window)} (use tta=8, or a model with H = W patches)"
            )
        if self.tta_reduce not in TTA_REDUCTIONS:
            raise UserInputError(f"tta_reduce must be one of {', '.join(TTA_REDUCTIONS)}; got {self.tta_reduce!r}")

    @property
    def stride(self) -> Triple:
        return tuple(max(1, w - int(round(self.overlap * w))) for w in self.window)  # type: ignore[return-value]


def gaussian_weight(window: Sequence[int], sigma_fraction: float = 0.125) -> np.ndarray:
    """``(T, H, W)`` weights: a Gaussian with sigma = ``sigma_fraction`` x size per axis, scaled
    to a peak of 1 and floored so that border voxels (seen by one window) are never 0/0."""
    axes = []
    for size in window:
        x = np.arange(size, dtype=np.float64) - (size - 1) / 2
        sigma = max(sigma_fraction * size, 1e-3)
        axes.append(np.exp(-0.5 * (x / sigma) ** 2))
    weight = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    weight /= weight.max()
    return np.maximum(weight, 1e-3).astype(np.float32)


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Starts of the windows along one axis: every ``stride``, the last one flush with the end."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window, stride))
    starts.append(length - window)
    return starts


def _blocks(shape: Triple, block: Triple) -> list[tuple[slice, slice, slice]]:
    ranges = [[slice(a, min(a + b, n)) for a in range(0, n, b)] for n, b in zip(shape, block)]
    return [tuple(s) for s in itertools.product(*ranges)]  # type: ignore[misc]


def _read_padded(
    volume: Any, region: Sequence[slice], window: Triple, shape: Triple, intensity: IntensitySpec = "dtype"
) -> np.ndarray:
    """``volume[region]`` as float32 in [0, 1] by the ``intensity`` rule (the one training
    used), reflect-padded up to the window where the volume itself is smaller."""
    data = to_unit_range(np.asarray(volume[tuple(region)]), intensity)
    pad = [(0, max(0, w - n)) for w, n in zip(window, shape)]
    if any(p[1] for p in pad):
        data = np.pad(data, pad, mode="reflect" if min(data.shape) > 1 else "edge")
    return data


class SlidingWindow:
    """Predicts probabilities for a whole volume with ``model`` (logits ``(B, C, T, H, W)``)."""

    def __init__(self, model: nn.Module, options: InferOptions):
        self.model, self.options = model, options
        self.device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.weight = torch.from_numpy(gaussian_weight(options.window)).to(self.device)
        self.variants = tta_variants(options.tta)
        self.bridged: list[int] = []  # the blank slices :meth:`run` bridged

    def _autocast(self):
        use = self.options.amp and self.device.type == "cuda"
        dtype = torch.bfloat16 if use and torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast(self.device.type, dtype=dtype, enabled=use)

    @torch.no_grad()
    def _probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """``(N, 1, T, H, W)`` -> sigmoid probabilities ``(N, C, T, H, W)`` float32, reduced over
        the test-time variants (one at a time: memory is one variant's)."""
        reduce = self.options.tta_reduce
        total: Optional[torch.Tensor] = None
        for variant in self.variants:
            with self._autocast():
                p = variant.invert(torch.sigmoid(self.model(variant.apply(batch)).float()))
            if total is None:
                total = p.contiguous()
            elif reduce == "mean":
                total += p
            elif reduce == "min":
                torch.minimum(total, p, out=total)
            else:
                torch.maximum(total, p, out=total)
        assert total is not None
        return total / len(self.variants) if reduce == "mean" else total

    def _windows(self, block: tuple[slice, ...], shape: Triple) -> list[Triple]:
        per_axis = []
        for axis, s in enumerate(block):
            w, n = self.options.window[axis], shape[axis]
            starts = window_starts(n, w, self.options.stride[axis])
            per_axis.append([p for p in starts if p < s.stop and p + w > s.start])
        return list(itertools.product(*per_axis))

    def predict_block(self, volume: Any, block: tuple[slice, ...], shape: Triple) -> np.ndarray:
        """Blended probabilities of the voxels of ``block``: ``(C, *block shape)`` float32."""
        window = self.options.window
        starts = self._windows(block, shape)
        lo = [min(s[axis] for s in starts) for axis in range(3)]
        hi = [min(max(s[axis] for s in starts) + window[axis], shape[axis]) for axis in range(3)]
        region = [slice(a, b) for a, b in zip(lo, hi)]
        data = torch.from_numpy(_read_padded(volume, region, window, shape, self.options.intensity))
        extent = data.shape
        acc: Optional[torch.Tensor] = None
        weight_sum = torch.zeros(extent, device=self.device)
        for chunk in _batched(starts, self.options.batch_size):
            offsets = [tuple(s[a] - lo[a] for a in range(3)) for s in chunk]
            batch = torch.stack(
                [data[o[0] : o[0] + window[0], o[1] : o[1] + window[1], o[2] : o[2] + window[2]] for o in offsets]
            )[:, None].to(self.device)
            probs = self._probabilities(batch) * self.weight
            if acc is None:
                acc = torch.zeros((probs.shape[1], *extent), device=self.device)
            for p, o in zip(probs, offsets):
                target = (slice(o[0], o[0] + window[0]), slice(o[1], o[1] + window[1]), slice(o[2], o[2] + window[2]))
                acc[(slice(None), *target)] += p
                weight_sum[target] += self.weight
        inner = tuple(slice(s.start - a, s.stop - a) for s, a in zip(block, lo))
        return (acc[(slice(None), *inner)] / weight_sum[inner]).cpu().numpy()

    def run(self, volume: Any, out: Any) -> Any:
        """Predict ``volume`` (array-like ``(Z, Y, X)``, mapped by ``options.intensity``) into ``out``
        (array-like ``(C, Z, Y, X)`` uint8, or float32 to keep full precision)."""
        shape = tuple(int(n) for n in volume.shape)
        if len(shape) != 3:
            raise UserInputError(f"volume must be 3-d (Z, Y, X); got shape {shape}")
        if tuple(out.shape[1:]) != shape:
            raise UserInputError(f"out must have shape (C, {shape[0]}, {shape[1]}, {shape[2]}); got {tuple(out.shape)}")
        # Every rank checks the whole volume, so all of them refuse it, not just the one that
        # holds the bad voxel; reads stay within one output block.
        check_image(volume, self.options.intensity, block=block_size(shape, self.options), name="the image")
        blocks = rank_blocks(shape, self.options)
        progress = Progress(len(blocks), "predict") if self.options.progress else None
        self.model.eval()
        for done, block in enumerate(blocks, 1):
            probs = self.predict_block(volume, block, shape)
            if probs.shape[0] != out.shape[0]:
                raise UserInputError(f"the model predicts {probs.shape[0]} channels but out has {out.shape[0]}")
            if not np.isfinite(probs).all():
                where = ", ".join(f"{axis} {s.start}:{s.stop}" for axis, s in zip("zyx", block))
                raise UserInputError(
                    f"the model predicts NaN/Inf probabilities in block {where} of a finite "
                    "input; its weights or the numerics (e.g. float16 overflow) are broken"
                )
            if np.dtype(out.dtype) == np.uint8:
                probs = np.rint(np.clip(probs, 0, 1) * 255).astype(np.uint8)
            out[(slice(None), *block)] = probs
            if progress is not None:
                progress.update(done)
        if progress is not None:
            progress.close()
        # With several ranks no rank holds the slices on both sides of a blank one for sure: the
        # ranks' parts are bridged by the merge (stt_model.parallel_predict.merge).
        if self.options.bridge_blank and self.options.world == 1:
            self.bridged = bridge_blank_slices(out, blank_slices(volume, self.options.intensity))
        return out


def block_size(shape: Triple, options: InferOptions) -> Triple:
    """The output block of a ``shape`` volume: ``options.block``, else about 4 windows per axis."""
    return options.block or tuple(min(n, 4 * w) for n, w in zip(shape, options.window))  # type: ignore[return-value]


def rank_blocks(shape: Triple, options: InferOptions) -> list[tuple[slice, slice, slice]]:
    """The output blocks of a ``shape`` volume that ``options.rank`` of ``options.world`` predicts."""
    return _blocks(shape, block_size(shape, options))[options.rank :: options.world]


def blank_slices(volume: Any, intensity: IntensitySpec = "dtype", max_std: float = BLANK_SLICE_STD) -> list[int]:
    """The z indices of ``volume (Z, Y, X)`` whose slice, mapped to [0, 1] by ``intensity``, has a
    standard deviation under ``max_std`` (missing sections); read one slice at a time."""
    if len(volume.shape) != 3:
        raise UserInputError(f"volume must be 3-d (Z, Y, X); got shape {tuple(volume.shape)}")
    if not max_std >= 0:
        raise UserInputError(f"max_std must be >= 0 (a standard deviation in [0, 1] units); got {max_std}")
    return [z for z in range(volume.shape[0]) if float(to_unit_range(np.asarray(volume[z]), intensity).std()) < max_std]


def bridge_blank_slices(probs: Any, blank: Sequence[int]) -> list[int]:
    """Replace, in ``probs (C, Z, Y, X)`` (array-like, written in place), each slice ``z`` of
    ``blank`` by the linear interpolation in z between the nearest slices not in ``blank``
    (a copy of the nearest one at either end of the volume). Returns the bridged indices, sorted;
    none when every slice is blank (there is nothing to bridge from)."""
    depth = int(probs.shape[1])
    blank_set = {int(z) for z in blank}
    outside = sorted(z for z in blank_set if not 0 <= z < depth)
    if outside:
        raise UserInputError(f"blank slice {outside[0]} is outside the volume's {depth} slices")
    valid = [z for z in range(depth) if z not in blank_set]
    if not valid or not blank_set:
        return []
    integer = np.dtype(probs.dtype).kind in "ui"
    for z in sorted(blank_set):
        below = max((v for v in valid if v < z), default=None)
        above = min((v for v in valid if v > z), default=None)
        if below is None or above is None:
            filled = np.asarray(probs[:, below if above is None else above], np.float32)
        else:
            w = (z - below) / (above - below)
            filled = (1 - w) * np.asarray(probs[:, below], np.float32) + w * np.asarray(probs[:, above], np.float32)
        probs[:, z] = np.rint(filled).astype(probs.dtype) if integer else filled.astype(probs.dtype)
    return sorted(blank_set)


def _batched(items: Sequence[Triple], size: int) -> Iterator[Sequence[Triple]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def predict(model: nn.Module, volume: Any, out: Any, options: InferOptions) -> Any:
    """Sliding-window prediction of ``volume (Z, Y, X)`` into ``out (C, Z, Y, X)``; see the module doc.
    Blank slices it bridged are reported in one line on stderr."""
    window = SlidingWindow(model, options)
    window.run(volume, out)
    if window.bridged:
        print(bridged_line(window.bridged), file=sys.stderr)
    return out


def bridged_line(bridged: Sequence[int]) -> str:
    """The report of bridged slices: ``bridged N blank slices at z=...``."""
    return (
        f"bridged {len(bridged)} blank slice{'s' if len(bridged) != 1 else ''} at z={','.join(map(str, bridged))} "
        f"(input std < {BLANK_SLICE_STD:g}: probabilities interpolated from the neighbouring slices)"
    )
