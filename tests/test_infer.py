"""Sliding-window inference: exact coverage and normalisation, blocks and ranks that do not
change the answer, reads bounded by the block, chunked HDF5 output."""

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from stt_model.infer import InferOptions, gaussian_weight, predict, window_starts


class Echo(nn.Module):
    """Logits whose sigmoid is the input: every window predicts the input back."""

    def forward(self, x):
        p = x.clamp(1e-4, 1 - 1e-4)
        return torch.cat([torch.log(p / (1 - p)), -torch.log(p / (1 - p))], dim=1)


class Positional(nn.Module):
    """A prediction that depends on where the voxel sits in its window, so blending matters."""

    def forward(self, x):
        t, h, w = x.shape[2:]
        ramp = torch.linspace(-2, 2, w).view(1, 1, 1, 1, w) + torch.linspace(-1, 1, h).view(1, 1, 1, h, 1)
        return x * 3 + ramp


class CountingVolume:
    """A numpy volume that records the size of every read."""

    def __init__(self, data):
        self.data, self.shape, self.dtype, self.reads = data, data.shape, data.dtype, []

    def __getitem__(self, index):
        chunk = self.data[index]
        self.reads.append(chunk.size)
        return chunk


def test_window_starts_cover_every_voxel():
    assert window_starts(10, 4, 3) == [0, 3, 6]
    assert window_starts(3, 8, 6) == [0]
    for length, window, stride in [(17, 5, 3), (100, 32, 24), (5, 5, 1)]:
        covered = np.zeros(length, bool)
        for s in window_starts(length, window, stride):
            covered[s : s + window] = True
        assert covered.all()


def test_gaussian_peaks_in_the_centre_and_never_vanishes():
    g = gaussian_weight((5, 8, 8))
    assert g.shape == (5, 8, 8) and g.max() == pytest.approx(1.0, rel=1e-3) and g.min() > 0
    assert g[2, 3, 3] > g[0, 0, 0]


@pytest.mark.parametrize(
    "shape, window, overlap, block",
    [
        ((7, 23, 19), (4, 8, 8), 0.25, None),
        ((7, 23, 19), (4, 8, 8), 0.5, (3, 10, 7)),
        ((2, 5, 6), (4, 8, 8), 0.25, None),  # smaller than the window: reflect padding
    ],
)
def test_echo_comes_back_exactly(shape, window, overlap, block):
    volume = np.random.default_rng(0).integers(1, 255, shape, dtype=np.uint8)
    out = np.zeros((2, *shape), np.float32)
    predict(Echo(), volume, out, InferOptions(window, overlap=overlap, block=block, progress=False))
    np.testing.assert_allclose(out[0], volume / 255.0, atol=1e-4)
    np.testing.assert_allclose(out[1], 1 - volume / 255.0, atol=1e-4)


def test_blocks_and_ranks_do_not_change_the_blend():
    volume = np.random.default_rng(1).random((9, 30, 26), dtype=np.float32)
    options = dict(window=(4, 8, 8), overlap=0.5, progress=False)
    whole = np.zeros((1, *volume.shape), np.float32)
    predict(Positional(), volume, whole, InferOptions(block=volume.shape, **options))
    tiled = np.zeros_like(whole)
    for rank in range(3):  # three ranks sharing one output, one after another
        predict(Positional(), volume, tiled, InferOptions(block=(3, 7, 11), rank=rank, world=3, **options))
    np.testing.assert_allclose(tiled, whole, rtol=1e-5, atol=1e-6)
    # And the blend is a real average of different window predictions, not one window's.
    single = torch.sigmoid(Positional()(torch.from_numpy(volume[None, None, :4, :8, :8]))).numpy()[0]
    assert not np.allclose(whole[:, :4, :8, :8], single, atol=1e-3)


def test_reads_are_bounded_by_the_block():
    volume = CountingVolume(np.random.default_rng(2).integers(0, 255, (8, 64, 64), dtype=np.uint8))
    out = np.zeros((2, 8, 64, 64), np.uint8)
    options = InferOptions((4, 8, 8), overlap=0.25, block=(4, 16, 16), progress=False)
    predict(Echo(), volume, out, options)
    halo = [b + 2 * w for b, w in zip(options.block, options.window)]
    assert max(volume.reads) <= np.prod(halo) < volume.data.size
    np.testing.assert_allclose(out[0].astype(int), volume.data.astype(int), atol=1)


def test_flip_tta_and_uint8_hdf5_output(tmp_path):
    volume = np.random.default_rng(3).integers(1, 255, (5, 16, 12), dtype=np.uint8)
    with h5py.File(tmp_path / "out.h5", "w") as f:
        out = f.create_dataset("main", (2, 5, 16, 12), np.uint8, chunks=(2, 5, 8, 8))
        predict(Echo(), volume, out, InferOptions((4, 8, 8), flip_tta=True, progress=False))
        np.testing.assert_allclose(out[0].astype(int), volume.astype(int), atol=1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="overlap must be in"):
        InferOptions((4, 8, 8), overlap=1.0)
    with pytest.raises(ValueError, match="window must be three positive sizes"):
        InferOptions((4, 8))
    with pytest.raises(ValueError, match=r"out must have shape \(C, 5, 8, 8\)"):
        predict(
            Echo(),
            np.zeros((5, 8, 8), np.uint8),
            np.zeros((2, 5, 8, 7), np.uint8),
            InferOptions((4, 8, 8), progress=False),
        )
    with pytest.raises(ValueError, match="the model predicts 2 channels but out has 1"):
        predict(
            Echo(),
            np.zeros((5, 8, 8), np.uint8),
            np.zeros((1, 5, 8, 8), np.uint8),
            InferOptions((4, 8, 8), progress=False),
        )
