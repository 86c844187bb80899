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


def require(condition, message, x, shapes=None):
    """Raises `ValueError(message)` unless `condition`, now or at run time.

    `condition` is a Python or NumPy boolean, or a scalar boolean tensor.
    `message` is a string, or a function that takes the shapes of the
    tensors `shapes` (default: `(x,)`), as tuples of integers, and returns
    the message; inside a TensorFlow graph those shapes are the run-time
    ones, printed as numbers. Returns `x`; inside a TensorFlow graph, `x`
    made to wait for the assertion, so that nothing computed from it (a
    reshape that would fail with a less clear message) runs first. A traced
    JAX value cannot raise: it is not checked.
    """
    shapes = (x,) if shapes is None else tuple(shapes)
    if isinstance(condition, (bool, np.bool_)):
        if not condition:
            raise ValueError(_text(message, shapes))
        return x
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        if tf.executing_eagerly():
            if not bool(condition):
                raise ValueError(_text(message, shapes))
            return x
        if _in_xla():
            # XLA drops assertions, and cannot compile the string ops that
            # format the message: what the check guards is skipped anyway.
            return x
        assertion = tf.debugging.Assert(condition, [_graph_text(message, shapes)])
        with tf.control_dependencies([assertion]):
            return tf.identity(x)
    if backend == "torch" and not bool(condition):
        raise ValueError(_text(message, shapes))
    return x


def _in_xla():
    """Whether TensorFlow is building a graph for XLA (`jit_compile=True`)."""
    import tensorflow as tf

    # TensorFlow has no public test for it.
    from tensorflow.python.ops import control_flow_util

    return control_flow_util.GraphOrParentsInXlaContext(
        tf.compat.v1.get_default_graph()
    )


def with_size(x, axis, size):
    """`x` with the static size of `axis` set, once `require` has checked it.

    Only a TensorFlow graph has dimensions unknown when the layer runs; the
    fused kernel's reshapes need the feature size.
    """
    if keras.backend.backend() != "tensorflow":
        return x
    import tensorflow as tf

    x = tf.identity(x)
    shape = x.shape.as_list()
    shape[axis] = size
    x.set_shape(shape)
    return x


def _text(message, shapes):
    if not callable(message):
        return message
    return message(*(tuple(int(d) for d in keras.ops.shape(t)) for t in shapes))


# Stands for the i-th shape in a message built inside a TensorFlow graph,
# then replaced by the run-time shape (Python's str of a symbolic dimension
# would print the tensor's name, not its value).
_MARKER = "\x00shape{}\x00"


class _RunTimeShape(tuple):
    def __new__(cls, index, rank):
        return super().__new__(cls, (None,) * rank)

    def __init__(self, index, rank):
        self.marker = _MARKER.format(index)

    def __str__(self):
        return self.marker

    __repr__ = __str__


def _graph_text(message, shapes):
    """The message as a string tensor, shapes formatted at run time."""
    import tensorflow as tf

    if not callable(message):
        return message
    text = message(*(_RunTimeShape(i, len(t.shape)) for i, t in enumerate(shapes)))
    pieces = [text]
    for i, t in enumerate(shapes):
        marker = _MARKER.format(i)
        dims = tf.strings.reduce_join(tf.strings.as_string(tf.shape(t)), separator=", ")
        shape = tf.strings.join(["(", dims, "," if len(t.shape) == 1 else "", ")"])
        split = []
        for piece in pieces:
            if isinstance(piece, str) and marker in piece:
                parts = piece.split(marker)
                for j, part in enumerate(parts):
                    if j:
                        split.append(shape)
                    split.append(part)
            else:
                split.append(piece)
        pieces = split
    return tf.strings.join(pieces)


def batch_size_message(input_shape, virtual_batch_size):
    """The error for a batch size that ghost batches cannot split."""
    return (
        f"The batch size (the first dimension of the input shape "
        f"{_shape(input_shape)}) is not a multiple of "
        f"virtual_batch_size={virtual_batch_size}. Use a batch size that it "
        "divides (drop or pad the last, incomplete batch), or another "
        "virtual_batch_size."
    )


def single_value_message(
    input_shape, reduction_axes, virtual_batch_size, batch_mode=False
):
    """The error for a training batch with at most one value per feature
    (with `batch_mode`, a batch of the `"batch"` statistics mode)."""
    where = (
        ""
        if virtual_batch_size is None
        else f" per ghost batch (virtual_batch_size={virtual_batch_size})"
    )
    if batch_mode:
        # No quotes: TensorFlow escapes them in an assertion's message.
        return (
            "BatchNorm in the statistics mode `batch` got a single value per "
            f"feature{where} (input shape {_shape(input_shape)}, reduced over "
            f"axes {tuple(reduction_axes)}): that mode normalizes every batch "
            "with the statistics of the batch itself, in predict() and "
            "evaluate() too, and every output would equal beta. Use batches of "
            "more than one example (mind the last batch: for example, 65 "
            "examples in batches of 64 leave one; pick a batch size that "
            "leaves none), or run such a "
            "batch in another mode: `bn_keras.statistics_mode(model, mode)`."
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


def empty_batch_message(input_shape, batch_mode=False):
    if batch_mode:
        return (
            "BatchNorm in the statistics mode `batch` got an empty batch (input "
            f"shape {_shape(input_shape)}): that mode normalizes every batch "
            "with the statistics of the batch itself, in inference too, and an "
            "empty batch has none. Skip empty batches."
        )
    return (
        f"BatchNorm in training mode got an empty batch (input shape "
        f"{_shape(input_shape)}): there is nothing to normalize with. Skip empty "
        "batches, or call the layer with training=False."
    )


def features_message(name, axis, expected, input_shape):
    """The error for an input whose feature axis differs from the built one."""
    return (
        f"Layer '{name}' was built for inputs with {expected} features on axis "
        f"{axis}, and this input has another number. Received: "
        f"inputs.shape={_shape(input_shape)}"
    )


def mask_message(mask_shape, input_shape):
    """The error for a mask that is not the input's shape without its last axis."""
    return (
        "The mask must have the input's shape without its last axis (Keras' "
        "convention), the same batch size included, or 1 where it broadcasts. "
        f"Received: mask.shape={_shape(mask_shape)}, "
        f"inputs.shape={_shape(input_shape)}"
    )


def _shape(shape):
    if isinstance(shape, _RunTimeShape):
        return str(shape)
    return str(tuple(shape))
