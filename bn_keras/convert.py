"""Conversion between `keras.layers.BatchNormalization` and `bn_keras.BatchNorm`.

With the options both layers share, the two compute the same function and
the same training updates (Ioffe & Szegedy, 2015, Algorithms 1 and 2, and
Ioffe, 2017, for renorm), from weights of the same names and shapes: a model
is converted by cloning its layer graph with each BN layer replaced by the
other class, built from the same config, and given the same weight values.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import keras

# Keras exports no name for functional models; clone_model tests this class too.
from keras.src.models.functional import Functional

from bn_keras import validation
from bn_keras.batch_norm import BatchNorm
from bn_keras.lstm import BatchNormLSTM
from bn_keras.precise import batch_norm_layers
from bn_keras.timestep import TimestepBatchNorm

_KERAS_BN = keras.layers.BatchNormalization

# The constructor arguments of Keras' layer, its base layer's included: a
# `BatchNorm` config key outside them has no Keras equivalent.
_KERAS_ARGUMENTS = frozenset(
    name
    for init in (_KERAS_BN.__init__, keras.layers.Layer.__init__)
    for name in inspect.signature(init).parameters
    if name not in ("self", "kwargs")
)

# Why a `bn_keras` layer that holds a BatchNorm is not one Keras can express.
_NO_KERAS_EQUIVALENT = {
    TimestepBatchNorm: "it keeps one population statistic per timestep, which "
    "keras.layers.BatchNormalization cannot hold",
    BatchNormLSTM: "its batch normalizations run inside the recurrence; Keras "
    "has no batch-normalized LSTM",
}


class _Direction(NamedTuple):
    """What `convert_batch_norms(model, to=...)` replaces, and with what.

    `reasons(layer)` says why a `source` layer cannot be converted (empty if
    it can); `config(layer)` is the config of its `target` replacement.
    """

    source: type
    target: type
    source_name: str
    target_name: str
    reasons: Callable[[keras.layers.Layer], list[str]]
    config: Callable[[keras.layers.Layer], dict[str, Any]]


def convert_batch_norms(model: keras.Model, to: str = "bn_keras") -> keras.Model:
    """A copy of `model` with its BN layers converted to `bn_keras` or to Keras.

    With `to="bn_keras"`, every `keras.layers.BatchNormalization` becomes a
    `bn_keras.BatchNorm`; with `to="keras"`, every `bn_keras.BatchNorm`
    becomes a `keras.layers.BatchNormalization`, for a model that must load
    without `bn_keras`. The replacement has the same config (axis, momentum,
    epsilon, center, scale, initializers, regularizers, constraints, renorm
    and its arguments, synchronized, name, dtype policy, trainable) and the
    same weights (gamma, beta, moving_mean, moving_variance and renorm's
    moving_stddev, renorm_mean, renorm_stddev), so the copy predicts as
    `model` does and trains as it would, up to float32 rounding.

    `BatchNorm`'s `fused` only picks a kernel: it is dropped going to Keras
    and left at its default (`None`) going to `bn_keras`. Going to Keras, a
    layer using an option that Keras' layer cannot express is an error that
    names the layer and the option: `momentum=None`, `debias=True`,
    `unbiased_variance=True`, `virtual_batch_size`, an `axis` of several
    axes, `domains > 1`, a `statistics` mode other than `"update"`, and
    `synchronized=True` on JAX or torch (Keras accepts it on TensorFlow
    only). So is a
    `TimestepBatchNorm` or `BatchNormLSTM`, which Keras has no layer for.
    Only layers of exactly the converted class are converted; a subclass of
    it (whose `call` may differ) is an error, as is a BN layer held inside
    another layer (a wrapper, a custom layer) rather than in the graph.

    The copy is a new model of the same kind (Sequential or functional), with
    the same layer names, trainable flags and compile configuration (with a
    fresh optimizer). Every layer is a new one built from its config, given
    a copy of the original's weight values: the copy shares no variable with
    `model`, which is left untouched. Nested Sequential and functional models
    are converted at any depth; a layer used several times stays one shared
    layer in the copy.

    Args:
        model: A built `keras.Sequential` or functional `keras.Model`, such as
            `keras.applications.ResNet50`.
        to: `"bn_keras"` (to `bn_keras.BatchNorm`) or `"keras"` (to
            `keras.layers.BatchNormalization`).

    Returns:
        A new model of the same kind as `model` with every BN layer of the
            source class replaced.

    Raises:
        ValueError: If `to` is neither `"bn_keras"` nor `"keras"`; if `model`
            is not a Keras model, is a subclassed model (no layer graph), or is
            a Sequential model that is not built; if it holds no BN layer of
            the source class (the message says which BN layers it holds); or
            if a BN layer cannot be converted (the message names each layer
            and why). Nothing is built then.
    """
    direction = _direction(to)
    _check_model(model)
    problems, count = _plan(model, direction)
    if problems:
        raise ValueError(
            f"Cannot convert the BN layers of model '{model.name}' to "
            f"{direction.target_name}: " + "; ".join(problems)
        )
    if count == 0:
        raise ValueError(_nothing_to_convert(model, direction))
    return _Converter(direction).convert(model)


def _direction(to):
    if to == "bn_keras":
        return _Direction(
            _KERAS_BN,
            BatchNorm,
            "keras.layers.BatchNormalization",
            "bn_keras.BatchNorm",
            lambda layer: [],
            lambda layer: layer.get_config(),
        )
    if to == "keras":
        return _Direction(
            BatchNorm,
            _KERAS_BN,
            "bn_keras.BatchNorm",
            "keras.layers.BatchNormalization",
            _reasons_not_keras,
            _keras_config,
        )
    raise ValueError(f"`to` must be 'bn_keras' or 'keras'. Received: to={to!r}")


def _is_graph(layer):
    return isinstance(layer, (keras.Sequential, Functional))


def _check_model(model):
    validation.check_graph_model(model, "convert_batch_norms", "convert it")


def _plan(model, direction):
    """`(problems, count)`: why BN layers cannot be converted, and how many can.

    Walks the graphs of `model` and of the models nested in it.
    """
    problems, count = [], 0
    for layer in model.layers:
        if _is_graph(layer):
            _check_model(layer)
            nested_problems, nested_count = _plan(layer, direction)
            problems += nested_problems
            count += nested_count
        elif type(layer) is direction.source:
            reasons = direction.reasons(layer)
            if reasons:
                problems.append(f"'{layer.name}': " + "; ".join(reasons))
            count += 1
        else:
            problem = _hidden(layer, direction)
            if problem is not None:
                problems.append(problem)
    # A layer used at several places of the graph is listed once.
    return list(dict.fromkeys(problems)), count


def _hidden(layer, direction):
    """Why a layer that is not the source class but holds one is an error."""
    inner = [
        held
        for held in layer._flatten_layers(include_self=True, recursive=True)
        if isinstance(held, direction.source)
    ]
    if not inner:
        return None
    kind = type(layer).__name__
    for cls, reason in _NO_KERAS_EQUIVALENT.items():
        if type(layer) is cls and direction.target is _KERAS_BN:
            return f"'{layer.name}' is a {kind}: {reason}"
    if inner[0] is layer:
        return (
            f"'{layer.name}' is a {kind}, a subclass of {direction.source_name} "
            f"whose computation may differ from it: {direction.target_name} "
            "cannot stand in for it"
        )
    names = ", ".join(f"'{held.name}'" for held in inner)
    if isinstance(layer, keras.Model):
        return (
            f"'{layer.name}' is a subclassed model (class {kind}) holding "
            f"{names}; it hides its layer graph in `call`: rebuild it with the "
            "functional API"
        )
    return (
        f"'{layer.name}' ({kind}) holds {names} inside it, not as layers of "
        "the model's graph, where they cannot be replaced"
    )


def _nothing_to_convert(model, direction):
    found = batch_norm_layers(model)
    if found:
        held = ", ".join(f"'{bn.name}' ({type(bn).__name__})" for bn in found)
        what = f"the BN layers it holds: {held}"
    else:
        what = "it holds no batch-normalization layer"
    return (
        f"Model '{model.name}' holds no {direction.source_name} layer to "
        f"convert to {direction.target_name} ({what})."
    )


# `BatchNorm` config keys absent from Keras' layer whose removal keeps the
# semantics (given `_reasons_not_keras`); `fused` picks a kernel only.
_BN_KERAS_ONLY = ("debias", "unbiased_variance", "virtual_batch_size", "fused")


def _reasons_not_keras(layer):
    """Why `layer`, a `BatchNorm`, has no `keras.layers.BatchNormalization` twin."""
    reasons = []
    if layer.momentum is None:
        reasons.append(
            "momentum=None (a cumulative average of every batch; Keras keeps "
            "an exponential moving average)"
        )
    if layer.debias:
        reasons.append("debias=True (a zero-debiased moving average)")
    if layer.unbiased_variance:
        reasons.append(
            "unbiased_variance=True (Keras averages the biased batch variance)"
        )
    if layer.virtual_batch_size is not None:
        reasons.append(f"virtual_batch_size={layer.virtual_batch_size} (ghost batches)")
    if isinstance(layer.axis, tuple) and len(layer.axis) > 1:
        reasons.append(
            f"axis={layer.axis} (Keras normalizes along one axis; it takes an int only)"
        )
    if layer.domains > 1:
        reasons.append(
            f"domains={layer.domains} (one set of statistics per domain; Keras "
            "keeps one set)"
        )
    mode = getattr(layer, "statistics", "update")
    if mode != "update":
        reasons.append(
            f"statistics={mode!r} (Keras' layer has the default 'update' mode only)"
        )
    backend = keras.backend.backend()
    if layer.synchronized and backend != "tensorflow":
        reasons.append(
            "synchronized=True (keras.layers.BatchNormalization accepts it on "
            f"TensorFlow only, not on {backend})"
        )
    config = _keras_config(layer)
    reasons += [
        f"{key}={config[key]!r} (no Keras equivalent)"
        for key in config
        # `statistics` and `domains` are explained above.
        if key not in _KERAS_ARGUMENTS and key not in ("statistics", "domains")
    ]
    return reasons


def _keras_config(layer):
    config = layer.get_config()
    for key in _BN_KERAS_ONLY:
        config.pop(key, None)
    if config.get("statistics") == "update":
        del config["statistics"]
    if config.get("domains") == 1:
        # One domain: the parameters are shared whatever the flag says.
        del config["domains"]
        config.pop("per_domain_parameters", None)
    if isinstance(config["axis"], (tuple, list)) and len(config["axis"]) == 1:
        config["axis"] = config["axis"][0]
    return config


class _Converter:
    """Clones graphs with the BN layers replaced, then copies the weights."""

    def __init__(self, direction):
        self.direction = direction
        # id(original) -> copy, over every nesting level: a layer shared by
        # several (sub)models stays one shared layer.
        self.copies = {}
        # (original, copy) of the layers whose weights are copied.
        self.pairs = []

    def convert(self, model):
        converted = self.copies[id(model)] = self.model(model)
        # Weights are set once the copies are built by the new graph.
        for original, copy in self.pairs:
            _copy_weights(original, copy)
        self.restore_trainable(model)
        return converted

    def model(self, model):
        if isinstance(model, keras.Sequential):
            return keras.models.clone_model(model, clone_function=self.layer)
        # Inputs named as the original's input layers (clone_model would
        # name them after their tensors).
        inputs = keras.tree.map_structure(_input_like, model.input)
        return keras.models.clone_model(
            model, input_tensors=inputs, clone_function=self.layer
        )

    def layer(self, layer):
        if id(layer) in self.copies:
            return self.copies[id(layer)]
        if _is_graph(layer):
            copy = self.model(layer)
        else:
            if type(layer) is self.direction.source:
                config = self.direction.config(layer)
                copy = self.direction.target.from_config(config)
            else:
                copy = layer.__class__.from_config(layer.get_config())
            self.pairs.append((layer, copy))
        self.copies[id(layer)] = copy
        return copy

    def restore_trainable(self, model):
        """Gives every copy its original's `trainable` flag, outer models first.

        Setting a model's flag sets its layers' flags too, which are then
        set back to the originals' (a frozen model may hold a layer that was
        unfrozen after it).
        """
        copy = self.copies[id(model)]
        if copy.trainable != model.trainable:
            copy.trainable = model.trainable
        for layer in model.layers:
            if isinstance(layer, keras.layers.InputLayer):
                continue
            if _is_graph(layer):
                self.restore_trainable(layer)
            elif self.copies[id(layer)].trainable != layer.trainable:
                self.copies[id(layer)].trainable = layer.trainable


def _input_like(tensor):
    layer = tensor._keras_history.operation
    return keras.Input(
        batch_shape=tensor.shape,
        dtype=tensor.dtype,
        sparse=tensor.sparse,
        name=layer.name,
        optional=layer.optional,
    )


def _copy_weights(original, copy):
    values = original.get_weights()
    if not values:
        return
    if type(original) is not type(copy):
        # A converted BN layer: the same weights by name (and in the same
        # order today), matched by name in case either class adds one.
        by_name = {
            v.name: value for v, value in zip(original.weights, values, strict=True)
        }
        names = [v.name for v in copy.weights]
        if sorted(names) != sorted(by_name):
            raise ValueError(
                f"Cannot copy the weights of BN layer '{original.name}': it "
                f"has {sorted(by_name)}, its {type(copy).__name__} replacement "
                f"{sorted(names)}."
            )
        values = [by_name[name] for name in names]
    copy.set_weights(values)
