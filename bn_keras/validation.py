"""Arguments validated and converted: a `ValueError` quotes a bad value."""

import math
import operator
from typing import Any

import keras
import numpy as np
from keras import initializers

# Keras exports no name for functional models; clone_model tests this class too.
from keras.src.models.functional import Functional

RENORM_CLIPPING_KEYS = ("rmax", "rmin", "dmax")

# The moments, and the float32 population statistics, are at least float32
# (also under mixed precision): an epsilon outside the normal float32 range
# vanishes (or is flushed to zero on XLA) or overflows there.
_FLOAT32_TINY = float(np.finfo(np.float32).tiny)
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def to_float(value, name):
    """`float(value)`, or a ValueError that quotes the argument."""
    try:
        if isinstance(value, (bool, np.bool_)):
            raise TypeError
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"`{name}` must be a number. Received: {name}={value!r}"
        ) from None


def to_int(value: Any) -> int | None:
    """`value` as a Python int if it is an integer, else None.

    Integers are what `operator.index` accepts: Python and NumPy integers and
    0-d integer arrays, as `int()` in Keras' layer. Bools, floats and strings
    are not integers here (Keras' `int(axis)` would turn `1.5` into `1`).
    """
    if isinstance(value, (bool, np.bool_)):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def validate_axis(axis):
    """An int or a non-empty tuple of distinct ints (a list becomes a tuple).

    NumPy integers are accepted, as by `keras.layers.BatchNormalization`, and
    stored as Python ints (so that the config is plain JSON).
    """
    integer = to_int(axis)
    if integer is not None:
        return integer
    if isinstance(axis, (list, tuple)) and axis:
        axes = tuple(to_int(a) for a in axis)
        if None not in axes:
            if len(set(axes)) != len(axes):
                raise ValueError(f"`axis` has a repeated entry. Received: axis={axis}")
            return axes
    raise ValueError(
        f"`axis` must be an int or a non-empty tuple of ints. Received: axis={axis!r}"
    )


def resolve_axes(axis, rank, input_shape):
    """The sorted, non-negative feature axes of `axis` for inputs of `rank`."""
    axes = (axis,) if isinstance(axis, int) else axis
    resolved = []
    for a in axes:
        if not -rank <= a < rank:
            raise ValueError(
                f"Axis {a} is out of bounds for input shape {tuple(input_shape)} "
                f"(rank {rank}). Received: axis={axis}"
            )
        resolved.append(a % rank)
    if len(set(resolved)) != len(resolved):
        raise ValueError(
            f"`axis` names the same axis twice for an input of rank {rank}. "
            f"Received: axis={axis}"
        )
    return tuple(sorted(resolved))


def validate_epsilon(epsilon):
    """A positive float that neither vanishes nor overflows in float32."""
    value = to_float(epsilon, "epsilon")
    if not 0 < value < math.inf:
        raise ValueError(
            f"`epsilon` must be a positive float. Received: epsilon={epsilon!r}"
        )
    if not _FLOAT32_TINY <= value <= _FLOAT32_MAX:
        raise ValueError(
            "`epsilon` must be within the normal float32 range "
            f"[{_FLOAT32_TINY:.4g}, {_FLOAT32_MAX:.4g}], the dtype of the "
            "moments and of the population statistics: outside it, it is 0 "
            f"or inf there. Received: epsilon={epsilon!r}"
        )
    return value


def validate_momentum(momentum, name, allow_none=False):
    if momentum is None and allow_none:
        return None
    try:
        value = to_float(momentum, name)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        hint = " or None (cumulative average)" if allow_none else ""
        raise ValueError(
            f"`{name}` must be a float in [0, 1]{hint}. Received: {name}={momentum!r}"
        )
    return value


def validate_debias(debias, momentum):
    debias = bool(debias)
    if debias and momentum is None:
        raise ValueError(
            "`debias=True` applies to an exponential moving average, but "
            "`momentum=None` already gives an unbiased cumulative average. "
            "Received: momentum=None, debias=True"
        )
    if debias and momentum == 1.0:
        raise ValueError(
            "`debias=True` needs `momentum < 1` (with momentum 1 the "
            "statistics never move). Received: momentum=1.0, debias=True"
        )
    return debias


def validate_fused(fused):
    if fused is None or isinstance(fused, bool):
        return fused
    raise ValueError(f"`fused` must be True, False or None. Received: fused={fused!r}")


STATISTICS_MODES = ("update", "frozen", "batch")


def validate_statistics(mode: Any) -> str:
    """A statistics mode of `STATISTICS_MODES`, or a `ValueError` quoting it."""
    if isinstance(mode, str) and mode in STATISTICS_MODES:
        return mode
    raise ValueError(
        f"`statistics` must be one of {', '.join(map(repr, STATISTICS_MODES))}. "
        f"Received: statistics={mode!r}"
    )


def validate_positive_int(value: Any, name: str) -> int:
    """`value` as an int, or a ValueError that quotes the argument.

    Args:
        value: The argument: an integer (not a bool) of at least 1.
        name: The argument's name, for the message.

    Returns:
        The integer.

    Raises:
        ValueError: If `value` is not a positive integer.
    """
    integer = to_int(value)
    if integer is None or integer < 1:
        raise ValueError(
            f"`{name}` must be a positive integer. Received: {name}={value!r}"
        )
    return integer


def clone_initializer(initializer: Any) -> Any:
    """A fresh instance of `initializer`, for one more weight.

    So that a seeded initializer instance is not reused for two weights.

    Args:
        initializer: A Keras initializer instance, or a callable.

    Returns:
        A new instance with the same configuration; a callable that is not a
            `keras.initializers.Initializer` is returned as it is.
    """
    if isinstance(initializer, initializers.Initializer):
        return initializer.__class__.from_config(initializer.get_config())
    return initializer


def validate_virtual_batch_size(value):
    """None, or a positive integer (a float that is one, e.g. `4.0`, too)."""
    if value is None:
        return None
    integer = to_int(value)
    if integer is None and isinstance(value, (float, np.floating)):
        if math.isfinite(value) and value == int(value):
            integer = int(value)
    if integer is None or integer < 1:
        raise ValueError(
            "`virtual_batch_size` must be a positive integer or None. "
            f"Received: virtual_batch_size={value!r}"
        )
    return integer


def validate_renorm_clipping(clipping):
    if clipping is None:
        return None
    if not isinstance(clipping, dict):
        raise ValueError(
            "`renorm_clipping` must be a dict with keys among "
            f"{RENORM_CLIPPING_KEYS}. Received: renorm_clipping={clipping!r}"
        )
    unknown = sorted(set(clipping) - set(RENORM_CLIPPING_KEYS))
    if unknown:
        raise ValueError(
            "Received invalid keys for `renorm_clipping` argument: "
            f"{unknown}. Supported values: {list(RENORM_CLIPPING_KEYS)}. "
            f"Received: renorm_clipping={clipping}"
        )
    original = clipping
    clipping = {}
    for key, value in original.items():
        name = f"renorm_clipping['{key}']"
        try:
            value = None if value is None else to_float(value, name)
        except ValueError:
            raise ValueError(
                f"`{name}` must be a number or None. "
                f"Received: renorm_clipping={original!r}"
            ) from None
        if value is not None and math.isnan(value):
            raise ValueError(
                f"`{name}` must not be NaN: every renorm correction would be "
                f"NaN. Received: renorm_clipping={original!r}"
            )
        clipping[key] = value
    rmax, rmin, dmax = (clipping.get(k) for k in RENORM_CLIPPING_KEYS)
    if rmax is not None and rmin is not None and rmax < rmin:
        raise ValueError(
            "rmax should be greater than rmin in the `renorm_clipping` argument. "
            f"Received: rmax={rmax}, rmin={rmin}"
        )
    if dmax is not None and dmax < 0:
        raise ValueError(
            "dmax should be non-negative in the `renorm_clipping` argument. "
            f"Received: dmax={dmax}"
        )
    # r is a ratio of standard deviations, positive and finite: a bound
    # that clips every r to 0 or to infinity makes every output beta, inf
    # or NaN. Infinite bounds on the open side mean "no clipping".
    # (In float32, where r is computed: 1e-50 is 0 there and 1e39 inf.)
    if rmax is not None and not rmax >= _FLOAT32_TINY:
        raise ValueError(
            "rmax should be positive (a normal float32) in the `renorm_clipping` "
            "argument (r is a ratio of standard deviations). "
            f"Received: rmax={rmax}"
        )
    if rmin is not None and rmin > _FLOAT32_MAX:
        raise ValueError(
            "rmin should be finite in float32 in the `renorm_clipping` argument "
            f"(it would clip every r to infinity). Received: rmin={rmin}"
        )
    # An infinite rmax or dmax, or rmin=-inf, clips nothing: the same as
    # leaving the key out, and stored as None (the config stays strict JSON).
    no_clipping = {"rmax": math.inf, "rmin": -math.inf, "dmax": math.inf}
    return {k: (None if v == no_clipping[k] else v) for k, v in clipping.items()}


def check_real_input(inputs: Any) -> None:
    """Raises a `ValueError` for a complex input, which would lose its imaginary part.

    Args:
        inputs: The layer's input: an array, a tensor, or anything without a
            `dtype` (not checked).

    Raises:
        ValueError: If `inputs` has a complex dtype.
    """
    dtype = getattr(inputs, "dtype", None)
    if dtype is None:
        return
    try:
        name = keras.backend.standardize_dtype(dtype)
    except ValueError:
        return
    if name.startswith("complex"):
        raise ValueError(
            "BatchNorm does not support complex inputs: they would be cast to "
            "a float dtype, dropping the imaginary part. Normalize the real and "
            "imaginary parts as features of their own, e.g. "
            "`keras.ops.stack([keras.ops.real(x), keras.ops.imag(x)], axis=-1)`. "
            f"Received: inputs.dtype={name}"
        )


def keras_object(get: Any, value: Any, name: str) -> Any:
    """`get(value)` (`initializers.get`, ...), its `ValueError` naming the argument.

    Args:
        get: Keras' `initializers.get`, `regularizers.get` or `constraints.get`.
        value: The argument: an identifier, a config dict, an instance or None.
        name: The argument's name, for the message.

    Returns:
        What `get` returns.

    Raises:
        ValueError: If `get` cannot interpret `value`.
    """
    try:
        return get(value)
    except (ValueError, TypeError) as error:
        raise ValueError(f"`{name}`: {error}. Received: {name}={value!r}") from None


def check_graph_model(model: Any, function: str, action: str) -> None:
    """A `ValueError` unless `model` is a built Sequential or functional model.

    For the functions that rebuild a model's layer graph (`fold_batch_norms`,
    `convert_batch_norms`): `function` is the function's name, `action` what
    it does to the model ("fold it"), for the messages.
    """
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"`{function}` takes a Keras Sequential or functional model. "
            f"Received: model={model!r}"
        )
    if isinstance(model, keras.Sequential):
        if not model.built or model._functional is None:
            raise ValueError(
                f"The Sequential model '{model.name}' is not built: give it a "
                "`keras.Input(shape=...)` first layer, or call it on data, "
                f"before you {action}."
            )
    elif not isinstance(model, Functional):
        raise ValueError(
            f"`{function}` needs the layer graph of a Sequential or functional "
            f"model; the subclassed model '{model.name}' (class "
            f"{type(model).__name__}) hides it in `call`. Rebuild it with the "
            f"functional API to {action}."
        )
