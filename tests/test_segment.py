"""Decoding probabilities into instances: in memory and slab by slab from a file."""

import h5py
import numpy as np
from scipy import ndimage

from stt_model.segment import Thresholds, instances_into


def _probs(seed=0):
    rng = np.random.default_rng(seed)
    probs = np.zeros((2, 10, 40, 40), np.uint8)
    for _ in range(6):
        z, y, x = rng.integers(0, [8, 34, 34])
        probs[0, z : z + 3, y : y + 6, x : x + 6] = 250
    probs[1, :, 20, :] = 230  # a contour plane cuts objects crossing y = 20
    return probs


def test_slab_wise_labelling_of_a_file_matches_connected_components(tmp_path):
    probs = _probs()
    with h5py.File(tmp_path / "p.h5", "w") as f:
        f["main"] = probs
    out = np.zeros(probs.shape[1:], np.uint32)
    with h5py.File(tmp_path / "p.h5") as f:
        count, method = instances_into(f["main"], out, Thresholds(min_size=1), in_memory_voxels=0)
    assert method == "slab-wise connected components"
    core = (probs[0] > int(255 * 0.85)) & (probs[1] < int(255 * 0.8))
    expected, n = ndimage.label(core, np.ones((3, 3, 3)))
    assert count == n > 0
    # Same partition of the voxels, whatever the numbering.
    pairs = set(zip(out[core].tolist(), expected[core].tolist()))
    assert len(pairs) == n and (out[~core] == 0).all()


def test_in_memory_watershed_for_small_volumes():
    probs = _probs(1)
    out = np.zeros(probs.shape[1:], np.uint32)
    count, method = instances_into(probs, out, Thresholds(min_size=1))
    assert method == "watershed" and count == out.max() > 0
