"""scikit-learn's UCI digits, brought into MNIST's 28 x 28 frame as MNIST was made.

The UCI "Optical Recognition of Handwritten Digits" test set that ships with
scikit-learn (`sklearn.datasets.load_digits`: 1,797 images of 8 x 8 blocks,
each pixel a count of 0 to 16 set pixels of a 32 x 32 bitmap; no download) is
a second handwritten-digit domain beside MNIST. `to_mnist_frame` prepares each
image the way MNIST's were (LeCun et al.: "size normalized to fit in a 20x20
pixel box while preserving their aspect ratio ... centered in a 28x28 image by
computing the center of mass of the pixels"):

1. scaled to `[0, 1]` (divided by 16);
2. cropped to the bounding box of its non-zero pixels;
3. resized by the same factor along both axes so that its longer side is 20
   pixels (`scipy.ndimage.zoom`, linear interpolation, `order=1`), clipped
   to `[0, 1]`;
4. placed into a 28 x 28 frame of zeros and translated by whole pixels so
   that its center of mass (`scipy.ndimage.center_of_mass`) is within half a
   pixel of `CENTER`, row and column 14 (0-based), where MNIST's centers of
   mass lie (their mean over MNIST's training images is 14.00 in both axes,
   spread 0.28: MNIST was translated by whole pixels too).

`load_digits` splits the images once, independently of any run's seed:
a stratified split (`sklearn.model_selection.train_test_split`,
`test_size=NUM_TEST`, `random_state=SPLIT_SEED`) into 1,198 training and 599
test images (a third), the classes in the same proportions in both.

Reference:
    E. Alpaydin, C. Kaynak, "Optical Recognition of Handwritten Digits", UCI
    Machine Learning Repository, 1998, https://doi.org/10.24432/C50P49
"""

from __future__ import annotations

import numpy as np

from experiments.common.data import IMAGE_SIZE, DataError, Mnist

# The digits' pixels count the set pixels of a 4 x 4 block: 0 to 16.
MAX_VALUE = 16.0
# MNIST's size normalization: the longer side of the bounding box.
BOX_SIZE = 20
# Where the center of mass goes, (row, column), 0-based, as in MNIST.
CENTER = (14.0, 14.0)
# The train/test split, fixed: the same images in every run and experiment,
# a third of them for testing.
SPLIT_SEED = 0
NUM_IMAGES = 1797
NUM_TEST = NUM_IMAGES // 3
NUM_TRAIN = NUM_IMAGES - NUM_TEST


def to_mnist_frame(images: np.ndarray) -> np.ndarray:
    """The images as MNIST's: `(N, 28, 28)` float32 in `[0, 1]` (see the module).

    Args:
        images: `(N, H, W)` non-negative pixel values of at most `MAX_VALUE`,
            each image with at least one non-zero pixel.

    Returns:
        `(N, 28, 28)` float32 images in `[0, 1]`, each of whose longer
        bounding-box side is `BOX_SIZE` (within a pixel) and whose center of
        mass is within half a pixel of `CENTER` in both axes.
    """
    from scipy import ndimage

    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 3:
        raise ValueError(f"images must be (N, H, W). Received shape {images.shape}")
    if images.size and (images.min() < 0 or images.max() > MAX_VALUE):
        raise ValueError(
            f"images must hold values in [0, {MAX_VALUE:g}]. Received "
            f"{images.min():g}..{images.max():g}"
        )
    framed = np.zeros((len(images), IMAGE_SIZE, IMAGE_SIZE), np.float32)
    for index, image in enumerate(images / MAX_VALUE):
        rows = np.flatnonzero(image.any(axis=1))
        cols = np.flatnonzero(image.any(axis=0))
        if not rows.size:
            raise ValueError(f"image {index} is blank: it has no center of mass")
        crop = image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        scaled = ndimage.zoom(crop, BOX_SIZE / max(crop.shape), order=1)
        scaled = np.clip(scaled, 0.0, 1.0)
        framed[index] = _centered(scaled, ndimage)
    return framed


def _centered(image, ndimage):
    """`image` in a 28 x 28 frame of zeros, placed by whole pixels so that its
    center of mass is within half a pixel of `CENTER`."""
    height, width = image.shape
    row, col = ndimage.center_of_mass(image)
    top, left = round(CENTER[0] - row), round(CENTER[1] - col)
    if not (0 <= top <= IMAGE_SIZE - height and 0 <= left <= IMAGE_SIZE - width):
        # Not so for any UCI digit (at most 3.5 pixels off the frame's middle).
        raise ValueError(
            f"a {height} x {width} image with its center of mass at ({row:.1f}, "
            f"{col:.1f}) does not fit the frame once centered"
        )
    frame = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.float32)
    frame[top : top + height, left : left + width] = image
    return frame


def load_digits() -> Mnist:
    """scikit-learn's UCI digits in MNIST's format, split as the module says.

    Returns:
        An `experiments.common.data.Mnist` tuple: `x_train` (1198, 784) and
        `x_test` (599, 784) float32 in `[0, 1]`, `y_train` and `y_test` int32.

    Raises:
        DataError: scikit-learn (or SciPy) is not installed.
    """
    try:
        from sklearn.datasets import load_digits as sklearn_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:
        raise DataError(
            f"the UCI digits need scikit-learn ({err}); install the experiments' "
            'dependencies: pip install -e ".[experiments]"'
        ) from None
    digits = sklearn_digits()
    if len(digits.images) != NUM_IMAGES:
        raise DataError(
            f"scikit-learn's load_digits gave {len(digits.images)} images, "
            f"expected {NUM_IMAGES}; this scikit-learn ships another copy"
        )
    images = to_mnist_frame(digits.images).reshape(len(digits.images), -1)
    labels = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        images,
        labels,
        test_size=NUM_TEST,
        stratify=labels,
        random_state=SPLIT_SEED,
    )
    return Mnist(x_train, y_train, x_test, y_test)
