"""Ghost batches (`virtual_batch_size`): each run of consecutive examples on its own.

Hoffer et al., 2017, https://arxiv.org/abs/1705.08741: a batch of `B`
examples is viewed as `B / V` sub-batches of `V`, each normalized with its own
moments; the population statistics take the average over the sub-batches.
"""

from keras import ops

from bn_keras import checks


def split(x, mask, size):
    """`(B, ...) -> (B / V, V, ...)` for `x` and its mask; `V` must divide `B`."""
    batch = x.shape[0]
    if batch is None:
        batch = ops.shape(x)[0]

    def message(input_shape):
        return checks.batch_size_message(input_shape, size)

    x = checks.require(batch % size == 0, message, x)
    shape = (-1, size) + tuple(ops.shape(x)[1:])
    x = ops.reshape(x, shape)
    if mask is not None:
        mask = ops.reshape(mask, shape)
    return x, mask


def merge(outputs, shape):
    """The inverse of `split`: back to the input's `shape`."""
    return ops.reshape(outputs, shape)


def axes(reduction_axes, broadcast_shape):
    """Reduction axes and broadcast shape with the leading sub-batch axis."""
    return tuple(a + 1 for a in reduction_axes), (1,) + tuple(broadcast_shape)


def average(value, ok):
    """The average over sub-batches (axis 0) where `ok`, and where any is.

    A sub-batch whose moments are not usable (masked out, a single value,
    not finite) does not enter the average; `where`, not a product with `ok`,
    so that its NaN cannot leak in.
    """
    filled = ops.sum(ops.cast(ok, value.dtype), axis=0)
    total = ops.sum(ops.where(ok, value, 0.0), axis=0)
    return total / ops.maximum(filled, 1.0), filled > 0.0
