"""Segmentation metrics: MitoEM 3D instance AP and Lucchi foreground Jaccard / DSC.

All functions take label volumes of shape ``(Z, Y, X)``: numpy arrays or any array-like
with ``shape``, ``dtype`` and z-slicing (an ``h5py.Dataset``, a zarr array). Volumes are
read in z-slabs of about ``slab_voxels`` voxels, so the extra memory is a few bytes per
slab voxel plus tables that grow with the number of instances and of (prediction,
ground truth) overlapping pairs, never with the volume size. A 100 x 4096 x 4096 uint32
volume (6.7 GB) is evaluated with roughly 1 GB of working memory at the default slab
size, on top of whatever the caller already holds.

Instance AP (:func:`instance_ap`) reproduces the MitoEM challenge evaluation
(``mAP_3Dvolume``: ``demo.py``, ``vol3d_util.seg_iou3d``, ``vol3d_eval.VOL3Deval``, the
version with the ``--threshold-crumb`` option used for the challenge); see its docstring
for the rules. :func:`evaluate` returns the one dictionary that ``stt evaluate --json``
prints.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import UserInputError, UserTypeError

__all__ = ["LabelOverlap", "label_overlap", "instance_ap", "jaccard", "dsc", "evaluate"]

# Written exactly as in the challenge code so that the float comparisons (IoU >= 0.75,
# recall thresholds) agree bit for bit.
IOU_THRESHOLDS = 0.5 + 0.05 * np.arange(0, 10)
RECALL_THRESHOLDS = 0.01 * np.arange(0, 101)
AREA_NAMES = ("all", "small", "medium", "large")
AREA_SPLITS = (5e3, 3e4)
CRUMB_SIZE = 2000
SLAB_VOXELS = 1 << 24

_UNDEFINED = -1.0  # COCO / challenge value for "no ground truth in this setting"


@dataclass(frozen=True)
class LabelOverlap:
    """Sparse summary of two label volumes, everything the metrics need.

    Attributes
    ----------
    pred_ids, gt_ids : (P,), (G,) uint64
        Sorted non-zero labels present in each volume.
    pred_sizes, gt_sizes : (P,), (G,) int64
        Voxel count of each label.
    pair_pred, pair_gt : (K,) uint64
        Label pairs that share at least one voxel (both non-zero), sorted.
    pair_counts : (K,) int64
        Number of shared voxels of each pair.
    """

    pred_ids: np.ndarray
    pred_sizes: np.ndarray
    gt_ids: np.ndarray
    gt_sizes: np.ndarray
    pair_pred: np.ndarray
    pair_gt: np.ndarray
    pair_counts: np.ndarray


def _as_volume(vol: Any, name: str) -> Any:
    if not (hasattr(vol, "shape") and hasattr(vol, "dtype")):
        vol = np.asarray(vol)
    if len(vol.shape) != 3:
        raise UserInputError(f"{name} must be a 3-D (Z, Y, X) volume, got shape {tuple(vol.shape)}")
    if np.dtype(vol.dtype).kind not in "biu":
        raise UserTypeError(
            f"{name} must hold integer labels (signed/unsigned integer or bool dtype), got dtype {np.dtype(vol.dtype)}"
        )
    return vol


def _check_pair(pred: Any, gt: Any, names: tuple[str, str]) -> tuple[Any, Any]:
    pred, gt = _as_volume(pred, names[0]), _as_volume(gt, names[1])
    if tuple(pred.shape) != tuple(gt.shape):
        raise UserInputError(
            f"{names[0]} has shape {tuple(pred.shape)} but {names[1]} has shape "
            f"{tuple(gt.shape)}; expected the same (Z, Y, X) shape"
        )
    return pred, gt


def _slabs(shape: tuple[int, ...], slab_voxels: int) -> Iterator[slice]:
    depth = max(1, slab_voxels // max(1, shape[1] * shape[2]))
    for z0 in range(0, shape[0], depth):
        yield slice(z0, min(z0 + depth, shape[0]))


def _read(vol: Any, zs: slice) -> np.ndarray:
    a = np.asarray(vol[zs]).reshape(-1)
    return a.view(np.uint8) if a.dtype == np.bool_ else a


def _sum_by_id(ids: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    uniq, inv = np.unique(ids, return_inverse=True)
    total = np.zeros(uniq.shape, np.int64)
    np.add.at(total, inv, counts)
    return uniq, total


def _sum_by_pair(a: np.ndarray, b: np.ndarray, counts: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique (a, b) pairs with summed counts (each pair counts 1 when ``counts`` is None)."""
    if a.size == 0:
        e = np.zeros(0, np.uint64)
        return e, e, np.zeros(0, np.int64)
    a, b = a.astype(np.uint64, copy=False), b.astype(np.uint64, copy=False)
    if int(a.max()) < 2**32 and int(b.max()) < 2**32:
        # One 64-bit key sorts far faster than np.unique(axis=0) on a two-column array.
        key = (a << np.uint64(32)) | b
        uniq, inv, n = np.unique(key, return_inverse=True, return_counts=True)
        ua, ub = uniq >> np.uint64(32), uniq & np.uint64(0xFFFFFFFF)
    else:
        uniq, inv, n = np.unique(np.stack([a, b], 1), axis=0, return_inverse=True, return_counts=True)
        ua, ub = uniq[:, 0], uniq[:, 1]
    if counts is None:
        return ua, ub, n.astype(np.int64)
    total = np.zeros(ua.shape, np.int64)
    np.add.at(total, inv.reshape(-1), counts)
    return ua, ub, total


def label_overlap(pred: Any, gt: Any, *, slab_voxels: int = SLAB_VOXELS) -> LabelOverlap:
    """Sizes of all labels and of all pairwise overlaps, in one pass over the voxels.

    Parameters
    ----------
    pred, gt : (Z, Y, X) integer or bool array-like
        Label volumes (0 = background), numpy arrays or lazily sliced datasets.
    slab_voxels : int
        Voxels read per z-slab; bounds the working memory (about 20 bytes per slab voxel).

    Returns
    -------
    LabelOverlap

    Raises
    ------
    ValueError
        Wrong ndim, different shapes, or negative labels.
    TypeError
        Non-integer dtype.
    """
    return _overlap(pred, gt, slab_voxels, ("pred", "gt"))


def _overlap(pred: Any, gt: Any, slab_voxels: int, names: tuple[str, str]) -> LabelOverlap:
    pred, gt = _check_pair(pred, gt, names)
    pred_parts: list[tuple[np.ndarray, np.ndarray]] = []
    gt_parts: list[tuple[np.ndarray, np.ndarray]] = []
    pair_parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for zs in _slabs(tuple(pred.shape), slab_voxels):
        p, g = _read(pred, zs), _read(gt, zs)
        p_fg, g_fg = p != 0, g != 0
        for vals, name, acc in ((p[p_fg], names[0], pred_parts), (g[g_fg], names[1], gt_parts)):
            ids, cnt = np.unique(vals, return_counts=True)
            if ids.size and ids[0] < 0:
                raise UserInputError(f"{name} contains negative labels (e.g. {ids[0]}); labels must be >= 0")
            acc.append((ids.astype(np.uint64), cnt.astype(np.int64)))
        both = np.logical_and(p_fg, g_fg, out=p_fg)
        pair_parts.append(_sum_by_pair(p[both], g[both], None))

    def cat(parts: list, i: int, dtype: type) -> np.ndarray:
        return np.concatenate([part[i] for part in parts]).astype(dtype, copy=False) if parts else np.zeros(0, dtype)

    pred_ids, pred_sizes = _sum_by_id(cat(pred_parts, 0, np.uint64), cat(pred_parts, 1, np.int64))
    gt_ids, gt_sizes = _sum_by_id(cat(gt_parts, 0, np.uint64), cat(gt_parts, 1, np.int64))
    pair_pred, pair_gt, pair_counts = _sum_by_pair(
        cat(pair_parts, 0, np.uint64), cat(pair_parts, 1, np.uint64), cat(pair_parts, 2, np.int64)
    )
    return LabelOverlap(pred_ids, pred_sizes, gt_ids, gt_sizes, pair_pred, pair_gt, pair_counts)


def _area_ranges(area_splits: tuple[float, float]) -> np.ndarray:
    # The challenge stores the ranges in an int array: 1e10 is "no upper bound" and the
    # split values are truncated to integers.
    lo, hi = int(area_splits[0]), int(area_splits[1])
    return np.array([[0, 10**10], [0, lo], [lo, hi], [hi, 10**10]], dtype=np.int64)


def _precision_table(ov: LabelOverlap, crumb_size: int, area_splits: tuple[float, float]) -> np.ndarray:
    """Interpolated precision, shape (T=10 IoU thresholds, R=101 recall points, A=4 areas);
    -1 where the area range holds no ground truth."""
    # Score = size, highest first; a stable sort breaks ties by the smaller id.
    order = np.argsort(-ov.pred_sizes, kind="stable")
    n_pred = order.size
    pred_sizes = ov.pred_sizes[order]
    rank = np.empty(n_pred, np.int64)
    rank[order] = np.arange(n_pred)

    keep_gt = ov.gt_sizes >= crumb_size
    gt_sizes = ov.gt_sizes[keep_gt]
    gt_pos = np.full(ov.gt_ids.size, -1, np.int64)
    gt_pos[keep_gt] = np.arange(gt_sizes.size)

    pi = rank[np.searchsorted(ov.pred_ids, ov.pair_pred)]
    gi = gt_pos[np.searchsorted(ov.gt_ids, ov.pair_gt)]
    inter = ov.pair_counts
    kept = gi >= 0
    pi, gi, inter = pi[kept], gi[kept], inter[kept]
    iou = inter.astype(np.float64) / (pred_sizes[pi] + gt_sizes[gi] - inter)
    # Per prediction, best IoU first, then the smallest ground-truth id (np.argmax in the
    # challenge returns the first of equal maxima, and its candidates are sorted by id).
    srt = np.lexsort((gi, -iou, pi))
    pi, gi, iou = pi[srt], gi[srt], iou[srt]
    gsz = gt_sizes[gi]

    ranges = _area_ranges(area_splits)
    n_t, n_r, n_a = IOU_THRESHOLDS.size, RECALL_THRESHOLDS.size, ranges.shape[0]
    precision = -np.ones((n_t, n_r, n_a))
    best_all_gt = best_all_iou = None
    for a, (lo, hi) in enumerate(ranges):
        in_range = np.flatnonzero((gsz > lo) & (gsz <= hi))
        first_pred, first = np.unique(pi[in_range], return_index=True)
        match_gt = np.full(n_pred, -1, np.int64)
        match_iou = np.zeros(n_pred)
        match_gt[first_pred] = gi[in_range[first]]
        match_iou[first_pred] = iou[in_range[first]]
        if a == 0:
            best_all_gt, best_all_iou = match_gt, match_iou
        else:
            # A prediction touching no ground truth of this range keeps its overall best
            # match, so that matching a ground truth of another size ignores it below.
            none = match_gt < 0
            match_gt[none], match_iou[none] = best_all_gt[none], best_all_iou[none]

        gt_ignored = (gt_sizes <= lo) | (gt_sizes > hi)
        n_gt = int(np.count_nonzero(~gt_ignored))
        if n_gt == 0:
            continue
        matched = (match_gt[None, :] >= 0) & (match_iou[None, :] >= IOU_THRESHOLDS[:, None])
        pred_outside = (pred_sizes <= lo) | (pred_sizes > hi)
        ignored = (matched & gt_ignored[np.maximum(match_gt, 0)][None, :]) | (~matched & pred_outside[None, :])
        tp_sum = np.cumsum(matched & ~ignored, axis=1).astype(np.float64)
        fp_sum = np.cumsum(~matched & ~ignored, axis=1).astype(np.float64)
        for t in range(n_t):
            tp, fp = tp_sum[t], fp_sum[t]
            recall = tp / n_gt
            prec = tp / (fp + tp + np.spacing(1))
            prec = np.maximum.accumulate(prec[::-1])[::-1]
            idx = np.searchsorted(recall, RECALL_THRESHOLDS, side="left")
            q = np.zeros(n_r)
            ok = idx < n_pred
            q[ok] = prec[idx[ok]]
            precision[t, :, a] = q
    return precision


def _mean_defined(p: np.ndarray) -> float:
    p = p[p > -1]
    return float(p.mean()) if p.size else _UNDEFINED


def _ap_summary(precision: np.ndarray) -> dict[str, float]:
    t50 = int(np.flatnonzero(np.abs(IOU_THRESHOLDS - 0.5) < 1e-5)[0])
    t75 = int(np.flatnonzero(np.abs(IOU_THRESHOLDS - 0.75) < 1e-5)[0])
    out = {
        "ap": _mean_defined(precision[:, :, 0]),
        "ap50": _mean_defined(precision[t50, :, 0]),
        "ap75": _mean_defined(precision[t75, :, 0]),
    }
    for a, name in enumerate(AREA_NAMES[1:], start=1):
        out[f"ap75_{name}"] = _mean_defined(precision[t75, :, a])
    return out


def instance_ap(
    pred_instances: Any,
    gt_instances: Any,
    *,
    crumb_size: int = CRUMB_SIZE,
    area_splits: tuple[float, float] = AREA_SPLITS,
    slab_voxels: int = SLAB_VOXELS,
) -> dict[str, float]:
    """MitoEM 3D instance average precision, as the challenge evaluation computes it.

    Rules (those of ``mAP_3Dvolume``, the COCO evaluation adapted to volumes):

    - Every non-zero label is one instance. IoU = shared voxels / (pred + gt - shared),
      computed from the sparse overlap table (:func:`label_overlap`), never dense masks.
    - Ground-truth instances smaller than ``crumb_size`` voxels (2,000; incomplete pieces at
      the volume border) are removed before matching: they are not in the recall
      denominator and cannot be matched. As in the challenge code, a prediction whose only
      overlap is such a crumb is unmatched and so counts as a false positive.
    - Prediction confidence = instance size in voxels; predictions are ranked largest first
      (ties: smaller id first; the challenge's unstable sort leaves this order unspecified).
    - Each prediction is matched to the ground-truth instance of highest IoU (ties: smaller
      id); it is a true positive at IoU threshold t if that IoU >= t, for t in
      0.50:0.05:0.95. There is no one-to-one bookkeeping: two predictions can only share
      a match at IoU >= 0.5 when both have IoU exactly 0.5, and then both count.
    - Area ranges, on voxel counts with bounds (lo, hi]: all (0, 1e10], small (0, 5e3],
      medium (5e3, 3e4], large (3e4, 1e10] (``area_splits``). For a range, each
      prediction is matched as above among ground truth of that range; if it overlaps none,
      its overall best match is used. A true positive whose ground truth lies outside the
      range, and an unmatched prediction whose own size lies outside the range, are
      ignored (neither TP nor FP); ground truth outside the range is not counted.
    - Precision/recall along the ranked list; precision made monotone from the right and
      read at the 101 recall points 0:0.01:1 (first list position reaching each recall,
      0 beyond the highest recall). AP = mean of those 101 values (and over the 10 IoU
      thresholds for ``ap``).
    - A setting with no ground truth is undefined and reported as -1.0 (the challenge's
      value); with ground truth but no predictions AP is 0.

    Parameters
    ----------
    pred_instances, gt_instances : (Z, Y, X) integer or bool array-like
        Instance label volumes, 0 = background; numpy arrays or h5py/zarr datasets.
    crumb_size : int
        Ground-truth instances with fewer voxels are removed (challenge: 2000).
    area_splits : (float, float)
        Voxel-count bounds between small / medium / large (challenge: 5e3, 3e4).
    slab_voxels : int
        Voxels read at once; see the module docstring for memory.

    Returns
    -------
    dict
        ``ap`` (IoU .50:.95, all sizes), ``ap50``, ``ap75`` (all sizes), and ``ap75_small``,
        ``ap75_medium``, ``ap75_large`` (AP at IoU 0.75 per size class). Floats in [0, 1]
        or -1.0 when undefined.

    Raises
    ------
    ValueError
        Volumes not 3-D, of different shapes, or with negative labels.
    TypeError
        Non-integer dtype.
    """
    ov = _overlap(pred_instances, gt_instances, slab_voxels, ("pred_instances", "gt_instances"))
    return _ap_summary(_precision_table(ov, crumb_size, area_splits))


def _foreground_counts(pred: Any, gt: Any, slab_voxels: int) -> tuple[int, int, int]:
    n_pred = n_gt = n_both = 0
    for zs in _slabs(tuple(pred.shape), slab_voxels):
        p, g = _read(pred, zs) != 0, _read(gt, zs) != 0
        n_pred += int(np.count_nonzero(p))
        n_gt += int(np.count_nonzero(g))
        n_both += int(np.count_nonzero(np.logical_and(p, g, out=p)))
    return n_pred, n_gt, n_both


def _jaccard(n_pred: int, n_gt: int, n_both: int) -> float:
    union = n_pred + n_gt - n_both
    return n_both / union if union else 1.0


def _dsc(n_pred: int, n_gt: int, n_both: int) -> float:
    total = n_pred + n_gt
    return 2.0 * n_both / total if total else 1.0


def jaccard(pred_mask: Any, gt_mask: Any, *, slab_voxels: int = SLAB_VOXELS) -> float:
    """Foreground Jaccard index |P & G| / |P | G| (Lucchi).

    Parameters
    ----------
    pred_mask, gt_mask : (Z, Y, X) integer or bool array-like
        Foreground = non-zero (instance labels work as they are).

    Returns
    -------
    float
        In [0, 1]; 1.0 when both masks are empty.
    """
    pred_mask, gt_mask = _check_pair(pred_mask, gt_mask, ("pred_mask", "gt_mask"))
    return _jaccard(*_foreground_counts(pred_mask, gt_mask, slab_voxels))


def dsc(pred_mask: Any, gt_mask: Any, *, slab_voxels: int = SLAB_VOXELS) -> float:
    """Foreground Dice similarity coefficient 2 |P & G| / (|P| + |G|) (Lucchi).

    Parameters and return as :func:`jaccard`; 1.0 when both masks are empty.
    """
    pred_mask, gt_mask = _check_pair(pred_mask, gt_mask, ("pred_mask", "gt_mask"))
    return _dsc(*_foreground_counts(pred_mask, gt_mask, slab_voxels))


def evaluate(
    pred: Any,
    gt: Any,
    *,
    crumb_size: int = CRUMB_SIZE,
    area_splits: tuple[float, float] = AREA_SPLITS,
    slab_voxels: int = SLAB_VOXELS,
) -> dict[str, float]:
    """All metrics of ``stt evaluate --json`` in one pass over the voxels.

    Parameters
    ----------
    pred, gt : (Z, Y, X) integer or bool array-like
        Instance label volumes, 0 = background. Every label value is one instance, so a
        0/1 mask scores as a single instance (label it first, e.g. with
        :func:`stt_model.postprocess.binary_connected`, for a meaningful AP).
    crumb_size, area_splits, slab_voxels
        As in :func:`instance_ap`.

    Returns
    -------
    dict
        Keys (a public contract): ``ap75``, ``ap50``, ``ap``, ``ap75_small``,
        ``ap75_medium``, ``ap75_large`` (see :func:`instance_ap`) and ``jaccard``, ``dsc``
        (foreground = label > 0, see :func:`jaccard`).
    """
    ov = _overlap(pred, gt, slab_voxels, ("pred", "gt"))
    ap = _ap_summary(_precision_table(ov, crumb_size, area_splits))
    counts = (int(ov.pred_sizes.sum()), int(ov.gt_sizes.sum()), int(ov.pair_counts.sum()))
    return {
        "ap75": ap["ap75"],
        "ap50": ap["ap50"],
        "ap": ap["ap"],
        "ap75_small": ap["ap75_small"],
        "ap75_medium": ap["ap75_medium"],
        "ap75_large": ap["ap75_large"],
        "jaccard": _jaccard(*counts),
        "dsc": _dsc(*counts),
    }
