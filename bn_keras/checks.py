"""Checks on training batches that hold at run time, not only at trace time.

A shape known when the layer runs (eager TensorFlow, JAX, which traces every
shape anew, torch) is checked in Python and raises `ValueError`. Inside a
TensorFlow graph with an unknown batch size (`fit()`, `tf.function` with a
`None` dimension) the check becomes an assertion that raises
`InvalidArgumentError` with the same message when the step runs. XLA drops
assertions, so the layer never relies on them alone: whatever the check
guards (the population statistics) is also skipped in the graph.
"""

import keras
import numpy as np


def require(condition, message, x):
    """Raises `ValueError(message)` unless `condition`, now or at run time.

    `condition` is a Python or NumPy boolean, or a scalar boolean tensor.
    Returns `x`; inside a TensorFlow graph, `x` made to wait for the
    assertion, so that nothing computed from it (a reshape that would fail
    with a less clear message) runs first. A traced JAX value cannot raise:
    it is not checked.
    """
    if isinstance(condition, (bool, np.bool_)):
        if not condition:
            raise ValueError(message)
        return x
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        if tf.executing_eagerly():
            if not bool(condition):
                raise ValueError(message)
            return x
        with tf.control_dependencies([tf.debugging.Assert(condition, [message])]):
            return tf.identity(x)
    if backend == "torch" and not bool(condition):
        raise ValueError(message)
    return x


def batch_size_message(batch_size, virtual_batch_size):
    """The error for a batch size that ghost batches cannot split."""
    return (
        f"The batch size{_value(batch_size)} is not a multiple of "
        f"virtual_batch_size={virtual_batch_size}. Use a batch size that it "
        "divides (drop or pad the last, incomplete batch), or another "
        "virtual_batch_size."
    )


def single_value_message(input_shape, reduction_axes, virtual_batch_size):
    """The error for a training batch with at most one value per feature."""
    where = (
        ""
        if virtual_batch_size is None
        else f" per ghost batch (virtual_batch_size={virtual_batch_size})"
    )
    return (
        "BatchNorm in training mode got a single value per feature"
        f"{where} (input shape {_shape(input_shape)}, reduced over axes "
        f"{tuple(reduction_axes)}): every output would equal beta, and the "
        "population statistics would be corrupted, so they are left as they "
        "are. Train with batches of "
        "more than one example (drop the last, incomplete batch: "
        "`drop_remainder=True` in tf.data, `drop_last=True` in a torch "
        "DataLoader, or a dataset size that the batch size divides), or call "
        "the layer with training=False."
    )


def empty_batch_message(input_shape):
    return (
        f"BatchNorm in training mode got an empty batch (input shape "
        f"{_shape(input_shape)}): there is nothing to normalize with. Skip empty "
        "batches, or call the layer with training=False."
    )


def _value(size):
    return f" {size}" if isinstance(size, int) else ""


def _shape(shape):
    return tuple(shape)
