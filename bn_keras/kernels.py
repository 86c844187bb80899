"""Backend kernels for two expressions of the maths: the same values, fewer passes.

`bn_keras.moments` is written in `keras.ops`; where a backend has one kernel
for what `keras.ops` computes in two, these functions use it, and fall back
to the `keras.ops` expression elsewhere.
"""

import keras
from keras import ops


def squared_difference(x, y):
    """`(x - y) ** 2`, elementwise.

    Args:
        x: A tensor.
        y: A tensor that broadcasts against `x`.

    Returns:
        The squared difference, of the broadcast shape.
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        # One fused kernel, forward and backward, where ops.square(x - y)
        # makes two passes over the tensor (as Keras does through tf.nn.moments).
        return tf.math.squared_difference(x, y)
    return ops.square(x - y)


def subtract_multiply_add(x, mean, multiplier, beta, inverse_std=None):
    """`(x - mean) * multiplier + beta`, exact however far the mean is from 0.

    With `inverse_std` (`1 / sqrt(variance + epsilon)`), statistics whose
    mean is within `FAR_OUT` spreads of 0 take Keras' fold
    `x * multiplier + (beta - mean * multiplier)`, one pass over `x` fewer
    on backends that do not fuse elementwise operations (TensorFlow and torch
    without XLA; XLA on a CPU too); its error, about `|mean| / std` float
    rounding units of the output, is then a few units. Farther means (where
    the fold would cancel two large terms, off by about 2 for float32 inputs
    of mean 1e6 and std 1e-2) subtract the mean first. The choice is made on
    the statistics: a Python branch where they are concrete, a `cond` inside
    a compiled graph (on JAX, a `where` for small inputs, where computing
    both costs less than the branch).

    Args:
        x: A tensor.
        mean: A tensor that broadcasts against `x`.
        multiplier: A tensor that broadcasts against `x`.
        beta: A tensor that broadcasts against `x`, or None for 0.
        inverse_std: `1 / sqrt(variance + epsilon)`, broadcastable like
            `mean`, or None to always subtract first.

    Returns:
        The result, of `x`'s shape.
    """
    backend = keras.backend.backend()

    def exact(x, mean, multiplier, beta):
        if backend == "torch" and beta is not None:
            import torch

            # Two kernels, as Keras' own: torch runs eagerly, op by op.
            return torch.addcmul(beta, x - mean, multiplier)
        outputs = (x - mean) * multiplier
        return outputs if beta is None else outputs + beta

    def folded(x, mean, multiplier, beta):
        offset = -mean * multiplier if beta is None else beta - mean * multiplier
        if backend == "torch":
            import torch

            return torch.addcmul(offset, x, multiplier)
        return x * multiplier + offset

    if inverse_std is None:
        return exact(x, mean, multiplier, beta)
    operands = (x, mean, multiplier, beta)
    if backend == "torch":
        import torch

        far = torch.any(torch.abs(mean * inverse_std) > FAR_OUT)
        return exact(*operands) if bool(far) else folded(*operands)
    far = ops.any(ops.abs(mean * inverse_std) > FAR_OUT)
    if backend == "tensorflow":
        import tensorflow as tf

        if not tf.executing_eagerly():
            return tf.cond(far, lambda: exact(*operands), lambda: folded(*operands))
    elif backend == "jax":
        import jax

        if isinstance(far, jax.core.Tracer):
            if _small(x):
                return ops.where(far, exact(*operands), folded(*operands))
            return jax.lax.cond(far, exact, folded, *operands)
    return exact(*operands) if bool(far) else folded(*operands)


# Means farther from 0 than this many spreads are subtracted first (see
# `subtract_multiply_add`); the fused kernels use the same bound.
FAR_OUT = 8.0
# Inputs of at most this many values compute both ways under `jax.jit`.
_SMALL = 2**16


def _small(x):
    """Whether `x` has at most `_SMALL` values (a symbolic size counts as large)."""
    size = 1
    for dimension in x.shape:
        if not isinstance(dimension, int):
            return False
        size *= dimension
    return size <= _SMALL


def cast(x, dtype):
    """`keras.ops.cast(x, dtype)`, without Keras' dispatch on torch.

    Eager torch runs every `keras.ops` call through Keras' checks for
    symbolic tensors, 1 to 25 microseconds each: more than the kernels of a
    small layer. The layer's own casts (its input, statistics and
    parameters, mostly to the dtype they already have) skip them there.

    Args:
        x: A tensor or a `keras.Variable`.
        dtype: A dtype; the float ones (`"float16"`, `"bfloat16"`,
            `"float32"`, `"float64"`) skip Keras' dispatch on torch.

    Returns:
        `x` as a tensor of `dtype` (`x` itself, or its value, if it has it).
    """
    if keras.backend.backend() != "torch":
        return ops.cast(x, dtype)
    if not isinstance(dtype, str):
        dtype = keras.backend.standardize_dtype(dtype)
    if dtype not in _TORCH_FLOATS:
        return ops.cast(x, dtype)
    import torch

    if isinstance(x, keras.Variable):
        x = x.value
    if not isinstance(x, torch.Tensor):
        return ops.cast(x, dtype)
    target = getattr(torch, dtype)
    return x if x.dtype == target else x.to(target)


_TORCH_FLOATS = ("float16", "bfloat16", "float32", "float64")


def update_ops():
    """`keras.ops`, or on torch the same few functions as direct torch calls.

    The population-statistics update (`bn_keras.statistics`) runs about a
    dozen small operations per training call. Through `keras.ops` they cost
    about 130 microseconds on eager torch, more than torch's whole
    batch-norm kernel on a dense batch; called directly, about a third.
    Only what the update uses is here, with `keras.ops`' semantics for the
    arguments it passes (tensors, bool tensors, Python scalars).

    Returns:
        A namespace with `isfinite`, `logical_and`, `reshape`, `cast`,
            `where`, `any`, `all`, `expm1` and `minimum`.
    """
    global _torch_update_ops
    if keras.backend.backend() != "torch":
        return ops
    if _torch_update_ops is None:
        _torch_update_ops = _make_torch_update_ops()
    return _torch_update_ops


_torch_update_ops = None


def _make_torch_update_ops():
    import types

    import torch

    def reduce(function):
        def reduced(x, axis=None, keepdims=False):
            if axis is None:
                return function(x)
            return function(x, dim=axis, keepdim=keepdims)

        return reduced

    def minimum(x, y):
        return torch.minimum(x, torch.as_tensor(y, dtype=x.dtype))

    return types.SimpleNamespace(
        isfinite=torch.isfinite,
        logical_and=torch.logical_and,
        reshape=torch.reshape,
        cast=cast,
        where=torch.where,
        any=reduce(torch.any),
        all=reduce(torch.all),
        expm1=torch.expm1,
        minimum=minimum,
    )


def cheap_cond() -> bool:
    """Whether a data-dependent `ops.cond` costs little on this backend.

    Not on JAX, which compiles both branches at every eager call; under jit
    XLA fuses a computation done unconditionally into the passes it makes.
    """
    return keras.backend.backend() != "jax"
