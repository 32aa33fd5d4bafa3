"""Missing (blank) sections: detected in the input, their probabilities bridged from the
neighbouring slices before decoding, so objects that cross one stay whole."""

import numpy as np
import pytest
import torch
from torch import nn

from stt_model.cli import _parser
from stt_model.errors import UserInputError
from stt_model.infer import BLANK_SLICE_STD, InferOptions, blank_slices, bridge_blank_slices, predict
from stt_model.segment import Thresholds, instances

DECODE = Thresholds(foreground=0.5, contour=0.5, min_size=0, decoder="distance", peak_height=2.0, anisotropy=1.0)


class Brightness(nn.Module):
    """A stand-in model: mask and contour logits from the voxel's own intensity (bright =
    mitochondrion, no contour), so a blank slice predicts background as a real model's does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([(x - 0.5) * 20, torch.full_like(x, -10.0)], dim=1)


def _rod_image(depth: int = 8, blank: int = 2) -> np.ndarray:
    """(Z, 16, 16) uint8: textured background, a bright 6 x 6 rod through every slice, one slice blank."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 80, (depth, 16, 16)).astype(np.uint8)
    image[:, 5:11, 5:11] = 230
    image[blank] = 0
    return image


def _predict(image: np.ndarray, bridge: bool) -> np.ndarray:
    out = np.zeros((2, *image.shape), np.uint8)
    return predict(Brightness(), image, out, InferOptions(window=(4, 16, 16), progress=False, bridge_blank=bridge))


def test_blank_slice_splits_an_object_unless_bridged(capsys):
    image = _rod_image()
    unbridged = instances(_predict(image, bridge=False), DECODE)
    assert "bridged" not in capsys.readouterr().err
    assert unbridged.max() == 2  # the rod cut at z = 2
    bridged = _predict(image, bridge=True)
    assert "bridged 1 blank slice at z=2" in capsys.readouterr().err
    labels = instances(bridged, DECODE)
    assert labels.max() == 1
    assert (labels[2, 5:11, 5:11] == 1).all()


def test_textured_volume_is_left_as_predicted(capsys):
    image = _rod_image()
    image[2] = image[1]
    out = _predict(image, bridge=True)
    assert "bridged" not in capsys.readouterr().err
    np.testing.assert_array_equal(out, _predict(image, bridge=False))


def test_interpolation_between_and_beyond_the_valid_slices():
    probs = np.zeros((2, 7, 2, 2), np.uint8)
    probs[:, 1], probs[:, 4], probs[:, 6] = 10, 90, 17
    probs[1] = 255 - probs[1]
    assert bridge_blank_slices(probs, [0, 3, 2, 5]) == [0, 2, 3, 5]
    # z=0 copies z=1; 2 and 3 a third and two thirds of the way to 4; 5 halfway (53.5 and 201.5, rounded to even)
    assert probs[0, :, 0, 0].tolist() == [10, 10, 37, 63, 90, 54, 17]
    assert probs[1, :, 1, 1].tolist() == [245, 245, 218, 192, 165, 202, 238]


def test_all_blank_or_none_blank_changes_nothing():
    probs = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 2, 2)
    before = probs.copy()
    assert bridge_blank_slices(probs, [0, 1, 2]) == []
    assert bridge_blank_slices(probs, []) == []
    np.testing.assert_array_equal(probs, before)


def test_blank_is_a_standard_deviation_under_the_threshold():
    volume = np.zeros((4, 8, 8), np.float32) + 0.4
    volume[1, ::2] += 2 * BLANK_SLICE_STD  # std = BLANK_SLICE_STD: a faint but real pattern
    volume[2, ::2] += 1.8 * BLANK_SLICE_STD  # std just under it
    volume[3] = np.linspace(0, 1, 64).reshape(8, 8)
    assert blank_slices(volume) == [0, 2]
    assert blank_slices(volume, max_std=0) == []


def test_bad_arguments_are_named():
    with pytest.raises(UserInputError, match="blank slice 5 is outside the volume's 3 slices"):
        bridge_blank_slices(np.zeros((1, 3, 2, 2)), [5])
    with pytest.raises(UserInputError, match="max_std must be >= 0"):
        blank_slices(np.zeros((2, 2, 2)), max_std=-1)
    with pytest.raises(UserInputError, match="volume must be 3-d"):
        blank_slices(np.zeros((2, 2)))


@pytest.mark.parametrize("command", [["predict", "--model", "m", "--image", "a.h5", "--out", "b.h5"], ["demo"]])
def test_the_flag_turns_bridging_off(command):
    assert _parser().parse_args(command).bridge_blank is True
    assert _parser().parse_args([*command, "--no-bridge-blank-slices"]).bridge_blank is False
