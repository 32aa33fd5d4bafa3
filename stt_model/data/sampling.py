"""Random training patches (T, H, W) from lazily read (image, labels) volumes.

:class:`PatchSampler` is an infinite ``IterableDataset`` of batches, for
``DataLoader(sampler, batch_size=None, num_workers=N)``. Each batch is
``{"image": (B, 1, T, H, W) float32 in [0, 1], "target": (B, out, T, H, W) float32}``; the
targets are the mask and, when ``out_channels`` = 2, the instance contour.

Normalisation: images are mapped to [0, 1] by one rule, ``intensity`` (the config's
``data.intensity``, which the checkpoint carries, so prediction applies the same one; see
:mod:`stt_model.data.intensity`): ``"dtype"`` divides integers by their dtype's maximum (uint8 /
255, uint16 / 65535) and takes floats as they are, which must then lie in [0, 1]; ``[lo, hi]``
maps ``lo`` to 0 and ``hi`` to 1, clipping only values outside that stated range. Intensities
are not standardised: the interpolation network and the FG-BG discriminator see them as stored.

Inputs are checked before the first batch, in one streaming pass over each volume: images for
NaN/Inf and for values the rule cannot map, labels for negative or fractional ids
(:func:`~stt_model.data.intensity.check_image`, :func:`~stt_model.data.targets.check_labels`),
each refused with the file and the first offending voxel.

Determinism: sample ``j`` of global batch ``g`` draws everything (volume, position, augmentation)
from ``numpy.random.default_rng((seed, g, j))``, so a batch depends on nothing but its index, and
the stream is the same whatever the number of DataLoader workers (worker ``w`` of ``W`` makes
batches ``w, w + W, ...``, which the DataLoader returns in order). With ``world_size`` ranks,
rank ``r`` makes global batches ``r, r + world_size, ...``. Resuming is restoring the index of
the next batch: ``state_dict()`` / ``load_state_dict()``.

Foreground bias: with probability ``foreground_bias`` a patch is centred on a uniformly chosen
foreground voxel. A :class:`ForegroundIndex` of foreground counts per block, built by reading the
labels block by block once, finds them without ever holding the whole label volume.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .augment import Compose
from .intensity import IntensitySpec, check_image, parse_intensity, to_unit_range
from .targets import check_labels, make_targets
from .volumes import Volume, open_volume

if TYPE_CHECKING:
    from ..config import Config

Source = Union[str, np.ndarray, Volume]
DEFAULT_BLOCK = (16, 128, 128)


class ForegroundIndex:
    """Foreground voxel counts per block of a label volume (Z, Y, X), for drawing foreground
    voxels uniformly while reading one block at a time."""

    def __init__(self, labels: Volume, block: Optional[Sequence[int]] = None):
        self.labels = labels
        chunks = getattr(labels, "chunks", None)
        self.block = tuple(int(b) for b in (block or (chunks if chunks and len(chunks) == 3 else DEFAULT_BLOCK)))
        self.grid = tuple(-(-n // b) for n, b in zip(labels.shape, self.block))
        counts = np.zeros(self.grid, np.int64)
        for index in np.ndindex(*self.grid):
            counts[index] = np.count_nonzero(labels[self._region(index)])
        self.counts = counts.ravel()
        self.total = int(self.counts.sum())

    def _region(self, index: Sequence[int]) -> tuple[slice, ...]:
        return tuple(slice(i * b, min((i + 1) * b, n)) for i, b, n in zip(index, self.block, self.labels.shape))

    def draw(self, rng: np.random.Generator) -> Optional[tuple[int, int, int]]:
        """A uniformly random foreground voxel (z, y, x), or ``None`` when there is none."""
        if self.total == 0:
            return None
        flat = int(np.searchsorted(np.cumsum(self.counts), rng.integers(self.total), side="right"))
        index = np.unravel_index(flat, self.grid)
        region = self._region(index)
        voxels = np.flatnonzero(self.labels[region])
        local = np.unravel_index(int(voxels[rng.integers(len(voxels))]), [s.stop - s.start for s in region])
        return tuple(int(s.start + v) for s, v in zip(region, local))  # type: ignore[return-value]


def read_window(volume: Volume, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """``volume[start : start + size]`` (Z, Y, X), reflect-padded on the far side of every axis the
    volume is smaller than ``size`` on (``start`` is 0 there)."""
    region = tuple(slice(s, min(s + p, n)) for s, p, n in zip(start, size, volume.shape))
    data = np.asarray(volume[region])
    pad = [(0, p - d) for p, d in zip(size, data.shape)]
    if any(after for _, after in pad):
        # A single slice cannot be mirrored; repeat it instead.
        data = np.pad(data, pad, mode="reflect" if min(data.shape) > 1 else "edge")
    return data


class PatchSampler(IterableDataset):
    """Infinite seeded stream of training batches; see the module doc.

    ``volumes``: one ``(image, labels)`` pair or a list of them (specs, arrays or volumes, each
    (Z, Y, X)); ``labels`` may be ``None`` for image-only streams (then batches have no
    ``"target"``). Volumes are drawn in proportion to their voxel counts. ``intensity``: the
    normalisation rule (module doc). Every volume is checked here, before any batch is made.
    """

    def __init__(
        self,
        volumes: Union[tuple[Source, Optional[Source]], Sequence[tuple[Source, Optional[Source]]]],
        patch: Sequence[int],
        *,
        foreground_bias: float = 0.5,
        out_channels: int = 2,
        contour_width: int = 1,
        augment: Optional[Compose] = None,
        batch_size: int = 1,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        index_block: Optional[Sequence[int]] = None,
        intensity: IntensitySpec = "dtype",
    ):
        super().__init__()
        parse_intensity(intensity)
        single = isinstance(volumes, tuple) and len(volumes) == 2 and not isinstance(volumes[0], (tuple, list))
        pairs = [volumes] if single else list(volumes)
        if not pairs:
            raise ValueError("PatchSampler needs at least one (image, labels) pair")
        self.images: list[Volume] = []
        self.labels: list[Optional[Volume]] = []
        for image, labels in pairs:
            image = open_volume(image)
            labels = open_volume(labels) if labels is not None else None
            if len(image.shape) != 3:
                raise ValueError(f"image volumes must be (Z, Y, X); got shape {tuple(image.shape)} for {image!r}")
            if labels is not None and tuple(labels.shape) != tuple(image.shape):
                raise ValueError(f"labels {tuple(labels.shape)} and image {tuple(image.shape)} differ in shape")
            self.images.append(image)
            self.labels.append(labels)
        if len(patch) != 3 or min(patch) < 1:
            raise ValueError(f"patch must be (T, H, W) with positive sizes; got {tuple(patch)}")
        if not 0 <= foreground_bias <= 1:
            raise ValueError(f"foreground_bias must be in [0, 1]; got {foreground_bias}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size = {world_size}); got {rank}")
        for i, (image, labels) in enumerate(zip(self.images, self.labels)):
            number = f" {i}" if len(pairs) > 1 else ""
            check_image(image, intensity, name=f"training image{number}")
            if labels is not None:
                check_labels(labels, name=f"training labels{number}")
        self.patch = tuple(int(p) for p in patch)
        self.intensity = intensity
        self.foreground_bias = foreground_bias
        self.out_channels = out_channels
        self.contour_width = contour_width
        self.augment = augment
        self.batch_size = batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        sizes = np.array([float(np.prod(v.shape)) for v in self.images])
        self._weights = sizes / sizes.sum()
        # Built here, once, so DataLoader workers receive it instead of each rescanning the labels.
        self.foreground = [
            ForegroundIndex(lab, index_block) if lab is not None and foreground_bias > 0 else None
            for lab in self.labels
        ]
        self._next = 0

    @classmethod
    def from_config(
        cls, volumes: Any, config: Config, *, rank: int = 0, world_size: int = 1, augment: Optional[Compose] = None
    ) -> PatchSampler:
        """A sampler with the config's patch, bias, contour width, out channels, batch size, seed and
        intensity rule;
        ``augment`` defaults to :func:`default_augmentations` when ``config.data.augment`` is set."""
        from .augment import default_augmentations

        data = config.data
        if augment is None and data.augment:
            augment = default_augmentations(data.augmentations)
        return cls(
            volumes,
            data.patch,
            foreground_bias=data.foreground_bias,
            out_channels=config.model.out_channels,
            contour_width=data.contour_width,
            augment=augment,
            batch_size=config.train.batch_size,
            seed=config.train.seed,
            rank=rank,
            world_size=world_size,
            intensity=data.intensity,
        )

    def _start(self, rng: np.random.Generator, volume: int) -> list[int]:
        shape = self.images[volume].shape
        index = self.foreground[volume]
        centre = index.draw(rng) if index is not None and rng.random() < self.foreground_bias else None
        if centre is None:
            return [int(rng.integers(0, max(n - p, 0) + 1)) for n, p in zip(shape, self.patch)]
        return [int(np.clip(c - p // 2, 0, max(n - p, 0))) for c, p, n in zip(centre, self.patch, shape)]

    def sample(self, batch: int, item: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """Sample ``item`` of global batch ``batch``: image (1, T, H, W) and targets (out, T, H, W)."""
        rng = np.random.default_rng((self.seed, batch, item))
        volume = int(rng.choice(len(self.images), p=self._weights))
        start = self._start(rng, volume)
        image = to_unit_range(read_window(self.images[volume], start, self.patch), self.intensity)
        labels_volume = self.labels[volume]
        labels = read_window(labels_volume, start, self.patch) if labels_volume is not None else None
        if self.augment is not None:
            image, labels = self.augment(image, labels, rng)
        targets = None if labels is None else make_targets(labels, self.out_channels, self.contour_width)
        return image[None], targets

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        """This rank's batch number ``index`` (0, 1, ...), as the iterator yields it."""
        global_index = index * self.world_size + self.rank
        samples = [self.sample(global_index, j) for j in range(self.batch_size)]
        out = {"image": torch.from_numpy(np.stack([s[0] for s in samples]))}
        if samples[0][1] is not None:
            out["target"] = torch.from_numpy(np.stack([s[1] for s in samples]))
        return out

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        index = self._next + worker
        while True:
            batch = self.batch(index)
            if info is None:
                self._next = index + 1
            yield batch
            index += workers

    def state_dict(self, batches: Optional[int] = None) -> dict[str, int]:
        """Where the stream stands: the seed and the index of the next batch. With DataLoader
        workers this object does not see their progress; pass ``batches`` (the number consumed,
        e.g. the training step) to record it."""
        return {"seed": self.seed, "batch": self._next if batches is None else int(batches)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a :meth:`state_dict`: the next batch is the one that would have come next."""
        self.seed, self._next = int(state["seed"]), int(state["batch"])
