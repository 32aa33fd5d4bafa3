"""A seeded generator of EM-like volumes (Z, Y, X) uint8 with known mitochondria instances.

Objects are capsules (tubes with round ends) measured in physical units with a z voxel
``anisotropy`` times the xy voxel (MitoEM: 30 nm vs 8 nm), lying mostly in the section plane so
they run through several slices; some are placed in touching pairs, where each voxel goes to the
nearer axis (relative to the radii), so instance interfaces exist. Their look: a dark double
membrane (two dark rims) all round each object, along an interface with a touching neighbour too
(two membranes side by side there, as in EM), a darker matrix with cristae-like stripes across
the long axis. Around them: smooth cytoplasm texture, a network of thin dark cell membranes and
dark-rimmed vesicles (unlabelled distractors), blur and noise, and section artefacts: per-slice
brightness/contrast jumps, a small slice misalignment (applied to the labels too: annotations
follow the image), an occasional blurred or missing (blank) slice whose labels are kept, as
annotators interpolate across them.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import numpy as np
from scipy import ndimage


class SyntheticVolume(NamedTuple):
    image: np.ndarray  # (Z, Y, X) uint8
    labels: np.ndarray  # (Z, Y, X) uint32, 0 = background, 1..n instances


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], scale: Sequence[float]) -> np.ndarray:
    """Smooth noise with unit std: white noise at ``1/scale`` resolution, upsampled linearly.

    Separable numpy interpolation: ``ndimage.zoom`` in 3-d costs seconds at this size.
    """
    field = rng.standard_normal(tuple(max(2, int(np.ceil(n / s)) + 1) for n, s in zip(shape, scale)))
    field = field.astype(np.float32)
    for axis, n in enumerate(shape):
        m = field.shape[axis]
        position = (np.arange(n, dtype=np.float32) + 0.5) * (m - 1) / n
        low = np.minimum(position.astype(np.intp), m - 2)
        weight = (position - low).reshape([-1 if a == axis else 1 for a in range(3)])
        field = np.take(field, low, axis) * (1 - weight) + np.take(field, low + 1, axis) * weight
    return (field - field.mean()) / (field.std() + 1e-6)


class _Capsule(NamedTuple):
    a: np.ndarray  # axis end points in physical (z, y, x) units
    b: np.ndarray
    radius: float


def _capsule_distance(points: np.ndarray, capsule: _Capsule) -> tuple[np.ndarray, np.ndarray]:
    """Distance of ``points`` (..., 3) to the capsule axis, and the position along it in [0, 1]."""
    ab = capsule.b - capsule.a
    t = np.clip(((points - capsule.a) @ ab) / max(float(ab @ ab), 1e-9), 0.0, 1.0)
    nearest = capsule.a + t[..., None] * ab
    return np.linalg.norm(points - nearest, axis=-1), t


def _random_capsule(rng: np.random.Generator, extent: np.ndarray, radius_range: tuple[float, float]) -> _Capsule:
    radius = rng.uniform(*radius_range)
    length = rng.uniform(1.0, 5.0) * radius
    angle = rng.uniform(0, np.pi)
    tilt = rng.uniform(-0.35, 0.35)  # mostly in the section plane, so objects span several slices
    direction = np.array([np.sin(tilt), np.cos(tilt) * np.sin(angle), np.cos(tilt) * np.cos(angle)])
    centre = rng.uniform([0, 0, 0], extent)
    return _Capsule(centre - direction * length / 2, centre + direction * length / 2, radius)


def _touching_partner(rng: np.random.Generator, capsule: _Capsule) -> _Capsule:
    """A capsule whose axis lies ``0.9 * (r1 + r2)`` away, so the two overlap slightly and touch."""
    radius = capsule.radius * rng.uniform(0.8, 1.1)
    axis = capsule.b - capsule.a
    side = np.cross(axis, [1.0, 0.0, 0.0])
    side /= np.linalg.norm(side) + 1e-9
    offset = side * 0.9 * (capsule.radius + radius) * rng.choice([-1, 1])
    stretch = rng.uniform(0.6, 1.2)
    mid = (capsule.a + capsule.b) / 2 + offset
    return _Capsule(mid - axis * stretch / 2, mid + axis * stretch / 2, radius)


def synthetic_volume(
    shape: Sequence[int] = (32, 256, 256),
    seed: int = 0,
    n_objects: Optional[int] = None,
    anisotropy: float = 4.0,
    touching: float = 0.3,
    artefacts: bool = True,
) -> SyntheticVolume:
    """An EM-like ``image`` (Z, Y, X) uint8 and its instance ``labels`` (uint32); see the module doc.

    ``n_objects`` defaults to about one per 64x64 pixels of section; ``touching`` is the fraction
    of objects given a touching partner. The same arguments always give the same volume.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be (Z, Y, X) with positive sizes; got {shape}")
    rng = np.random.default_rng(seed)
    Z, Y, X = shape
    spacing = np.array([anisotropy, 1.0, 1.0])
    extent = np.array(shape) * spacing
    if n_objects is None:
        n_objects = max(2, int(round(Y * X / 64**2)))
    r_lo, r_hi = 0.03 * min(Y, X) + 4, 0.05 * min(Y, X) + 6

    capsules: list[_Capsule] = []
    for _ in range(n_objects):
        capsules.append(_random_capsule(rng, extent, (r_lo, r_hi)))
        if rng.random() < touching:
            capsules.append(_touching_partner(rng, capsules[-1]))

    labels = np.zeros(shape, np.uint32)
    best = np.full(shape, np.inf, np.float32)  # normalised distance of the nearest object so far
    second = np.full(shape, np.inf, np.float32)  # ... and of the next nearest, for interfaces
    slope = np.zeros(shape, np.float32)  # 1 / radius of the nearest object
    second_slope = np.zeros(shape, np.float32)
    depth = np.zeros(shape, np.float32)  # depth below the object's own surface (physical units)
    stripes = np.zeros(shape, np.float32)
    for ident, capsule in enumerate(capsules, start=1):
        reach = capsule.radius + 1
        lo = np.floor((np.minimum(capsule.a, capsule.b) - reach) / spacing).astype(int).clip(0, np.array(shape))
        hi = np.ceil((np.maximum(capsule.a, capsule.b) + reach) / spacing).astype(int).clip(0, np.array(shape))
        if np.any(hi <= lo):
            continue
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        grid = np.stack(np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi)), indexing="ij"), -1)
        distance, along = _capsule_distance(grid * spacing, capsule)
        score = (distance / capsule.radius).astype(np.float32)
        # Scores of 1 or more (outside the object) are ranked too, so that the voxels beside
        # an interface know the neighbour across it; a label still goes to the nearest object
        # that holds the voxel, as the ranking never lets a score >= 1 beat one below 1.
        nearest = score < best[box]
        runner_up = ~nearest & (score < second[box])
        second[box] = np.where(nearest, best[box], np.where(runner_up, score, second[box]))
        second_slope[box] = np.where(nearest, slope[box], np.where(runner_up, 1 / capsule.radius, second_slope[box]))
        best[box] = np.where(nearest, score, best[box])
        slope[box] = np.where(nearest, 1 / capsule.radius, slope[box])
        mine = (score < 1) & nearest
        labels[box] = np.where(mine, ident, labels[box])
        depth[box] = np.where(mine, capsule.radius - distance, depth[box])
        length = np.linalg.norm(capsule.b - capsule.a) + 2 * capsule.radius
        period = rng.uniform(5.0, 8.0)
        phase = rng.uniform(0, 2 * np.pi)
        stripes[box] = np.where(mine, np.cos(2 * np.pi * along * length / period + phase), stripes[box])
    labels = _compact_ids(labels)
    # Depth below the interface with the next object, where the two normalised distances are
    # equal: their difference over its gradient, whose norm is 1/r1 + 1/r2 where the two axes
    # face each other (exact for parallel capsules). So a touching pair shows both membranes
    # between them, as in EM, where every mitochondrion has its own.
    with np.errstate(invalid="ignore", divide="ignore"):
        interface = (second - best) / (slope + second_slope)
    rim = np.minimum(depth, np.where(np.isfinite(interface), interface, np.inf))

    image = 165 + 18 * _smooth_field(rng, shape, (2, 12, 12)) + 8 * _smooth_field(rng, shape, (1, 3, 3))
    membranes = np.abs(_smooth_field(rng, shape, (3, 40, 40))) < 0.05
    image[membranes] -= 70
    _add_vesicles(rng, image, labels, spacing)
    inside = labels > 0
    image[inside] = 120 + 10 * _smooth_field(rng, shape, (1, 4, 4))[inside]
    cristae = inside & (stripes > 0.75) & (rim > 3.5)
    image[cristae] -= 45
    outer = inside & (rim < 1.2)
    inner = inside & (rim >= 2.0) & (rim < 3.0)
    image[outer | inner] = 55
    image = ndimage.gaussian_filter(image, sigma=(0, 0.8, 0.8))
    image += rng.normal(0, 9, shape).astype(np.float32)
    if artefacts:
        image, labels = _section_artefacts(rng, image, labels)
    return SyntheticVolume(np.clip(image, 0, 255).astype(np.uint8), labels)


def _compact_ids(labels: np.ndarray) -> np.ndarray:
    """Renumber 1..n in order of first appearance; objects that fell outside the volume leave no gap."""
    ids = np.unique(labels)
    ids = ids[ids != 0]
    lookup = np.zeros(int(labels.max()) + 1, np.uint32)
    lookup[ids] = np.arange(1, len(ids) + 1, dtype=np.uint32)
    return lookup[labels]


def _add_vesicles(rng: np.random.Generator, image: np.ndarray, labels: np.ndarray, spacing: np.ndarray) -> None:
    """Small dark-rimmed light spheres away from mitochondria: unlabelled look-alikes."""
    Z, Y, X = image.shape
    for _ in range(int(Y * X / 48**2)):
        radius = rng.uniform(3, 7)
        centre = rng.uniform([0, 0, 0], np.array(image.shape) * spacing)
        lo = np.floor((centre - radius - 1) / spacing).astype(int).clip(0, image.shape)
        hi = np.ceil((centre + radius + 1) / spacing).astype(int).clip(0, image.shape)
        if np.any(hi <= lo):
            continue
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        grid = np.stack(np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi)), indexing="ij"), -1)
        distance = np.linalg.norm(grid * spacing - centre, axis=-1)
        free = labels[box] == 0
        image[box] = np.where(free & (distance < radius - 1.2), 190, image[box])
        image[box] = np.where(free & (np.abs(distance - radius + 0.6) < 0.6), 70, image[box])


def _section_artefacts(
    rng: np.random.Generator, image: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    Z = image.shape[0]
    gain = rng.normal(1.0, 0.06, Z).astype(np.float32)
    offset = rng.normal(0.0, 8.0, Z).astype(np.float32)
    image = image * gain[:, None, None] + offset[:, None, None]
    if Z > 4:
        z = int(rng.integers(1, Z))
        dy, dx = (int(v) for v in rng.integers(-3, 4, 2))
        image[z:] = np.roll(image[z:], (dy, dx), axis=(1, 2))
        labels[z:] = np.roll(labels[z:], (dy, dx), axis=(1, 2))
        if rng.random() < 0.5:
            blurred = int(rng.integers(1, Z - 1))
            image[blurred] = ndimage.gaussian_filter(image[blurred], 2.0)
        if rng.random() < 0.3:
            image[int(rng.integers(1, Z - 1))] = 0
    return image, labels
