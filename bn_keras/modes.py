"""Statistics modes for a whole model: `set_statistics` and `statistics_mode`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import keras

from bn_keras.batch_norm import BatchNorm
from bn_keras.precise import batch_norm_layers
from bn_keras.validation import validate_statistics


def set_statistics(model: keras.Model, mode: str) -> dict[str, str]:
    """Sets the statistics mode of every `bn_keras` BN layer of `model`.

    Every `BatchNorm` (and `TimestepBatchNorm`, and the normalizations of a
    `BatchNormLSTM`) at any depth gets `statistics=mode`:

    - `"update"`: batch statistics in training, population statistics in
      inference, updated in training (the default).
    - `"frozen"`: the population statistics in training too, never updated;
      gamma and beta keep training (FrozenBN).
    - `"batch"`: the batch statistics in inference too, never updated
      (PyTorch's `track_running_stats=False`).

    The change takes effect at the next `fit()`, `evaluate()` or `predict()`
    of `model`, also from inside a callback during `fit()`: the compiled
    functions of `model` and of the models nested in it, which TensorFlow and
    JAX traced with the old modes, are rebuilt. Pass the model you call
    `fit()` on: a model that holds `model` as a layer keeps its own compiled
    functions.

    Args:
        model: A Keras model or layer holding `bn_keras` BN layers, or one
            such layer itself.
        mode: `"update"`, `"frozen"` or `"batch"`.

    Returns:
        The previous mode of each layer, `{layer name: mode}`.

    Raises:
        ValueError: If `mode` is not one of the three, `model` has no BN
            layer, or holds a `keras.layers.BatchNormalization`, which has no
            modes (convert it first with `bn_keras.convert_batch_norms`).
            Nothing is changed then.

    Example:
        ```python
        previous = bn_keras.set_statistics(model, "frozen")
        model.fit(x, y, epochs=2)  # gamma and beta train; statistics fixed
        bn_keras.set_statistics(model, "update")
        ```
    """
    return {layer.name: old for layer, old in _set(model, mode)}


@contextlib.contextmanager
def statistics_mode(model: keras.Model, mode: str) -> Iterator[keras.Model]:
    """A context in which every `bn_keras` BN layer of `model` has mode `mode`.

    `set_statistics(model, mode)` on entry; on exit, also on an exception
    (a `KeyboardInterrupt` included), each layer gets back the mode it had,
    and the compiled functions are rebuilt again.

    Args:
        model: A Keras model or layer holding `bn_keras` BN layers, or one
            such layer itself.
        mode: `"update"`, `"frozen"` or `"batch"`.

    Yields:
        `model`.

    Raises:
        ValueError: As `set_statistics`, on entry.

    Example:
        ```python
        with bn_keras.statistics_mode(model, "batch"):
            batch_predictions = model.predict(x, batch_size=200)
        ```
    """
    previous = _set(model, mode)
    try:
        yield model
    finally:
        _restore(model, previous)


def _set(model, mode):
    """`[(layer, previous mode)]` after setting `mode` on every layer of `model`."""
    mode = validate_statistics(mode)
    layers = _check(model)
    previous = [(layer, layer._statistics) for layer in layers]
    for layer in layers:
        # Not the attribute's setter: its warning is about compiled
        # functions, which are rebuilt here.
        layer._statistics = mode
    if any(old != mode for _, old in previous):
        _rebuild_compiled_functions(model)
    return previous


def _check(model):
    """The BN layers of `model`, all ours, or a `ValueError`."""
    layers = batch_norm_layers(model)
    if isinstance(model, (BatchNorm, keras.layers.BatchNormalization)):
        # A BN layer given on its own is its own (only) layer.
        layers.insert(0, model)
    foreign = [layer.name for layer in layers if not isinstance(layer, BatchNorm)]
    if foreign:
        raise ValueError(
            f"{_describe(model)} holds Keras' BatchNormalization layers {foreign}, "
            "which have no statistics modes: convert them first with "
            "`model = bn_keras.convert_batch_norms(model)`. No mode was changed."
        )
    if not layers:
        raise ValueError(
            f"{_describe(model)} has no batch-normalization layer to set the "
            "statistics mode of."
        )
    return layers


def _restore(model, previous):
    """Gives each layer of `_set`'s `[(layer, mode)]` its mode back."""
    changed = False
    for layer, old in previous:
        changed |= layer._statistics != old
        layer._statistics = old
    if changed:
        _rebuild_compiled_functions(model)


def _describe(model):
    return f"{type(model).__name__} {model.name!r}"


_FUNCTIONS = ("train", "test", "predict")


def _rebuild_compiled_functions(model):
    """Rebuilds the compiled step functions that `model` and its models hold.

    Rebuilt, not dropped: `fit()` calls `model.train_function` at every step,
    so a callback that changes a mode needs a new function there at once.
    """
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if not isinstance(layer, keras.Model):
            continue
        for kind in _FUNCTIONS:
            if getattr(layer, f"{kind}_function", None) is not None:
                getattr(layer, f"make_{kind}_function")(force=True)
