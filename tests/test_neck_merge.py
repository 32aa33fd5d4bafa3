"""The distance decoder's neck merging (``merge_ratio``): a waist of one object is not a cut,
the contact of two touching objects is, and a contour between two objects always is."""

import numpy as np
import pytest

from stt_model.data import instance_contour
from stt_model.errors import UserInputError
from stt_model.metrics import instance_ap
from stt_model.postprocess import distance_watershed
from stt_model.segment import Thresholds
from stt_model.tune import search_thresholds

Z, Y, X = np.mgrid[:24, :48, :96]


def _ball(cx: float, r: float) -> np.ndarray:
    return (Z - 12) ** 2 + (Y - 24) ** 2 + (X - cx) ** 2 < r**2


def _probs(gt: np.ndarray, contour: np.ndarray) -> np.ndarray:
    """(2, Z, Y, X) uint8: a confident mask of ``gt`` and the given contour."""
    return np.rint(np.stack([(gt > 0) * 0.95 + 0.02, contour * 0.9 + 0.02]) * 255).astype(np.uint8)


def _waisted() -> np.ndarray:
    """One object: two balls of radius 10 joined by a bar 7 voxels in radius (a dumbbell)."""
    bar = ((Z - 12) ** 2 + (Y - 24) ** 2 < 7**2) & (X > 30) & (X < 64)
    return (_ball(30, 10) | _ball(64, 10) | bar).astype(np.uint32)


def _touching() -> np.ndarray:
    """Two objects: balls of radius 12 whose centres are 22 apart (contact radius about 5)."""
    a = _ball(36, 12)
    return (a * 1 + (_ball(58, 12) & ~a) * 2).astype(np.uint32)


def _decode(probs: np.ndarray, merge_ratio: float) -> np.ndarray:
    return distance_watershed(probs[0], probs[1], peak_height=1.0, min_size=10, merge_ratio=merge_ratio)


def _outer(gt: np.ndarray) -> np.ndarray:
    return instance_contour((gt > 0).astype(np.uint32))


def test_a_waist_is_cut_without_merging_and_kept_whole_with_it():
    probs = _probs(_waisted(), _outer(_waisted()))
    assert _decode(probs, 1.0).max() == 2
    assert _decode(probs, 0.6).max() == 1


def test_touching_objects_stay_apart_at_the_same_ratio():
    gt = _touching()
    labels = _decode(_probs(gt, _outer(gt)), 0.6)
    assert labels.max() == 2 and instance_ap(labels, gt)["ap75"] == 1.0
    assert _decode(_probs(gt, _outer(gt)), 0.2).max() == 1  # a low enough ratio merges them too


def test_a_contour_between_objects_is_never_merged():
    gt = _touching()
    labels = _decode(_probs(gt, instance_contour(gt)), 0.0)
    assert labels.max() == 2 and instance_ap(labels, gt)["ap75"] == 1.0


def test_merge_ratio_one_is_the_decoding_without_merging():
    probs = _probs(_waisted(), _outer(_waisted()))
    plain = distance_watershed(probs[0], probs[1], peak_height=1.0, min_size=10)
    np.testing.assert_array_equal(_decode(probs, 1.0), plain)


def test_merge_ratio_outside_zero_one_is_refused():
    probs = _probs(_touching(), _outer(_touching()))
    with pytest.raises(UserInputError, match=r"merge_ratio must be in \[0, 1\]"):
        _decode(probs, 1.5)


def test_the_search_tunes_merge_ratio():
    gt = _waisted()
    probs = _probs(gt, _outer(gt))
    start = Thresholds(decoder="distance", min_size=10, peak_height=1.0, foreground=0.5, contour=0.5)
    assert _decode(probs, start.merge_ratio).max() == 2
    result = search_thresholds(probs, gt, start, points=3)
    assert result.thresholds.merge_ratio < 1
    assert result.after["ap75"] == pytest.approx(1.0) and result.before["ap75"] < 0.5
