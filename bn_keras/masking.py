"""Masks in Keras' convention: one dimension fewer than the input, for any axis."""

from keras import ops

from bn_keras import checks


def broadcast_mask(mask, x):
    """The boolean mask of `x`'s shape, or None.

    Keras' convention (what `Masking` and `Embedding(mask_zero=True)` produce):
    the mask has the input's shape without its last axis and is expanded on
    that axis, whatever the feature axis is; any nonzero value counts. A
    dimension of 1 broadcasts (as in NumPy, and as Keras' layer accepts); a
    mask of another shape (another batch size or length) raises `ValueError`
    naming both shapes: when the layer is called where the shapes are known,
    when the step runs in a TensorFlow graph where they are not.
    """
    if mask is None:
        return None
    if len(mask.shape) != len(x.shape) - 1:
        raise ValueError(
            "The mask provided should be one dimension less than the inputs "
            "(Keras' convention: the input's shape without its last axis). "
            f"Received: mask.shape={tuple(mask.shape)}, "
            f"inputs.shape={tuple(x.shape)}"
        )
    static = [(m, s) for m, s in zip(mask.shape, x.shape[:-1], strict=True)]
    if any(m is not None and s is not None and m not in (s, 1) for m, s in static):
        raise ValueError(checks.mask_message(mask.shape, x.shape))
    if any(m is None or s is None for m, s in static):
        mask_shape = ops.convert_to_tensor(ops.shape(mask))
        fits = ops.logical_or(
            ops.equal(mask_shape, ops.convert_to_tensor(ops.shape(x)[:-1])),
            ops.equal(mask_shape, 1),
        )
        mask = checks.require(
            ops.all(fits), checks.mask_message, mask, shapes=(mask, x)
        )
    mask = ops.cast(mask, "bool")
    return ops.broadcast_to(ops.expand_dims(mask, -1), ops.shape(x))
