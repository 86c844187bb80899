"""TensorFlow's fused batch-norm kernel, where it gives the layer's semantics.

`FusedBatchNormV3` normalizes a 4-D tensor over every axis but the channels
in one kernel, forward and backward (tf-keras' `fused=True`). It applies to
`BatchNorm` when:

- the backend is TensorFlow;
- there is one feature axis, the last (channels-last, any rank >= 2, seen by
  the kernel as `(values, 1, 1, channels)`) or axis 1 of an input of rank
  >= 3 (channels-first, seen as `(batch, channels, values, 1)`);
- the input is float32 (half inputs are widened to float32 first; float64
  has no fused kernel);
- there is no mask, no renorm, no ghost batches, no synchronized moments
  (those change the statistics the kernel would compute);
- `epsilon >= 1.001e-5`, the smallest cuDNN accepts on a GPU.

With `fused=None` the layer uses it for channels-last inputs only, and in
training only on 4-D and 5-D inputs, where it is faster than the unfused ops
on a CPU; `fused=True` asks for it wherever it applies.

The kernel returns the batch mean and the *unbiased* batch variance; the
layer turns the latter back into the biased variance before its own guarded
update of the population statistics, so every statistics option (momentum,
`momentum=None`, `debias`, `unbiased_variance`) and every guard (single
value per feature, non-finite moments) holds on the fused path as well.
"""

import keras

MIN_EPSILON = 1.001e-5
# Batches whose mean is farther than this many standard deviations from 0 are
# normalized from shifted values (see `train`): below it, the kernel's output
# is within about 1.5e-5 of a float64 reference (measured on 65,536 values
# per channel); beyond, its error grows in proportion.
_FAR_OUT = 8.0


def unavailable(epsilon):
    """Why the kernel cannot run at all, or None if it can."""
    backend = keras.backend.backend()
    if backend != "tensorflow":
        return f"the fused kernel is TensorFlow's, and the backend is {backend}"
    if epsilon < MIN_EPSILON:
        return (
            f"the kernel needs epsilon >= {MIN_EPSILON} (cuDNN's minimum), "
            f"and epsilon={epsilon}"
        )
    return None


def training_unsupported(layer):
    """Why the layer's options rule the kernel out in training, or None."""
    if layer.renorm:
        return "renorm=True puts the renorm corrections into the normalization"
    if layer.virtual_batch_size is not None:
        return "virtual_batch_size normalizes each ghost batch on its own"
    if layer.synchronized:
        return "synchronized=True needs the moments of the global batch"
    return None


def layout(axes, rank):
    """`("NHWC" | "NCHW", None)` for the feature `axes` of a rank-`rank` input,
    or `(None, why not)`."""
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
    """Training-mode normalization of float32 `x` by the fused kernel.

    `gamma`/`beta` have the shape `(channels,)`, None when off. Returns
    `(outputs, mean, variance)`: the batch mean and the biased batch
    variance, without gradient (they feed the population statistics only).
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
    def shifted():
        if data_format == "NHWC":
            shift = image[:1, :1, :1]
        else:
            shift = tf.reshape(image[0, :, 0], (1, channels, 1, 1))
        shift = tf.stop_gradient(shift)
        outputs, mean, variance = _kernel(
            image - shift, data_format, gamma, beta, epsilon
        )
        return outputs, mean + tf.reshape(shift, (channels,)), variance

    if _compiled_by_xla():
        # XLA cannot differentiate this `cond` over a batch size known only
        # at run time (a ragged last batch): always shift there.
        outputs, mean, variance = shifted()
    else:
        outputs, mean, variance = _kernel(image, data_format, gamma, beta, epsilon)
        far = tf.reduce_any(tf.square(mean) > _FAR_OUT**2 * variance)
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


def inference(x, data_format, mean, variance, gamma, beta, epsilon):
    """Inference-mode normalization of float32 `x` with the given statistics.

    The kernel subtracts the mean first, in a single pass: exact for inputs
    near the mean however large it is.
    """
    import tensorflow as tf

    gamma, beta = _parameters(gamma, beta, mean.shape[0])
    image = _as_image(x, data_format)
    outputs, _, _ = _kernel(image, data_format, gamma, beta, epsilon, (mean, variance))
    return tf.reshape(outputs, tf.shape(x))
