"""The `BatchNorm` layer: batch normalization with population statistics done right."""

import math

import keras
from keras import constraints, initializers, ops, regularizers

_RENORM_CLIPPING_KEYS = ("rmax", "rmin", "dmax")
_HALF_DTYPES = ("float16", "bfloat16")


@keras.saving.register_keras_serializable(package="bn_keras")
class BatchNorm(keras.layers.Layer):
    """Batch normalization (Ioffe & Szegedy, 2015), a drop-in for Keras' layer.

    Per feature along `axis`, in training mode the layer computes
    `gamma * (x - mean_B) / sqrt(var_B + epsilon) + beta` with the mean and
    (biased) variance of the mini-batch, and updates the non-trainable
    population estimates `moving_mean` and `moving_variance`. In inference mode
    it uses those estimates, `gamma * (x - moving_mean) /
    sqrt(moving_variance + epsilon) + beta`, folded into one multiply-add, so a
    batch of one example is normalized exactly as it would be in a large batch.

    With default arguments it matches `keras.layers.BatchNormalization`: same
    arguments, weight names and shapes, outputs, gradients and statistics. The
    extra arguments (all off by default) change only how the population
    statistics are estimated, or add what Keras lacks:

    - `momentum=None`: the population statistics are the equal-weight average
      of every training batch seen so far (PyTorch's `momentum=None`), what the
      paper's Algorithm 2 asks for. Adds a `num_batches` counter weight.
    - `debias=True`: a zero-debiased exponential moving average, as
      `tf.train.ExponentialMovingAverage(zero_debias=True)`: after `t` updates
      the estimate is `sum_i (1 - m) m^(t-i) x_i / (1 - m^t)`, a weighted
      average of the batches seen, not dragged toward the initializers early
      in training. Adds a `num_batches` counter weight.
    - `unbiased_variance=True`: the population variance is updated with the
      unbiased batch variance `var_B * n / (n - 1)` (Algorithm 2, step 10),
      where `n` is the number of values per feature; training-mode
      normalization still uses the biased `var_B`.
    - `axis` may be a tuple of axes: one statistic per element of those axes.
    - `virtual_batch_size`: ghost batches. In training mode the batch is split
      into consecutive sub-batches of this size, each normalized with its own
      statistics; the population statistics are updated with their average.

    All updates have the form `moving = (1 - w) * moving + w * batch_stat`
    with `w = 1 - momentum` (plain EMA, Keras' rule), `w = (1 - momentum) /
    (1 - momentum^t)` (debiased) or `w = 1 / t` (cumulative average). Under
    `renorm`, as in Keras, the average is taken of the standard deviation
    and `moving_variance = moving_stddev**2 - epsilon`.

    Setting `trainable = False` on the layer freezes it *and* puts it in
    inference mode, also inside `fit()`: Keras' convention for fine-tuning.

    Args:
        axis: Integer or tuple of integers, the feature axis or axes (not
            reduced). `-1` for channels-last; `1` after a channels-first conv.
        momentum: Momentum of the moving average, in `[0, 1]`, or `None` for
            the cumulative average of all training batches.
        epsilon: Small positive float added to the variance.
        center: If `True`, add the offset `beta`.
        scale: If `True`, multiply by `gamma`.
        beta_initializer: Initializer for `beta`.
        gamma_initializer: Initializer for `gamma`.
        moving_mean_initializer: Initializer for `moving_mean`.
        moving_variance_initializer: Initializer for `moving_variance`.
        beta_regularizer: Optional regularizer for `beta`.
        gamma_regularizer: Optional regularizer for `gamma`.
        beta_constraint: Optional constraint for `beta`.
        gamma_constraint: Optional constraint for `gamma`.
        renorm: Whether to use batch renormalization (Ioffe, 2017), with
            Keras' semantics and extra weights (`moving_stddev`,
            `renorm_mean`, `renorm_stddev`).
        renorm_clipping: Dict with optional keys `"rmax"`, `"rmin"`, `"dmax"`
            clipping the renorm corrections `r` to `[rmin, rmax]` and `d` to
            `[-dmax, dmax]`. Only with `renorm=True`.
        renorm_momentum: Momentum of the moving mean and standard deviation
            used by the renorm corrections during training.
        synchronized: If `True`, under a `tf.distribute` strategy the batch
            statistics are those of the global batch over all replicas.
            TensorFlow backend only.
        debias: If `True`, zero-debias the exponential moving average.
        unbiased_variance: If `True`, update `moving_variance` with the
            unbiased batch variance.
        virtual_batch_size: Optional positive integer, the size of the ghost
            batches; the batch size must be a multiple of it.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: Input tensor of any rank.
        training: Python boolean. `True` normalizes with the batch statistics
            and updates the population statistics (if the layer is
            trainable); `False` or `None` normalizes with the population
            statistics and updates nothing.
        mask: Optional boolean tensor of the input's shape without the feature
            axes (for the default `axis=-1`, one dimension less). The batch
            statistics are computed over the unmasked entries only; features
            with no unmasked entry leave their population statistics as they
            are.

    Reference:
        - [Ioffe & Szegedy, 2015](https://arxiv.org/abs/1502.03167).
        - [Ioffe, 2017](https://arxiv.org/abs/1702.03275) (renormalization).
    """

    def __init__(
        self,
        axis=-1,
        momentum=0.99,
        epsilon=1e-3,
        center=True,
        scale=True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        renorm=False,
        renorm_clipping=None,
        renorm_momentum=0.99,
        synchronized=False,
        debias=False,
        unbiased_variance=False,
        virtual_batch_size=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.axis = _validate_axis(axis)
        self.momentum = _validate_momentum(momentum, "momentum", allow_none=True)
        self.epsilon = _to_float(epsilon, "epsilon")
        if not 0 < self.epsilon < math.inf:
            raise ValueError(
                f"`epsilon` must be a positive float. Received: epsilon={epsilon!r}"
            )
        self.center = bool(center)
        self.scale = bool(scale)
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = initializers.get(moving_variance_initializer)
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        self.beta_constraint = constraints.get(beta_constraint)
        self.gamma_constraint = constraints.get(gamma_constraint)

        self.renorm = bool(renorm)
        self.renorm_clipping = _validate_renorm_clipping(renorm_clipping)
        self.renorm_momentum = _validate_momentum(renorm_momentum, "renorm_momentum")

        self.synchronized = bool(synchronized)
        if self.synchronized and keras.backend.backend() != "tensorflow":
            raise ValueError(
                "`synchronized=True` needs the TensorFlow backend (it reduces "
                "statistics across `tf.distribute` replicas); the current backend "
                f"is {keras.backend.backend()!r}. Received: synchronized=True"
            )
        self.debias = bool(debias)
        if self.debias and self.momentum is None:
            raise ValueError(
                "`debias=True` applies to an exponential moving average, but "
                "`momentum=None` already gives an unbiased cumulative average. "
                "Received: momentum=None, debias=True"
            )
        if self.debias and self.momentum == 1.0:
            raise ValueError(
                "`debias=True` needs `momentum < 1` (with momentum 1 the "
                "statistics never move). Received: momentum=1.0, debias=True"
            )
        self.unbiased_variance = bool(unbiased_variance)
        self.virtual_batch_size = _validate_virtual_batch_size(virtual_batch_size)
        self.supports_masking = True

        self.gamma = None
        self.beta = None
        self.moving_mean = None
        self.moving_variance = None
        self.num_batches = None

    @property
    def input_dtype(self):
        # Under a mixed policy, float32 inputs stay float32 (no overflow above
        # the float16 range) and half inputs are widened: the moments are
        # always computed in float32 and only the output is in compute dtype.
        if self.compute_dtype in _HALF_DTYPES:
            return self.variable_dtype
        return self.compute_dtype

    @property
    def _counts_batches(self):
        return self.momentum is None or self.debias

    def build(self, input_shape):
        rank = len(input_shape)
        axes = _resolve_axes(self.axis, rank, input_shape)
        for a in axes:
            if input_shape[a] is None:
                raise ValueError(
                    f"The feature axis {a} of the input must have a known size "
                    f"when BatchNorm is built. Received: input_shape={input_shape}, "
                    f"axis={self.axis}"
                )
        if self.virtual_batch_size is not None and 0 in axes:
            raise ValueError(
                "`virtual_batch_size` splits the batch axis 0, which cannot also "
                f"be a feature axis. Received: axis={self.axis}"
            )
        self._axes = axes
        self._reduction_axes = tuple(i for i in range(rank) if i not in axes)
        param_shape = tuple(input_shape[a] for a in axes)
        self._param_shape = param_shape
        self._broadcast_shape = tuple(
            input_shape[i] if i in axes else 1 for i in range(rank)
        )

        def stat(name, initializer):
            return self.add_weight(
                shape=param_shape,
                name=name,
                initializer=initializer,
                trainable=False,
                autocast=False,
            )

        if self.scale:
            self.gamma = self.add_weight(
                shape=param_shape,
                name="gamma",
                initializer=self.gamma_initializer,
                regularizer=self.gamma_regularizer,
                constraint=self.gamma_constraint,
                trainable=True,
                autocast=False,
            )
        if self.center:
            self.beta = self.add_weight(
                shape=param_shape,
                name="beta",
                initializer=self.beta_initializer,
                regularizer=self.beta_regularizer,
                constraint=self.beta_constraint,
                trainable=True,
                autocast=False,
            )
        self.moving_mean = stat("moving_mean", self.moving_mean_initializer)
        self.moving_variance = stat("moving_variance", self.moving_variance_initializer)
        if self.renorm:
            # Keras tracks the population standard deviation under renorm
            # (the paper's formulation); moving_variance is derived from it.
            def stddev_initializer(shape, dtype=None):
                initializer = _clone_initializer(self.moving_variance_initializer)
                return ops.sqrt(initializer(shape, dtype=dtype))

            self.moving_stddev = stat("moving_stddev", stddev_initializer)
            self.renorm_mean = stat(
                "renorm_mean", _clone_initializer(self.moving_mean_initializer)
            )
            self.renorm_stddev = stat("renorm_stddev", stddev_initializer)
        if self._counts_batches:
            self.num_batches = self.add_weight(
                shape=(),
                name="num_batches",
                initializer="zeros",
                dtype="int32",
                trainable=False,
                autocast=False,
            )
        self.input_spec = keras.layers.InputSpec(
            ndim=rank, axes={a: input_shape[a] for a in axes}
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    def call(self, inputs, training=None, mask=None):
        x = ops.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
        if training and self.trainable:
            outputs = self._train_call(x, mask)
        else:
            outputs = self._inference_call(x)
        return ops.cast(outputs, self.compute_dtype)

    def _inference_call(self, x):
        mean = ops.cast(self.moving_mean, x.dtype)
        variance = ops.cast(self.moving_variance, x.dtype)
        multiplier, offset = _fold(
            mean,
            variance,
            self._param(self.gamma, x),
            self._param(self.beta, x),
            self.epsilon,
        )
        return x * self._broadcast(multiplier) + self._broadcast(offset)

    def _train_call(self, x, mask):
        ghosts = self.virtual_batch_size
        shape = ops.shape(x)
        weights = None if mask is None else self._mask_weights(mask, x)
        reduction_axes = self._reduction_axes
        broadcast_shape = self._broadcast_shape
        if ghosts is not None:
            self._check_divisible(x)
            # (B, ...) -> (B / V, V, ...): statistics per consecutive sub-batch.
            ghost_shape = (-1, ghosts) + tuple(shape[1:])
            x = ops.reshape(x, ghost_shape)
            if weights is not None:
                weights = ops.reshape(weights, ghost_shape)
            reduction_axes = tuple(a + 1 for a in reduction_axes)
            broadcast_shape = (1,) + broadcast_shape
        self._check_several_values(x, reduction_axes)

        # The output is folded around the shift too: `(x - shift) * a + b`
        # adds no op and avoids cancelling large terms when the mean is large.
        x, shifted_mean, variance, count, shift = _moments(
            x, reduction_axes, weights, self.synchronized
        )
        mean = shifted_mean + shift
        gamma = self._param(self.gamma, x, broadcast_shape)
        beta = self._param(self.beta, x, broadcast_shape)
        if self.renorm:
            r, d = self._renorm_correction(mean, variance, broadcast_shape)
            # (x_hat * r + d) * gamma + beta, with r and d held constant.
            d = d if gamma is None else d * gamma
            beta = d if beta is None else d + beta
            gamma = r if gamma is None else r * gamma
        self._update_statistics(
            *self._population_update(x, reduction_axes, mean, variance, count)
        )
        multiplier, offset = _fold(shifted_mean, variance, gamma, beta, self.epsilon)
        outputs = x * multiplier + offset
        if ghosts is not None:
            outputs = ops.reshape(outputs, shape)
        return outputs

    def _population_update(self, x, reduction_axes, mean, variance, count):
        """The batch's contribution to the population statistics.

        Returns `(mean, variance, active)` in the weights' shape: with ghost
        batches, the average over the sub-batches that hold a value; the
        variance with the Bessel factor of each (sub-)batch if
        `unbiased_variance`; `active` (None without a mask) is False for
        features without any unmasked value, which keep their statistics.
        """
        masked = count is not None
        if self.unbiased_variance:
            n = count
            if not masked:
                sizes = [x.shape[a] for a in reduction_axes]
                if None in sizes:
                    sizes = [ops.shape(x)[a] for a in reduction_axes]
                n = _product(sizes)
            variance = variance * ops.cast(_bessel_factor(n), variance.dtype)
        active = None
        if self.virtual_batch_size is not None:
            if masked:
                filled = ops.cast(count > 0.0, mean.dtype)
                total = ops.maximum(ops.sum(filled, axis=0), 1.0)
                mean = ops.sum(mean * filled, axis=0) / total
                variance = ops.sum(variance * filled, axis=0) / total
                count = ops.sum(count, axis=0)
            else:
                mean = ops.mean(mean, axis=0)
                variance = ops.mean(variance, axis=0)
        if masked:
            active = ops.reshape(count, self._param_shape) > 0.0
        return (
            ops.reshape(mean, self._param_shape),
            ops.reshape(variance, self._param_shape),
            active,
        )

    def _renorm_correction(self, mean, variance, broadcast_shape):
        stddev = ops.sqrt(variance + self.epsilon)
        renorm_mean = ops.reshape(
            ops.cast(self.renorm_mean, mean.dtype), broadcast_shape
        )
        # The floor avoids dividing by zero early in training (as Keras).
        renorm_stddev = ops.maximum(
            ops.reshape(ops.cast(self.renorm_stddev, mean.dtype), broadcast_shape),
            ops.sqrt(ops.cast(self.epsilon, mean.dtype)),
        )
        r = stddev / renorm_stddev
        d = (mean - renorm_mean) / renorm_stddev
        clipping = self.renorm_clipping or {}
        if clipping.get("rmin") is not None:
            r = ops.maximum(r, clipping["rmin"])
        if clipping.get("rmax") is not None:
            r = ops.minimum(r, clipping["rmax"])
        if clipping.get("dmax") is not None:
            d = ops.clip(d, -clipping["dmax"], clipping["dmax"])
        return ops.stop_gradient(r), ops.stop_gradient(d)

    def _update_statistics(self, mean, variance, active):
        weight, keep = self._update_weight(active)
        if self.renorm:
            stddev = ops.sqrt(variance + self.epsilon)
            momentum = self.renorm_momentum
            _average_into(self.renorm_mean, mean, 1.0 - momentum, momentum, active)
            _average_into(self.renorm_stddev, stddev, 1.0 - momentum, momentum, active)
            _average_into(self.moving_mean, mean, weight, keep, active)
            new_stddev = _average_into(self.moving_stddev, stddev, weight, keep, active)
            # ReLU guards against rounding making the variance negative.
            new_variance = ops.relu(new_stddev * new_stddev - self.epsilon)
            if active is not None:
                new_variance = ops.where(
                    active, new_variance, ops.cast(self.moving_variance, mean.dtype)
                )
            self.moving_variance.assign(new_variance)
        else:
            _average_into(self.moving_mean, mean, weight, keep, active)
            _average_into(self.moving_variance, variance, weight, keep, active)

    def _update_weight(self, active):
        """`(w, 1 - w)` for the update `moving = (1 - w) * moving + w * stat`."""
        if not self._counts_batches:
            # Python floats: Keras' exact expression, bit for bit.
            return 1.0 - self.momentum, self.momentum
        t = ops.cast(self.num_batches, "float32") + 1.0
        # A batch without any unmasked value does not count.
        seen = 1 if active is None else ops.cast(ops.any(active), "int32")
        self.num_batches.assign(self.num_batches + seen)
        if self.momentum is None:
            weight = 1.0 / t
        elif self.momentum == 0.0:
            return 1.0, 0.0
        else:
            # 1 - m^t as -expm1(t log m): accurate in float32 when m is near 1,
            # so the first update gives exactly the first batch's statistics.
            debiasing = -ops.expm1(t * math.log(self.momentum))
            weight = ops.minimum((1.0 - self.momentum) / debiasing, 1.0)
        return weight, 1.0 - weight

    def _param(self, weight, x, broadcast_shape=None):
        if weight is None:
            return None
        weight = ops.cast(weight, x.dtype)
        if broadcast_shape is None:
            return weight
        return ops.reshape(weight, broadcast_shape)

    def _broadcast(self, value):
        if self._axes == (len(self._broadcast_shape) - 1,):
            return value
        return ops.reshape(value, self._broadcast_shape)

    def _mask_weights(self, mask, x):
        rank = len(x.shape)
        if len(mask.shape) != rank - len(self._axes):
            raise ValueError(
                "The mask must have the input's shape without the feature axes "
                f"{self._axes}. Received: mask.shape={mask.shape}, "
                f"inputs.shape={x.shape}"
            )
        weights = ops.cast(mask, x.dtype)
        for a in self._axes:
            weights = ops.expand_dims(weights, a)
        return ops.broadcast_to(weights, ops.shape(x))

    def _check_several_values(self, x, reduction_axes):
        sizes = [x.shape[a] for a in reduction_axes]
        if None not in sizes and _product(sizes) == 1:
            ghosts = self.virtual_batch_size
            where = (
                ""
                if ghosts is None
                else f" per ghost batch (virtual_batch_size={ghosts})"
            )
            raise ValueError(
                "BatchNorm in training mode got a single value per feature"
                f"{where} (input shape {tuple(x.shape)}, reduced over axes "
                f"{reduction_axes}), so every output would equal beta. Train "
                "with a batch of more than one example, or call the layer "
                "with training=False."
            )

    def _check_divisible(self, x):
        batch = x.shape[0]
        if batch is not None and batch % self.virtual_batch_size:
            raise ValueError(
                f"The batch size {batch} is not a multiple of "
                f"virtual_batch_size={self.virtual_batch_size}. Use a batch size "
                "that it divides, or another virtual_batch_size."
            )

    def get_config(self):
        config = {
            "axis": self.axis,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": initializers.serialize(self.beta_initializer),
            "gamma_initializer": initializers.serialize(self.gamma_initializer),
            "moving_mean_initializer": initializers.serialize(
                self.moving_mean_initializer
            ),
            "moving_variance_initializer": initializers.serialize(
                self.moving_variance_initializer
            ),
            "beta_regularizer": regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": regularizers.serialize(self.gamma_regularizer),
            "beta_constraint": constraints.serialize(self.beta_constraint),
            "gamma_constraint": constraints.serialize(self.gamma_constraint),
            "renorm": self.renorm,
            "renorm_clipping": self.renorm_clipping,
            "renorm_momentum": self.renorm_momentum,
            "synchronized": self.synchronized,
            "debias": self.debias,
            "unbiased_variance": self.unbiased_variance,
            "virtual_batch_size": self.virtual_batch_size,
        }
        return {**super().get_config(), **config}


def _fold(mean, variance, gamma, beta, epsilon):
    """`gamma * (x - mean) / sqrt(variance + epsilon) + beta` as `x * a + b`."""
    multiplier = ops.rsqrt(variance + epsilon)
    if gamma is not None:
        multiplier = multiplier * gamma
    offset = -mean * multiplier if beta is None else beta - mean * multiplier
    return multiplier, offset


def _average_into(variable, value, weight, keep, active=None):
    """Assigns `keep * variable + weight * value` where `active`; returns it."""
    old = ops.cast(variable, value.dtype)
    if not isinstance(weight, float):
        weight, keep = ops.cast(weight, value.dtype), ops.cast(keep, value.dtype)
    new = old * keep + value * weight
    if active is not None:
        new = ops.where(active, new, old)
    variable.assign(new)
    return new


def _bessel_factor(n):
    """`n / (n - 1)`, the unbiased-variance correction; 1 where n <= 1."""
    if isinstance(n, int):
        return n / (n - 1) if n > 1 else 1.0
    n = ops.cast(n, "float32")
    return ops.where(n > 1.0, n / ops.maximum(n - 1.0, 1.0), 1.0)


def _moments(x, axes, weights=None, synchronized=False):
    """Moments over `axes`, kept as size-1 dims, around a shift.

    Two passes (the mean, then the mean squared deviation from it), as
    `tf.nn.moments`, so the variance is never negative.

    Returns:
        `(x - shift, mean - shift, variance, count, shift)`: the count is None
        without weights (it is then known from the shape); the variance is
        biased; the shift is a constant (no gradient) or 0.
    """
    if synchronized:
        replicas = _replica_context()
        if replicas is not None:
            return _synchronized_moments(x, axes, weights, replicas)
    if weights is None:
        # Moments of x - shift, the shift being one of the values: the sums
        # then see deviations of the size of the spread, not of the mean, and
        # stay accurate for a large mean (1e4 with std 1 in float32).
        first = tuple(
            slice(0, 1) if i in axes else slice(None) for i in range(len(x.shape))
        )
        shift = ops.stop_gradient(x[first])
        deviations = x - shift
        mean = ops.mean(deviations, axis=axes, keepdims=True)
        squares = _squared_difference(deviations, ops.stop_gradient(mean))
        variance = ops.mean(squares, axis=axes, keepdims=True)
        return deviations, mean, variance, None, shift
    # Masked entries may hold anything (padding): no shift taken from them.
    count = ops.sum(weights, axis=axes, keepdims=True)
    mean = ops.divide_no_nan(ops.sum(x * weights, axis=axes, keepdims=True), count)
    squares = weights * ops.square(x - ops.stop_gradient(mean))
    variance = ops.divide_no_nan(ops.sum(squares, axis=axes, keepdims=True), count)
    return x, mean, variance, count, 0.0


def _squared_difference(x, y):
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        # One fused kernel, forward and backward, where ops.square(x - y)
        # makes two passes over the tensor (as Keras does through tf.nn.moments).
        return tf.math.squared_difference(x, y)
    return ops.square(x - y)


def _synchronized_moments(x, axes, weights, replicas):
    import tensorflow as tf

    if weights is None:
        weights = ops.ones_like(x)
    total, count = replicas.all_reduce(
        tf.distribute.ReduceOp.SUM,
        [
            ops.sum(x * weights, axis=axes, keepdims=True),
            ops.sum(weights, axis=axes, keepdims=True),
        ],
    )
    mean = ops.divide_no_nan(total, count)
    deviation = weights * ops.square(x - ops.stop_gradient(mean))
    squares = replicas.all_reduce(
        tf.distribute.ReduceOp.SUM, ops.sum(deviation, axis=axes, keepdims=True)
    )
    return x, mean, ops.divide_no_nan(squares, count), count, 0.0


def _replica_context():
    """The tf.distribute replica context when inside a multi-replica step."""
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync <= 1:
        return None
    return context


def _product(sizes):
    # math.prod, but also for the backend's scalar tensors of dynamic shapes.
    result = 1
    for size in sizes:
        result = result * size
    return result


def _clone_initializer(initializer):
    # A fresh instance, so a seeded initializer is not reused for two weights.
    if isinstance(initializer, initializers.Initializer):
        return initializer.__class__.from_config(initializer.get_config())
    return initializer


def _validate_axis(axis):
    if isinstance(axis, bool):
        raise ValueError(
            f"`axis` must be an int or a tuple of ints. Received: axis={axis}"
        )
    if isinstance(axis, int):
        return axis
    if (
        isinstance(axis, (list, tuple))
        and axis
        and all(isinstance(a, int) and not isinstance(a, bool) for a in axis)
    ):
        if len(set(axis)) != len(axis):
            raise ValueError(f"`axis` has a repeated entry. Received: axis={axis}")
        return tuple(axis)
    raise ValueError(
        f"`axis` must be an int or a non-empty tuple of ints. Received: axis={axis!r}"
    )


def _resolve_axes(axis, rank, input_shape):
    axes = (axis,) if isinstance(axis, int) else axis
    resolved = []
    for a in axes:
        if not -rank <= a < rank:
            raise ValueError(
                f"`axis` {a} is out of range for an input of rank {rank} "
                f"(shape {tuple(input_shape)}). Received: axis={axis}"
            )
        resolved.append(a % rank)
    if len(set(resolved)) != len(resolved):
        raise ValueError(
            f"`axis` names the same axis twice for an input of rank {rank}. "
            f"Received: axis={axis}"
        )
    return tuple(sorted(resolved))


def _to_float(value, name):
    """`float(value)`, or a ValueError that quotes the argument."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"`{name}` must be a number. Received: {name}={value!r}"
        ) from None


def _validate_virtual_batch_size(value):
    if value is None:
        return None
    valid = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value == int(value)
        and value >= 1
    )
    if not valid:
        raise ValueError(
            "`virtual_batch_size` must be a positive integer or None. "
            f"Received: virtual_batch_size={value!r}"
        )
    return int(value)


def _validate_momentum(momentum, name, allow_none=False):
    if momentum is None and allow_none:
        return None
    try:
        value = _to_float(momentum, name)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        hint = " or None (cumulative average)" if allow_none else ""
        raise ValueError(
            f"`{name}` must be a float in [0, 1]{hint}. Received: {name}={momentum!r}"
        )
    return value


def _validate_renorm_clipping(clipping):
    if clipping is None:
        return None
    if not isinstance(clipping, dict):
        raise ValueError(
            "`renorm_clipping` must be a dict with keys among "
            f"{_RENORM_CLIPPING_KEYS}. Received: renorm_clipping={clipping!r}"
        )
    unknown = sorted(set(clipping) - set(_RENORM_CLIPPING_KEYS))
    if unknown:
        raise ValueError(
            f"Unknown `renorm_clipping` keys {unknown}; supported keys are "
            f"{_RENORM_CLIPPING_KEYS}. Received: renorm_clipping={clipping}"
        )
    try:
        clipping = {k: (None if v is None else float(v)) for k, v in clipping.items()}
    except (TypeError, ValueError):
        raise ValueError(
            "`renorm_clipping` values must be numbers or None. "
            f"Received: renorm_clipping={clipping!r}"
        ) from None
    rmax, rmin, dmax = (clipping.get(k) for k in _RENORM_CLIPPING_KEYS)
    if rmax is not None and rmin is not None and rmax < rmin:
        raise ValueError(
            f"`renorm_clipping` needs rmax >= rmin. Received: rmax={rmax}, rmin={rmin}"
        )
    if dmax is not None and dmax < 0:
        raise ValueError(f"`renorm_clipping` needs dmax >= 0. Received: dmax={dmax}")
    return clipping
