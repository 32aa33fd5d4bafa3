"""Test-time augmentation: every variant is mapped back to the window's orientation, checked
against an explicit loop over the variants written independently with numpy, for a model that
is not equivariant (so a variant inverted wrongly, or missing, changes the answer)."""

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from stt_model.infer import InferOptions, predict, tta_variants


class Lopsided(nn.Module):
    """A prediction that changes under every flip and under the H/W transpose: an asymmetric
    convolution plus ramps of different slopes along T, H and W, two different channels."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(1, 2, 3, padding=1)

    def forward(self, x):
        t, h, w = x.shape[2:]
        ramp = (
            torch.linspace(-1.5, 1.5, t).view(1, 1, t, 1, 1)
            + torch.linspace(-1, 1, h).view(1, 1, 1, h, 1)
            + torch.linspace(-2.5, 2.5, w).view(1, 1, 1, 1, w)
        )
        return 3 * self.conv(x) + ramp * torch.tensor([1.0, -0.5]).view(1, 2, 1, 1, 1)


def _numpy_variants(count):
    """(forward, inverse) pairs on (C, T, H, W) arrays, enumerated the plain way."""
    z_flips = (False, True) if count >= 8 else (False,)
    plane_flips = list(itertools.product((False, True), repeat=2)) if count >= 4 else [(False, False)]
    transposes = (False, True) if count == 16 else (False,)
    pairs = []
    for fz, (fy, fx), tr in itertools.product(z_flips, plane_flips, transposes):
        axes = [a for a, on in zip((1, 2, 3), (fz, fy, fx)) if on]

        def forward(a, axes=axes, tr=tr):
            a = np.flip(a, axes) if axes else a
            return np.swapaxes(a, 2, 3) if tr else a

        def inverse(a, axes=axes, tr=tr):
            a = np.swapaxes(a, 2, 3) if tr else a
            return np.flip(a, axes) if axes else a

        pairs.append((forward, inverse))
    return pairs


def _explicit(model, window_image, count, reduce):
    """The reduced probabilities of one window, variant by variant."""
    outs = []
    for forward, inverse in _numpy_variants(count):
        x = torch.from_numpy(np.ascontiguousarray(forward(window_image[None])))[None]
        with torch.no_grad():
            p = torch.sigmoid(model(x))[0].numpy()
        outs.append(inverse(p))
    stack = np.stack(outs)
    return {"mean": stack.mean(0), "min": stack.min(0), "max": stack.max(0)}[reduce]


@pytest.mark.parametrize("count", [1, 4, 8, 16])
@pytest.mark.parametrize("reduce", ["mean", "min", "max"])
def test_each_variant_is_inverted(count, reduce):
    window = (4, 8, 8)
    image = np.random.default_rng(count).random(window, dtype=np.float32)
    out = np.zeros((2, *window), np.float32)
    # One window covering the volume: the Gaussian blend divides out, leaving the TTA reduction.
    predict(Lopsided(), image, out, InferOptions(window, tta=count, tta_reduce=reduce, progress=False))
    np.testing.assert_allclose(out, _explicit(Lopsided(), image, count, reduce), rtol=1e-5, atol=1e-6)


def test_variants_are_distinct_and_change_the_answer():
    for count in (4, 8, 16):
        variants = tta_variants(count)
        assert len(set(variants)) == count and variants[0].flips == () and not variants[0].transpose
    image = np.random.default_rng(5).random((4, 8, 8), dtype=np.float32)
    results = {}
    for count in (1, 4, 8, 16):
        out = np.zeros((2, 4, 8, 8), np.float32)
        predict(Lopsided(), image, out, InferOptions((4, 8, 8), tta=count, progress=False))
        results[count] = out
    for a, b in itertools.combinations(results, 2):
        assert not np.allclose(results[a], results[b], atol=1e-4), (a, b)
    low, high = (np.zeros((2, 4, 8, 8), np.float32) for _ in range(2))
    predict(Lopsided(), image, low, InferOptions((4, 8, 8), tta=16, tta_reduce="min", progress=False))
    predict(Lopsided(), image, high, InferOptions((4, 8, 8), tta=16, tta_reduce="max", progress=False))
    assert (low <= results[16] + 1e-6).all() and (results[16] <= high + 1e-6).all() and (high - low).max() > 0.1


class Echo(nn.Module):
    def forward(self, x):
        p = x.clamp(1e-4, 1 - 1e-4)
        return torch.log(p / (1 - p))


class CountingVolume:
    def __init__(self, data):
        self.data, self.shape, self.dtype, self.reads = data, data.shape, data.dtype, []

    def __getitem__(self, index):
        chunk = self.data[index]
        self.reads.append(chunk.size)
        return chunk


@pytest.mark.parametrize("reduce", ["mean", "min", "max"])
def test_an_equivariant_model_comes_back_exactly_over_many_windows_and_blocks(reduce):
    volume = CountingVolume(np.random.default_rng(2).integers(1, 255, (9, 40, 36), dtype=np.uint8))
    out = np.zeros((1, 9, 40, 36), np.float32)
    options = InferOptions((4, 8, 8), overlap=0.5, block=(4, 16, 16), tta=16, tta_reduce=reduce, progress=False)
    predict(Echo(), volume, out, options)
    np.testing.assert_allclose(out[0], volume.data / 255.0, atol=1e-4)
    halo = [b + 2 * w for b, w in zip(options.block, options.window)]
    assert max(volume.reads) <= np.prod(halo) < volume.data.size


def test_bad_tta_options():
    with pytest.raises(ValueError, match="tta must be one of 1, 4, 8, 16 variants; got 3"):
        InferOptions((4, 8, 8), tta=3)
    with pytest.raises(ValueError, match=r"tta=16 transposes .* square window; the window is \(4, 8, 16\)"):
        InferOptions((4, 8, 16), tta=16)
    with pytest.raises(ValueError, match="tta_reduce must be one of mean, min, max; got 'median'"):
        InferOptions((4, 8, 8), tta=4, tta_reduce="median")
    assert InferOptions((4, 8, 16), tta=8).tta == 8
    assert InferOptions((4, 8, 8), flip_tta=True).tta == 4
