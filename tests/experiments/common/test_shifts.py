"""Tests for experiments/common/shifts.py: the MNIST-C-style shift suite."""

import numpy as np
import pytest

from experiments.common import shifts
from experiments.common.data import IMAGE_SIZE, NUM_PIXELS, load_mnist


@pytest.fixture(scope="module")
def clean():
    """200 MNIST test images, (N, 28, 28)."""
    x = load_mnist("vendored").x_test[:200]
    return x.reshape(-1, IMAGE_SIZE, IMAGE_SIZE)


def _distance(shifted, clean):
    return float(np.mean(np.abs(shifted.astype(np.float64) - clean)))


@pytest.mark.parametrize("shift", shifts.SHIFTS)
def test_range_shape_and_dtype(clean, shift):
    for severity in shifts.SEVERITIES:
        shifted = shifts.corrupt(clean, shift, severity)
        assert shifted.shape == clean.shape and shifted.dtype == np.float32
        assert shifted.min() >= 0.0 and shifted.max() <= 1.0
        assert np.isfinite(shifted).all()
    # Flat rows in, flat rows out: the same images.
    flat = shifts.corrupt(clean.reshape(-1, NUM_PIXELS), shift, 3)
    assert flat.shape == (len(clean), NUM_PIXELS)
    np.testing.assert_array_equal(
        flat.reshape(clean.shape), shifts.corrupt(clean, shift, 3)
    )


@pytest.mark.parametrize("shift", shifts.SHIFTS)
def test_deterministic_given_the_seed(clean, shift):
    first = shifts.corrupt(clean, shift, 4, seed=7)
    np.testing.assert_array_equal(first, shifts.corrupt(clean, shift, 4, seed=7))
    # Not on what was made before: another shift in between changes nothing.
    shifts.corrupt(clean, "gaussian_noise", 2, seed=7)
    np.testing.assert_array_equal(first, shifts.corrupt(clean, shift, 4, seed=7))


@pytest.mark.parametrize(
    "shift",
    [
        "gaussian_noise",
        "shot_noise",
        "impulse_noise",
        "translate",
        "rotate",
        "stripes",
        "fog",
    ],
)
def test_random_shifts_depend_on_the_seed(clean, shift):
    assert not np.array_equal(
        shifts.corrupt(clean, shift, 3, seed=0), shifts.corrupt(clean, shift, 3, seed=1)
    )


@pytest.mark.parametrize("shift", shifts.SHIFTS)
def test_severity_moves_the_images_further_from_the_clean_ones(clean, shift):
    distances = [
        _distance(shifts.corrupt(clean, shift, severity), clean)
        for severity in shifts.SEVERITIES
    ]
    assert distances[0] > 0.0
    assert all(a < b for a, b in zip(distances[:-1], distances[1:], strict=True)), (
        distances
    )


def test_invert_at_full_severity_is_its_own_inverse(clean):
    once = shifts.corrupt(clean, "invert", 5)
    np.testing.assert_allclose(once, 1.0 - clean, atol=1e-6)
    np.testing.assert_allclose(shifts.corrupt(once, "invert", 5), clean, atol=1e-6)


def test_contrast_keeps_each_image_mean(clean):
    for severity in shifts.SEVERITIES:
        shifted = shifts.corrupt(clean, "contrast", severity)
        np.testing.assert_allclose(
            shifted.mean(axis=(1, 2)), clean.mean(axis=(1, 2)), atol=1e-6
        )


def test_brightness_adds_a_constant_where_not_clipped(clean):
    shifted = shifts.corrupt(clean, "brightness", 2)
    amount = shifts.PARAMETERS["brightness"][1]
    room = clean <= 1.0 - amount
    np.testing.assert_allclose(shifted[room], clean[room] + amount, atol=1e-6)
    np.testing.assert_array_equal(shifted[~room], 1.0)


def test_translation_moves_whole_pixels(clean):
    # MNIST's digits sit in a 20 x 20 box in the middle of the frame: moved
    # by 1 pixel, no ink leaves it, and the image is the clean one rolled.
    shifted = shifts.corrupt(clean, "translate", 1)
    rolls = [np.roll(clean, direction, axis=(1, 2)) for direction in shifts.DIRECTIONS]
    for index, image in enumerate(shifted):
        assert any(np.array_equal(image, rolled[index]) for rolled in rolls), index
    np.testing.assert_allclose(
        shifted.sum(axis=(1, 2)), clean.sum(axis=(1, 2)), rtol=1e-5
    )


def test_blur_keeps_the_ink(clean):
    # Only a digit that reaches near the frame's edge loses a little ink.
    shifted = shifts.corrupt(clean, "gaussian_blur", 5)
    np.testing.assert_allclose(shifted.sum(), clean.sum(), rtol=0.005)
    np.testing.assert_allclose(
        shifted.sum(axis=(1, 2)), clean.sum(axis=(1, 2)), rtol=0.05
    )


def test_rotation_keeps_the_ink_roughly_and_turns_the_digit(clean):
    shifted = shifts.corrupt(clean, "rotate", 5)
    np.testing.assert_allclose(
        shifted.sum(axis=(1, 2)), clean.sum(axis=(1, 2)), rtol=0.1
    )
    assert _distance(shifted, clean) > 0.05


@pytest.mark.parametrize(
    "shift, severity, match",
    [
        ("snow", 1, "unknown shift 'snow'"),
        ("fog", 0, "severity must be one of"),
        ("fog", 6, "severity must be one of"),
    ],
)
def test_bad_arguments(clean, shift, severity, match):
    with pytest.raises(ValueError, match=match):
        shifts.corrupt(clean, shift, severity)


def test_bad_image_shape():
    with pytest.raises(ValueError, match=r"\(N, 28, 28\) or \(N, 784\)"):
        shifts.corrupt(np.zeros((2, 32, 32)), "fog", 1)
