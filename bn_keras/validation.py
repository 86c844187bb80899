"""The layers' arguments, validated and converted: a `ValueError` quotes a bad value."""

import math
import operator
from typing import Any

from keras import initializers

RENORM_CLIPPING_KEYS = ("rmax", "rmin", "dmax")


def to_float(value, name):
    """`float(value)`, or a ValueError that quotes the argument."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"`{name}` must be a number. Received: {name}={value!r}"
        ) from None


def validate_axis(axis):
    """An int or a non-empty tuple of distinct ints (a list becomes a tuple)."""
    if isinstance(axis, bool):
        raise ValueError(
            f"`axis` must be an int or a tuple of ints. Received: axis={axis}"
        )
    if isinstance(axis, int):
        return axis
    if (
        isinstance(axis, (list, tuple))
        and axis
        and all(isinstance(a, int) and not isinstance(a, bool) for a in axis)
    ):
        if len(set(axis)) != len(axis):
            raise ValueError(f"`axis` has a repeated entry. Received: axis={axis}")
        return tuple(axis)
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
    value = to_float(epsilon, "epsilon")
    if not 0 < value < math.inf:
        raise ValueError(
            f"`epsilon` must be a positive float. Received: epsilon={epsilon!r}"
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
    try:
        if isinstance(value, bool):
            raise TypeError
        integer = operator.index(value)
    except TypeError:
        integer = 0
    if integer < 1:
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
    if value is None:
        return None
    valid = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value == int(value)
        and value >= 1
    )
    if not valid:
        raise ValueError(
            "`virtual_batch_size` must be a positive integer or None. "
            f"Received: virtual_batch_size={value!r}"
        )
    return int(value)


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
    try:
        clipping = {k: (None if v is None else float(v)) for k, v in clipping.items()}
    except (TypeError, ValueError):
        raise ValueError(
            "`renorm_clipping` values must be numbers or None. "
            f"Received: renorm_clipping={clipping!r}"
        ) from None
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
    return clipping
