"""Augmentations keep image and labels aligned and shapes intact; image-only ones spare labels."""

import numpy as np
import pytest

from stt_model.data import (
    Compose,
    CutNoise,
    Elastic,
    Flip,
    GrayJitter,
    Misalign,
    MissingSection,
    MotionBlur,
    Rescale,
    Rotate90,
    default_augmentations,
    synthetic_volume,
)

EXACT = [Flip(), Rotate90(), Misalign()]  # pure index moves: image == label * 255 survives exactly
INTERPOLATED = [
    Rescale((0.8, 0.9)),
    Rescale((1.1, 1.25)),
    Elastic(alpha=6.0),
]  # bilinear image vs nearest labels: equal up to rounding
IMAGE_ONLY = [GrayJitter(), MissingSection(), MotionBlur(), CutNoise()]


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return synthetic_volume((8, 96, 96), seed=2, artefacts=False).labels


def as_image(labels: np.ndarray) -> np.ndarray:
    return (labels > 0).astype(np.float32)


@pytest.mark.parametrize("transform", EXACT, ids=repr)
def test_exact_geometric_alignment(transform, labels):
    for seed in range(6):
        image, moved = transform(as_image(labels), labels, np.random.default_rng(seed))
        assert image.shape == labels.shape and moved.shape == labels.shape
        np.testing.assert_array_equal(image, moved > 0)
        assert np.array_equal(np.unique(moved), np.unique(labels)) or isinstance(transform, Misalign)


@pytest.mark.parametrize("transform", INTERPOLATED, ids=repr)
def test_interpolated_geometric_alignment(transform, labels):
    for seed in range(3):
        image, moved = transform(as_image(labels), labels, np.random.default_rng(seed))
        assert image.shape == labels.shape and moved.dtype == labels.dtype
        assert not np.array_equal(moved, labels), "the transform moved nothing"
        assert set(np.unique(moved)) <= set(np.unique(labels)), "label ids must not be blended"
        assert ((image > 0.5) != (moved > 0)).mean() < 0.01


def test_rotations_and_non_square_patches(labels):
    rect = labels[:, :, :64]
    image, moved = Rotate90()(as_image(rect), rect, np.random.default_rng(1))
    assert image.shape == rect.shape
    np.testing.assert_array_equal(image, moved > 0)
    seen = set()
    for seed in range(40):
        _, out = Rotate90()(as_image(labels), labels, np.random.default_rng(seed))
        seen.add(out.tobytes())
    assert len(seen) == 8, "4 rotations x transpose give the 8 in-plane symmetries"


@pytest.mark.parametrize("transform", IMAGE_ONLY, ids=repr)
def test_image_only(transform, labels):
    image = np.random.default_rng(0).uniform(0.2, 0.8, labels.shape).astype(np.float32)
    out, same = transform(image, labels, np.random.default_rng(3))
    assert same is labels
    assert out.shape == image.shape and out.dtype == np.float32
    assert not np.array_equal(out, image) and 0 <= out.min() and out.max() <= 1


def test_compose_seeded_and_aligned(labels):
    compose = default_augmentations()
    a = compose(as_image(labels), labels, np.random.default_rng(7))
    b = compose(as_image(labels), labels, np.random.default_rng(7))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[0].flags.c_contiguous and a[1].flags.c_contiguous
    geometric = Compose([(t, 1.0) for t in EXACT])
    image, moved = geometric(as_image(labels), labels, np.random.default_rng(1))
    np.testing.assert_array_equal(image, moved > 0)
    image, none = compose(as_image(labels), None, np.random.default_rng(1))
    assert none is None and image.shape == labels.shape


def test_light_augmentations_are_symmetries_and_jitter_only(labels):
    light = default_augmentations("light")
    assert [type(t).__name__ for t, _ in light.steps] == ["Flip", "Rotate90", "GrayJitter"]
    image, moved = light(as_image(labels), labels, np.random.default_rng(3))
    assert sorted(np.unique(moved)) == sorted(np.unique(labels)) and image.shape == moved.shape
    with pytest.raises(ValueError, match="strength must be 'full', 'medium' or 'light'"):
        default_augmentations("heavy")


def test_medium_augmentations_warp_without_section_artefacts(labels):
    medium = default_augmentations("medium")
    names = [type(t).__name__ for t, _ in medium.steps]
    assert names == ["Flip", "Rotate90", "Rescale", "Elastic", "GrayJitter"]
    image, moved = medium(as_image(labels), labels, np.random.default_rng(5))
    assert set(np.unique(moved)) <= set(np.unique(labels)) and image.shape == moved.shape


def test_fast_on_a_training_patch(labels):
    import time

    labels = np.tile(labels, (4, 4, 4))[:32, :320, :320]
    image = as_image(labels)
    compose = Compose([(t, 1.0) for t in EXACT + INTERPOLATED + IMAGE_ONLY])
    start = time.perf_counter()
    compose(image, labels, np.random.default_rng(0))
    assert time.perf_counter() - start < 3.0  # ~0.7 s alone
