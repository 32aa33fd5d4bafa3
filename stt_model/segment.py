"""From a trained model to instances and scores: the steps ``stt predict``, validation during
training and ``stt demo`` share.

Probabilities are ``(C, Z, Y, X)``: channel 0 the mitochondria mask, channel 1 (MitoEM
presets) the instance contour. Instances come from the MitoEM baseline's decodings:
``bc_watershed`` with a contour channel, 3D connected components without one; or
(``Thresholds.decoder = "distance"``) a watershed of the distance transform of the
mask-and-not-contour core, which splits touching instances at the neck between them where the
contour channel misses their interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from .config import Config
from .infer import InferOptions, predict
from .metrics import dsc, instance_ap, jaccard
from .postprocess import Foreground, bc_watershed, binary_connected, distance_watershed, label_chunked

# Above this many voxels, instances are labelled slab by slab (connected components of the
# mask-and-not-contour core) instead of by the in-memory watershed (~30 bytes a voxel).
IN_MEMORY_VOXELS = 64 * 2**20


@dataclass
class Thresholds:
    """Decoding thresholds (on probabilities in [0, 1]); defaults are the MitoEM baseline's."""

    foreground: float = 0.85
    seed: float = 0.9  # bc_watershed only
    contour: float = 0.8
    min_size: int = 128
    mask: float = 0.5  # the semantic mask scored by Jaccard/DSC (Lucchi)
    decoder: str = "watershed"  # with a contour channel: "watershed" (bc_watershed) or "distance"
    peak_height: float = 2.0  # "distance": h-maxima height of the seeds, in xy voxels
    anisotropy: float = 1.0  # "distance": z voxel size / xy voxel size
    merge_ratio: float = 1.0  # "distance": merge regions whose neck exceeds this x the lower peak (1: none)


def infer_options(config: Config, **overrides: Any) -> InferOptions:
    """Sliding-window settings for a model trained with ``config`` (its training patch size and
    intensity rule)."""
    overrides.setdefault("intensity", config.data.intensity)
    return InferOptions(window=tuple(config.data.patch), **overrides)  # type: ignore[arg-type]


def probabilities(model: nn.Module, config: Config, volume: Any, out: Optional[Any] = None, **options: Any) -> Any:
    """Probabilities of ``volume (Z, Y, X)`` into ``out (C, Z, Y, X)`` (default: a new uint8 array)."""
    if out is None:
        out = np.zeros((config.model.out_channels, *volume.shape), np.uint8)
    return predict(model, volume, out, infer_options(config, **options))


def _unit(probs: np.ndarray) -> np.ndarray:
    return probs.astype(np.float32) / 255.0 if probs.dtype == np.uint8 else probs


def instances(probs: Any, thresholds: Thresholds = Thresholds()) -> np.ndarray:
    """``(C, Z, Y, X)`` probabilities (uint8 or float) -> ``(Z, Y, X)`` uint32 instance ids."""
    probs = np.asarray(probs)
    semantic = _unit(probs[0])
    if probs.shape[0] > 1 and thresholds.decoder == "distance":
        return distance_watershed(
            semantic,
            _unit(probs[1]),
            t_fg=thresholds.foreground,
            t_contour=thresholds.contour,
            peak_height=thresholds.peak_height,
            anisotropy=thresholds.anisotropy,
            min_size=thresholds.min_size,
            merge_ratio=thresholds.merge_ratio,
        )
    if probs.shape[0] > 1:
        return bc_watershed(
            semantic,
            _unit(probs[1]),
            t_seed=thresholds.seed,
            t_contour=thresholds.contour,
            t_fg=thresholds.foreground,
            min_size=thresholds.min_size,
        )
    return binary_connected(semantic, t_fg=thresholds.foreground, min_size=thresholds.min_size)


class _Channel:
    """Channel ``c`` of a ``(C, Z, Y, X)`` array-like as a lazy ``(Z, Y, X)`` one."""

    def __init__(self, volume: Any, channel: int):
        self.volume, self.channel = volume, channel
        self.shape, self.dtype = tuple(volume.shape[1:]), volume.dtype

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        return np.asarray(self.volume[(self.channel, *key)])


def instances_into(
    probs: Any, out: Any, thresholds: Thresholds = Thresholds(), in_memory_voxels: int = IN_MEMORY_VOXELS
) -> tuple[int, str]:
    """Decode ``probs (C, Z, Y, X)`` (array-like, e.g. an HDF5 dataset) into ``out (Z, Y, X)``.

    Volumes up to ``in_memory_voxels`` use :func:`instances` (seeded watershed); larger ones
    are labelled slab by slab, so memory stays bounded: 3D connected components of
    ``mask > foreground and contour < contour threshold`` with small objects removed (the
    baseline's ``bc_connected`` core, without its dilation). Returns (count, method).
    """
    voxels = int(np.prod(probs.shape[1:]))
    if voxels <= in_memory_voxels:
        labels = instances(np.asarray(probs[:]), thresholds)
        out[:] = labels
        return int(labels.max()), "watershed"
    contour = _Channel(probs, 1) if probs.shape[0] > 1 else None
    mask = Foreground(_Channel(probs, 0), contour, t_fg=thresholds.foreground, t_contour=thresholds.contour)
    _, count = label_chunked(mask, out, min_size=thresholds.min_size)
    return int(count), "slab-wise connected components"


def score(probs: Any, gt_instances: Any, thresholds: Thresholds = Thresholds()) -> dict[str, float]:
    """Scores of probabilities against ground-truth instances: MitoEM AP of the decoded
    instances, and Lucchi Jaccard/DSC of the semantic mask ``p >= thresholds.mask``."""
    probs = np.asarray(probs)
    gt = np.asarray(gt_instances)
    mask = _unit(probs[0]) >= thresholds.mask
    scores = instance_ap(instances(probs, thresholds), gt)
    scores.update(jaccard=jaccard(mask, gt > 0), dsc=dsc(mask, gt > 0))
    return scores


def validator(
    config: Config, image: Any, gt_instances: Any, thresholds: Thresholds = Thresholds(), device: Optional[str] = None
):
    """A ``Validator`` for :func:`stt_model.train.train`: scores the model on a held-out volume."""
    image, gt = np.asarray(image), np.asarray(gt_instances)

    def validate(model: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            probs = probabilities(model, config, image, progress=False, device=device)
        return score(probs, gt, thresholds)

    return validate
