"""Recurrent batch normalization: population statistics per timestep.

Cooijmans et al., 2016, https://arxiv.org/abs/1603.09025: in a recurrent
network the distribution of a pre-activation changes over the sequence
(the state starts at zero and settles later), so one population statistic
for all timesteps normalizes most timesteps with the wrong mean and variance.
The statistics are kept per timestep up to `max_timesteps` (T_max); later
timesteps reuse those of T_max. Gamma and beta are shared across time.

`TimestepBatchNorm` is `BatchNorm` underneath: the population statistics
(momentum, `momentum=None`, `debias`, `unbiased_variance`, the guards against
non-finite and single-value batches, `recompute_statistics`) are `BatchNorm`'s,
through its subclass hooks. `bn_keras.lstm.BatchNormLSTM` normalizes with
three of them.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from bn_keras import checks, domains, statistics, validation
from bn_keras.batch_norm import BatchNorm
from bn_keras.moments import Moments, normalize_broadcast

# The axis of `(batch, time, ..., features)` inputs that holds the timesteps.
TIME_AXIS = 1


def empty_sequence_message(layer_name, input_shape):
    """The error for a training sequence without timesteps."""
    return (
        f"{layer_name} in training mode got a sequence of length 0 (input shape "
        f"{tuple(input_shape)}): there is no timestep to normalize with. Skip "
        "empty sequences, or call the layer with training=False."
    )


def _clamped_steps(steps, max_timesteps):
    """`min(t, max_timesteps - 1)` for `t` in `range(steps)`: the statistics' slot."""
    return ops.minimum(ops.arange(steps, dtype="int32"), max_timesteps - 1)


@keras.saving.register_keras_serializable(package="bn_keras")
class TimestepBatchNorm(BatchNorm):
    """Batch normalization with population statistics per timestep, shared gamma/beta.

    For inputs `(batch, time, ..., features)`, in training mode each timestep
    `t` is normalized with the moments of its own values over the batch (and
    any axes between time and the features),
    `gamma * (x[:, t] - mean_B[t]) / sqrt(var_B[t] + epsilon) + beta`, and the
    population statistics `moving_mean[t]` and `moving_variance[t]`, of shape
    `(max_timesteps, features...)`, are updated for `t < max_timesteps`. In
    inference mode each timestep has its own population statistics, clamped
    to the last slot:
    `gamma * (x[:, t] - moving_mean[s]) / sqrt(moving_variance[s] + epsilon)
    + beta` with `s = min(t, max_timesteps - 1)`. `gamma` and `beta` have
    the shape of the features, shared across time. (`BatchNorm(axis=(1, -1))`
    also keeps statistics per timestep, but with a gamma and beta per timestep
    and a fixed number of timesteps.)

    - Timesteps beyond `max_timesteps`: in inference they use the statistics
      of the last slot (timestep `max_timesteps - 1`, the paper's T_max). In
      training they are normalized with their own batch moments, as every
      timestep is, and their moments enter no population statistic: the last
      slot estimates timestep `max_timesteps - 1` alone.
    - Variable lengths: masked (padded) entries do not enter the batch moments
      of their timestep. A timestep that no sequence of the batch reaches, or
      only one, keeps its population statistics for that batch; with
      `momentum=None` or `debias=True` each timestep counts the batches that
      updated it (`num_batches` has shape `(max_timesteps, 1, ...)`). Pad at
      the end (`padding="post"`): the timestep is the position on the time
      axis.
    - The time dimension may be unknown until the layer runs (statistics are
      gathered with clamped indices, not sliced).
    - A sequence of length 0 raises a `ValueError` in training, as an empty
      batch does (inside a TensorFlow graph with an unknown length, an
      `InvalidArgumentError` with the same message when the step runs); in
      inference it gives an empty output.

    Everything else is `BatchNorm`'s: `momentum` (or `None`), `debias`,
    `unbiased_variance`, `virtual_batch_size`, `synchronized`, the protection
    of the population statistics against non-finite and single-value batches,
    and `bn_keras.recompute_statistics`. Batch renormalization is not
    supported.

    Args:
        max_timesteps: Positive integer, the number of timesteps with their
            own population statistics (T_max).
        axis: Integer or tuple of integers, the feature axis or axes; neither
            the batch axis 0 nor the time axis 1.
        **kwargs: `BatchNorm`'s arguments (`momentum`, `epsilon`, `center`,
            `scale`, initializers, regularizers, constraints, `debias`,
            `unbiased_variance`, `virtual_batch_size`, `synchronized`,
            `statistics`, `domains` (statistics of shape `(domains,
            max_timesteps, features...)`, and a `domain` call argument)) and
            the base layer's (`name`, `dtype`, ...).

    Call arguments:
        inputs: Tensor of shape `(batch, time, ..., features)`.
        training: Python boolean. `True` normalizes each timestep with its
            batch statistics and updates its population statistics (if the
            layer is trainable); `False` or `None` uses the population
            statistics. The `statistics` modes `"frozen"` and `"batch"`
            apply as in `BatchNorm`.
        mask: Optional boolean tensor, the input's shape without its last
            axis (Keras' convention, `(batch, time)` for 3-D inputs): masked
            entries do not enter the batch statistics.

    Reference:
        - [Cooijmans et al., 2016](https://arxiv.org/abs/1603.09025),
          "Recurrent Batch Normalization", Section 3.
        - [Ioffe & Szegedy, 2015](https://arxiv.org/abs/1502.03167).
    """

    def __init__(
        self, max_timesteps: int, axis: int | tuple[int, ...] = -1, **kwargs: Any
    ) -> None:
        if kwargs.get("renorm"):
            raise ValueError(
                "TimestepBatchNorm does not support batch renormalization. "
                f"Received: renorm={kwargs['renorm']!r}"
            )
        super().__init__(axis=axis, **kwargs)
        self.max_timesteps = validation.validate_positive_int(
            max_timesteps, "max_timesteps"
        )

    def build(self, input_shape):
        if len(input_shape) < 3:
            raise ValueError(
                "TimestepBatchNorm expects inputs of shape (batch, time, ..., "
                f"features), of rank 3 or more. Received: input_shape={input_shape}"
            )
        super().build(input_shape)

    def _train_call(self, x, mask, update=True, domain=None):
        steps = ops.shape(x)[TIME_AXIS]
        message = empty_sequence_message(type(self).__name__, x.shape)
        x = checks.require(steps > 0, message, x)
        return super()._train_call(x, mask, update, domain)

    def _statistics_axes(self, axes):
        if 0 in axes or TIME_AXIS in axes:
            raise ValueError(
                "The feature axis of TimestepBatchNorm can be neither the batch "
                f"axis 0 nor the time axis 1. Received: axis={self.axis}"
            )
        return (TIME_AXIS,) + tuple(axes)

    def _statistics_shape_for(self, param_shape):
        return (self.max_timesteps,) + tuple(param_shape)

    def _counter_shape(self):
        return self._per_domain((self.max_timesteps,) + (1,) * len(self._param_shape))

    def _batch_statistics(self, batch_moments, ghosts):
        # One row per timestep of the batch, then one per slot: timesteps
        # beyond the slots are dropped, slots beyond the batch's timesteps
        # are not reached (ok False), gathered with clamped indices so that
        # the number of timesteps may be known only at run time.
        per_step = (-1,) + tuple(self._param_shape)
        mean, variance, ok = statistics.batch_contribution(
            batch_moments, per_step, self.unbiased_variance, ghosts
        )
        steps = ops.shape(mean)[0]
        slots = ops.arange(self.max_timesteps, dtype="int32")
        index = ops.minimum(slots, steps - 1)
        reached = ops.reshape(
            slots < steps, (self.max_timesteps,) + (1,) * len(self._param_shape)
        )
        ok = ops.logical_and(ops.take(ok, index, axis=0), reached)
        return ops.take(mean, index, axis=0), ops.take(variance, index, axis=0), ok

    def _population_statistics(self, x):
        mean, variance = self.population_statistics_at(ops.shape(x)[TIME_AXIS])
        rank = len(x.shape)
        shape = [1] * rank
        shape[TIME_AXIS] = -1
        for a, size in zip(self._axes, self._param_shape, strict=True):
            shape[a] = size
        return (
            ops.reshape(ops.cast(mean, x.dtype), shape),
            ops.reshape(ops.cast(variance, x.dtype), shape),
        )

    def _domain_inference_call(self, x, domain):
        # Each example's domain set (batch, max_timesteps, features...) or
        # the one set, then its timesteps' slots, against x.
        index = _clamped_steps(ops.shape(x)[TIME_AXIS], self.max_timesteps)
        axis = 1 if domain.per_example else 0
        rank = len(x.shape)

        def rows(variable):
            values = ops.take(domains.select(variable, domain, x.dtype), index, axis)
            shape = [1] * rank
            if domain.per_example:
                shape[0], shape[TIME_AXIS] = -1, ops.shape(x)[TIME_AXIS]
            else:
                shape[TIME_AXIS] = -1
            for a, size in zip(self._axes, self._param_shape, strict=True):
                shape[a] = size
            return ops.reshape(values, shape)

        def parameter(variable):
            if variable is None:
                return None
            if not self.per_domain_parameters:
                return ops.reshape(ops.cast(variable, x.dtype), self._broadcast_shape)
            values = domains.select(variable, domain, x.dtype)
            if domain.per_example:
                return ops.reshape(values, (-1,) + self._broadcast_shape[1:])
            return ops.reshape(values, self._broadcast_shape)

        return normalize_broadcast(
            x,
            rows(self.moving_mean),
            rows(self.moving_variance),
            parameter(self.gamma),
            parameter(self.beta),
            self.epsilon,
        )

    def population_statistics_at(self, steps: Any) -> tuple[Any, Any]:
        """The population `(mean, variance)` of timesteps `0 .. steps - 1`.

        Args:
            steps: The number of timesteps, an int or a scalar tensor.

        Returns:
            `(mean, variance)`, each of shape `(steps, features...)`;
                timesteps from `max_timesteps` on get the statistics of the last
                slot.

        Raises:
            ValueError: With `domains > 1`, whose statistics have a set per
                domain.
        """
        if self.domains > 1:
            raise ValueError(
                f"{self.name} keeps {self.domains} sets of statistics; call the "
                "layer with `domain=` instead."
            )
        index = _clamped_steps(steps, self.max_timesteps)
        return (
            ops.take(self.moving_mean, index, axis=0),
            ops.take(self.moving_variance, index, axis=0),
        )

    def update_from_moments(self, mean: Any, variance: Any, count: Any) -> None:
        """Updates the population statistics from per-timestep batch moments.

        For a layer that computes its batch moments itself, one timestep at a
        time (the recurrent normalizations of `BatchNormLSTM`). The update is
        `BatchNorm`'s, with its guards and averaging rule.

        Args:
            mean: The batch mean of each timestep, `(steps, 1, features...)`.
            variance: The biased batch variance, of the same shape.
            count: The number of values per feature: an int, a scalar
                tensor, or one per timestep and feature under a mask.
        """
        self._update_statistics(Moments(None, mean, variance, count, 0.0), False)

    def load_own_variables(self, store):
        # A file saved with another max_timesteps: say so, rather than
        # Keras' shape mismatch of a variable.
        variables = self._trainable_variables + self._non_trainable_variables
        for i, variable in enumerate(variables):
            if variable is self.moving_mean and str(i) in store:
                saved = tuple(store[str(i)].shape)
                slot_axis = 1 if self.domains > 1 else 0
                if len(saved) > slot_axis and saved[slot_axis] != self.max_timesteps:
                    raise ValueError(
                        f"The population statistics of {self.name} were saved "
                        f"with max_timesteps={saved[slot_axis]} (moving_mean of "
                        f"shape {saved}); this layer has "
                        f"max_timesteps={self.max_timesteps}. Build it with "
                        f"max_timesteps={saved[slot_axis]} to load them."
                    )
        super().load_own_variables(store)

    def get_config(self):
        return {**super().get_config(), "max_timesteps": self.max_timesteps}
