"""The backends' own batch-norm kernels: where `BatchNorm` uses them, and how.

Two backends have one kernel that normalizes over every axis but the
channels, forward and backward:

- TensorFlow's `FusedBatchNormV3` (tf-keras' `fused=True`), on 4-D
  tensors;
- torch's `native_batch_norm` (what `torch.nn.BatchNorm2d` runs, cuDNN's on
  a GPU), on `(batch, channels, ...)` tensors.

JAX has none: XLA fuses the layer's own operations. A kernel applies to
`BatchNorm` when:

- there is one feature axis, the last (channels-last, any rank >= 2, seen by
  the kernel as `(values, channels)`) or axis 1 of an input of rank >= 3
  (channels-first, seen as `(batch, channels, values)`);
- the input is float32, or float64 on torch (half inputs are widened to
  float32 first; TensorFlow's kernel has no float64 version);
- there is no mask, no renorm, no ghost batches, no synchronized moments
  (those change the statistics the kernel would compute);
- on TensorFlow, `epsilon >= 1.001e-5`, the smallest cuDNN accepts on a GPU
  (torch falls back to its own kernel below it).

With `fused=None` the layer uses it wherever it is faster than its own
operations, measured in `benchmarks/bench_layer.py`: on torch everywhere it
applies; on TensorFlow for channels-last inputs, and in training only on
4-D and 5-D inputs whose gradient is needed (see `needs_input_gradient`).
`fused=True` asks for it wherever it applies, and is an error where it
cannot; a saved `fused=True` layer loaded on JAX (a `.keras` file is portable
across backends) runs without it, with a warning. The whole decision is
here: `check_request` when the layer is created, `plan` when it is built,
`in_training` and `in_inference` when it runs.

The kernels run in training mode on batch statistics only: they update no
running statistics themselves (Keras moved off torch's kernel because it
updated them in place, keras-team/keras#19102). They return the batch mean
and a variance (TensorFlow's unbiased, torch's as `1 / sqrt(var + eps)`),
which the layer turns back into the biased variance before its own guarded
update of the population statistics, so every statistics option (momentum,
`momentum=None`, `debias`, `unbiased_variance`) and every guard (single
value per feature, non-finite moments) holds on the kernel path as well.

Both kernels lose accuracy when the mean is far from 0 compared with the
spread (TensorFlow's sums raw values; torch's inference multiplies raw
values by `gamma / sqrt(var + eps)` and adds a folded offset): such batches
are normalized again from shifted values in training, and such statistics
take the layer's own operations in inference on torch.
"""

from typing import NamedTuple

import keras

from bn_keras import kernels

MIN_EPSILON = 1.001e-5
# Batches whose mean is farther than this many standard deviations from 0 are
# normalized from shifted values (see `train`): below it, TensorFlow's
# kernel's output is within about 1.5e-5 of a float64 reference (measured on
# 65,536 values per channel); beyond, its error grows in proportion.
_FAR_OUT = kernels.FAR_OUT
_LN2 = 0.6931471805599453


class Plan(NamedTuple):
    """Where a built layer runs the fused kernel.

    Attributes:
        data_format: `"NHWC"` or `"NCHW"`, how the kernel sees the layer's
            inputs, or `None` if the layer never uses the kernel. Inference
            on float32 inputs uses it whenever it is set.
        training: Whether training-mode calls use it too (on float32
            inputs without a mask).
        required: Whether the layer was asked for it (`fused=True`), so that
            an input the kernel cannot take is an error.
    """

    data_format: str | None = None
    training: bool = False
    required: bool = False


def unavailable(epsilon: float) -> str | None:
    """Why the kernel cannot run at all, or None if it can.

    Args:
        epsilon: The layer's `epsilon`.

    Returns:
        The reason, to complete "the fused kernel cannot be used: ...", or
            None.
    """
    why = backend_unavailable()
    if why is not None:
        return why
    if keras.backend.backend() == "tensorflow" and epsilon < MIN_EPSILON:
        return (
            f"the kernel needs epsilon >= {MIN_EPSILON} (cuDNN's minimum), "
            f"and epsilon={epsilon}"
        )
    return None


def backend_unavailable() -> str | None:
    """Why the backend has no fused kernel, or None on TensorFlow and torch."""
    backend = keras.backend.backend()
    if backend not in ("tensorflow", "torch"):
        return (
            "the fused kernels are TensorFlow's and torch's, and the backend "
            f"is {backend}"
        )
    return None


def unavailable_for_config(epsilon: float, dtype) -> str | None:
    """Why a saved `fused=True` layer cannot use this backend's kernel, or None.

    A `.keras` file is portable across backends, and `fused` changes only
    the speed: what rules the kernel out here (JAX; on TensorFlow an epsilon
    below cuDNN's minimum or a float64 layer, which torch's kernel takes)
    makes the loaded layer run without it rather than fail.

    Args:
        epsilon: The config's `epsilon`.
        dtype: The config's `dtype`: a name, a policy name, or None.

    Returns:
        The reason, or None.
    """
    why = unavailable(epsilon)
    if why is None and keras.backend.backend() == "tensorflow":
        name = dtype if isinstance(dtype, str) else None
        if name is not None and name.endswith("float64"):
            why = "the kernel has no float64 version"
    return why


def loaded_elsewhere_warning(name: str, why: str) -> str:
    """The warning for a `fused=True` config loaded where there is no kernel."""
    return (
        f"BatchNorm layer '{name}' was saved with fused=True, but {why}: it "
        "runs without the kernel (the same results, the kernel is only "
        "faster). Its config keeps fused=True for TensorFlow."
    )


def training_unsupported(
    renorm: bool, virtual_batch_size: int | None, synchronized: bool
) -> str | None:
    """Why the layer's options rule the kernel out in training, or None.

    Args:
        renorm: The layer's `renorm`.
        virtual_batch_size: The layer's `virtual_batch_size`.
        synchronized: The layer's `synchronized`.

    Returns:
        The reason, or None if the options allow the kernel.
    """
    if renorm:
        return "renorm=True puts the renorm corrections into the normalization"
    if virtual_batch_size is not None:
        return "virtual_batch_size normalizes each ghost batch on its own"
    if synchronized:
        return "synchronized=True needs the moments of the global batch"
    return None


def refusal(why: str) -> str:
    """The error message of `fused=True` where the kernel cannot be used."""
    return (
        f"`fused=True`, but the fused kernel cannot be used: {why}. Pass "
        "`fused=None` to use it only where it applies. Received: fused=True"
    )


def check_request(
    fused: bool | None,
    epsilon: float,
    renorm: bool,
    virtual_batch_size: int | None,
    synchronized: bool,
) -> None:
    """Checks, when the layer is created, that `fused=True` can be honoured.

    Args:
        fused: The layer's `fused` (`True`, `False` or `None`).
        epsilon: The layer's `epsilon`.
        renorm: The layer's `renorm`.
        virtual_batch_size: The layer's `virtual_batch_size`.
        synchronized: The layer's `synchronized`.

    Raises:
        ValueError: If `fused=True` and the backend, `epsilon` or the options
            rule the kernel out.
    """
    if not fused:
        return
    why = unavailable(epsilon) or training_unsupported(
        renorm, virtual_batch_size, synchronized
    )
    if why:
        raise ValueError(refusal(why))


def plan(
    fused: bool | None,
    axes: tuple[int, ...],
    statistics_axes: tuple[int, ...],
    rank: int,
    epsilon: float,
    renorm: bool,
    virtual_batch_size: int | None,
    synchronized: bool,
) -> Plan:
    """Decides, when the layer is built, where it uses the kernel.

    Args:
        fused: The layer's `fused` (`True`, `False` or `None`).
        axes: The sorted, non-negative feature axes.
        statistics_axes: The axes the population statistics vary along
            (more than `axes` for per-timestep statistics).
        rank: The rank of the inputs.
        epsilon: The layer's `epsilon`.
        renorm: The layer's `renorm`.
        virtual_batch_size: The layer's `virtual_batch_size`.
        synchronized: The layer's `synchronized`.

    Returns:
        The layer's `Plan`.

    Raises:
        ValueError: If `fused=True` and the kernel cannot take these inputs.
    """
    if fused is False:
        return Plan()
    data_format, why = layout(axes, rank)
    if statistics_axes != axes:
        why = "the population statistics vary along more axes than gamma/beta"
    elif why is None:
        why = unavailable(epsilon)
    if why is not None:
        if fused:
            raise ValueError(refusal(why))
        return Plan()
    options_allow_training = (
        training_unsupported(renorm, virtual_batch_size, synchronized) is None
    )
    if keras.backend.backend() == "torch":
        # torch's kernel takes (batch, channels, ...) as it is and
        # channels-last inputs as (values, channels): faster than the
        # layer's own operations on every shape measured, since eager torch
        # pays for each operation.
        return Plan(data_format, options_allow_training, bool(fused))
    if data_format != "NHWC" and not fused:
        # Channels-first on request only: the CPU kernel transposes to
        # channels-last and back (1.7x Keras' training step, 7x its
        # inference, measured in benchmarks/bench_layer.py).
        return Plan()
    # Training on request, or on images and volumes: for smaller inputs
    # the kernel's fixed cost outweighs its gain (dense (60, 100): 1.05x
    # to 1.13x Keras' step, unfused 0.99x).
    training = options_allow_training and (bool(fused) or rank in (4, 5))
    return Plan(data_format, training, bool(fused))


def in_training(plan: Plan, x, mask) -> bool:
    """Whether a training-mode call on `x` (and `mask`) goes through the kernel.

    Args:
        plan: The layer's `Plan`.
        x: The input, already cast to float32 or float64.
        mask: The broadcast boolean mask, or None.

    Returns:
        True if the kernel normalizes this batch.

    Raises:
        ValueError: If the kernel was required (`fused=True`) and cannot take
            this batch.
    """
    if not plan.training:
        return False
    why = None
    if mask is not None:
        why = "a mask selects the values that enter the batch statistics"
    else:
        why = _dtype_unsupported(x)
    if why and plan.required:
        raise ValueError(refusal(why))
    if why is None and not plan.required and not needs_input_gradient(x):
        return False
    return why is None


def needs_input_gradient(x) -> bool:
    """Whether a gradient may flow into `x`, as far as the graph shows.

    TensorFlow's kernel computes the input's gradient with gamma's and
    beta's in one op, needed or not; Keras' operations skip it. For BN on a
    model's raw inputs (a first layer) the kernel's step is slower than
    Keras' (1.10x measured), so `fused=None` leaves such inputs to the
    layer's own operations. Inside a TensorFlow graph an input computed from
    no variable (the model's inputs, a constant) is such an input; anywhere
    else (eager calls, torch, where the kernel skips an unneeded gradient
    itself) this says True. Only the speed depends on it: both paths give
    the same results.

    Args:
        x: The layer's input tensor.

    Returns:
        False if `x` is a TensorFlow graph tensor that no variable feeds.
    """
    if keras.backend.backend() != "tensorflow":
        return True
    import tensorflow as tf

    if tf.executing_eagerly() or not hasattr(x, "op"):
        return True
    seen = set()
    pending = [x.op]
    while pending:
        op = pending.pop()
        if op.type in _VARIABLE_READS:
            return True
        for tensor in op.inputs:
            if tensor.op.name not in seen:
                seen.add(tensor.op.name)
                pending.append(tensor.op)
        if len(seen) > _GRAPH_SEARCH_LIMIT:
            return True  # a large graph: assume a layer with weights below
    return False


_VARIABLE_READS = (
    "ReadVariableOp",
    "ResourceGather",
    "ResourceGatherNd",
    "VariableV2",
    "Variable",
)
# Ops looked at before `needs_input_gradient` gives up and says True: the
# input of a first layer is a few ops (casts, checks) from the data.
_GRAPH_SEARCH_LIMIT = 500


def in_inference(plan: Plan, x) -> bool:
    """Whether an inference-mode call on `x` goes through the kernel.

    Args:
        plan: The layer's `Plan`.
        x: The input, already cast to float32 or float64.

    Returns:
        True if the kernel normalizes `x` (float32 inputs, and float64 on
            torch; TensorFlow's float64 takes the unfused path silently, even
            with `fused=True`).
    """
    return plan.data_format is not None and _dtype_unsupported(x) is None


def _dtype_unsupported(x) -> str | None:
    dtype = keras.backend.standardize_dtype(x.dtype)
    if dtype == "float32" or (
        dtype == "float64" and keras.backend.backend() == "torch"
    ):
        return None
    return f"the kernel has no {dtype} version"


def layout(axes: tuple[int, ...], rank: int) -> tuple[str | None, str | None]:
    """The kernel's data format for the feature `axes` of a rank-`rank` input.

    Args:
        axes: The sorted, non-negative feature axes.
        rank: The rank of the inputs.

    Returns:
        `("NHWC" | "NCHW", None)`, or `(None, why not)`.
    """
    if len(axes) != 1:
        return None, f"the kernel normalizes one feature axis, and axis={axes}"
    (axis,) = axes
    if axis == rank - 1 and rank >= 2:
        return "NHWC", None
    if axis == 1 and rank >= 3:
        return "NCHW", None
    return None, (
        "the feature axis must be the last (channels-last) or axis 1 "
        f"(channels-first), and it is axis {axis} of an input of rank {rank}"
    )


def _as_image(x, data_format):
    import tensorflow as tf

    if data_format == "NHWC":
        return tf.reshape(x, (-1, 1, 1, x.shape[-1]))
    return tf.reshape(x, (tf.shape(x)[0], x.shape[1], -1, 1))


def _parameters(gamma, beta, channels):
    import tensorflow as tf

    if gamma is None:
        gamma = tf.ones((channels,), "float32")
    if beta is None:
        beta = tf.zeros((channels,), "float32")
    return gamma, beta


def train(x, data_format, gamma, beta, epsilon):
    """Training-mode normalization of `x` by the backend's kernel.

    Args:
        x: The float32 input (or float64, on torch).
        data_format: `"NHWC"` or `"NCHW"`, from `Plan.data_format`.
        gamma: The scale, of shape `(channels,)`, or None when off.
        beta: The offset, of shape `(channels,)`, or None when off.
        epsilon: The layer's `epsilon`.

    Returns:
        `(outputs, mean, variance)`: the batch mean and the biased batch
            variance, without gradient (they feed the population statistics
            only).
    """
    if keras.backend.backend() == "torch":
        return _train_torch(x, data_format, gamma, beta, epsilon)
    return _train_tensorflow(x, data_format, gamma, beta, epsilon)


def inference(x, data_format, mean, variance, gamma, beta, epsilon):
    """Inference-mode normalization of `x` by the kernel, or None.

    Args:
        x: The float32 input (or float64, on torch).
        data_format: `"NHWC"` or `"NCHW"`, from `Plan.data_format`.
        mean: The population mean, of shape `(channels,)`.
        variance: The population variance, of shape `(channels,)`.
        gamma: The scale, of shape `(channels,)`, or None when off.
        beta: The offset, of shape `(channels,)`, or None when off.
        epsilon: The layer's `epsilon`.

    Returns:
        The normalized `x`, or None where the kernel would lose accuracy
            (torch, with a mean far from 0 compared with the spread): the
            layer then normalizes with its own operations.
    """
    if keras.backend.backend() == "torch":
        return _inference_torch(x, data_format, mean, variance, gamma, beta, epsilon)
    return _inference_tensorflow(x, data_format, mean, variance, gamma, beta, epsilon)


def _train_tensorflow(x, data_format, gamma, beta, epsilon):
    """Training-mode normalization of float32 `x` by `FusedBatchNormV3`.

    Args:
        x: The float32 input.
        data_format: `"NHWC"` or `"NCHW"`, from `Plan.data_format`.
        gamma: The scale, of shape `(channels,)`, or None when off.
        beta: The offset, of shape `(channels,)`, or None when off.
        epsilon: The layer's `epsilon`.

    Returns:
        `(outputs, mean, variance)`: the batch mean and the biased batch
            variance, without gradient (they feed the population statistics
            only).
    """
    import tensorflow as tf

    channels = x.shape[-1] if data_format == "NHWC" else x.shape[1]
    gamma, beta = _parameters(gamma, beta, channels)
    image = _as_image(x, data_format)

    # The kernel sums raw values, and loses about |mean| / std float32 ulps
    # of the output: for float32 inputs of mean 1e6 and std 1e-2 it is off by
    # about 3 (as Keras' layer). Where the mean is that far out, the batch is
    # normalized again from its deviations from one of its values (the
    # output does not change with a shift), exact to float32 rounding like
    # the unfused moments; an ordinary batch pays no extra pass for it.
    # Deviations beyond 2**60 (a batch of magnitude 1e20) are also divided
    # by a power of two that brings them to about 2**40, so that their
    # squares do not overflow (the outputs would all be beta) and epsilon
    # stays negligible beside the variance, as it is.
    def shifted():
        if data_format == "NHWC":
            shift = image[:1, :1, :1]
        else:
            shift = tf.reshape(image[0, :, 0], (1, channels, 1, 1))
        shift = tf.stop_gradient(shift)
        centered = image - shift
        axes = (0, 1, 2) if data_format == "NHWC" else (0, 2, 3)
        largest = tf.stop_gradient(
            tf.reduce_max(tf.abs(centered), axis=axes, keepdims=True)
        )
        large = largest > 2.0**60
        exponent = tf.math.ceil(tf.math.log(tf.where(large, largest, 1.0)) / _LN2)
        scale = tf.where(large, tf.pow(2.0, exponent - 40.0), 1.0)
        outputs, mean, variance = _kernel(
            centered / scale, data_format, gamma, beta, epsilon
        )
        scale = tf.reshape(scale, (channels,))
        mean = mean * scale + tf.reshape(shift, (channels,))
        return outputs, mean, variance * scale * scale

    if _compiled_by_xla():
        # XLA cannot differentiate this `cond` over a batch size known only
        # at run time (a ragged last batch): always shift there.
        outputs, mean, variance = shifted()
    else:
        outputs, mean, variance = _kernel(image, data_format, gamma, beta, epsilon)
        far = tf.reduce_any(tf.square(mean) > _FAR_OUT**2 * variance)
        overflow = tf.reduce_any(tf.math.is_finite(mean) & ~tf.math.is_finite(variance))
        far = far | overflow
        outputs, mean, variance = tf.cond(
            far, shifted, lambda: (outputs, mean, variance)
        )
    count = tf.cast(tf.size(x) // channels, "float32")
    # n / (n - 1) undone; with n == 1 the kernel's variance is not finite and
    # the statistics are skipped (the layer raises before, where it can).
    variance = tf.stop_gradient(variance) * ((count - 1.0) / count)
    return tf.reshape(outputs, tf.shape(x)), tf.stop_gradient(mean), variance


def _compiled_by_xla():
    """Whether the graph being built is compiled by XLA (`jit_compile=True`)."""
    import tensorflow as tf

    try:
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # a private module: if it moves, shift always
        return True
    return control_flow_util.GraphOrParentsInXlaContext(
        tf.compat.v1.get_default_graph()
    )


def _kernel(image, data_format, gamma, beta, epsilon, statistics=None):
    """`FusedBatchNormV3` on a 4-D `image`: `(outputs, mean, variance)`.

    Without `statistics`, training mode: the batch mean and the unbiased
    batch variance. With `statistics = (mean, variance)`, inference mode.
    """
    import tensorflow as tf

    training = statistics is None
    if training:
        empty = tf.constant([], "float32")
        statistics = (empty, empty)
    return tf.raw_ops.FusedBatchNormV3(
        x=image,
        scale=gamma,
        offset=beta,
        mean=statistics[0],
        variance=statistics[1],
        epsilon=epsilon,
        is_training=training,
        data_format=data_format,
    )[:3]


def _inference_tensorflow(x, data_format, mean, variance, gamma, beta, epsilon):
    """Inference-mode normalization of float32 `x` with the given statistics.

    The kernel subtracts the mean first, in a single pass: exact for inputs
    near the mean however large it is.

    Args:
        x: The float32 input.
        data_format: `"NHWC"` or `"NCHW"`, from `Plan.data_format`.
        mean: The population mean, of shape `(channels,)`.
        variance: The population variance, of shape `(channels,)`.
        gamma: The scale, of shape `(channels,)`, or None when off.
        beta: The offset, of shape `(channels,)`, or None when off.
        epsilon: The layer's `epsilon`.

    Returns:
        The normalized `x`.
    """
    import tensorflow as tf

    gamma, beta = _parameters(gamma, beta, mean.shape[0])
    image = _as_image(x, data_format)
    outputs, _, _ = _kernel(image, data_format, gamma, beta, epsilon, (mean, variance))
    return tf.reshape(outputs, tf.shape(x))


# torch's kernel. `native_batch_norm` with no running statistics, in
# training mode, returns the batch mean and `1 / sqrt(var + eps)`; the biased
# variance is recovered from the latter to within float rounding of
# `var + eps` (an absolute error of about 1e-10 with the default epsilon).


def _channels_view(x, data_format):
    """`x` as the kernel takes it: `(batch, channels, ...)`, a view."""
    return x.reshape(-1, x.shape[-1]) if data_format == "NHWC" else x


def _far(mean, inverse_std):
    """Whether a mean is farther than `_FAR_OUT` spreads from 0, as a bool.

    `inverse_std` is `1 / sqrt(var + eps)`. A NaN compares false: a batch
    with a NaN gains nothing from being normalized again.
    """
    import torch

    return bool(torch.any(torch.abs(mean * inverse_std) > _FAR_OUT))


def _train_torch(x, data_format, gamma, beta, epsilon):
    import torch

    image = _channels_view(x, data_format)
    outputs, mean, inverse_std = torch.native_batch_norm(
        image, gamma, beta, None, None, True, 0.0, epsilon
    )
    # The kernel sums raw values: at mean 1e6 and std 1e-2 its output is off
    # by about 0.5 (torch 2.13 on a CPU), and the variance of a batch of
    # magnitude 1e20 overflows float32 (an inverse of 0). Such batches are
    # normalized from deviations from one of their values, divided by a
    # power of two where they exceed 2**60.
    if _far(mean, inverse_std) or bool(torch.any(inverse_std == 0)):
        channels = image.shape[1]
        shape = (1, channels) + (1,) * (image.dim() - 2)
        shift = image[:1, :, ...].reshape(1, channels, -1)[:, :, :1]
        shift = shift.reshape(shape).detach()
        centered = image - shift
        axes = tuple(i for i in range(image.dim()) if i != 1)
        largest = torch.amax(torch.abs(centered.detach()), dim=axes, keepdim=True)
        large = largest > 2.0**60
        exponent = torch.ceil(torch.log2(torch.where(large, largest, 1.0)))
        scale = torch.where(large, torch.pow(2.0, exponent - 40.0), 1.0)
        outputs, mean, inverse_std = torch.native_batch_norm(
            centered / scale, gamma, beta, None, None, True, 0.0, epsilon
        )
        scale = scale.reshape(channels)
        variance = torch.clamp(inverse_std**-2 - epsilon, min=0.0) * scale * scale
        mean = mean * scale + shift.reshape(channels)
    else:
        variance = torch.clamp(inverse_std**-2 - epsilon, min=0.0)
    return outputs.reshape(x.shape), mean, variance


def _inference_torch(x, data_format, mean, variance, gamma, beta, epsilon):
    import torch

    # The kernel computes x * a + (beta - mean * a): two terms of the size
    # of mean * a cancel, an error of about |mean| / std float rounding
    # units of the output. Within _FAR_OUT spreads that is a few units.
    if _far(mean, torch.rsqrt(variance + epsilon)):
        return None
    outputs = torch.batch_norm(
        _channels_view(x, data_format),
        gamma,
        beta,
        mean,
        variance,
        False,
        0.0,
        epsilon,
        torch.backends.cudnn.enabled,
    )
    return outputs.reshape(x.shape)
