"""The `BatchNorm` layer: batch normalization with population statistics done right."""

from __future__ import annotations

import warnings
from typing import Any

import keras
from keras import constraints, initializers, ops, regularizers

from bn_keras import (
    checks,
    closed_form,
    domains,
    kernels,
    masking,
    renorm,
    statistics,
    validation,
    virtual_batch,
)
from bn_keras import fused as fused_kernel
from bn_keras.moments import (
    Moments,
    fold_centered,
    moments,
    normalize,
    normalize_broadcast,
    static_count,
)

_HALF_DTYPES = ("float16", "bfloat16")


@keras.saving.register_keras_serializable(package="bn_keras")
class BatchNorm(keras.layers.Layer):
    """Batch normalization (Ioffe & Szegedy, 2015), a drop-in for Keras' layer.

    Per feature along `axis`, in training mode the layer computes
    `gamma * (x - mean_B) / sqrt(var_B + epsilon) + beta` with the mean and
    (biased) variance of the mini-batch, and updates the non-trainable
    population estimates `moving_mean` and `moving_variance`. In inference mode
    it uses those estimates, `gamma * (x - moving_mean) /
    sqrt(moving_variance + epsilon) + beta`, so a batch of one example is
    normalized exactly as it would be in a large batch.

    With default arguments it matches `keras.layers.BatchNormalization`: same
    arguments, weight names and shapes, masks, outputs, gradients and
    statistics. The extra arguments (all off by default) change only how the
    population statistics are estimated, or add what Keras lacks:

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

    The population statistics are never corrupted: a training batch whose
    moments are not finite (a NaN or inf in the input), or that holds at most
    one value for a feature, leaves them as they were, feature by feature. A
    training batch that is empty or has one value per feature is an error
    (see `bn_keras.checks` for when it is raised on each backend).

    Which statistics normalize, and whether the population statistics
    change, is set by `statistics`, apart from `trainable`:

    | `statistics` | training mode | inference mode | population statistics |
    | --- | --- | --- | --- |
    | `"update"` (default) | batch | population | updated in training |
    | `"frozen"` | population | population | never updated |
    | `"batch"` | batch | batch | never updated |

    gamma and beta train in every mode. `"frozen"` is the FrozenBN of Wu &
    Johnson (2021): fine-tuning with fixed statistics while gamma and beta
    keep learning. `"batch"` is PyTorch's `track_running_stats=False`, what
    test-time adaptation needs; a batch of one example is then an error, in
    inference too. Setting `trainable = False` freezes the layer *and*, in the
    default mode, puts it in inference mode, also inside `fit()`: Keras'
    convention for fine-tuning; in the `"batch"` mode it still normalizes with
    the batch statistics. To switch a whole model, use
    `bn_keras.set_statistics` or `bn_keras.statistics_mode`: they also make
    the model's compiled `fit()`/`evaluate()`/`predict()` functions pick up
    the change.

    Args:
        axis: Integer or tuple of integers, the feature axis or axes (not
            reduced). `-1` for channels-last; `1` after a channels-first conv.
        momentum: Momentum of the moving average, in `[0, 1]`, or `None` for
            the cumulative average of all training batches.
        epsilon: Small positive float added to the variance, within the
            normal float32 range (`[1.18e-38, 3.4e38]`): the moments are at
            least float32.
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
            `[-dmax, dmax]`. Only with `renorm=True`. NaN is rejected;
            `rmax=inf`, `rmin=-inf` and `dmax=inf` clip nothing (stored as
            None).
        renorm_momentum: Momentum of the moving mean and standard deviation
            used by the renorm corrections during training.
        synchronized: If `True`, the batch statistics are those of the global
            batch over every replica of a distributed step: a `tf.distribute`
            strategy on TensorFlow, `torch.distributed` on torch. On JAX,
            under `keras.distribution.DataParallel`, they are global anyway.
            Outside a distributed step it changes nothing.
        debias: If `True`, zero-debias the exponential moving average.
        unbiased_variance: If `True`, update `moving_variance` with the
            unbiased batch variance.
        virtual_batch_size: Optional positive integer, the size of the ghost
            batches; the batch size must be a multiple of it.
        fused: Whether to use the backend's batch-norm kernel, forward and
            backward: TensorFlow's `FusedBatchNormV3` or torch's
            `native_batch_norm` (see `bn_keras.fused`). `None` (default):
            where it gives the same results (one channels-last or
            channels-first feature axis, float32, or float64 on torch, no
            mask, renorm, ghost batches or synchronization) and is faster
            than the layer's own operations. `True`: always, and a
            `ValueError` that says why where it cannot (a saved `fused=True`
            layer loads on JAX, which has no kernel, with a warning: see
            `from_config`). `False`: never.
        statistics: `"update"`, `"frozen"` or `"batch"`: which statistics
            normalize in each mode, and whether the population statistics
            are updated (see the table above). Also a settable attribute.
        domains: Positive integer, the number of sets of population
            statistics: one per domain (dataset, tower, source) whose
            batches are normalized apart. With `domains > 1` the statistics
            have shape `(domains, features...)`, each call names its set with
            its `domain` argument, and a training batch updates only its own
            domain's set (see `bn_keras.domains` for what is checked where).
            Not with renorm or `fused=True`.
        per_domain_parameters: If `True` (with `domains > 1`), gamma and
            beta are per domain too, of shape `(domains, features...)`;
            by default they are shared.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: Input tensor of any rank, real (a complex input is a
            `ValueError`: its imaginary part would be dropped).
        training: Python boolean. In the default `"update"` mode, `True`
            normalizes with the batch statistics and updates the population
            statistics (if the layer is trainable); `False` or `None`
            normalizes with the population statistics and updates nothing.
            The `"frozen"` and `"batch"` modes ignore it.
        domain: With `domains > 1`, whose statistics (and parameters) to use
            and update: a Python int in `[0, domains)`, or an integer tensor,
            a scalar or one entry per example (`(batch,)` or `(batch, 1)`).
            In inference each example uses its own domain's; a training
            batch must be of one domain. Optional with `domains=1` (0).
        mask: Optional boolean tensor with one dimension fewer than the input
            (Keras' convention, as produced by `Masking` or
            `Embedding(mask_zero=True)`), expanded on the last axis; a
            dimension of 1 broadcasts, another size is a `ValueError` naming
            both shapes. The batch
            statistics are computed over the unmasked entries only; features
            with at most one unmasked entry leave their population statistics
            as they are.

    Reference:
        - [Ioffe & Szegedy, 2015](https://arxiv.org/abs/1502.03167).
        - [Ioffe, 2017](https://arxiv.org/abs/1702.03275) (renormalization).
        - [Wu & Johnson, 2021](https://arxiv.org/abs/2105.07576), Section 5
          (domain-specific statistics).
    """

    def __init__(
        self,
        axis: int | tuple[int, ...] = -1,
        momentum: float | None = 0.99,
        epsilon: float = 1e-3,
        center: bool = True,
        scale: bool = True,
        beta_initializer: Any = "zeros",
        gamma_initializer: Any = "ones",
        moving_mean_initializer: Any = "zeros",
        moving_variance_initializer: Any = "ones",
        beta_regularizer: Any = None,
        gamma_regularizer: Any = None,
        beta_constraint: Any = None,
        gamma_constraint: Any = None,
        renorm: bool = False,
        renorm_clipping: dict[str, float] | None = None,
        renorm_momentum: float = 0.99,
        synchronized: bool = False,
        debias: bool = False,
        unbiased_variance: bool = False,
        virtual_batch_size: int | None = None,
        fused: bool | None = None,
        statistics: str = "update",
        domains: int = 1,
        per_domain_parameters: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._statistics = validation.validate_statistics(statistics)
        self.domains = validation.validate_positive_int(domains, "domains")
        self.per_domain_parameters = bool(per_domain_parameters)
        self.axis = validation.validate_axis(axis)
        self.momentum = validation.validate_momentum(
            momentum, "momentum", allow_none=True
        )
        self.epsilon = validation.validate_epsilon(epsilon)
        self.center = bool(center)
        self.scale = bool(scale)
        self.beta_initializer = validation.keras_object(
            initializers.get, beta_initializer, "beta_initializer"
        )
        self.gamma_initializer = validation.keras_object(
            initializers.get, gamma_initializer, "gamma_initializer"
        )
        self.moving_mean_initializer = validation.keras_object(
            initializers.get, moving_mean_initializer, "moving_mean_initializer"
        )
        self.moving_variance_initializer = validation.keras_object(
            initializers.get, moving_variance_initializer, "moving_variance_initializer"
        )
        self.beta_regularizer = validation.keras_object(
            regularizers.get, beta_regularizer, "beta_regularizer"
        )
        self.gamma_regularizer = validation.keras_object(
            regularizers.get, gamma_regularizer, "gamma_regularizer"
        )
        self.beta_constraint = validation.keras_object(
            constraints.get, beta_constraint, "beta_constraint"
        )
        self.gamma_constraint = validation.keras_object(
            constraints.get, gamma_constraint, "gamma_constraint"
        )
        self.renorm = bool(renorm)
        self.renorm_clipping = validation.validate_renorm_clipping(renorm_clipping)
        self.renorm_momentum = validation.validate_momentum(
            renorm_momentum, "renorm_momentum"
        )
        self.synchronized = bool(synchronized)
        self.debias = validation.validate_debias(debias, self.momentum)
        self.unbiased_variance = bool(unbiased_variance)
        self.virtual_batch_size = validation.validate_virtual_batch_size(
            virtual_batch_size
        )
        self.fused = validation.validate_fused(fused)
        if self.domains > 1 and (self.renorm or self.fused):
            option = "renorm=True" if self.renorm else "fused=True"
            raise ValueError(
                f"`domains > 1` does not combine with `{option}`. Received: "
                f"domains={self.domains}, {option}"
            )
        fused_kernel.check_request(
            self.fused,
            self.epsilon,
            self.renorm,
            self.virtual_batch_size,
            self.synchronized,
        )
        self.supports_masking = True

        self.gamma = None
        self.beta = None
        self.moving_mean = None
        self.moving_variance = None
        self.num_batches = None
        self._renorm = None

    @property
    def statistics(self) -> str:
        """The statistics mode: `"update"`, `"frozen"` or `"batch"`.

        Setting it changes the layer at once in eager calls. A model's
        compiled functions (`fit`, `evaluate`, `predict` on TensorFlow and
        JAX) keep the mode they were traced with until rebuilt: change the
        modes of a model's layers with `bn_keras.set_statistics(model, mode)`,
        which rebuilds them. Setting it on a built layer directly warns so.
        """
        return self._statistics

    @statistics.setter
    def statistics(self, mode: str) -> None:
        mode = validation.validate_statistics(mode)
        if self.built and mode != self._statistics:
            warnings.warn(
                f"The statistics mode of {self.name!r} changes from "
                f"{self._statistics!r} to {mode!r} in eager calls; a model's "
                "fit/evaluate/predict functions compiled before keep the old "
                "mode. Use `bn_keras.set_statistics(model, mode)`, which also "
                "rebuilds them.",
                stacklevel=2,
            )
        self._statistics = mode

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
        axes = validation.resolve_axes(self.axis, rank, input_shape)
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
        statistics_axes = self._statistics_axes(axes)
        self._reduction_axes = tuple(i for i in range(rank) if i not in statistics_axes)
        self._param_shape = tuple(input_shape[a] for a in axes)
        self._broadcast_shape = tuple(
            input_shape[i] if i in axes else 1 for i in range(rank)
        )
        self._domain_shape = self._statistics_shape_for(self._param_shape)
        self._statistics_shape = self._per_domain(self._domain_shape)
        self._fused = fused_kernel.plan(
            self.fused,
            axes,
            statistics_axes,
            rank,
            self.epsilon,
            self.renorm,
            self.virtual_batch_size,
            self.synchronized,
        )
        if self.domains > 1:
            # The kernel takes one set of statistics per call.
            self._fused = fused_kernel.Plan()

        if self.scale:
            self.gamma = self._add_parameter(
                "gamma",
                self.gamma_initializer,
                self.gamma_regularizer,
                self.gamma_constraint,
            )
        if self.center:
            self.beta = self._add_parameter(
                "beta",
                self.beta_initializer,
                self.beta_regularizer,
                self.beta_constraint,
            )
        self.moving_mean = self._add_statistic(
            "moving_mean", self.moving_mean_initializer
        )
        self.moving_variance = self._add_statistic(
            "moving_variance", self.moving_variance_initializer
        )
        if self.renorm:
            self._renorm = renorm.Renorm(
                self._add_statistic,
                self.moving_mean_initializer,
                self.moving_variance_initializer,
                self.epsilon,
                self.renorm_momentum,
                self.renorm_clipping,
            )
            self.moving_stddev = self._renorm.moving_stddev
            self.renorm_mean = self._renorm.renorm_mean
            self.renorm_stddev = self._renorm.renorm_stddev
        if self._counts_batches:
            self.num_batches = self.add_weight(
                shape=self._counter_shape(),
                name="num_batches",
                initializer="zeros",
                dtype="int32",
                trainable=False,
                autocast=False,
                aggregation="only_first_replica",
            )
        self.input_spec = keras.layers.InputSpec(
            ndim=rank, axes={a: input_shape[a] for a in axes}
        )

    def _per_domain(self, shape):
        """`shape` with a leading axis of one entry per domain, if several."""
        return (self.domains,) + tuple(shape) if self.domains > 1 else tuple(shape)

    def _add_parameter(self, name, initializer, regularizer, constraint):
        shape = self._param_shape
        if self.per_domain_parameters:
            shape = self._per_domain(shape)
        return self.add_weight(
            shape=shape,
            name=name,
            initializer=initializer,
            regularizer=regularizer,
            constraint=constraint,
            trainable=True,
            autocast=False,
        )

    def _add_statistic(self, name, initializer):
        # Float32 under mixed precision (autocast=False), never trained. Under
        # a tf.distribute strategy, "mean" keeps the replicas' copies equal
        # (the mean of their updates, as tf-keras did); with Keras' default
        # each replica's copy drifts with its own slice, and saving keeps the
        # first one's. Other backends have one copy.
        return self.add_weight(
            shape=self._statistics_shape,
            name=name,
            initializer=initializer,
            trainable=False,
            autocast=False,
            aggregation="mean",
        )

    # Subclass hooks. `BatchNorm` keeps one population statistic per feature
    # and shares gamma/beta with it; a subclass may keep its statistics along
    # more axes than its parameters (`bn_keras.timestep.TimestepBatchNorm`:
    # one per timestep and feature, gamma/beta per feature) and still reuse
    # the batch moments, the guards and the averaging rules below.

    def _statistics_axes(self, axes):
        """The input axes not reduced by the batch moments (base: the `axis` axes)."""
        return axes

    def _statistics_shape_for(self, param_shape):
        """The shape of the population statistics (base: that of gamma/beta)."""
        return param_shape

    def _counter_shape(self):
        """The shape of `num_batches`: `()`, or one count per leading statistics axis.

        A counter of shape `(n, 1, ..., 1)` counts the batches that updated
        each of the `n` leading slices of the statistics separately, and its
        averaging rate broadcasts against them. Base: one count per domain
        when there are several.
        """
        if self.domains > 1:
            return (self.domains,) + (1,) * len(self._param_shape)
        return ()

    def _batch_statistics(self, batch_moments, ghosts):
        """The batch's `(mean, variance, ok)` in the statistics' shape.

        `ok` is False where the population statistics must stay as they are.
        """
        return statistics.batch_contribution(
            batch_moments, self._domain_shape, self.unbiased_variance, ghosts
        )

    def _population_statistics(self, x):
        """The population `(mean, variance)` that normalize `x` in inference.

        Base: `moving_mean` and `moving_variance`, one value per feature (and
        the backend's kernel where it applies). A subclass whose
        statistics vary along other axes returns them with the rank of `x`,
        broadcastable against it.
        """
        dtype = keras.backend.standardize_dtype(x.dtype)
        return (
            kernels.cast(self.moving_mean, dtype),
            kernels.cast(self.moving_variance, dtype),
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    def __call__(self, *args, **kwargs):
        # Before Keras' own conversion to the layer's dtype, which would drop
        # the imaginary part of a complex input.
        validation.check_real_input(args[0] if args else kwargs.get("inputs"))
        # Before JAX's conversion of an int64 array to int32 too.
        domains.check_array(kwargs.get("domain"), self.domains, self.name)
        return super().__call__(*args, **kwargs)

    def call(self, inputs, training=None, mask=None, domain=None):
        # At least float32 (as Keras), float64 kept: written out because
        # Keras' torch backend promotes float64 with float32 to float32.
        float64 = keras.backend.standardize_dtype(inputs.dtype) == "float64"
        x = self._check_features(
            kernels.cast(inputs, "float64" if float64 else "float32")
        )
        if mask is not None:
            # Validated in inference too: a wrong mask is a bug either way.
            mask = masking.broadcast_mask(mask, x)
        if self._domain_override is not None:
            domain = self._domain_override
        if self.domains > 1 or domain is not None:
            x, domain = domains.resolve(domain, self.domains, self.name, x)
        if self.domains == 1:
            domain = None
        if self._statistics == "batch":
            outputs = self._train_call(x, mask, update=False, domain=domain)
        elif training and self.trainable and self._statistics == "update":
            outputs = self._train_call(x, mask, domain=domain)
        else:
            # "frozen" in training too: gamma and beta get their gradients.
            outputs = self._inference_call(x, domain)
        return kernels.cast(outputs, self.compute_dtype)

    def _check_features(self, x):
        """`x`, checked to have the feature sizes the layer was built for.

        Keras' input spec misses a wrong size in some graphs (a `Sequential`
        model without an `Input`, fitted again on other data), where the
        error would come from a broadcast deep in the step: a `ValueError`
        where the size is known, an assertion that prints the shape where not.
        """
        for axis, size in zip(self._axes, self._param_shape, strict=True):

            def message(input_shape, axis=axis, size=size):
                return checks.features_message(self.name, axis, size, input_shape)

            if x.shape[axis] is not None:
                x = checks.require(x.shape[axis] == size, message, x)
            else:
                x = checks.require(ops.shape(x)[axis] == size, message, x)
                x = checks.with_size(x, axis, size)
        return x

    def _inference_call(self, x, domain=None):
        if domain is not None:
            return self._domain_inference_call(x, domain)
        mean, variance = self._population_statistics(x)
        if fused_kernel.in_inference(self._fused, x):
            outputs = fused_kernel.inference(
                x,
                self._fused.data_format,
                mean,
                variance,
                self._parameter(self.gamma, x.dtype),
                self._parameter(self.beta, x.dtype),
                self.epsilon,
            )
            if outputs is not None:
                return outputs
        if len(mean.shape) == len(self._param_shape):
            return normalize(
                x,
                self._axes,
                mean,
                variance,
                self._parameter(self.gamma, x.dtype),
                self._parameter(self.beta, x.dtype),
                self.epsilon,
            )
        return normalize_broadcast(
            x,
            mean,
            variance,
            self._parameter(self.gamma, x.dtype, self._broadcast_shape),
            self._parameter(self.beta, x.dtype, self._broadcast_shape),
            self.epsilon,
        )

    def _domain_inference_call(self, x, domain):
        """Inference with the statistics (and parameters) of `domain`'s set."""
        shape = self._broadcast_shape
        if domain.per_example:
            # (batch, features...) rows, one per example, against x.
            shape = (-1,) + shape[1:]

        def rows(variable, per_domain=True):
            if variable is None:
                return None
            if not per_domain:
                return ops.reshape(ops.cast(variable, x.dtype), self._broadcast_shape)
            return ops.reshape(domains.select(variable, domain, x.dtype), shape)

        own = self.per_domain_parameters
        return normalize_broadcast(
            x,
            rows(self.moving_mean),
            rows(self.moving_variance),
            rows(self.gamma, own),
            rows(self.beta, own),
            self.epsilon,
        )

    def _train_call(self, x, mask, update=True, domain=None):
        """Normalizes with the batch statistics; updates the population's if asked.

        Without the update (the `"batch"` mode) renorm's corrections, which
        pull toward the population statistics, are not applied either.
        """
        shape = ops.shape(x)
        batch = shape[0]
        x = checks.require(
            batch > 0,
            lambda shape: checks.empty_batch_message(shape, batch_mode=not update),
            x,
        )
        inputs = x
        if fused_kernel.in_training(self._fused, x, mask):
            return self._fused_train_call(x, update)
        if domain is not None:
            x, domain = domains.for_training(domain, self.name, x)
        ghosts = self.virtual_batch_size is not None
        reduction_axes, broadcast_shape = self._reduction_axes, self._broadcast_shape
        if ghosts:
            x, mask = virtual_batch.split(x, mask, self.virtual_batch_size)
            reduction_axes, broadcast_shape = virtual_batch.axes(
                reduction_axes, broadcast_shape
            )

        if closed_form.applies(mask, ghosts, self.synchronized) and not (
            self.renorm and update
        ):
            return self._closed_form_train_call(x, inputs, update, domain)

        batch_moments = moments(x, reduction_axes, mask, self.synchronized)
        count = self._most_values_per_feature(x, reduction_axes, batch_moments, mask)
        if count is not None:

            def message(input_shape):
                return checks.single_value_message(
                    input_shape,
                    self._reduction_axes,
                    self.virtual_batch_size,
                    batch_mode=not update,
                )

            x = checks.require(count > 1, message, x, shapes=(inputs,))

        mean = batch_moments.mean + batch_moments.shift
        variance = batch_moments.variance
        gamma = self._parameter(self.gamma, x.dtype, broadcast_shape, domain)
        beta = self._parameter(self.beta, x.dtype, broadcast_shape, domain)
        if self.renorm and update:
            r, d = self._renorm.correction(mean, variance, broadcast_shape)
            gamma, beta = renorm.compose(r, d, gamma, beta)
        if update:
            self._update_statistics(batch_moments, ghosts, domain)

        # Folded around the shift: `(x - shift) * a + b` adds no op and does
        # not cancel large terms when the mean is large.
        multiplier, offset = fold_centered(batch_moments, gamma, beta, self.epsilon)
        outputs = batch_moments.centered * multiplier + offset
        return virtual_batch.merge(outputs, shape) if ghosts else outputs

    def _closed_form_train_call(self, x, inputs, update, domain):
        """`_train_call` through `bn_keras.closed_form` (no mask, ghosts, sync)."""
        count = static_count(x, self._reduction_axes)

        def message(input_shape):
            return checks.single_value_message(
                input_shape, self._reduction_axes, None, batch_mode=not update
            )

        x = checks.require(count > 1, message, x, shapes=(inputs,))
        shape = self._broadcast_shape
        gamma = self._parameter(self.gamma, x.dtype, shape, domain)
        beta = self._parameter(self.beta, x.dtype, shape, domain)
        outputs, mean, variance = closed_form.train(
            x,
            self._reduction_axes,
            ops.ones(shape, x.dtype) if gamma is None else gamma,
            ops.zeros(shape, x.dtype) if beta is None else beta,
            self.epsilon,
        )
        if update:
            moments_ = Moments(None, mean, variance, count, 0.0)
            self._update_statistics(moments_, False, domain)
        return outputs

    def _fused_train_call(self, x, update):
        count = static_count(x, self._reduction_axes)

        def message(input_shape):
            return checks.single_value_message(
                input_shape, self._reduction_axes, None, batch_mode=not update
            )

        x = checks.require(count > 1, message, x)
        outputs, mean, variance = fused_kernel.train(
            x,
            self._fused.data_format,
            self._parameter(self.gamma, x.dtype),
            self._parameter(self.beta, x.dtype),
            self.epsilon,
        )
        if update:
            self._update_statistics(Moments(None, mean, variance, count, 0.0), False)
        return outputs

    def _most_values_per_feature(self, x, reduction_axes, batch_moments, mask):
        """How many values a feature can have in this batch, or None if unknown.

        At most one is a mistake (every output would equal beta). Without a
        mask it is the count itself; under a mask, the shape bounds it, and
        features that the mask leaves with one value only skip their update.
        Across replicas (`synchronized`) it is the global count.
        """
        count = batch_moments.count
        if mask is None:
            if isinstance(count, int) or len(count.shape) == 0:
                return count
            return ops.min(count)
        if self.synchronized:
            return None
        return static_count(x, reduction_axes)

    def _update_statistics(self, batch_moments, ghosts, domain=None):
        mean, variance, ok = self._batch_statistics(batch_moments, ghosts)
        if domain is not None:
            mean, variance, ok = domains.spread(
                mean, variance, ok, domain, self.domains
            )
        rate, keep = statistics.average_rate(
            self.momentum, self.debias, self.num_batches
        )
        if self._counts_batches:
            # A batch that updates no feature (of a counter's slice) does not count.
            used = statistics.any_updated(ok, self._counter_shape())
            self.num_batches.assign(self.num_batches + ops.cast(used, "int32"))
        statistics.assign_average(self.moving_mean, mean, rate, keep, ok)
        if self.renorm:
            # Derived from the updated moving_stddev: replaced, not averaged.
            variance = self._renorm.update(mean, variance, rate, keep, ok)
            statistics.assign_average(self.moving_variance, variance, 1.0, 0.0, ok)
        else:
            statistics.assign_average(self.moving_variance, variance, rate, keep, ok)

    def _parameter(self, variable, dtype, broadcast_shape=None, domain=None):
        """`gamma` or `beta` (None if off) cast, and shaped to broadcast if asked.

        Per-domain parameters: the row of `domain` (one domain per batch).
        """
        if variable is None:
            return None
        if self.per_domain_parameters and domain is not None:
            variable = domains.select(variable, domain, dtype)
        variable = kernels.cast(variable, keras.backend.standardize_dtype(dtype))
        if broadcast_shape is None:
            return variable
        return ops.reshape(variable, broadcast_shape)

    def load_own_variables(self, store):
        # A file saved with another number of domains: say so, rather than
        # Keras' shape mismatch of a variable.
        variables = self._trainable_variables + self._non_trainable_variables
        for i, variable in enumerate(variables):
            if variable is self.moving_mean and str(i) in store:
                saved = tuple(store[str(i)].shape)
                if saved != tuple(variable.shape):
                    raise ValueError(
                        f"The population statistics of {self.name} were saved "
                        f"with shape {saved}; this layer's have shape "
                        f"{tuple(variable.shape)} (domains={self.domains}, "
                        "features first after it). Build the layer with the "
                        "`domains` and features it was saved with to load them."
                    )
        super().load_own_variables(store)

    # Set by precise BN and the diagnosis around a run on one domain's data:
    # every call then uses that domain, whatever its `domain` argument.
    _domain_override = None

    # `fused=True` from a config loaded where the backend has no fused
    # kernel: the layer runs without it, and saves it again as asked.
    _fused_in_config = None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BatchNorm:
        """Creates a layer from its config (`get_config`'s output).

        A bad value or an unknown key raises a one-line `ValueError` that
        names the layer and quotes the constructor's reason ("Received:
        momentum=7.0"). Keras' own `from_config` would turn it into a
        `TypeError`, which `keras.saving` wraps in a long "could not be
        deserialized" message with the reason last; a `ValueError` reaches
        the user as it is, also from `keras.saving.load_model`.

        A config with `fused=True` loaded where the kernel cannot run (a
        model saved on TensorFlow or torch, loaded on JAX; one saved on
        torch with an epsilon below cuDNN's minimum or a float64 dtype,
        loaded on TensorFlow) gives a layer that runs without it, with a
        warning: `fused` changes the speed, not the results. Its
        `get_config` still says `fused=True`. Constructing
        `BatchNorm(fused=True)` there stays an error.
        """
        config = dict(config)
        if isinstance(config.get("dtype"), dict):
            policy = keras.dtype_policies.deserialize(config["dtype"])
            if (
                not isinstance(policy, keras.dtype_policies.DTypePolicyMap)
                and policy.quantization_mode is None
            ):
                policy = policy.name
            config["dtype"] = policy
        why = None
        if config.get("fused") is True:
            why = fused_kernel.unavailable_for_config(
                config.get("epsilon", 1e-3), config.get("dtype")
            )
        try:
            if why is None:
                return cls(**config)
            layer = cls(**{**config, "fused": None})
        except ValueError as error:
            raise ValueError(
                f"Cannot create {cls.__name__} layer {config.get('name')!r} from "
                f"its config: {error}"
            ) from error
        layer._fused_in_config = True
        warnings.warn(
            fused_kernel.loaded_elsewhere_warning(layer.name, why), stacklevel=2
        )
        return layer

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
            "fused": self.fused
            if self._fused_in_config is None
            else self._fused_in_config,
            "statistics": self._statistics,
            "domains": self.domains,
            "per_domain_parameters": self.per_domain_parameters,
        }
        return {**super().get_config(), **config}
