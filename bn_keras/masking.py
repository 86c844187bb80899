"""Masks in Keras' convention: one dimension fewer than the input, for any axis."""

from keras import ops


def broadcast_mask(mask, x):
    """The boolean mask of `x`'s shape, or None.

    Keras' convention (what `Masking` and `Embedding(mask_zero=True)` produce):
    the mask has the input's shape without its last axis and is expanded on
    that axis, whatever the feature axis is; any nonzero value counts.
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
    mask = ops.cast(mask, "bool")
    return ops.broadcast_to(ops.expand_dims(mask, -1), ops.shape(x))
