"""The BN-LSTM: an LSTM with recurrent batch normalization (Cooijmans et al., 2016).

Reference: https://arxiv.org/abs/1603.09025. Its three normalizations are
`bn_keras.timestep.TimestepBatchNorm` sublayers, with per-timestep
population statistics; in training the recurrent and cell normalizations
take the batch moments of each step of the recurrence themselves, and hand
them to their sublayer's update at the end of the sequence.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import keras
import numpy as np
from keras import activations, initializers, ops, regularizers, tree

from bn_keras import checks, fused, validation
from bn_keras.timestep import TIME_AXIS, TimestepBatchNorm


class _TrainingCarry(NamedTuple):
    """What the training recurrence carries from a timestep to the next.

    The state `(h, c)` and the step's batch moments of the recurrent
    pre-activations (`h_*`, of `W_h h`) and of the cell (`c_*`), each
    `(1, features)`. Keras' TensorFlow scan stacks outputs shaped as the
    carry: the stacked moments feed the population statistics. The counts
    (values per feature under a mask) are `()`, no tensor, without a mask.
    """

    h: Any
    c: Any
    h_mean: Any
    h_variance: Any
    c_mean: Any
    c_variance: Any
    h_count: Any = ()
    c_count: Any = ()


def _step_moments(z, mask):
    """`(z - mean, mean, variance, count)` over the batch axis of one timestep.

    The batch moments of a recurrent pre-activation: `mask` (batch, 1) selects
    the sequences that reach the timestep. Written out rather than
    `bn_keras.moments.moments` (no shift, gradients through mean and variance
    alike): this runs at every step of the recurrence, where a lighter graph
    makes the backward pass markedly faster; the pre-activations' mean is of
    the size of their spread, so no shift is needed for accuracy.
    """
    # `centered * centered`, not `ops.square`: the same values, and under
    # JAX's gradient XLA saves fewer tensors per step (8% off a masked
    # training step on CPU; twice as fast a step when unmasked steps ran here).
    if mask is None:
        mean = ops.mean(z, axis=0, keepdims=True)
        centered = z - mean
        variance = ops.mean(centered * centered, axis=0, keepdims=True)
        return centered, mean, variance, None
    weights = ops.cast(mask, z.dtype)
    count = ops.sum(weights, axis=0, keepdims=True)
    # `where`: the state of a finished sequence may be anything.
    mean = ops.divide_no_nan(
        ops.sum(ops.where(mask, z, 0.0), axis=0, keepdims=True), count
    )
    centered = z - mean
    squares = ops.where(mask, centered * centered, 0.0)
    variance = ops.divide_no_nan(ops.sum(squares, axis=0, keepdims=True), count)
    return centered, mean, variance, count


class _Weights(NamedTuple):
    """The float32 weights of the unmasked training recurrence.

    The gammas are None where a normalization has no scale; `epsilons` are
    those of the input, recurrent and cell normalizations.
    """

    kernel: Any
    recurrent_kernel: Any
    bias: Any
    gamma_x: Any
    gamma_h: Any
    gamma_c: Any
    beta_c: Any
    epsilons: tuple


def _batch_reducers(x):
    """`(ones, ones / batch, batch)`: the rows whose matmuls sum and average.

    For `_normalized` over the batch of `x`; `batch` is a float, or a scalar
    tensor in a TensorFlow graph that knows it only when it runs. Built
    once, outside the recurrence's loop.
    """
    batch = x.shape[0]
    if batch is None:
        ones = ops.ones((1, ops.shape(x)[0]))
        batch = ops.cast(ops.shape(x)[0], "float32")
    else:
        # NumPy constants: JAX's gradient rule cannot close over a tracer.
        ones = np.ones((1, batch), "float32")
        batch = float(batch)
    return ones, ones / batch, batch


def _normalized(z, gamma, beta, epsilon, reducers):
    """`(gamma * (z - mean) / sqrt(variance + epsilon) + beta, mean, variance)`.

    The batch moments of `z` (batch, features), each `(1, features)`, as
    are gamma and beta (None for 0); `reducers` are `_batch_reducers`'. The
    step of the unmasked recurrence on TensorFlow and JAX: the moments are
    `(1, batch) @ (batch, features)` matmuls (a third of the time of
    TensorFlow's sums over the batch axis, with oneDNN; fewer of XLA's CPU
    kernels), and the gradient is written out (two thirds of the ops of
    TensorFlow's own, fewer tensors saved per step on both). The moments
    carry no gradient: they feed the population statistics only.
    """
    summer, averager, batch = reducers

    def forward(z, gamma):
        mean = ops.matmul(averager, z)
        centered = z - mean
        variance = ops.matmul(averager, centered * centered)
        inverse = ops.rsqrt(variance + epsilon)

        def gradient(*upstream):
            # TensorFlow passes one upstream gradient per output, JAX a tuple.
            upstream = tree.flatten(upstream)[0]
            d_beta = ops.matmul(summer, upstream)
            d_gamma = ops.matmul(summer, upstream * centered) * inverse
            correction = (d_beta + centered * (d_gamma * inverse)) / batch
            return (upstream - correction) * (inverse * gamma), d_gamma, d_beta

        return centered * (inverse * gamma), mean, variance, gradient

    @ops.custom_gradient
    def without_beta(z, gamma):
        outputs, mean, variance, gradient = forward(z, gamma)
        return (outputs, mean, variance), lambda *d: gradient(*d)[:2]

    @ops.custom_gradient
    def with_beta(z, gamma, beta):
        outputs, mean, variance, gradient = forward(z, gamma)
        return (outputs + beta, mean, variance), gradient

    if gamma is None:
        gamma = ops.ones((1, z.shape[-1]))
    if beta is None:
        return without_beta(z, gamma)
    return with_beta(z, gamma, beta)


def _as_rows(w):
    """`w` with its vectors as `(1, features)` rows, for `_normalized`."""
    return w._replace(
        **{
            name: ops.reshape(getattr(w, name), (1, -1))
            for name in ("bias", "gamma_x", "gamma_h", "gamma_c", "beta_c")
            if getattr(w, name) is not None
        }
    )


def _shifted(x, kernel):
    """`x` less its first sequence, and the `x_t W_x` of that sequence.

    The input pre-activations' mean may be far from 0 (the recurrent ones'
    is not, see `_step_moments`): their moments are taken less one of their
    values, as in `bn_keras.moments`, the inputs being shifted outside the
    loop, before the matmul: the same, the kernel being linear, and more
    accurate (in float32 the pre-activations themselves lose the spread's
    digits to the mean's). The normalization does not change; the shift is
    added back to the means, of shape `(time, 1, 4 * units)`.
    """
    first = ops.stop_gradient(x[:1])
    return x - first, ops.transpose(ops.matmul(first, kernel), (1, 0, 2))


def _step(x_t, h, c, w, activation, gate, reducers):
    """One step of the unmasked training recurrence (TensorFlow, JAX).

    The three normalizations of the step with their batch moments. Returns
    the new `(h, c)` and the moments `(input, recurrent, cell)`, each
    `(mean, variance)` of shape `(1, features)`.
    """
    eps_x, eps_h, eps_c = w.epsilons
    gates, x_mean, x_variance = _normalized(
        ops.matmul(x_t, w.kernel), w.gamma_x, w.bias, eps_x, reducers
    )
    gates_h, h_mean, h_variance = _normalized(
        ops.matmul(h, w.recurrent_kernel), w.gamma_h, None, eps_h, reducers
    )
    i, f, g, o = ops.split(gates + gates_h, 4, axis=-1)
    c = gate(f) * c + gate(i) * activation(g)
    normalized_c, c_mean, c_variance = _normalized(
        c, w.gamma_c, w.beta_c, eps_c, reducers
    )
    h = gate(o) * activation(normalized_c)
    moments = ((x_mean, x_variance), (h_mean, h_variance), (c_mean, c_variance))
    return h, c, moments


def _scan_recurrence(x, state, w, activation, gate, sequences):
    """`_unmasked_train_recurrence` as one `keras.ops.scan` (used on JAX)."""
    x, shift = _shifted(x, w.kernel)
    w, reducers = _as_rows(w), _batch_reducers(x)

    def step(carry, x_t):
        h, c, moments = _step(x_t, *carry, w, activation, gate, reducers)
        return (h, c), (h if sequences else None, moments)

    (h, c), (sequence, moments) = ops.scan(step, state, ops.transpose(x, (1, 0, 2)))
    (x_mean, x_variance), *moments = moments
    return sequence, h, c, ((x_mean + shift, x_variance), *moments)


def _tensorflow_recurrence(x, state, w, activation, gate, sequences):
    """`_unmasked_train_recurrence` as a `tf.while_loop` over `_step`.

    The loop carries the state alone (Keras' `scan` passes its carry
    through TensorArrays, a read and a write per tensor and step) and
    stacks the step's moments as one tensor; no list it does not write (XLA
    cannot differentiate a loop that carries one).
    """
    import tensorflow as tf

    steps = x.shape[TIME_AXIS] or tf.shape(x)[TIME_AXIS]
    units = w.recurrent_kernel.shape[0]
    sizes = [4 * units] * 4 + [units] * 2
    x, shift = _shifted(x, w.kernel)
    w, reducers = _as_rows(w), _batch_reducers(x)
    inputs = tf.TensorArray(tf.float32, size=steps).unstack(tf.transpose(x, (1, 0, 2)))

    def body(t, h, c, moments, *outputs):
        h, c, step_moments = _step(inputs.read(t), h, c, w, activation, gate, reducers)
        step_moments = tf.stop_gradient(tf.concat(tf.nest.flatten(step_moments), -1))
        outputs = tuple(sequence.write(t, h) for sequence in outputs)
        return t + 1, h, c, moments.write(t, step_moments), *outputs

    moments = tf.TensorArray(tf.float32, size=steps, element_shape=(1, sum(sizes)))
    outputs = (tf.TensorArray(tf.float32, size=steps),) if sequences else ()
    _, h, c, moments, *outputs = tf.while_loop(
        lambda t, *_: t < steps,
        body,
        (tf.constant(0), *state, moments, *outputs),
        maximum_iterations=steps,
    )
    x_mean, *moments = tf.split(moments.stack(), sizes, -1)
    moments = [x_mean + shift, *moments]
    moments = tuple(zip(moments[::2], moments[1::2], strict=True))
    return outputs[0].stack() if sequences else None, h, c, moments


def _torch_recurrence(x, state, w, activation, gate, sequences):
    """`_unmasked_train_recurrence` with `native_batch_norm`, in direct torch calls.

    Eager torch pays Keras' dispatch (5 to 25 microseconds) on every
    `keras.ops` call; this loop makes about a dozen torch calls per step,
    as Keras' own LSTM on torch. The input pre-activations are split into
    timesteps by `unbind`, whose gradient is one `stack` (indexing would
    give each timestep a gradient of the size of the whole sequence).
    """
    import torch

    eps_x, eps_h, eps_c = w.epsilons
    batch, steps, features = x.shape
    units = w.recurrent_kernel.shape[0]
    activation, gate = _torch_function(activation), _torch_function(gate)
    x, shift = _shifted(x, w.kernel)
    gates = torch.matmul(x.reshape(-1, features), w.kernel)
    gamma_x = None if w.gamma_x is None else w.gamma_x.repeat(steps)
    gates, x_mean, x_variance = fused.train(
        gates.reshape(batch, steps * 4 * units),
        "NHWC",
        gamma_x,
        w.bias.repeat(steps),
        eps_x,
    )
    h, c = state
    outputs, moments = [], ([], [], [], [])
    for gates_t in gates.reshape(batch, steps, 4 * units).unbind(1):
        gates_h, h_mean, h_inverse = torch.native_batch_norm(
            torch.matmul(h, w.recurrent_kernel),
            w.gamma_h,
            None,
            None,
            None,
            True,
            0.0,
            eps_h,
        )
        i, f, g, o = (gates_t + gates_h).chunk(4, 1)
        c = torch.addcmul(gate(f) * c, gate(i), activation(g))
        normalized_c, c_mean, c_inverse = torch.native_batch_norm(
            c, w.gamma_c, w.beta_c, None, None, True, 0.0, eps_c
        )
        h = gate(o) * activation(normalized_c)
        outputs.append(h)
        for values, value in zip(
            moments, (h_mean, h_inverse, c_mean, c_inverse), strict=True
        ):
            values.append(value)
    h_mean, h_inverse, c_mean, c_inverse = (
        torch.stack(values).unsqueeze(1) for values in moments
    )
    # The kernel returns 1 / sqrt(var + eps) (rounding can make var < 0).
    moments = (
        (x_mean.reshape(steps, 1, -1) + shift, x_variance.reshape(steps, 1, -1)),
        (h_mean, torch.clamp(h_inverse**-2 - eps_h, min=0.0)),
        (c_mean, torch.clamp(c_inverse**-2 - eps_c, min=0.0)),
    )
    return torch.stack(outputs) if sequences else None, h, c, moments


def _torch_function(activation):
    """torch's own function for Keras' `tanh` and `sigmoid`, without dispatch."""
    import torch

    known = {activations.tanh: torch.tanh, activations.sigmoid: torch.sigmoid}
    return known.get(activation, activation)


# `BatchNormLSTM._unmasked_train_recurrence` by backend; elsewhere (and
# under a mask) the layer runs `input_norm` and `_train_recurrence`.
_UNMASKED_RECURRENCES = {
    "tensorflow": _tensorflow_recurrence,
    "jax": _scan_recurrence,
    "torch": _torch_recurrence,
}


@keras.saving.register_keras_serializable(package="bn_keras")
class BatchNormLSTM(keras.layers.Layer):
    """LSTM with recurrent batch normalization and per-timestep statistics.

    The BN-LSTM of Cooijmans et al. (2016). The input-to-hidden and the
    hidden-to-hidden pre-activations are batch-normalized separately, and so is
    the cell state before the output activation:

    `(i, f, g, o) = BN(W_x x_t; gamma_x) + BN(W_h h_{t-1}; gamma_h) + b`,
    `c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)`,
    `h_t = sigmoid(o) * tanh(BN(c_t; gamma_c, beta_c))`,

    where `BN(z; gamma, beta) = gamma * (z - mean) / sqrt(var + epsilon) +
    beta`. The two gate normalizations have no beta (the bias `b` is their
    shift); the cell normalization has its own `beta_c`. Each normalization is
    a `TimestepBatchNorm` sublayer (`input_norm`, `recurrent_norm`,
    `cell_norm`) with population statistics of shape `(max_timesteps, 4 *
    units)` or `(max_timesteps, units)`: in training mode every timestep is
    normalized with its batch moments (over the sequences that reach it) and
    updates its own statistics; in inference mode timestep `t` uses the
    statistics of slot `min(t, max_timesteps - 1)`. The gammas start at 0.1,
    as in the paper, which keeps the tanh and sigmoid away from saturation.

    It is used like `keras.layers.LSTM`: `return_sequences`, `return_state`,
    `go_backwards`, masks (a masked timestep keeps the state and does not
    enter the batch statistics; pad at the end), `initial_state`, stacking and
    `.keras` saving. The timestep of the statistics is the position in the
    order of processing (reversed with `go_backwards`). Training without a
    mask runs each backend's fastest form of the recurrence (a
    `tf.while_loop`, `jax.lax.scan`, or a loop of torch calls; see
    `benchmarks/bench_recurrent.py`), any other call `keras.ops.scan`, with
    the same results. Dropout, `stateful` and `unroll` are not supported.

    Inputs are checked as Keras' `LSTM` would want them, with an error that
    names what is wrong: a sequence of length 0 raises a `ValueError` in
    training and inference alike (Keras' `LSTM` fails on it on every backend;
    there is no last state to return), as do an `initial_state` that is not
    two tensors of shape `(batch, units)`, a mask that is not `(batch, time)`
    and a feature size other than the one the layer was built with.

    Args:
        units: Positive integer, the dimension of the state.
        max_timesteps: Positive integer, the number of timesteps with their
            own population statistics (T_max); the sequence length if fixed.
        activation: Activation of the cell input and output (`tanh`).
        recurrent_activation: Activation of the gates (`sigmoid`).
        kernel_initializer: Initializer of the input kernel `W_x`.
        recurrent_initializer: Initializer of the recurrent kernel `W_h`.
        bias_initializer: Initializer of the bias `b`.
        unit_forget_bias: If `True`, add 1 to the forget gate's bias at
            initialization (as Keras' LSTM).
        gamma_initializer: Initializer of the three gammas; `None` for the
            paper's constant 0.1.
        kernel_regularizer: Optional regularizer of `W_x`.
        recurrent_regularizer: Optional regularizer of `W_h`.
        bias_regularizer: Optional regularizer of `b`.
        momentum: Momentum of the population statistics' moving average, or
            `None` for the cumulative average (see `BatchNorm`).
        epsilon: Small positive float added to the variances.
        debias: Zero-debias the moving average (see `BatchNorm`).
        unbiased_variance: Update the population variances with the unbiased
            batch variances (see `BatchNorm`).
        return_sequences: Return the output of every timestep, not only the
            last.
        return_state: Also return the last state `h` and cell `c`.
        go_backwards: Process the sequence backwards and return the reversed
            sequence.
        statistics: `"update"`, `"frozen"` or `"batch"`, the statistics mode
            of the three normalizations (see `BatchNorm`): `"frozen"` runs
            the inference recurrence in training too, `"batch"` the training
            recurrence in inference too, and neither updates the population
            statistics. Also a settable attribute.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Call arguments:
        sequences: Tensor of shape `(batch, time, features)`, `time >= 1`.
        initial_state: Optional list `[h, c]` of tensors `(batch, units)`.
        mask: Optional boolean tensor `(batch, time)`: False for padding.
        training: Python boolean, batch statistics (`True`) or population
            statistics, in the default `"update"` mode.

    Reference:
        - [Cooijmans et al., 2016](https://arxiv.org/abs/1603.09025),
          "Recurrent Batch Normalization", equations (6) to (8).
        - [Hochreiter & Schmidhuber, 1997](https://doi.org/10.1162/neco.1997.9.8.1735).
    """

    def __init__(
        self,
        units: int,
        max_timesteps: int,
        activation: Any = "tanh",
        recurrent_activation: Any = "sigmoid",
        kernel_initializer: Any = "glorot_uniform",
        recurrent_initializer: Any = "orthogonal",
        bias_initializer: Any = "zeros",
        unit_forget_bias: bool = True,
        gamma_initializer: Any = None,
        kernel_regularizer: Any = None,
        recurrent_regularizer: Any = None,
        bias_regularizer: Any = None,
        momentum: float | None = 0.99,
        epsilon: float = 1e-3,
        debias: bool = False,
        unbiased_variance: bool = False,
        return_sequences: bool = False,
        return_state: bool = False,
        go_backwards: bool = False,
        statistics: str = "update",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.units = validation.validate_positive_int(units, "units")
        self.max_timesteps = validation.validate_positive_int(
            max_timesteps, "max_timesteps"
        )
        self.activation = activations.get(activation)
        self.recurrent_activation = activations.get(recurrent_activation)
        self.kernel_initializer = initializers.get(kernel_initializer)
        self.recurrent_initializer = initializers.get(recurrent_initializer)
        self.bias_initializer = initializers.get(bias_initializer)
        self.unit_forget_bias = bool(unit_forget_bias)
        self.gamma_initializer = initializers.get(
            initializers.Constant(0.1)
            if gamma_initializer is None
            else gamma_initializer
        )
        self.kernel_regularizer = regularizers.get(kernel_regularizer)
        self.recurrent_regularizer = regularizers.get(recurrent_regularizer)
        self.bias_regularizer = regularizers.get(bias_regularizer)
        self.return_sequences = bool(return_sequences)
        self.return_state = bool(return_state)
        self.go_backwards = bool(go_backwards)
        self.supports_masking = True

        def norm(name, center):
            return TimestepBatchNorm(
                self.max_timesteps,
                momentum=momentum,
                epsilon=epsilon,
                center=center,
                gamma_initializer=validation.clone_initializer(self.gamma_initializer),
                debias=debias,
                unbiased_variance=unbiased_variance,
                statistics=statistics,
                name=name,
                dtype=self.dtype_policy,
            )

        # Validates momentum, epsilon and debias as BatchNorm does.
        self.input_norm = norm("input_norm", center=False)
        self.recurrent_norm = norm("recurrent_norm", center=False)
        self.cell_norm = norm("cell_norm", center=True)
        self.kernel = None
        self.recurrent_kernel = None
        self.bias = None

    @property
    def statistics(self) -> str:
        """The statistics mode of the three normalizations (see `BatchNorm`).

        `None` if they were given different modes one by one, which the layer
        refuses to run with.
        """
        modes = {norm.statistics for norm in self._norms}
        return modes.pop() if len(modes) == 1 else None

    @statistics.setter
    def statistics(self, mode: str) -> None:
        # One warning (BatchNorm's) for the three normalizations.
        self.input_norm.statistics = mode
        for norm in self._norms:
            norm._statistics = self.input_norm.statistics

    def _mode(self):
        """The statistics mode, or a `ValueError` if the normalizations differ."""
        mode = self.statistics
        if mode is None:
            found = ", ".join(f"{n.name}={n.statistics!r}" for n in self._norms)
            raise ValueError(
                f"The normalizations of {self.name!r} have different statistics "
                f"modes ({found}); the recurrence takes one: set `statistics` on "
                "the BatchNormLSTM layer, or use `bn_keras.set_statistics`."
            )
        return mode

    @property
    def _norms(self):
        return (self.input_norm, self.recurrent_norm, self.cell_norm)

    def build(self, sequences_shape, initial_state_shape=None):
        if len(sequences_shape) != 3 or sequences_shape[-1] is None:
            raise ValueError(
                "BatchNormLSTM expects inputs of shape (batch, time, features) "
                f"with known features. Received: input_shape={sequences_shape}"
            )
        units = self.units
        self.kernel = self.add_weight(
            shape=(sequences_shape[-1], 4 * units),
            name="kernel",
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
        )
        self.recurrent_kernel = self.add_weight(
            shape=(units, 4 * units),
            name="recurrent_kernel",
            initializer=self.recurrent_initializer,
            regularizer=self.recurrent_regularizer,
        )
        if self.unit_forget_bias:

            def bias_initializer(_, *args, **kwargs):
                return ops.concatenate(
                    [
                        self.bias_initializer((units,), *args, **kwargs),
                        initializers.get("ones")((units,), *args, **kwargs),
                        self.bias_initializer((2 * units,), *args, **kwargs),
                    ]
                )

        else:
            bias_initializer = self.bias_initializer
        self.bias = self.add_weight(
            shape=(4 * units,),
            name="bias",
            initializer=bias_initializer,
            regularizer=self.bias_regularizer,
        )
        self.input_spec = keras.InputSpec(ndim=3, axes={-1: sequences_shape[-1]})
        self.input_norm.build((None, None, 4 * units))
        self.recurrent_norm.build((None, None, 4 * units))
        self.cell_norm.build((None, None, units))

    def compute_output_shape(self, sequences_shape, initial_state_shape=None):
        batch, length = sequences_shape[0], sequences_shape[1]
        if self.return_sequences:
            output_shape = (batch, length, self.units)
        else:
            output_shape = (batch, self.units)
        if self.return_state:
            return output_shape, (batch, self.units), (batch, self.units)
        return output_shape

    def compute_mask(self, _, mask):
        if isinstance(mask, (list, tuple)):
            mask = mask[0]
        output_mask = mask if self.return_sequences else None
        if self.return_state:
            return [output_mask, None, None]
        return output_mask

    def call(self, sequences, initial_state=None, mask=None, training=False):
        x = self._check_length(ops.cast(sequences, "float32"))
        if isinstance(mask, (list, tuple)):
            mask = mask[0]
        if mask is not None:
            mask = ops.cast(self._check_mask(mask, x), "bool")
        if self.go_backwards:
            x = ops.flip(x, axis=TIME_AXIS)
            if mask is not None:
                mask = ops.flip(mask, axis=TIME_AXIS)
        mode = self._mode()
        train = bool(training) and self.trainable
        batch_statistics = mode == "batch" or (train and mode == "update")
        batch = x.shape[0] if x.shape[0] is not None else ops.shape(x)[0]
        if batch_statistics:
            x = checks.require(batch > 0, checks.empty_batch_message(x.shape), x)

        if initial_state is None:
            h = ops.zeros((batch, self.units), "float32")
            state = (h, h)
        else:
            state = self._check_initial_state(initial_state, x)
        if (
            batch_statistics
            and mask is None
            and keras.backend.backend() in _UNMASKED_RECURRENCES
        ):
            sequence, h, c = self._unmasked_train_recurrence(
                x, state, batch, update=mode == "update"
            )
        else:
            # The input-to-hidden pre-activations of all timesteps at once.
            gates_x = self.input_norm(
                ops.matmul(x, ops.cast(self.kernel, "float32")),
                training=train,
                mask=mask,
            )
            gates_x = ops.cast(gates_x, "float32") + ops.cast(self.bias, "float32")
            # Time-major for the scan; the mask as (time, batch, 1).
            xs = [ops.transpose(gates_x, (1, 0, 2))]
            if mask is not None:
                xs.append(ops.expand_dims(ops.transpose(mask, (1, 0)), -1))
            if batch_statistics:
                sequence, h, c = self._train_recurrence(
                    state, xs, mask, batch, update=mode == "update"
                )
            else:
                sequence, h, c = self._inference_recurrence(state, xs, mask)

        if self.return_sequences:
            output = ops.transpose(sequence, (1, 0, 2))
        else:
            output = h
        output = ops.cast(output, self.compute_dtype)
        if self.return_state:
            return [
                output,
                ops.cast(h, self.compute_dtype),
                ops.cast(c, self.compute_dtype),
            ]
        return output

    def _check_length(self, x):
        steps = x.shape[TIME_AXIS]
        if steps is None:
            steps = ops.shape(x)[TIME_AXIS]
        message = (
            "BatchNormLSTM expects sequences of at least one timestep, as "
            "keras.layers.LSTM does: a sequence of length 0 has no last state. "
            f"Received: input shape {tuple(x.shape)}"
        )
        return checks.require(steps > 0, message, x)

    def _check_mask(self, mask, x):
        mask = ops.convert_to_tensor(mask)
        expected = tuple(x.shape[:2])
        received = tuple(mask.shape)
        if len(received) != 2 or any(
            m is not None and e is not None and m != e
            for m, e in zip(received, expected, strict=True)
        ):
            raise ValueError(
                "BatchNormLSTM's mask must have the shape (batch, time) of its "
                f"inputs, {expected}. Received: mask.shape={received}, "
                f"inputs.shape={tuple(x.shape)}"
            )
        return mask

    def _check_initial_state(self, initial_state, x):
        """`initial_state` as two float32 tensors `(batch, units)`, or a ValueError."""
        expected = (x.shape[0], self.units)
        usage = (
            "BatchNormLSTM's `initial_state` must be a list [h, c] of two "
            f"tensors of shape (batch, units) = {expected}. Received: "
        )
        if not isinstance(initial_state, (list, tuple)):
            shape = tuple(getattr(initial_state, "shape", ()))
            raise ValueError(f"{usage}initial_state of shape {shape}, not a list")
        if len(initial_state) != 2 or any(s is None for s in initial_state):
            received = [
                None if s is None else tuple(getattr(s, "shape", ()))
                for s in initial_state
            ]
            raise ValueError(f"{usage}initial_state shapes {received}")
        states = [ops.convert_to_tensor(s) for s in initial_state]
        shapes = [tuple(s.shape) for s in states]
        if any(
            len(shape) != 2
            or shape[1] != self.units
            or (None not in (shape[0], expected[0]) and shape[0] != expected[0])
            for shape in shapes
        ):
            raise ValueError(f"{usage}initial_state shapes {shapes}")
        if None in (shapes[0][0], shapes[1][0], expected[0]):
            # Batch sizes known only when the graph runs.
            batch = ops.shape(x)[0]
            message = (
                f"{usage}initial_state shapes {shapes}, whose batch size is not "
                "the inputs'"
            )
            states = [
                checks.require(ops.shape(s)[0] == batch, message, s) for s in states
            ]
        return tuple(ops.cast(s, "float32") for s in states)

    def _weights(self):
        def value(variable):
            return None if variable is None else ops.cast(variable, "float32")

        return (
            value(self.recurrent_kernel),
            value(self.recurrent_norm.gamma),
            value(self.cell_norm.gamma),
            value(self.cell_norm.beta),
        )

    def _cell(self, gates, c):
        """The new cell state and the output gate from the gates' pre-activations."""
        i, f, g, o = ops.split(gates, 4, axis=-1)
        act, gate = self.activation, self.recurrent_activation
        return gate(f) * c + gate(i) * act(g), gate(o)

    def _train_recurrence(self, state, xs, mask, batch, update=True):
        recurrent_kernel, gamma_h, gamma_c, beta_c = self._weights()
        masked = mask is not None

        def step(carry, inputs):
            h, c = carry.h, carry.c
            gates_x = inputs[0]
            step_mask = inputs[1] if masked else None
            h_centered, h_mean, h_variance, h_count = _step_moments(
                ops.matmul(h, recurrent_kernel), step_mask
            )
            multiplier = ops.rsqrt(h_variance + self.recurrent_norm.epsilon)
            new_c, output_gate = self._cell(
                gates_x + h_centered * (multiplier * gamma_h), c
            )
            c_centered, c_mean, c_variance, c_count = _step_moments(new_c, step_mask)
            multiplier = ops.rsqrt(c_variance + self.cell_norm.epsilon)
            normalized_c = c_centered * (multiplier * gamma_c)
            if beta_c is not None:
                normalized_c = normalized_c + beta_c
            new_h = output_gate * self.activation(normalized_c)
            counts = ()
            if masked:
                new_h = ops.where(step_mask, new_h, h)
                new_c = ops.where(step_mask, new_c, c)
                counts = (h_count, c_count)
            carried = _TrainingCarry(
                new_h, new_c, h_mean, h_variance, c_mean, c_variance, *counts
            )
            return carried, carried

        units = self.units
        counts = (ops.zeros((1, 1)), ops.zeros((1, 1))) if masked else ()
        init = _TrainingCarry(
            *state,
            ops.zeros((1, 4 * units)),
            ops.zeros((1, 4 * units)),
            ops.zeros((1, units)),
            ops.zeros((1, units)),
            *counts,
        )
        last, stacked = ops.scan(step, init, tuple(xs))
        if not update:
            return stacked.h, last.h, last.c
        if masked:
            h_count, c_count = stacked.h_count, stacked.c_count
        else:
            h_count = c_count = batch
        self.recurrent_norm.update_from_moments(
            stacked.h_mean, stacked.h_variance, h_count
        )
        self.cell_norm.update_from_moments(stacked.c_mean, stacked.c_variance, c_count)
        return stacked.h, last.h, last.c

    def _unmasked_train_recurrence(self, x, state, batch, update=True):
        """The training recurrence without a mask, in the backend's fastest form.

        The same maths as `input_norm` followed by `_train_recurrence`, in
        fewer operations per timestep (see `benchmarks/bench_recurrent.py`):

        - TensorFlow and JAX: the input normalization moves into the step
          (over the hoisted `(time, batch, 4 * units)` pre-activations,
          passing them and their gradient through the loop costs more than
          normalizing them there), and the three normalizations take their
          moments as matmuls and have their gradient written out
          (`_normalized`); TensorFlow's loop is a `tf.while_loop` that
          carries only the state.
        - torch: the input normalization of all timesteps is one
          `native_batch_norm` over `(batch, time * 4 * units)` (each
          timestep's features are channels of their own), the two per-step
          ones too, in a loop of direct torch calls.

        Args:
            x: The float32 sequences, `(batch, time, features)`.
            state: The initial `(h, c)`.
            batch: The batch size, an int or a scalar tensor.
            update: Whether to update the population statistics.

        Returns:
            `(sequence, h, c)`: the time-major outputs (None unless
                `return_sequences`), the last state and cell.
        """
        message = checks.single_value_message(
            (x.shape[0], x.shape[TIME_AXIS], 4 * self.units), (0,), None, not update
        )
        x = checks.require(batch > 1, message, x)
        recurrent_kernel, gamma_h, gamma_c, beta_c = self._weights()
        weights = _Weights(
            ops.cast(self.kernel, "float32"),
            recurrent_kernel,
            ops.cast(self.bias, "float32"),
            None
            if self.input_norm.gamma is None
            else ops.cast(self.input_norm.gamma, "float32"),
            gamma_h,
            gamma_c,
            beta_c,
            tuple(norm.epsilon for norm in self._norms),
        )
        run = _UNMASKED_RECURRENCES[keras.backend.backend()]
        sequence, h, c, moments = run(
            x,
            state,
            weights,
            self.activation,
            self.recurrent_activation,
            self.return_sequences,
        )
        if update:
            for norm, (mean, variance) in zip(self._norms, moments, strict=True):
                norm.update_from_moments(mean, variance, batch)
        return sequence, h, c

    def _inference_recurrence(self, state, xs, mask):
        recurrent_kernel, gamma_h, gamma_c, beta_c = self._weights()
        steps = ops.shape(xs[0])[0]

        def per_step(norm, gamma):
            # Slot statistics per timestep, as (time, 1, features) scan inputs.
            mean, variance = norm.population_statistics_at(steps)
            multiplier = ops.rsqrt(ops.cast(variance, "float32") + norm.epsilon)
            if gamma is not None:
                multiplier = multiplier * gamma
            return (
                ops.expand_dims(ops.cast(mean, "float32"), 1),
                ops.expand_dims(multiplier, 1),
            )

        h_statistics = per_step(self.recurrent_norm, gamma_h)
        c_statistics = per_step(self.cell_norm, gamma_c)
        masked = mask is not None
        xs = tuple(xs) + h_statistics + c_statistics

        def step(carry, inputs):
            h, c = carry
            gates_x = inputs[0]
            h_mean, h_multiplier, c_mean, c_multiplier = inputs[-4:]
            gates_h = (ops.matmul(h, recurrent_kernel) - h_mean) * h_multiplier
            new_c, output_gate = self._cell(gates_x + gates_h, c)
            normalized_c = (new_c - c_mean) * c_multiplier
            if beta_c is not None:
                normalized_c = normalized_c + beta_c
            new_h = output_gate * self.activation(normalized_c)
            if masked:
                new_h = ops.where(inputs[1], new_h, h)
                new_c = ops.where(inputs[1], new_c, c)
            return (new_h, new_c), (new_h, new_c)

        last, stacked = ops.scan(step, state, xs)
        return stacked[0], last[0], last[1]

    def get_config(self):
        config = {
            "units": self.units,
            "max_timesteps": self.max_timesteps,
            "activation": activations.serialize(self.activation),
            "recurrent_activation": activations.serialize(self.recurrent_activation),
            "kernel_initializer": initializers.serialize(self.kernel_initializer),
            "recurrent_initializer": initializers.serialize(self.recurrent_initializer),
            "bias_initializer": initializers.serialize(self.bias_initializer),
            "unit_forget_bias": self.unit_forget_bias,
            "gamma_initializer": initializers.serialize(self.gamma_initializer),
            "kernel_regularizer": regularizers.serialize(self.kernel_regularizer),
            "recurrent_regularizer": regularizers.serialize(self.recurrent_regularizer),
            "bias_regularizer": regularizers.serialize(self.bias_regularizer),
            "momentum": self.input_norm.momentum,
            "epsilon": self.input_norm.epsilon,
            "debias": self.input_norm.debias,
            "unbiased_variance": self.input_norm.unbiased_variance,
            "return_sequences": self.return_sequences,
            "return_state": self.return_state,
            "go_backwards": self.go_backwards,
            "statistics": self.statistics,
        }
        return {**super().get_config(), **config}
