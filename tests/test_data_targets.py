"""Targets on constructed volumes, and the synthetic EM generator."""

import numpy as np
import pytest
from scipy import ndimage

from stt_model.data import binary_mask, instance_contour, instances_from_binary, make_targets, synthetic_volume


def two_touching_cubes() -> np.ndarray:
    """Cubes 1 (x 4..9) and 2 (x 10..15) share the interface between x = 9 and x = 10."""
    labels = np.zeros((6, 20, 20), np.uint32)
    labels[1:5, 5:15, 4:10] = 1
    labels[1:5, 5:15, 10:16] = 2
    return labels


def test_contour_on_interface_and_background_ring():
    labels = two_touching_cubes()
    contour = instance_contour(labels, width=1)
    z = 2
    # Both sides of the interface, all along it.
    assert contour[z, 6:14, 9].all() and contour[z, 6:14, 10].all()
    # A ring on both sides of the outer boundary: the last object voxel and the first background one.
    assert contour[z, 5, 4:16].all() and contour[z, 4, 4:16].all()
    assert contour[z, 8, 3] and contour[z, 8, 4] and contour[z, 8, 15] and contour[z, 8, 16]
    # Not deep inside, not far outside.
    assert not contour[z, 9, 6] and not contour[z, 9, 13] and not contour[z, 0, 0] and not contour[z, 9, 18]
    # 2-d per slice: the top and bottom slices of the cubes are not all contour, nor the slice above.
    assert not contour[1, 9, 6] and not contour[0].any()


def test_contour_width_and_3d_mode():
    labels = two_touching_cubes()
    wide = instance_contour(labels, width=2)
    assert wide[2, 8, 8:12].all() and not wide[2, 8, 6]
    assert (wide >= instance_contour(labels, width=1)).all()
    cube = instance_contour(labels, width=1, mode="3d")
    assert cube[1, 9, 6] and cube[0, 9, 6] and not cube[2, 9, 6]


def test_no_contour_at_the_volume_border():
    labels = np.ones((3, 8, 8), np.uint32)
    assert not instance_contour(labels).any()


def test_binary_mask_and_targets():
    labels = two_touching_cubes()
    np.testing.assert_array_equal(binary_mask(labels), labels > 0)
    targets = make_targets(labels, out_channels=2, contour_width=1)
    assert targets.shape == (2, *labels.shape) and targets.dtype == np.float32
    np.testing.assert_array_equal(targets[1], instance_contour(labels))
    assert make_targets(labels, out_channels=1).shape == (1, *labels.shape)
    with pytest.raises(ValueError, match="out_channels must be 1"):
        make_targets(labels, out_channels=3)


def test_connected_components():
    mask = np.zeros((5, 10, 10), np.uint8)
    mask[0:2, 0:3, 0:3] = 1
    mask[3:5, 6:9, 6:9] = 1
    mask[2, 3, 3] = 1  # touches the first block only at a corner
    ids = instances_from_binary(mask)
    assert ids.dtype == np.uint32 and ids.max() == 2
    assert ids[2, 3, 3] == ids[0, 0, 0]
    six = instances_from_binary(mask, connectivity=6)
    assert six.max() == 3
    np.testing.assert_array_equal(ids > 0, mask > 0)


@pytest.fixture(scope="module")
def volume():
    return synthetic_volume((24, 192, 192), seed=5)


def test_synthetic_deterministic_and_typed(volume):
    image, labels = volume
    assert image.dtype == np.uint8 and image.shape == (24, 192, 192)
    assert labels.dtype == np.uint32 and labels.shape == image.shape
    again = synthetic_volume((24, 192, 192), seed=5)
    np.testing.assert_array_equal(again.image, image)
    np.testing.assert_array_equal(again.labels, labels)
    assert not np.array_equal(synthetic_volume((24, 192, 192), seed=6).labels, labels)


def test_synthetic_objects(volume):
    image, labels = volume
    ids = np.unique(labels)[1:]
    assert len(ids) >= 5 and ids.tolist() == list(range(1, len(ids) + 1))
    assert 0.03 < (labels > 0).mean() < 0.4
    spans = [np.ptp(np.nonzero(labels == i)[0]) + 1 for i in ids]
    assert np.median(spans) >= 3, "objects run through several slices"
    # Dark-rimmed, darker objects: the labels sit on the dark structures of the image.
    assert image[labels > 0].mean() < image[labels == 0].mean() - 20
    rim = (labels > 0) & ~ndimage.binary_erosion(labels > 0, np.ones((1, 3, 3)))
    assert image[rim].mean() < image[labels > 0].mean()


def test_synthetic_has_touching_instances(volume):
    labels = volume.labels
    right = labels[:, :, 1:]
    left = labels[:, :, :-1]
    assert ((left != right) & (left > 0) & (right > 0)).any()


def test_synthetic_touching_instances_are_separated_by_membrane(volume):
    """Two touching mitochondria each keep their own dark membrane along the interface, so the
    image shows where one ends and the other begins (without it their matrices merged)."""
    image, labels = volume
    image = image.astype(np.float32)
    interface = np.zeros(labels.shape, bool)
    for axis in (1, 2):
        a = labels.take(np.arange(labels.shape[axis] - 1), axis)
        b = labels.take(np.arange(1, labels.shape[axis]), axis)
        differ = (a != b) & (a > 0) & (b > 0)
        low = [slice(None)] * 3
        high = [slice(None)] * 3
        low[axis], high[axis] = slice(0, -1), slice(1, None)
        interface[tuple(low)] |= differ
        interface[tuple(high)] |= differ
    assert interface.sum() > 100
    # The matrix: inside, away from any boundary (outer surface or interface).
    same = labels > 0
    for axis in (1, 2):
        for shift in (-3, 3):
            same &= np.roll(labels, shift, axis) == labels
    # Here 36 grey levels darker; without membranes along interfaces (blur and the nearby outer
    # rims only) it was 19.
    assert image[interface].mean() < image[same].mean() - 28


def test_synthetic_is_fast():
    import time

    start = time.perf_counter()
    synthetic_volume((32, 256, 256), seed=0)
    assert time.perf_counter() - start < 4.0  # ~1 s alone; slack for a shared 2-core machine
