"""Distribution shifts of MNIST images in the manner of MNIST-C, in NumPy and SciPy.

`corrupt(images, shift, severity, seed)` returns the images under one of
`SHIFTS` at one of `SEVERITIES` (1, mild, to 5, severe). The images stay what
MNIST's are, float32 in `[0, 1]`, 28 x 28 (or flat rows of 784, as given),
and the labels do not change. The result depends only on the images, the
shift, the severity and the seed: each (shift, severity) draws from its own
generator, `numpy.random.default_rng([seed, shift's index, severity])`, so one
corruption does not depend on which others were made, nor in what order.

The shifts (parameter by severity 1..5 in `PARAMETERS`):

- `gaussian_noise`: `x + N(0, sigma^2)` per pixel, clipped;
- `shot_noise`: Poisson photon noise, `Poisson(lam * x) / lam`, clipped;
- `impulse_noise`: salt and pepper: a fraction of the pixels set to 0 or 1;
- `gaussian_blur`: a Gaussian filter of standard deviation sigma pixels;
- `contrast`: `(x - m) * c + m`, with `m` the image's mean (kept);
- `brightness`: `x + b`, clipped;
- `translate`: moved by `s` whole pixels in one of the 8 compass directions,
  drawn per image, the frame filled with zeros;
- `rotate`: rotated by `a` degrees, clockwise or not (drawn per image),
  bilinear;
- `invert`: `(1 - a) x + a (1 - x)`: severity 5 (`a = 1`) is `1 - x`, its own
  inverse; lower severities also lower the contrast;
- `stripes`: bright lines every `p` pixels, horizontal, vertical or diagonal
  with a phase drawn per image, laid over the digit (`max`), a stand-in for
  MNIST-C's zigzag;
- `fog`: `(x + a f) / (1 + a)` with `f` a smooth random field in `[0, 1]`
  (white noise under a wide Gaussian filter), a stand-in for MNIST-C's
  plasma fog.

Every shift moves the images further from the clean ones as the severity
grows (the mean absolute pixel difference grows; tests check it).

Reference:
    N. Mu, J. Gilmer, "MNIST-C: A Robustness Benchmark for Computer Vision",
    2019, https://arxiv.org/abs/1906.02337; D. Hendrycks, T. Dietterich,
    "Benchmarking Neural Network Robustness to Common Corruptions and
    Perturbations", ICLR 2019, https://arxiv.org/abs/1903.12261
"""

from __future__ import annotations

import numpy as np

from experiments.common.data import IMAGE_SIZE, NUM_PIXELS

SEVERITIES = (1, 2, 3, 4, 5)

# The parameter of each shift at severities 1 to 5.
PARAMETERS = {
    # Standard deviation of the added noise.
    "gaussian_noise": (0.1, 0.2, 0.3, 0.45, 0.6),
    # Photons at a white pixel: fewer is noisier.
    "shot_noise": (60.0, 25.0, 12.0, 6.0, 3.0),
    # Fraction of the pixels set to 0 or 1.
    "impulse_noise": (0.03, 0.06, 0.1, 0.17, 0.27),
    # Standard deviation of the filter, pixels.
    "gaussian_blur": (0.6, 0.9, 1.2, 1.5, 1.9),
    # The factor on the difference from the image's mean.
    "contrast": (0.6, 0.45, 0.3, 0.2, 0.1),
    # Added to every pixel.
    "brightness": (0.1, 0.2, 0.3, 0.45, 0.6),
    # Pixels moved.
    "translate": (1, 2, 3, 4, 5),
    # Degrees turned.
    "rotate": (10.0, 20.0, 30.0, 45.0, 60.0),
    # The weight of the inverted image.
    "invert": (0.6, 0.7, 0.8, 0.9, 1.0),
    # Pixels between lines: closer is more lines.
    "stripes": (8, 7, 6, 5, 4),
    # The weight of the fog field.
    "fog": (0.3, 0.5, 0.8, 1.2, 1.8),
}
SHIFTS = tuple(PARAMETERS)
# The fog field: white noise under a Gaussian filter of this many pixels.
FOG_SMOOTHING = 4.0
# The 8 compass directions a translated image moves in, (rows, columns).
DIRECTIONS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def corrupt(images: np.ndarray, shift: str, severity: int, seed: int = 0) -> np.ndarray:
    """`images` under `shift` at `severity`; deterministic given `seed`.

    Args:
        images: `(N, 28, 28)` images or `(N, 784)` rows, values in `[0, 1]`.
        shift: One of `SHIFTS`.
        severity: One of `SEVERITIES`, 1 (mild) to 5 (severe).
        seed: Feeds the generator of this shift and severity (see the module).

    Returns:
        float32 images of the shape of `images`, in `[0, 1]`.

    Raises:
        ValueError: An unknown shift or severity, or images of another size.
    """
    if shift not in PARAMETERS:
        raise ValueError(
            f"unknown shift {shift!r}; choose one of {', '.join(SHIFTS)}. "
            f"Received: shift={shift!r}"
        )
    if severity not in SEVERITIES:
        raise ValueError(
            f"severity must be one of {SEVERITIES}. Received: severity={severity!r}"
        )
    images = np.asarray(images)
    shape = images.shape
    if images.ndim == 2 and shape[1] == NUM_PIXELS:
        square = images.reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    elif images.ndim == 3 and shape[1:] == (IMAGE_SIZE, IMAGE_SIZE):
        square = images
    else:
        raise ValueError(
            f"images must be (N, 28, 28) or (N, 784). Received shape {shape}"
        )
    rng = np.random.default_rng([seed, SHIFTS.index(shift), severity])
    parameter = PARAMETERS[shift][severity - 1]
    result = _CORRUPTIONS[shift](square.astype(np.float64), parameter, rng)
    return np.clip(result, 0.0, 1.0).astype(np.float32).reshape(shape)


def _gaussian_noise(x, sigma, rng):
    return x + rng.normal(0.0, sigma, size=x.shape)


def _shot_noise(x, lam, rng):
    return rng.poisson(x * lam) / lam


def _impulse_noise(x, fraction, rng):
    x = x.copy()
    hit = rng.random(x.shape) < fraction
    x[hit] = rng.integers(0, 2, size=int(hit.sum()))
    return x


def _gaussian_blur(x, sigma, rng):
    from scipy import ndimage

    return ndimage.gaussian_filter(x, sigma=(0, sigma, sigma), mode="constant")


def _contrast(x, factor, rng):
    mean = x.mean(axis=(1, 2), keepdims=True)
    return (x - mean) * factor + mean


def _brightness(x, amount, rng):
    return x + amount


def _translate(x, pixels, rng):
    moved = np.zeros_like(x)
    directions = rng.integers(0, len(DIRECTIONS), size=len(x))
    padded = np.pad(x, ((0, 0), (pixels, pixels), (pixels, pixels)))
    for index, direction in enumerate(directions):
        rows, cols = DIRECTIONS[direction]
        # The window of the padded image that puts pixel (i, j) at
        # (i + rows * pixels, j + cols * pixels).
        top, left = pixels - rows * pixels, pixels - cols * pixels
        moved[index] = padded[index, top : top + IMAGE_SIZE, left : left + IMAGE_SIZE]
    return moved


def _rotate(x, degrees, rng):
    from scipy import ndimage

    signs = rng.choice((-1.0, 1.0), size=len(x))
    return np.stack(
        [
            ndimage.rotate(image, sign * degrees, reshape=False, order=1)
            for image, sign in zip(x, signs, strict=True)
        ]
    )


def _invert(x, weight, rng):
    return (1.0 - weight) * x + weight * (1.0 - x)


def _stripes(x, period, rng):
    rows, cols = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE]
    # Horizontal, vertical, and the two diagonals.
    coordinates = (rows, cols, rows + cols, rows - cols + IMAGE_SIZE)
    kinds = rng.integers(0, len(coordinates), size=len(x))
    phases = rng.integers(0, period, size=len(x))
    lines = np.stack(
        [(coordinates[k] + p) % period == 0 for k, p in zip(kinds, phases, strict=True)]
    )
    return np.maximum(x, lines.astype(np.float64))


def _fog(x, weight, rng):
    from scipy import ndimage

    noise = rng.random(x.shape)
    field = ndimage.gaussian_filter(
        noise, sigma=(0, FOG_SMOOTHING, FOG_SMOOTHING), mode="wrap"
    )
    low = field.min(axis=(1, 2), keepdims=True)
    high = field.max(axis=(1, 2), keepdims=True)
    field = (field - low) / np.maximum(high - low, 1e-12)
    return (x + weight * field) / (1.0 + weight)


_CORRUPTIONS = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "gaussian_blur": _gaussian_blur,
    "contrast": _contrast,
    "brightness": _brightness,
    "translate": _translate,
    "rotate": _rotate,
    "invert": _invert,
    "stripes": _stripes,
    "fog": _fog,
}
