"""Per-domain population statistics: which set a call uses, and its update.

A `BatchNorm(domains=k)` keeps `k` sets of population statistics, stacked on
a leading axis (`moving_mean` of shape `(k, features...)`), and optionally
`k` sets of gamma and beta. A call names its set with `domain`:

- a Python int, fixed where the layer is called (two towers sharing one
  layer object, each with its own statistics), checked at once;
- an integer tensor, a scalar or one entry per example (a model that serves
  several domains takes them as an input). In inference each example uses
  its own domain's statistics. In training the batch statistics are those of
  the whole batch, so every example of a training batch must have the same
  domain.

Checks hold where the backend can raise at run time: in Python for an int, a
`ValueError` in eager TensorFlow and on torch, an `InvalidArgumentError` with
the same message inside a TensorFlow graph. A traced JAX value (and XLA on
TensorFlow) cannot raise: there a domain outside `[0, k)`, or a training
batch of mixed domains, updates no statistics at all (so no other domain's
set is touched) and gives NaN outputs wherever it selects statistics or
parameters, rather than a plausible wrong number.
"""

from typing import Any, NamedTuple

import keras
import numpy as np
from keras import ops

from bn_keras import checks


class Domain(NamedTuple):
    """A call's domain, resolved.

    Attributes:
        index: A Python int, or an int32 tensor: scalar, or `(batch,)` with
            one domain per example. Clamped into `[0, k)`.
        valid: `True`, or a boolean tensor of `index`'s shape: False where
            the domain given was outside `[0, k)` (only where that could not
            raise).
        per_example: Whether `index` has one entry per example.
    """

    index: Any
    valid: Any = True
    per_example: bool = False


def resolve(domain, domains, layer_name, x):
    """`(x, Domain)` for a call's `domain` argument, checked.

    `x` is returned made to wait for a run-time check inside a TensorFlow
    graph, as `checks.require` does.
    """
    if domain is None:
        if domains == 1:
            return x, Domain(0)
        raise ValueError(
            f"{layer_name} keeps {domains} sets of population statistics "
            f"(`domains={domains}`): call it with `domain=` an int in [0, "
            f"{domains}) or an integer tensor, which says whose statistics "
            "to use and update. Received: domain=None"
        )
    if isinstance(domain, (bool, np.bool_)) or (
        isinstance(domain, float) and not float(domain).is_integer()
    ):
        raise ValueError(_message(layer_name, domains, domain))
    if isinstance(domain, (int, np.integer, float)):
        index = int(domain)
        if not 0 <= index < domains:
            raise ValueError(_message(layer_name, domains, domain))
        return x, Domain(index)
    if not ops.is_tensor(domain) and not hasattr(domain, "shape"):
        raise ValueError(_message(layer_name, domains, domain))
    dtype = keras.backend.standardize_dtype(domain.dtype)
    if "int" not in dtype:
        raise ValueError(
            f"The `domain` of {layer_name} must be an integer tensor (or a "
            f"Python int). Received: a tensor of dtype {dtype}"
        )
    rank = len(domain.shape)
    if rank == 2 and domain.shape[-1] == 1:
        domain = ops.squeeze(domain, -1)
        rank = 1
    if rank > 1:
        raise ValueError(
            f"The `domain` of {layer_name} must be a scalar or one entry per "
            f"example, of shape (batch,) or (batch, 1). Received: a tensor of "
            f"shape {tuple(domain.shape)}"
        )
    if rank == 1:
        x = _check_length(domain, x, layer_name)
    # Checked in the tensor's own dtype: a cast to int32 first would wrap an
    # int64 domain of 2**32 + 1 to a valid 1.
    valid = ops.logical_and(domain >= 0, domain < domains)
    index = ops.cast(domain, "int32")
    concrete = _concrete(valid)
    if concrete is not None:
        if not concrete.all():
            bad = np.asarray(ops.convert_to_numpy(domain))[~concrete]
            raise ValueError(_message(layer_name, domains, bad.tolist()))
    else:
        x = checks.require(
            ops.all(valid),
            f"The `domain` of {layer_name} must be in [0, {domains}) "
            f"(`domains={domains}`). Received: a domain outside that range",
            x,
        )
    index = ops.clip(index, 0, domains - 1)
    return x, Domain(index, valid, per_example=rank == 1)


def check_array(domain, domains, layer_name):
    """Checks a NumPy `domain` before Keras converts it for the backend.

    JAX without 64-bit mode converts an int64 array to int32, wrapping
    `2**32 + 1` to a valid 1 before `call` sees it.
    """
    if isinstance(domain, np.ndarray) and np.issubdtype(domain.dtype, np.integer):
        bad = domain[(domain < 0) | (domain >= domains)]
        if bad.size:
            raise ValueError(_message(layer_name, domains, bad.tolist()))


def _check_length(domain, x, layer_name):
    """`x`, checked to have one example per entry of the `(batch,)` `domain`.

    Another length would broadcast: a batch of one example with three
    domains would give three outputs.
    """

    message = (
        f"The `domain` of {layer_name} must have one entry per example, as "
        "many as the input has examples (pass a scalar for one domain for "
        "the whole batch)."
    )
    examples, entries = x.shape[0], domain.shape[0]
    if examples is not None and entries is not None:
        if examples != entries:
            raise ValueError(
                f"{message} Received: an input of shape {tuple(x.shape)} and a "
                f"domain of shape {tuple(domain.shape)}"
            )
        return x
    # A plain string: XLA compiles no string formatting of run-time shapes.
    return checks.require(ops.shape(x)[0] == ops.shape(domain)[0], message, x)


def for_training(domain, layer_name, x):
    """`(x, Domain)` with one domain for the whole training batch.

    Under a per-example domain, every example must have the first one's;
    where that cannot raise, `valid` is False for the batch.
    """
    if not domain.per_example:
        return x, domain
    first = domain.index[0]
    same = ops.logical_and(ops.all(domain.index == first), ops.all(domain.valid))
    concrete = _concrete(same)
    message = (
        f"{layer_name} got a training batch of several domains: its batch "
        "statistics are those of the whole batch, so every example of a "
        "training batch must have the same `domain` (train each domain with "
        "batches of its own, or two calls of the layer)."
    )
    if concrete is not None:
        if not concrete:
            raise ValueError(message)
    else:
        x = checks.require(same, message, x)
    return x, Domain(first, same)


def select(variable, domain, dtype, rank=None):
    """The rows of `variable` (`(k, ...)`) for `domain`, as `dtype`.

    Scalar domain: one row, shaped as the per-domain values. Per-example
    domain: `(batch, ...)`, reshaped to `rank` dimensions when given (the
    input's rank, to broadcast against it). NaN where the domain was invalid.
    """
    values = ops.take(ops.cast(variable, dtype), domain.index, axis=0)
    if domain.valid is not True:
        trailing = (1,) * (len(variable.shape) - 1)
        valid = ops.reshape(domain.valid, tuple(ops.shape(domain.valid)) + trailing)
        values = ops.where(valid, values, ops.cast(np.nan, dtype))
    return values


def spread(mean, variance, ok, domain, domains):
    """One domain's batch statistics placed in the `(k, ...)` statistics.

    Every row but `domain`'s gets `ok = False`: it keeps its statistics.
    """
    shape = (domains,) + tuple(mean.shape)
    rows = ops.arange(domains, dtype="int32") == domain.index
    if domain.valid is not True:
        rows = ops.logical_and(rows, domain.valid)
    rows = ops.reshape(rows, (domains,) + (1,) * len(mean.shape))
    return (
        ops.broadcast_to(mean, shape),
        ops.broadcast_to(variance, shape),
        ops.logical_and(ops.broadcast_to(ok, shape), rows),
    )


def _concrete(value):
    """`value` as NumPy where it is known now (eager), else None (traced)."""
    if isinstance(value, (bool, np.bool_, np.ndarray)):
        return np.asarray(value)
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        if not tf.executing_eagerly():
            return None
    elif backend == "jax":
        import jax

        if isinstance(value, jax.core.Tracer):
            return None
    try:
        return np.asarray(ops.convert_to_numpy(value))
    except Exception:  # noqa: BLE001 - symbolic (a functional model's build)
        return None


def _message(layer_name, domains, received):
    return (
        f"The `domain` of {layer_name} must be an int in [0, {domains}) "
        f"(`domains={domains}`). Received: domain={received!r}"
    )
