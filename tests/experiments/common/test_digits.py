"""Tests for experiments/common/digits.py: the UCI digits in MNIST's frame."""

import numpy as np
import pytest
from scipy import ndimage

from experiments.common import digits
from experiments.common.data import IMAGE_SIZE, NUM_CLASSES, NUM_PIXELS, load_mnist


def _bounding_box(image):
    rows = np.flatnonzero(image.any(axis=1))
    cols = np.flatnonzero(image.any(axis=0))
    return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1


@pytest.fixture(scope="module")
def loaded():
    return digits.load_digits()


def test_a_small_image_is_scaled_to_the_box_keeping_its_aspect():
    # A 2 x 4 block of ink, off-center in an 8 x 8 image, with a heavy column.
    image = np.zeros((8, 8))
    image[5:7, 0:4] = 8.0
    image[5:7, 3] = 16.0
    (framed,) = digits.to_mnist_frame(image[None])
    assert framed.shape == (IMAGE_SIZE, IMAGE_SIZE) and framed.dtype == np.float32
    assert framed.min() >= 0.0 and framed.max() == pytest.approx(1.0)
    assert _bounding_box(framed) == (10, 20)
    # A whole-pixel translation: at most half a pixel off (10 rows of the
    # same ink have their center halfway between two pixels).
    row, col = ndimage.center_of_mass(framed)
    assert abs(row - digits.CENTER[0]) <= 0.5 + 1e-5
    assert abs(col - digits.CENTER[1]) <= 0.5 + 1e-5
    # The heavy column pulls the center of mass right of the box's middle,
    # so the box sits left of the frame's middle.
    cols = np.flatnonzero(framed.any(axis=0))
    assert (cols[0] + cols[-1]) / 2 < digits.CENTER[1] - 0.5


@pytest.mark.parametrize(
    "images, match",
    [
        (np.zeros((8, 8)), r"\(N, H, W\)"),
        (np.full((1, 8, 8), 17.0), r"\[0, 16\]"),
        (np.full((1, 8, 8), -1.0), r"\[0, 16\]"),
        (np.zeros((2, 8, 8)), "image 0 is blank"),
    ],
)
def test_bad_images_are_errors(images, match):
    with pytest.raises(ValueError, match=match):
        digits.to_mnist_frame(images)


def test_split_sizes_types_and_values(loaded):
    assert loaded.x_train.shape == (digits.NUM_TRAIN, NUM_PIXELS) == (1198, 784)
    assert loaded.x_test.shape == (digits.NUM_TEST, NUM_PIXELS) == (599, 784)
    for x, y in ((loaded.x_train, loaded.y_train), (loaded.x_test, loaded.y_test)):
        assert x.dtype == np.float32 and y.dtype == np.int32
        assert x.min() == 0.0 and x.max() <= 1.0 and x.max() > 0.99
        assert set(np.unique(y)) == set(range(NUM_CLASSES))


def test_split_is_stratified_and_fixed(loaded):
    from sklearn.datasets import load_digits

    counts = np.bincount(load_digits().target, minlength=NUM_CLASSES)
    test_counts = np.bincount(loaded.y_test, minlength=NUM_CLASSES)
    train_counts = np.bincount(loaded.y_train, minlength=NUM_CLASSES)
    np.testing.assert_array_equal(train_counts + test_counts, counts)
    assert np.all(np.abs(test_counts - counts / 3) <= 1)
    again = digits.load_digits()
    for first, second in zip(loaded, again, strict=True):
        np.testing.assert_array_equal(first, second)


def test_every_image_is_framed_as_mnist(loaded):
    images = np.concatenate([loaded.x_train, loaded.x_test]).reshape(
        -1, IMAGE_SIZE, IMAGE_SIZE
    )
    centers = np.array([ndimage.center_of_mass(image) for image in images])
    assert np.abs(centers - np.array(digits.CENTER)).max() <= 0.5 + 1e-5
    boxes = np.array([_bounding_box(image) for image in images])
    assert boxes.max(axis=1).min() >= digits.BOX_SIZE - 1
    assert boxes.max() <= digits.BOX_SIZE


def test_the_center_is_where_mnist_puts_it():
    mnist = load_mnist("vendored")
    images = mnist.x_train[:3000].reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    centers = np.array([ndimage.center_of_mass(image) for image in images])
    np.testing.assert_allclose(centers.mean(axis=0), digits.CENTER, atol=0.05)
    boxes = np.array([_bounding_box(image) for image in images])
    assert np.mean(boxes.max(axis=1) == digits.BOX_SIZE) > 0.99


def test_images_keep_their_labels(loaded):
    # The framing moves and scales each image, never swaps them: each class's
    # mean training image is nearest to that class's mean test image.
    means = {
        split: np.stack([x[y == c].mean(axis=0) for c in range(NUM_CLASSES)])
        for split, (x, y) in {
            "train": (loaded.x_train, loaded.y_train),
            "test": (loaded.x_test, loaded.y_test),
        }.items()
    }
    distances = np.linalg.norm(means["train"][:, None] - means["test"][None], axis=-1)
    np.testing.assert_array_equal(distances.argmin(axis=1), np.arange(NUM_CLASSES))
