"""Probability maps -> instances, and chunked labelling against whole-volume labelling."""

import numpy as np
import pytest
from scipy import ndimage as ndi

from stt_model import postprocess
from stt_model.postprocess import Foreground, bc_connected, bc_watershed, binary_connected, label_chunked

RANK = {6: 1, 18: 2, 26: 3}


@pytest.fixture(params=["cc3d", "scipy"])
def backend(request, monkeypatch):
    """Run a test with cc3d (when installed) and with the scipy.ndimage fallback."""
    if request.param == "cc3d":
        pytest.importorskip("cc3d")
    else:
        monkeypatch.setattr(postprocess, "_cc3d", None)
    return request.param


def reference_labels(mask: np.ndarray, connectivity: int, min_size: int = 0) -> np.ndarray:
    labels, n = ndi.label(mask, ndi.generate_binary_structure(3, RANK[connectivity]))
    keep = np.bincount(labels.ravel(), minlength=n + 1) >= min_size
    keep[0] = False
    lut = np.zeros(n + 1, np.int64)
    lut[keep] = np.arange(1, keep.sum() + 1)
    return lut[labels]


def two_boxes_with_contour(dtype=np.float32):
    """Two boxes touching along x = 16, with a contour band on both sides of the border."""
    sem = np.zeros((8, 24, 32), np.float32)
    sem[1:7, 4:20, 4:28] = 0.95
    contour = np.zeros_like(sem)
    contour[1:7, 4:20, 15:17] = 0.9
    if dtype == np.uint8:
        return (sem * 255).astype(np.uint8), (contour * 255).astype(np.uint8)
    return sem, contour


@pytest.mark.parametrize("connectivity", [6, 18, 26])
@pytest.mark.parametrize("slab", [1, 2, 5, 64])
def test_label_chunked_equals_whole_volume_labelling(backend, connectivity, slab):
    rng = np.random.default_rng(connectivity * 100 + slab)
    for density in (0.2, 0.35, 0.6):
        mask = rng.random((13, 17, 19)) < density
        out, n = label_chunked(mask, connectivity=connectivity, slab=slab)
        expected = reference_labels(mask, connectivity)
        assert out.dtype == np.uint32
        assert n == expected.max()
        np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("slab", [1, 3, 10])
def test_label_chunked_removes_small_objects(backend, slab):
    rng = np.random.default_rng(slab)
    mask = ndi.gaussian_filter(rng.random((20, 24, 24)), 1.0) > 0.52
    out, n = label_chunked(mask, connectivity=26, slab=slab, min_size=5)
    expected = reference_labels(mask, 26, min_size=5)
    assert n == expected.max() > 0
    np.testing.assert_array_equal(out, expected)


def test_label_chunked_h5py_to_h5py_through_lazy_foreground(tmp_path):
    h5py = pytest.importorskip("h5py")
    sem, contour = two_boxes_with_contour(np.uint8)
    with h5py.File(tmp_path / "p.h5", "w") as f:
        f.create_dataset("sem", data=sem, chunks=(2, 24, 32))
        f.create_dataset("contour", data=contour, chunks=(2, 24, 32))
        out = f.create_dataset("inst", shape=sem.shape, dtype=np.uint32, chunks=(2, 24, 32))
        fg = Foreground(f["sem"], f["contour"], t_fg=0.8, t_contour=0.5)
        _, n = label_chunked(fg, out, slab=3)
        assert n == 2
        np.testing.assert_array_equal(out[()], reference_labels(fg[:], 26))
        np.testing.assert_array_equal(out[()], bc_connected(sem, contour, dilation=None, min_size=0))


def test_label_chunked_bad_arguments():
    mask = np.ones((4, 5, 6), bool)
    with pytest.raises(ValueError, match="connectivity must be 6, 18 or 26"):
        label_chunked(mask, connectivity=8)
    with pytest.raises(ValueError, match=r"out has shape \(4, 5, 5\)"):
        label_chunked(mask, np.zeros((4, 5, 5), np.uint32))
    with pytest.raises(TypeError, match="out must have an unsigned integer dtype"):
        label_chunked(mask, np.zeros((4, 5, 6), np.int32))
    with pytest.raises(ValueError, match="mask must be a 3-D"):
        label_chunked(mask[0])
    with pytest.raises(ValueError, match="slab must be >= 1"):
        label_chunked(mask, slab=0)
    checker = np.indices((4, 30, 30)).sum(0) % 2 == 0  # 1,800 isolated voxels with 6-connectivity
    with pytest.raises(ValueError, match="cannot hold the 1800 labels of one slab; pass a uint64 out"):
        label_chunked(checker, np.zeros(checker.shape, np.uint8), connectivity=6)


@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
def test_bc_connected_splits_at_the_contour_and_dilates_back(backend, dtype):
    sem, contour = two_boxes_with_contour(dtype)
    undilated = bc_connected(sem, contour, dilation=None, min_size=0)
    assert undilated.dtype == np.uint32 and undilated.max() == 2
    assert np.count_nonzero(undilated) == 6 * 16 * 22  # the two contour columns are cut away
    # Without the contour the boxes are one object.
    assert bc_connected(sem, np.zeros_like(contour), dilation=None, min_size=0).max() == 1

    dilated = bc_connected(sem, contour, dilation=(1, 5, 5), min_size=0, dilate_into="foreground")
    assert dilated.max() == 2
    np.testing.assert_array_equal(dilated > 0, sem > (0.8 if dtype == np.float32 else 204))
    assert (dilated[:, :, :15] != 2).all() and (dilated[:, :, 17:] != 1).all()
    grown = bc_connected(sem, contour, min_size=0)  # baseline: dilation also into background
    assert np.count_nonzero(grown) > np.count_nonzero(dilated)


def test_bc_connected_matches_the_baseline_steps(backend):
    from skimage.measure import label
    from skimage.morphology import dilation

    rng = np.random.default_rng(0)
    sem = ndi.gaussian_filter(rng.random((12, 40, 40)), 2.0)
    sem = (sem - sem.min()) / (sem.max() - sem.min())
    contour = ndi.gaussian_filter(rng.random(sem.shape), 1.5)
    contour = (contour - contour.min()) / (contour.max() - contour.min())
    sem8, contour8 = (sem * 255).astype(np.uint8), (contour * 255).astype(np.uint8)

    segm = dilation(label((sem8 > int(255 * 0.6)) & (contour8 < int(255 * 0.5))), np.ones((1, 5, 5)))
    sizes = np.bincount(segm.ravel())
    segm[sizes[segm] < 20] = 0
    got = bc_connected(sem8, contour8, t_fg=0.6, t_contour=0.5, min_size=20)
    assert got.max() > 1
    # Same partition; ids may differ where dilation moves an instance's first voxel.
    np.testing.assert_array_equal(relabel_by_first_voxel(got), relabel_by_first_voxel(segm))


def relabel_by_first_voxel(labels: np.ndarray) -> np.ndarray:
    ids, first = np.unique(labels.ravel(), return_index=True)
    order = ids[np.argsort(first)]
    order = order[order != 0]
    lut = np.zeros(labels.max() + 1, np.int64)
    lut[order] = np.arange(1, order.size + 1)
    return lut[labels]


def test_bc_watershed_fills_the_foreground_from_seeds(backend):
    zz, yy, xx = np.indices((16, 32, 48))
    d1 = np.sqrt((zz - 8) ** 2 + (yy - 16) ** 2 + (xx - 14) ** 2)
    d2 = np.sqrt((zz - 8) ** 2 + (yy - 16) ** 2 + (xx - 34) ** 2)
    sem = np.clip(1.0 - np.minimum(d1, d2) / 20.0, 0, 1).astype(np.float32)  # two touching blobs
    contour = (np.abs(xx - 24) <= 1).astype(np.float32) * 0.9  # border between them
    seg = bc_watershed(sem, contour, t_seed=0.9, t_contour=0.8, t_fg=0.6, min_seed_size=4, min_size=10)
    assert seg.dtype == np.uint32 and seg.max() == 2
    np.testing.assert_array_equal(seg > 0, sem > 0.6)  # every foreground voxel reached
    assert (seg[xx < 22] != 2).all() and (seg[xx > 26] != 1).all()
    # Seeds below min_seed_size are dropped, and foreground reached from no seed stays 0.
    one_seed = bc_watershed(sem, contour, t_seed=0.9, t_contour=0.8, t_fg=0.6, min_seed_size=10**6, min_size=0)
    assert one_seed.max() == 0
    # uint8 maps decode the same as the equivalent floats.
    seg8 = bc_watershed(
        (sem * 255).astype(np.uint8), (contour * 255).astype(np.uint8), t_fg=0.6, min_seed_size=4, min_size=10
    )
    assert seg8.max() == 2


def test_bc_watershed_matches_the_baseline_steps(backend):
    from skimage.measure import label
    from skimage.segmentation import watershed

    rng = np.random.default_rng(1)
    sem = ndi.gaussian_filter(rng.random((10, 40, 40)), 2.0)
    sem8 = ((sem - sem.min()) / (sem.max() - sem.min()) * 255).astype(np.uint8)
    contour8 = (ndi.gaussian_filter(rng.random(sem.shape), 1.5) * 255).astype(np.uint8)
    seed = label((sem8 > int(255 * 0.7)) & (contour8 < int(255 * 0.8)))
    seed_sizes = np.bincount(seed.ravel())
    seed[seed_sizes[seed] < 4] = 0
    segm = watershed(-sem8.astype(np.float64), seed, mask=sem8 > int(255 * 0.5))
    sizes = np.bincount(segm.ravel())
    segm[sizes[segm] < 30] = 0
    got = bc_watershed(sem8, contour8, t_seed=0.7, t_contour=0.8, t_fg=0.5, min_seed_size=4, min_size=30)
    assert got.max() > 1
    # Same partition; ids may differ because watershed ids follow the seeds' order.
    np.testing.assert_array_equal(relabel_by_first_voxel(got), relabel_by_first_voxel(segm))


def test_binary_connected(backend):
    mask = np.zeros((6, 10, 10), bool)
    mask[0:3, 0:3, 0:3] = True  # 27 voxels
    mask[4:6, 6:10, 6:10] = True  # 32 voxels
    mask[5, 0, 9] = True  # 1 voxel
    seg = binary_connected(mask, min_size=2)
    assert seg.dtype == np.uint32
    assert np.bincount(seg.ravel()).tolist()[1:] == [27, 32]
    assert binary_connected(mask, min_size=0).max() == 3
    prob = mask.astype(np.uint8) * 205  # 205 > int(255 * 0.8) = 204
    np.testing.assert_array_equal(binary_connected(prob, min_size=2), seg)
    assert binary_connected(mask.astype(np.uint8) * 204, min_size=0).max() == 0
    diagonal = np.zeros((2, 2, 2), bool)
    diagonal[0, 0, 0] = diagonal[1, 1, 1] = True
    assert binary_connected(diagonal, min_size=0, connectivity=26).max() == 1
    assert binary_connected(diagonal, min_size=0, connectivity=18).max() == 2


def test_postprocess_bad_inputs_name_the_argument():
    sem, contour = two_boxes_with_contour()
    with pytest.raises(ValueError, match=r"semantic has shape \(8, 24, 32\) but contour has shape \(8, 24, 31\)"):
        bc_connected(sem, contour[..., :31])
    with pytest.raises(TypeError, match="contour must be float in \\[0, 1\\] or uint8.*int16"):
        bc_watershed(sem, contour.astype(np.int16))
    with pytest.raises(ValueError, match="semantic must be a 3-D"):
        bc_connected(sem[0], contour[0])
    with pytest.raises(ValueError, match=r"t_fg must be in \[0, 1\], got 1.5"):
        bc_watershed(sem, contour, t_fg=1.5)
    with pytest.raises(ValueError, match="min_size must be >= 0"):
        binary_connected(sem, min_size=-1)
    with pytest.raises(ValueError, match="dilation must be three positive box sizes"):
        bc_connected(sem, contour, dilation=(5, 5))
    with pytest.raises(ValueError, match="dilate_into"):
        bc_connected(sem, contour, dilate_into="background")
    with pytest.raises(ValueError, match="contour has shape"):
        Foreground(sem, contour[:4])
