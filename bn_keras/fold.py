"""Batch-norm folding: each BN after a linear layer merged into it, for inference.

At inference a BN layer is the per-channel affine map
`y = gamma * (x - moving_mean) / sqrt(moving_variance + epsilon) + beta`
(Ioffe & Szegedy, 2015, Section 3.1). When `x` is the output of a linear layer
`x = W * u + b`, the two compose into one linear layer with
`W' = W * s` and `b' = (b - moving_mean) * s + beta`, where
`s = gamma / sqrt(moving_variance + epsilon)` scales each output channel of
the kernel.
"""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple

import keras
import numpy as np

from bn_keras import validation
from bn_keras.batch_norm import BatchNorm

# Exact types: a subclass may compute something else in `call`.
_BATCH_NORMS = (BatchNorm, keras.layers.BatchNormalization)


class _Layout(NamedTuple):
    """Where a producer's output channels lie in the weight that is scaled.

    `channels` is "last" for `(..., out)`, "depthwise" for `(..., in,
    multiplier)` whose output channel is `in * multiplier + m`, and
    "transposed" for `(..., out, in)`.
    """

    kernel: str
    channels: str


_LAYOUTS = {
    keras.layers.Dense: _Layout("kernel", "last"),
    keras.layers.Conv1D: _Layout("kernel", "last"),
    keras.layers.Conv2D: _Layout("kernel", "last"),
    keras.layers.Conv3D: _Layout("kernel", "last"),
    keras.layers.DepthwiseConv1D: _Layout("kernel", "depthwise"),
    keras.layers.DepthwiseConv2D: _Layout("kernel", "depthwise"),
    # The depthwise step stays as it is; the BN folds into the pointwise one.
    keras.layers.SeparableConv1D: _Layout("pointwise_kernel", "last"),
    keras.layers.SeparableConv2D: _Layout("pointwise_kernel", "last"),
    keras.layers.Conv1DTranspose: _Layout("kernel", "transposed"),
    keras.layers.Conv2DTranspose: _Layout("kernel", "transposed"),
    keras.layers.Conv3DTranspose: _Layout("kernel", "transposed"),
}


def fold_batch_norms(
    model: keras.Model, strict: bool = False, domain: int | None = None
) -> keras.Model:
    """A copy of `model` with every foldable BN layer folded into its producer.

    A BN layer (`bn_keras.BatchNorm` or `keras.layers.BatchNormalization`)
    computes, at inference, `x * s + (beta - moving_mean * s)` with
    `s = gamma / sqrt(moving_variance + epsilon)`. When its input is the output
    of a linear layer with kernel `W` and bias `b`, the new model has that
    layer with `W' = W * s` along the kernel's output-channel dimension and
    `b' = (b - moving_mean) * s + beta` (a bias is added if the layer had
    none), and no BN layer. `gamma` is 1 with `scale=False` and `beta` 0 with
    `center=False`. Renorm and the population-statistics options of
    `BatchNorm` change only training, so those layers fold the same way.

    A BN layer is folded when all of these hold; otherwise it is kept as it
    is (a partial fold, or an error with `strict=True`):

    - its input is the output of a `Dense`, `Conv1D/2D/3D`,
      `DepthwiseConv1D/2D`, `SeparableConv1D/2D` or `Conv1D/2D/3DTranspose`
      layer (exactly these classes) with a linear activation, not quantized;
    - that output feeds nothing else and is not a model output, and neither
      layer is called more than once in the model: folding would change the
      other use, and a copy of the producer for it would cost more than the
      BN layer saves;
    - its `axis` is one axis, the producer's output-channel axis (`-1`, or
      `1` after a `channels_first` convolution); a tuple of several axes is
      kept;
    - it is not called with `training=True`, and its compute dtype is the
      producer's;
    - with per-domain statistics (`BatchNorm(domains=k)`), `domain` names
      the set to fold: the folded model serves that domain only.

    The copy shares no variable with `model`, which is left untouched. Nested
    Sequential and functional models are folded too; a BN whose producer is
    in another (sub)model is kept. A producer with LoRA enabled is folded with
    its LoRA update merged into the kernel. The copy keeps the layer names
    and the compile configuration. It is meant for inference: in training
    mode it does not normalize.

    The folded model computes the same function up to float32 rounding. If
    every BN was folded, it holds no `bn_keras` layer and loads without
    `bn_keras`.

    Args:
        model: A built `keras.Sequential` or functional `keras.Model`.
        strict: If `True`, raise a `ValueError` naming every BN layer that
            cannot be folded, and why, instead of keeping it.
        domain: Optional int, the domain whose statistics (and parameters)
            a per-domain BN layer is folded with; without it such a layer is
            kept. Layers with one set of statistics ignore it.

    Returns:
        A new model of the same kind (Sequential or functional) with the
            folded BN layers removed.

    Raises:
        ValueError: If `model` is not a Keras model, is a subclassed model
            (or holds one), is a Sequential model that is not built, or, with
            `strict=True`, holds a BN layer that cannot be folded.

    Reference:
        - [Ioffe & Szegedy, 2015](https://arxiv.org/abs/1502.03167),
          Section 3.1: at inference the transform is linear.
        - [Jacob et al., 2018](https://arxiv.org/abs/1712.05877),
          Section 3.2: folding batch normalization into the weights.
    """
    if domain is not None:
        index = validation.to_int(domain)
        if index is None or index < 0 or isinstance(domain, bool):
            raise ValueError(
                f"`domain` must be a non-negative int. Received: domain={domain!r}"
            )
        domain = index
    return _fold_model(model, bool(strict), domain)


def _check_model(model):
    validation.check_graph_model(model, "fold_batch_norms", "fold it")


def _fold_model(model, strict, domain):
    _check_model(model)
    sequential = isinstance(model, keras.Sequential)
    graph = model._functional if sequential else model
    folds, kept = _plan(graph, domain)
    if strict and kept:
        raise ValueError(
            f"Cannot fold every BN layer of model '{model.name}' "
            "(strict=True): "
            + "; ".join(f"'{name}': {reason}" for name, reason in kept)
        )
    producers = {id(producer): bn for bn, producer in folds.values()}
    copies = []

    def clone(layer):
        if id(layer) in folds:
            # Never called: `call` below skips it.
            return layer
        if isinstance(layer, keras.Model):
            return _fold_model(layer, strict, domain)
        config = layer.get_config()
        if id(layer) in producers:
            config["use_bias"] = True
            # The LoRA update is merged into the folded kernel.
            config.pop("lora_rank", None)
            config.pop("lora_alpha", None)
        copy = layer.__class__.from_config(config)
        copies.append((layer, copy))
        return copy

    def call(layer, *args, **kwargs):
        if id(layer) in folds:
            return args[0] if args else kwargs["inputs"]
        return layer(*args, **kwargs)

    if sequential:
        folded = _rebuild_sequential(model, folds, clone)
    else:
        folded = keras.models.clone_model(
            model, clone_function=clone, call_function=call
        )
        if not model.trainable:
            folded.trainable = False
    # Weights are set once the copies are built by the new graph.
    for layer, copy in copies:
        if id(layer) in producers:
            _assign_folded(layer, copy, producers[id(layer)], domain)
        elif getattr(layer, "weights", None):
            copy.set_weights(layer.get_weights())
    return folded


def _rebuild_sequential(model, folds, clone):
    tensor = model._functional.inputs[0]
    inputs = keras.Input(
        batch_shape=tensor.shape,
        dtype=tensor.dtype,
        name=tensor._keras_history.operation.name,
    )
    layers = [clone(layer) for layer in model.layers if id(layer) not in folds]
    folded = keras.Sequential([inputs, *layers], name=model.name)
    if not model.trainable:
        folded.trainable = False
    if model.compiled:
        folded.compile_from_config(model.get_compile_config())
    return folded


def _plan(graph, domain):
    """Which BN layers of a functional graph fold, and why the others do not.

    Returns `({id(bn): (bn, producer)}, [(bn name, reason)])`.
    """
    nodes = [node for level in graph._nodes_by_depth.values() for node in level]
    calls = Counter(id(node.operation) for node in nodes)
    uses = Counter(id(tensor) for node in nodes for tensor in node.input_tensors)
    outputs = {id(tensor) for tensor in graph.outputs}
    folds, kept = {}, []
    for node in nodes:
        bn = node.operation
        if type(bn) not in _BATCH_NORMS:
            continue
        producer = node.input_tensors[0]._keras_history.operation
        reason = _reason_not_to_fold(node, bn, producer, calls, uses, outputs)
        domains = getattr(bn, "domains", 1)
        if reason is None and domains > 1 and domain is None:
            reason = (
                f"it keeps per-domain statistics (domains={domains}): pass "
                "`domain=` to fold one domain's"
            )
        elif reason is None and domains > 1 and domain >= domains:
            reason = f"`domain={domain}` is out of range (domains={domains})"
        if reason is None:
            folds[id(bn)] = (bn, producer)
        elif (bn.name, reason) not in kept:
            kept.append((bn.name, reason))
    return folds, kept


def _reason_not_to_fold(node, bn, producer, calls, uses, outputs):
    """Why the BN layer called at `node` cannot be folded, or None if it can."""
    if calls[id(bn)] > 1:
        return "it is called more than once"
    if node.arguments.kwargs.get("training") is True:
        # `model(x)` keeps it; only `training=False` on the call overrides it.
        return "it is called with training=True"
    if type(producer) not in _LAYOUTS:
        source = type(producer).__name__
        if isinstance(producer, keras.layers.InputLayer):
            source = "a model input"
        return (
            f"its input comes from {source}, not a Dense, convolution or "
            "transposed convolution layer"
        )
    where = f"its producer '{producer.name}'"
    activation = keras.activations.serialize(producer.activation)
    if activation != "linear":
        return f"{where} has activation {activation!r}"
    quantization = getattr(producer, "quantization_mode", None)
    if quantization is not None:
        return f"{where} is quantized ({quantization})"
    if calls[id(producer)] > 1:
        return f"{where} is called more than once"
    x = node.input_tensors[0]
    if uses[id(x)] > 1 or id(x) in outputs:
        return f"the output of {where} also feeds other layers or the model output"
    rank = len(x.shape)
    channels_first = getattr(producer, "data_format", None) == "channels_first"
    channel_axis = 1 if channels_first else rank - 1
    axes = (bn.axis,) if isinstance(bn.axis, int) else tuple(bn.axis)
    if len(axes) != 1:
        return f"its axis={bn.axis} names several axes"
    if axes[0] % rank != channel_axis:
        return (
            f"its axis={bn.axis} is not the output-channel axis {channel_axis} "
            f"of {where}"
        )
    if bn.compute_dtype != producer.compute_dtype:
        return (
            f"its compute dtype {bn.compute_dtype} differs from that of {where} "
            f"({producer.compute_dtype})"
        )
    return None


def _affine(bn, domain):
    """`(s, t)` in float64 with `bn(x) = x * s + t` at inference.

    A per-domain layer's with `domain`'s statistics (and parameters).
    """
    per_domain = getattr(bn, "domains", 1) > 1
    own = per_domain and bn.per_domain_parameters

    def value(variable, per_domain):
        values = _numpy(variable)
        return values[domain] if per_domain else values

    mean = value(bn.moving_mean, per_domain)
    scale = 1.0 / np.sqrt(value(bn.moving_variance, per_domain) + bn.epsilon)
    if bn.scale:
        scale = scale * value(bn.gamma, own)
    shift = -mean * scale
    if bn.center:
        shift = shift + value(bn.beta, own)
    return scale, shift


def _assign_folded(producer, copy, bn, domain):
    """Gives `copy` (built, with a bias) `producer`'s weights with `bn` folded in."""
    layout = _LAYOUTS[type(producer)]
    values = {variable.name: _numpy(variable) for variable in producer.weights}
    # The kernel the layer computes with (with LoRA, not the stored weight).
    kernel = _numpy(getattr(producer, layout.kernel))
    scale, shift = _affine(bn, domain)
    if layout.channels == "last":
        kernel = kernel * scale
    elif layout.channels == "depthwise":
        kernel = kernel * scale.reshape(kernel.shape[-2:])
    else:
        kernel = kernel * scale[:, None]
    values[layout.kernel] = kernel
    values["bias"] = values.get("bias", 0.0) * scale + shift
    for variable in copy.weights:
        variable.assign(values[variable.name].astype(variable.dtype))


def _numpy(variable):
    return np.asarray(keras.ops.convert_to_numpy(variable), np.float64)
