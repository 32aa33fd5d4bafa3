"""EM augmentations of a training patch, applied identically to image and labels.

Every transform is called as ``transform(image, labels, rng) -> (image, labels)`` with ``image``
float32 (Z, Y, X) in [0, 1], ``labels`` (Z, Y, X) instance ids (or ``None``, e.g. for
self-supervised pretraining) and a ``numpy.random.Generator`` that makes it reproducible. Shapes are
preserved. Geometric transforms move image and labels together (labels by nearest neighbour where
interpolated, so ids are never blended); image-only transforms (``geometric = False``) return the
labels untouched. In-plane warps are the same for every slice, as in the MitoEM baseline: sections
are cut and imaged in the xy plane.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence

import numpy as np
from scipy import ndimage

Pair = tuple[np.ndarray, Optional[np.ndarray]]


class Transform(Protocol):
    geometric: bool

    def __call__(self, image: np.ndarray, labels: Optional[np.ndarray], rng: np.random.Generator) -> Pair: ...


def _square(image: np.ndarray) -> bool:
    return image.shape[1] == image.shape[2]


@dataclass
class Flip:
    """Mirror along each of z, y, x with probability 1/2."""

    geometric: bool = True

    def __call__(self, image: np.ndarray, labels: Optional[np.ndarray], rng: np.random.Generator) -> Pair:
        axes = tuple(a for a in range(3) if rng.random() < 0.5)
        if not axes:
            return image, labels
        return np.flip(image, axes), None if labels is None else np.flip(labels, axes)


@dataclass
class Rotate90:
    """Rotate by k * 90 degrees in the xy plane (k in 0..3; 0 or 2 when H != W) and, with probability
    1/2, transpose y and x (square patches only), which with k covers all 8 in-plane symmetries."""

    geometric: bool = True

    def __call__(self, image: np.ndarray, labels: Optional[np.ndarray], rng: np.random.Generator) -> Pair:
        square = _square(image)
        k = int(rng.integers(4)) if square else 2 * int(rng.integers(2))
        transpose = square and rng.random() < 0.5

        def apply(a: np.ndarray) -> np.ndarray:
            a = np.rot90(a, k, axes=(1, 2))
            return a.transpose(0, 2, 1) if transpose else a

        return apply(image), None if labels is None else apply(labels)


def _reflect(index: np.ndarray, n: int) -> np.ndarray:
    """Fold indices into [0, n) by mirroring with the edge repeated (ndimage's ``reflect``)."""
    index = np.mod(index, 2 * n)
    return np.where(index >= n, 2 * n - 1 - index, index)


def _warp(image: np.ndarray, labels: Optional[np.ndarray], coords: np.ndarray) -> Pair:
    """Sample every slice at in-plane ``coords`` (2, Y, X): image bilinear, labels nearest.

    The sampling positions are shared by all slices, so corner indices and weights are computed
    once and applied as flat gathers (several times faster than ``map_coordinates`` per slice).
    """
    Z, Y, X = image.shape
    low = np.floor(coords)
    frac = (coords - low).astype(np.float32)
    y0, x0 = low.astype(np.intp)
    flat = image.reshape(Z, Y * X)
    out = np.zeros((Z, Y * X), np.float32)
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        weight = (frac[0] if dy else 1 - frac[0]) * (frac[1] if dx else 1 - frac[1])
        index = _reflect(y0 + dy, Y) * X + _reflect(x0 + dx, X)
        out += np.take(flat, index.ravel(), axis=1) * weight.ravel()
    if labels is None:
        return out.reshape(Z, Y, X), None
    nearest = _reflect(np.rint(coords[0]).astype(np.intp), Y) * X + _reflect(np.rint(coords[1]).astype(np.intp), X)
    return out.reshape(Z, Y, X), np.take(labels.reshape(Z, Y * X), nearest.ravel(), axis=1).reshape(Z, Y, X)


@dataclass
class Rescale:
    """Zoom in-plane by a factor in ``scale`` about the patch centre, keeping the patch size."""

    scale: tuple[float, float] = (0.8, 1.2)
    geometric: bool = True

    def __call__(self, image: np.ndarray, labels: Optional[np.ndarray], rng: np.random.Generator) -> Pair:
        factor = rng.uniform(*self.scale)
        Y, X = image.shape[1:]
        ys = (np.arange(Y, dtype=np.float32) - (Y - 1) / 2) / factor + (Y - 1) / 2
        xs = (np.arange(X, dtype=np.float32) - (X - 1) / 2) / factor + (X - 1) / 2
        return _warp(image, labels, np.stack(np.meshgrid(ys, xs, indexing="ij")))


@dataclass
class Elastic:
    """Smooth random in-plane displacement: Gaussian offsets (std ``alpha`` pixels) on a grid of
    ``spacing`` pixels, interpolated to every pixel."""

    alpha: float = 4.0
    spacing: int = 32
    geometric: bool = True

    def __call__(self, image: np.ndarray, labels: Optional[np.ndarray], rng: np.random.Generator) -> Pair:
        Y, X = image.shape[1:]
        grid = (max(2, Y // self.spacing + 2), max(2, X // self.spacing + 2))
        coarse = rng.normal(0, self.alpha, (2, *grid)).astype(np.float32)
        dense = np.stack(
            [
                ndimage.zoom(c, (Y / grid[0], X / grid[1]), order=3, grid_mode=True, mode="nearest")[:Y, :X]
                for c in coarse
            ]
        )
        base = np.stack(np.meshgrid(np.arange(Y, dtype=np.float32), np.arange(X, dtype=np.float32), indexing="ij"))
        return _warp(image, labels, base + dense)


@dataclass
class Misalign:
    """Shift the slices from a random z on (or one slice alone) by up to ``max_shift`` pixels, as a
    section misregistration; the labels move with the image."""

    max_shift: int = 8
    single_slice: float = 0.5
    geometric: bool = True

    def __call__(self, image: np.ndarray, labels: Optional[np.ndarray], rng: np.random.Generator) -> Pair:
        Z = image.shape[0]
        if Z < 2:
            return image, labels
        z = int(rng.integers(1, Z))
        stop = z + 1 if rng.random() < self.single_slice else Z
        dy, dx = (int(v) for v in rng.integers(-self.max_shift, self.max_shift + 1, 2))

        def shift(a: np.ndarray) -> np.ndarray:
            a = a.copy()
            Y, X = a.shape[1:]
            padded = np.pad(a[z:stop], ((0, 0), (abs(dy),) * 2, (abs(dx),) * 2), mode="reflect")
            a[z:stop] = padded[:, abs(dy) - dy : abs(dy) - dy + Y, abs(dx) - dx : abs(dx) - dx + X]
            return a

        return shift(image), None if labels is None else shift(labels)


@dataclass
class GrayJitter:
    """Random contrast, brightness and gamma, for the whole patch or (``per_slice``) slice by slice."""

    contrast: float = 0.2
    brightness: float = 0.1
    gamma: float = 0.3
    per_slice: float = 0.5
    geometric: bool = False

    def __call__(self, image: np.ndarray, labels: Optional[np.ndarray], rng: np.random.Generator) -> Pair:
        n = image.shape[0] if rng.random() < self.per_slice else 1
        c = (1 + rng.uniform(-self.contrast, self.contrast, n)).astype(np.float32)[:, None, None]
        b = rng.uniform(-self.brightness, self.brightness, n).astype(np.float32)[:, None, None]
        g = (2.0 ** rng.uniform(-self.gamma, self.gamma, n)).astype(np.float32)[:, None, None]
        out = np.clip((image - 0.5) * c + 0.5 + b, 0, 1) ** g
        return out.astype(np.float32), labels


@dataclass
class MissingSection:
    """Blank up to ``max_sections`` slices (lost sections); the labels keep the objects there."""

    max_sections: int = 2
    geometric: bool = False

    def __call__(self, image: np.ndarray, labels: Optional[np.ndarray], rng: np.random.Generator) -> Pair:
        Z = image.shape[0]
        count = int(rng.integers(1, self.max_sections + 1))
        out = image.copy()
        out[rng.choice(Z, size=min(count, Z), replace=False)] = 0
        return out, labels


@dataclass
class MotionBlur:
    """Smear up to ``max_sections`` slices along y or x with a box kernel of ``size`` pixels."""

    size: tuple[int, int] = (5, 11)
    max_sections: int = 2
    geometric: bool = False

    def __call__(self, image: np.ndarray, labels: Optional[np.ndarray], rng: np.random.Generator) -> Pair:
        Z = image.shape[0]
        out = image.copy()
        for z in rng.choice(Z, size=min(int(rng.integers(1, self.max_sections + 1)), Z), replace=False):
            out[z] = ndimage.uniform_filter1d(
                image[z], int(rng.integers(self.size[0], self.size[1] + 1)), axis=int(rng.integers(2)), mode="reflect"
            )
        return out, labels


@dataclass
class CutNoise:
    """Add Gaussian noise (std ``scale``) to a random cuboid of up to ``fraction`` of each side."""

    fraction: float = 0.5
    scale: float = 0.2
    geometric: bool = False

    def __call__(self, image: np.ndarray, labels: Optional[np.ndarray], rng: np.random.Generator) -> Pair:
        box = []
        for n in image.shape:
            size = max(1, int(rng.integers(1, max(2, int(n * self.fraction) + 1))))
            start = int(rng.integers(0, n - size + 1))
            box.append(slice(start, start + size))
        out = image.copy()
        region = out[tuple(box)]
        out[tuple(box)] = np.clip(region + rng.normal(0, self.scale, region.shape).astype(np.float32), 0, 1)
        return out, labels


@dataclass
class Compose:
    """Apply each ``(transform, probability)`` in turn with its probability."""

    steps: Sequence[tuple[Transform, float]] = field(default_factory=list)

    def __call__(self, image: np.ndarray, labels: Optional[np.ndarray], rng: np.random.Generator) -> Pair:
        for transform, probability in self.steps:
            if rng.random() < probability:
                image, labels = transform(image, labels, rng)
        image = np.ascontiguousarray(image, dtype=np.float32)
        return image, None if labels is None else np.ascontiguousarray(labels)


def default_augmentations(strength: str = "full") -> Compose:
    """``full``: all the transforms above, the set the MitoEM baseline (pytorch_connectomics)
    trains with; the probabilities are ours: symmetries always, the rest often enough to
    matter. ``light``: the symmetries and grayscale jitter only, for short training budgets
    (the section artefacts and warps slow early learning) and well-aligned volumes. ``medium``:
    the symmetries, rescaling, elastic warps and jitter, without the section artefacts
    (missing and misaligned sections, motion blur, cut noise) a well-aligned volume never shows."""
    if strength == "light":
        return Compose([(Flip(), 1.0), (Rotate90(), 1.0), (GrayJitter(), 0.5)])
    if strength == "medium":
        return Compose([(Flip(), 1.0), (Rotate90(), 1.0), (Rescale(), 0.5), (Elastic(), 0.75), (GrayJitter(), 0.75)])
    if strength != "full":
        raise ValueError(f"strength must be 'full', 'medium' or 'light'; got {strength!r}")
    return Compose(
        [
            (Flip(), 1.0),
            (Rotate90(), 1.0),
            (Rescale(), 0.5),
            (Elastic(), 0.75),
            (GrayJitter(), 0.75),
            (MissingSection(), 0.15),
            (Misalign(), 0.5),
            (MotionBlur(), 0.15),
            (CutNoise(), 0.5),
        ]
    )
