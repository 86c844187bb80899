"""A float64 NumPy reference for batch normalization, from the papers' formulas.

Ioffe & Szegedy (2015), https://arxiv.org/abs/1502.03167: Algorithm 1 (the
training transform), its back-propagation formulas (Section 3) and Algorithm 2
(inference with population statistics). Ioffe (2017),
https://arxiv.org/abs/1702.03275: batch renormalization. Cooijmans et al.
(2016), https://arxiv.org/abs/1603.09025: recurrent batch normalization
(per-timestep statistics, the BN-LSTM). Where the papers leave
a choice (how population statistics are averaged, the renorm floor), Keras'
choice is written out. Nothing here imports Keras: it is the independent side
of every comparison.
"""

import numpy as np


def feature_axes(axis, rank):
    """The sorted, non-negative feature axes named by `axis` (int or tuple)."""
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted(a % rank for a in axes))


def reduction_axes(axis, rank):
    """The axes the moments are taken over: all but the feature axes."""
    kept = feature_axes(axis, rank)
    return tuple(i for i in range(rank) if i not in kept)


def param_shape(shape, axis):
    """Shape of gamma, beta and the statistics for inputs of `shape`."""
    return tuple(shape[a] for a in feature_axes(axis, len(shape)))


def expand(param, shape, axis):
    """Reshapes a per-feature array so that it broadcasts against `shape`."""
    kept = feature_axes(axis, len(shape))
    return np.reshape(param, [shape[i] if i in kept else 1 for i in range(len(shape))])


def expand_mask(mask, shape, axis=None):
    """A mask in Keras' convention, broadcast to `shape`.

    Keras' mask (from `Masking` or `Embedding(mask_zero=True)`) has the
    input's shape without its last axis, whatever the feature `axis` (unused,
    kept for the callers' symmetry): it is expanded on the last axis.
    """
    mask = np.asarray(mask, bool)
    assert mask.shape == tuple(shape[:-1]), (mask.shape, shape)
    return np.broadcast_to(mask[..., None], shape)


def moments(x, axis, mask=None):
    """Mean, biased variance and value count per feature (Algorithm 1, lines 1-2).

    `mask` has the shape of `x` without its last axis (Keras' convention);
    only entries where it is true count. A feature with no entry gets NaN
    moments and count 0.
    """
    x = np.asarray(x, np.float64)
    reduced = reduction_axes(axis, x.ndim)
    if mask is None:
        weights = np.ones_like(x)
    else:
        weights = expand_mask(mask, x.shape, axis).astype(np.float64)
    count = weights.sum(axis=reduced)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (weights * x).sum(axis=reduced) / count
        deviation = x - expand(mean, x.shape, axis)
        variance = (weights * deviation**2).sum(axis=reduced) / count
    return mean, variance, count


def normalize(x, mean, variance, gamma, beta, epsilon, axis):
    """`gamma * (x - mean) / sqrt(variance + epsilon) + beta`, per feature.

    With batch moments this is Algorithm 1, lines 3-4; with population
    statistics it is the inference transform of Algorithm 2, line 11.
    `gamma=None` means 1 and `beta=None` means 0 (`scale`/`center` off).
    """
    x = np.asarray(x, np.float64)
    shape = x.shape
    x_hat = (x - expand(mean, shape, axis)) / np.sqrt(
        expand(variance, shape, axis) + epsilon
    )
    if gamma is not None:
        x_hat = x_hat * expand(gamma, shape, axis)
    if beta is not None:
        x_hat = x_hat + expand(beta, shape, axis)
    return x_hat


def train_transform(x, gamma, beta, epsilon, axis, mask=None):
    """Training-mode output and the batch moments behind it (Algorithm 1)."""
    mean, variance, count = moments(x, axis, mask)
    y = normalize(x, mean, variance, gamma, beta, epsilon, axis)
    return y, mean, variance, count


def train_gradients(x, dy, gamma, epsilon, axis):
    """Gradients of `sum(dy * y)` through the training transform.

    The chain rule of Section 3 of the paper, line by line; returns
    `(dx, dgamma, dbeta)`. `gamma=None` means 1.
    """
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    shape = x.shape
    reduced = reduction_axes(axis, x.ndim)
    mean, variance, count = moments(x, axis)
    mu = expand(mean, shape, axis)
    var = expand(variance, shape, axis)
    m = expand(count, shape, axis)
    x_hat = (x - mu) / np.sqrt(var + epsilon)
    g = 1.0 if gamma is None else expand(gamma, shape, axis)
    dx_hat = dy * g
    dvar = np.sum(
        dx_hat * (x - mu) * -0.5 * (var + epsilon) ** -1.5, reduced, keepdims=True
    )
    dmu = np.sum(dx_hat * -1.0 / np.sqrt(var + epsilon), reduced, keepdims=True)
    dmu = dmu + dvar * np.sum(-2.0 * (x - mu), reduced, keepdims=True) / m
    dx = dx_hat / np.sqrt(var + epsilon) + dvar * 2.0 * (x - mu) / m + dmu / m
    dgamma = np.sum(dy * x_hat, axis=reduced)
    dbeta = np.sum(dy, axis=reduced)
    return dx, dgamma, dbeta


def ghost_batch_transform(
    x,
    virtual_batch_size,
    gamma,
    beta,
    epsilon,
    axis,
    mask=None,
    unbiased_variance=False,
):
    """Ghost batch normalization (Hoffer et al., 2017).

    Each run of `virtual_batch_size` consecutive examples is normalized with
    its own moments (over its unmasked entries). Returns the output and the
    average, over the ghost batches that have values, of their means and of
    their variances (each unbiased with its own count if asked).
    """
    x = np.asarray(x, np.float64)
    parts = len(x) // virtual_batch_size
    masks = [None] * parts if mask is None else np.split(np.asarray(mask), parts)
    outputs, means, variances = [], [], []
    for part, part_mask in zip(np.split(x, parts), masks, strict=True):
        y, mean, variance, count = train_transform(
            part, gamma, beta, epsilon, axis, part_mask
        )
        outputs.append(y)
        if np.all(count == 0):
            continue
        means.append(mean)
        variances.append(unbiased(variance, count) if unbiased_variance else variance)
    return np.concatenate(outputs), np.mean(means, 0), np.mean(variances, 0)


def unbiased(variance, count):
    """The unbiased variance `variance * n / (n - 1)` (Algorithm 2, line 10)."""
    return variance * count / (count - 1.0)


def ema(moving, value, momentum):
    """Keras' moving average: `momentum * moving + (1 - momentum) * value`."""
    return momentum * moving + (1.0 - momentum) * value


def debiased_ema(values, momentum):
    """Zero-debiased EMA after `t = len(values)` updates.

    `sum_i (1 - m) m^(t - i) x_i / (1 - m^t)`, the estimate of
    `tf.train.ExponentialMovingAverage(zero_debias=True)`; written in closed
    form so that it shares nothing with a recursive implementation.
    """
    t = len(values)
    total = sum(
        (1.0 - momentum) * momentum ** (t - i) * np.asarray(v, np.float64)
        for i, v in enumerate(values, start=1)
    )
    return total / (1.0 - momentum**t)


def cumulative_average(values):
    """The equal-weight average of every batch statistic seen so far."""
    return np.mean(np.asarray(values, np.float64), axis=0)


class PopulationStatistics:
    """`moving_mean` and `moving_variance` after a sequence of training batches.

    `momentum` is a float (Keras' EMA, or the debiased EMA with `debias=True`)
    or None (cumulative average). `update` takes one batch's mean and variance
    (already unbiased if wanted); a batch with no values (`count == 0`) is
    skipped, as if it never happened.
    """

    def __init__(self, mean, variance, momentum, debias=False):
        self.mean = np.asarray(mean, np.float64)
        self.variance = np.asarray(variance, np.float64)
        self.momentum = momentum
        self.debias = debias
        self.means = []
        self.variances = []

    def update(self, mean, variance, count=None):
        if count is not None and np.all(np.asarray(count) == 0):
            return
        self.means.append(np.asarray(mean, np.float64))
        self.variances.append(np.asarray(variance, np.float64))
        if self.momentum is None:
            self.mean = cumulative_average(self.means)
            self.variance = cumulative_average(self.variances)
        elif self.debias:
            self.mean = debiased_ema(self.means, self.momentum)
            self.variance = debiased_ema(self.variances, self.momentum)
        else:
            self.mean = ema(self.mean, mean, self.momentum)
            self.variance = ema(self.variance, variance, self.momentum)


def renorm_train_step(
    x,
    state,
    gamma,
    beta,
    epsilon,
    axis,
    momentum,
    renorm_momentum,
    clipping=None,
    mask=None,
):
    """One training step of batch renormalization (Ioffe, 2017, Algorithm 1).

    `r = clip(sigma_B / sigma, rmin, rmax)`, `d = clip((mu_B - mu) / sigma,
    -dmax, dmax)`, `y = gamma * (x_hat * r + d) + beta`, where `mu` and `sigma`
    are `state["renorm_mean"]` and `state["renorm_stddev"]`, the latter floored
    at `sqrt(epsilon)` as Keras does. Keras' update rules follow: `renorm_mean`
    and `renorm_stddev` with `renorm_momentum`, `moving_mean` and
    `moving_stddev` with `momentum`, and `moving_variance = relu(moving_stddev^2
    - epsilon)`. The moments are over the unmasked entries. Returns the output
    and the new state (a new dict).
    """
    clipping = clipping or {}
    mean, variance, _ = moments(x, axis, mask)
    sigma_b = np.sqrt(variance + epsilon)
    sigma = np.maximum(state["renorm_stddev"], np.sqrt(epsilon))
    r = sigma_b / sigma
    d = (mean - state["renorm_mean"]) / sigma
    if clipping.get("rmin") is not None:
        r = np.maximum(r, clipping["rmin"])
    if clipping.get("rmax") is not None:
        r = np.minimum(r, clipping["rmax"])
    if clipping.get("dmax") is not None:
        d = np.clip(d, -clipping["dmax"], clipping["dmax"])
    x_hat = normalize(x, mean, variance, None, None, epsilon, axis)
    shape = np.shape(x)
    y = x_hat * expand(r, shape, axis) + expand(d, shape, axis)
    if gamma is not None:
        y = y * expand(gamma, shape, axis)
    if beta is not None:
        y = y + expand(beta, shape, axis)
    new = {
        "renorm_mean": ema(state["renorm_mean"], mean, renorm_momentum),
        "renorm_stddev": ema(state["renorm_stddev"], sigma_b, renorm_momentum),
        "moving_mean": ema(state["moving_mean"], mean, momentum),
        "moving_stddev": ema(state["moving_stddev"], sigma_b, momentum),
    }
    new["moving_variance"] = np.maximum(new["moving_stddev"] ** 2 - epsilon, 0.0)
    return y, new


def sigmoid(x):
    """The logistic function `1 / (1 + exp(-x))`."""
    return 1.0 / (1.0 + np.exp(-x))


def timestep_moments(x, mask=None):
    """Per-timestep mean, biased variance and count of `(batch, time, ..., features)`.

    Reduced over the batch and the axes between time and the last (feature)
    axis; masked entries (mask of shape `(batch, time, ...)`) excluded.
    """
    x = np.asarray(x, np.float64)
    axes = (0,) + tuple(range(2, x.ndim - 1))
    weights = np.ones(x.shape[:-1]) if mask is None else mask.astype(np.float64)
    weights = weights[..., None]
    count = weights.sum(axis=axes)
    with np.errstate(invalid="ignore", divide="ignore"):
        # `where`, not a product: padding may hold NaN.
        mean = np.where(weights > 0, x, 0.0).sum(axis=axes) / count
        deviation = np.where(weights > 0, x - np.expand_dims(mean, axes), 0.0)
        variance = (deviation**2).sum(axis=axes) / count
    return mean, variance, count[..., 0]


def reference_bn_lstm(
    x,
    w,
    training,
    mask=None,
    population=None,
    max_timesteps=None,
    epsilon=1e-3,
):
    """The BN-LSTM (Cooijmans et al., equations 6 to 8), one timestep at a time.

    `w` holds `kernel`, `recurrent_kernel`, `bias`, `gamma_x`, `gamma_h`,
    `gamma_c`, `beta_c`. In training the moments are those of each timestep's
    batch (unmasked sequences only); in inference `population[name] = (mean,
    variance)` of shape `(T_max, features)`, indexed by `min(t, T_max - 1)`.
    Returns `(sequence, h, c, moments)`, `moments[name]` the per-timestep
    batch `(mean, variance)` of `input`, `recurrent` and `cell`.
    """
    x = np.asarray(x, np.float64)
    batch, steps, _ = x.shape
    units = w["recurrent_kernel"].shape[0]
    h = np.zeros((batch, units))
    c = np.zeros((batch, units))
    sequence = []
    seen = {"input": [], "recurrent": [], "cell": []}

    def statistics(name, z, t, step_mask):
        if training:
            mean, variance, _ = moments(z, -1, step_mask)
            seen[name].append((mean, variance))
            return mean, variance
        slot = min(t, max_timesteps - 1)
        return population[name][0][slot], population[name][1][slot]

    def bn(z, name, t, step_mask, gamma, beta=None):
        mean, variance = statistics(name, z, t, step_mask)
        return normalize(z, mean, variance, gamma, beta, epsilon, -1)

    for t in range(steps):
        step_mask = None if mask is None else mask[:, t]
        z_x = x[:, t] @ w["kernel"]
        z_h = h @ w["recurrent_kernel"]
        gates = (
            bn(z_x, "input", t, step_mask, w["gamma_x"])
            + bn(z_h, "recurrent", t, step_mask, w["gamma_h"])
            + w["bias"]
        )
        i, f, g, o = np.split(gates, 4, axis=-1)
        new_c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        normalized_c = bn(new_c, "cell", t, step_mask, w["gamma_c"], w["beta_c"])
        new_h = sigmoid(o) * np.tanh(normalized_c)
        if step_mask is not None:
            new_h = np.where(step_mask[:, None], new_h, h)
            new_c = np.where(step_mask[:, None], new_c, c)
        h, c = new_h, new_c
        sequence.append(h)
    stacked = {
        name: tuple(np.stack(values) for values in zip(*pairs, strict=True))
        for name, pairs in seen.items()
        if pairs
    }
    return np.stack(sequence, axis=1), h, c, stacked
