"""Precise BN: population statistics recomputed from training data after training."""

from __future__ import annotations

import collections.abc
import contextlib
import itertools
import warnings
from typing import Any

import keras
import numpy as np
from keras import ops, tree

# Keras' own data adapters, which `model.fit` and `model.predict` read their
# data through; there is no public API for them.
from keras.src.trainers.data_adapters import (
    TFDatasetAdapter,
    array_data_adapter,
    get_data_adapter,
    is_tf_dataset,
    is_torch_dataloader,
)
from tqdm.auto import tqdm

from bn_keras.batch_norm import BatchNorm
from bn_keras.validation import to_int, validate_positive_int


def batch_norm_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Every batch-normalization layer in `model` (ours and Keras'), in order."""
    types = (BatchNorm, keras.layers.BatchNormalization)
    # Keras has no public recursive walk; _flatten_layers also finds layers
    # held as attributes of custom layers and subclassed models.
    return [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, types)
    ]


def recompute_statistics(
    model: keras.Model,
    data: Any,
    batch_size: int | None = None,
    steps: int | None = None,
    progress: bool = True,
    domain: int | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Recomputes every BN layer's `moving_mean` and `moving_variance` exactly.

    "Precise BN" (Wu & Johnson, 2021): with all weights frozen, the model runs
    in training mode over `steps` batches of `data`, each BN layer's batch
    mean and variance are collected, and its population statistics are set to
    the statistics of all the values it saw: the mean of the batch means and
    the pooled variance (the mean of the batch variances plus the variance of
    the batch means, combined with Chan's parallel update in float64). When
    the batches cover a dataset once, these are exactly that dataset's mean and
    variance of each BN layer's input. An EMA instead weighs recent batches,
    taken with older weights, and lags behind the network early in training.

    With a mask or `virtual_batch_size`, each batch is weighted by its number
    of examples and its variance is the layer's (averaged over ghost
    batches), so the result approximates rather than equals the statistics of
    the values seen.

    The old statistics are replaced, never blended in, so a NaN or inf state
    (from a bad batch, or a bad checkpoint) is repaired. A batch of `data`
    holding a NaN or inf raises `ValueError` and changes nothing.

    Nothing but the population statistics changes: the model runs statelessly,
    so trainable weights, other non-trainable weights (counters, renorm
    statistics) and the optimizer are untouched.

    A frozen BN layer (`trainable=False`, or a `bn_keras` layer in the
    `"frozen"` statistics mode) normalizes with its population statistics in
    training mode too, as in `model.fit`: it is skipped, with a warning
    naming it, keeps its statistics, and the layers after it are recomputed
    from its inference-mode output. A layer in the `"batch"` statistics mode
    normalizes with the batch statistics in training, as in the `"update"`
    mode, and gets its (unused) population statistics recomputed too.

    Per-domain statistics (`BatchNorm(domains=k)`): each call of a layer
    updates the set of its `domain`, so a model that routes each domain's
    data to its own calls (two towers, or a domain input) gets every set
    recomputed from its own domain's data in one pass; a set that `data`
    never reaches keeps its values. With `domain=d`, every per-domain layer
    uses domain `d` whatever its calls say, and only set `d` is recomputed,
    from `data`, which should be domain `d`'s.

    `data` is read as `model.predict` reads its `x`:

    - Arrays (NumPy, tensors) or a dict, list or tuple of them, nested as the
      model's inputs, are the model's inputs, as `model.fit(x=...)` takes
      them: `(x1, x2)` is two inputs, never `(x, y)`. They are split into
      batches of `batch_size`.
    - A `tf.data.Dataset`, a `keras.utils.PyDataset`, a torch `DataLoader`, a
      generator or any other iterable yields batches, each unpacked as Keras
      unpacks them (`keras.utils.unpack_x_y_sample_weight`): `(x,)`,
      `(x, y)` or `(x, y, sample_weight)`, where `x` is the model's inputs
      (an array, or a dict, list or tuple of arrays), or `x` alone when the
      batch is not a tuple or list. A two-input model's batch is thus
      `((x1, x2), y)` or `((x1, x2),)`.

    Args:
        model: A built Keras model holding `bn_keras.BatchNorm` or
            `keras.layers.BatchNormalization` layers, at any depth.
        data: The model's inputs as arrays, or a dataset or iterable of
            batches (see above). Targets and sample weights are ignored.
        batch_size: Batch size for array `data`, a positive integer; the
            statistics are those of training, so use the training batch size.
            A last batch of a single example is left out.
        steps: Number of batches to use, a positive integer (default: all of
            `data`).
        progress: Show a progress bar.
        domain: Optional int: recompute only this domain's statistics, from
            `data` of that domain. Every BN layer must then keep per-domain
            statistics with more than `domain` sets (a layer with one set,
            shared by every domain, is an error: `data` of one domain would
            fit it to that domain).

    Returns:
        `{layer name: (mean, variance)}`, the NumPy values assigned (frozen
        layers are not in it).

    Raises:
        ValueError: If `batch_size` or `steps` is not a positive integer,
            `domain` does not fit the layers (see above), `data` does not fit
            the model's inputs, yields no batch or holds a
            NaN or inf, or every BN layer is frozen.

    Reference:
        - [Ioffe & Szegedy, 2015](https://arxiv.org/abs/1502.03167),
          Algorithm 2: population statistics over training mini-batches.
        - [Wu & Johnson, 2021](https://arxiv.org/abs/2105.07576),
          "Rethinking 'Batch' in BatchNorm", Section 3.
    """
    batch_size, steps, layers = _validated(model, batch_size, steps, "recompute")
    domain = _check_domain(layers, domain, "recompute")
    untrainable = [layer.name for layer in layers if not layer.trainable]
    fixed = [layer.name for layer in layers if layer.trainable and _frozen(layer)]
    layers = [layer for layer in layers if not _frozen(layer)]
    if not layers:
        raise ValueError(
            f"Every batch-normalization layer of model {model.name!r} is frozen "
            '(`trainable=False`) or in the "frozen" statistics mode: frozen '
            "layers keep their statistics, so there is nothing to recompute. "
            f"Frozen layers: {untrainable + fixed}"
        )
    if untrainable:
        warnings.warn(
            f"Precise BN skips the frozen (`trainable=False`) layers {untrainable}: "
            "they normalize with their population statistics in training too, "
            "and keep them.",
            stacklevel=2,
        )
    if fixed:
        warnings.warn(
            f'Precise BN skips the layers {fixed} in the "frozen" statistics '
            "mode: they normalize with their population statistics in training "
            "too, and keep them.",
            stacklevel=2,
        )
    source, total_steps = _batches(data, batch_size, _model_inputs(model))
    return _replace_statistics(
        model, layers, source, total_steps, steps, progress, domain, "Precise BN"
    )


def _replace_statistics(
    model, layers, source, total_steps, steps, progress, domain, desc, unfreeze=False
):
    """Measures `layers` on the batches of `source` and assigns the result.

    Returns `{layer name: (mean, variance)}`; see `recompute_statistics`.
    """
    totals = _measure(
        model,
        layers,
        source,
        total_steps,
        steps,
        progress=progress,
        desc=desc,
        domain=domain,
        unfreeze=unfreeze,
    )
    for layer, total in zip(layers, totals, strict=True):
        if not total.reached.any():
            raise ValueError(
                f"No batch of `data` gave finite statistics for layer "
                f"{layer.name!r} (its inputs overflow, or the data never reach "
                "it); nothing was recomputed."
            )

    result = {}
    for layer, total in zip(layers, totals, strict=True):
        reached = total.reached
        expected = np.ones_like(reached)
        if domain is not None:
            # The other domains' statistics are not this data's to reach.
            expected = np.zeros_like(reached)
            expected[domain] = True
        if not reached[expected].all():
            warnings.warn(
                f"{desc}: {int((expected & ~reached).sum())} of "
                f"{int(expected.sum())} population "
                f"statistics of layer {layer.name!r} got no usable value from "
                "`data` (features or timesteps it never reaches, or non-finite "
                "activations); they keep their previous values.",
                stacklevel=2,
            )
        old_mean = ops.convert_to_numpy(layer.moving_mean).astype("float64")
        old_variance = ops.convert_to_numpy(layer.moving_variance).astype("float64")
        mean = np.where(reached, total.mean, old_mean)
        variance = np.where(reached, total.variance, old_variance)
        layer.moving_mean.assign(mean.astype("float32"))
        layer.moving_variance.assign(variance.astype("float32"))
        if getattr(layer, "renorm", False):
            # Keras derives moving_variance from moving_stddev under renorm.
            stddev = ops.convert_to_numpy(layer.moving_stddev).astype("float64")
            stddev = np.where(reached, np.sqrt(variance + layer.epsilon), stddev)
            layer.moving_stddev.assign(stddev.astype("float32"))
        result[layer.name] = (mean, variance)
    return result


def _validated(model, batch_size, steps, verb):
    """`(batch_size, steps, BN layers of model)`, checked; `verb` names the work."""
    if batch_size is not None:
        batch_size = validate_positive_int(batch_size, "batch_size")
        if batch_size == 1:
            raise ValueError(
                f"Cannot {verb} batch statistics from batches of one example: "
                "a single value per feature has no spread. Use the training "
                "batch size. Received: batch_size=1"
            )
    if steps is not None:
        steps = validate_positive_int(steps, "steps")
    layers = batch_norm_layers(model)
    if not layers:
        raise ValueError(
            f"Model {model.name!r} has no batch-normalization layer to {verb}."
        )
    if not model.built:
        raise ValueError(f"Model {model.name!r} must be built before you {verb} it.")
    return batch_size, steps, layers


def _measure(
    model,
    layers,
    source,
    total_steps,
    steps,
    *,
    progress,
    desc,
    unfreeze=False,
    on_batch=None,
    domain=None,
):
    """The pooled moments of each layer's input, over the batches of `source`.

    The model runs statelessly in training mode (compiled) on each `(x, y)`
    batch of `source` (from `_batches`), at most `steps` of them; each layer
    of `layers` normalizes with its batch statistics, whose moments are
    collected. A frozen layer of `layers` (`trainable=False`, or the
    `"frozen"` statistics mode) would use its population statistics instead
    and give none: `unfreeze=True` runs it as an unfrozen one. `on_batch(x,
    y, outputs, inference_outputs)`, if given, gets each batch with the
    model's outputs of that run and of an inference-mode run of the model as
    it is, with its population statistics. With `domain`, every layer with
    several sets of statistics (`BatchNorm(domains=k)`) uses that domain's in
    both runs, whatever its call's `domain` argument.

    Nothing changes: the variables are only read, and the layers' attributes
    (momentum, `trainable`, ...) are restored, also on an error. A batch with
    a NaN or inf in `x`, or no batch at all, is a `ValueError`.

    Returns:
        One `_Pooled` per layer of `layers`.
    """
    batches = source
    if steps is not None:
        batches = itertools.islice(source, steps)
        total_steps = steps if total_steps is None else min(steps, total_steps)
    if domain is not None:
        with _overriding_domain(layers, domain):
            return _measure(
                model,
                layers,
                source,
                total_steps,
                steps,
                progress=progress,
                desc=desc,
                unfreeze=unfreeze,
                on_batch=on_batch,
            )
    try:
        # The attributes are switched around each training-mode call only:
        # the inference-mode call runs the model as it is. The variables are
        # listed in both states (unfreezing moves gamma and beta among the
        # trainable ones).
        holders = _holders(model, layers) if unfreeze else []
        with _writing_batch_statistics(layers, unfreeze, holders):
            trainable = [v.value for v in model.trainable_variables]
            variables = model.non_trainable_variables
        position = {id(v): i for i, v in enumerate(variables)}
        slots = [
            (position[id(layer.moving_mean)], position[id(layer.moving_variance)])
            for layer in layers
        ]
        # Stand-ins for the old statistics, which the run replaces: our layers
        # replace outright and leave what a batch does not reach (a masked
        # feature, a timestep beyond the batch's sequences) as it was, so NaN
        # marks it as not reached. Keras' layer blends with weight 0, and
        # 0 * NaN is NaN: finite values for it.
        stand_ins = [v.value for v in variables]
        for layer, (mean_at, variance_at) in zip(layers, slots, strict=True):
            mean, variance = stand_ins[mean_at], stand_ins[variance_at]
            if isinstance(layer, BatchNorm):
                stand_ins[mean_at] = ops.full_like(mean, np.nan)
                stand_ins[variance_at] = ops.full_like(variance, np.nan)
            else:
                stand_ins[mean_at] = ops.zeros_like(mean)
                stand_ins[variance_at] = ops.ones_like(variance)
        totals = [_Pooled() for _ in layers]
        run = _compiled_call(model, slots, training=True)
        if on_batch is not None:
            infer = _compiled_call(model, [], training=False)
            state = (
                [v.value for v in model.trainable_variables],
                [v.value for v in model.non_trainable_variables],
            )
        for step, (x, y) in enumerate(
            tqdm(batches, total=total_steps, disable=not progress, desc=desc)
        ):
            if not _all_finite(x):
                raise ValueError(
                    f"Batch {step} of `data` holds a NaN or inf; nothing was changed."
                )
            with _writing_batch_statistics(layers, unfreeze, holders):
                with _counting_calls(layers) as calls:
                    outputs, statistics = run(trainable, stand_ins, x)
            _check_single_calls(layers, calls)
            examples = int(ops.shape(tree.flatten(x)[0])[0])
            for total, (mean, variance) in zip(totals, statistics, strict=True):
                total.add(
                    examples, ops.convert_to_numpy(mean), ops.convert_to_numpy(variance)
                )
            if on_batch is not None:
                on_batch(x, y, outputs, infer(*state, x)[0])
    finally:
        # Ends the data's epoch now (a PyDataset's workers), not when
        # garbage-collected.
        source.close()
    if totals[0].batches == 0:
        raise ValueError("`data` yielded no batch; nothing was changed.")
    return totals


def _compiled_call(model, slots, training):
    """`f(trainable, non_trainable, x) -> (outputs, [(mean, variance) per slot])`.

    The model's stateless call, compiled as the backend compiles a train
    step (tf.function, jax.jit; torch runs eagerly, without autograd),
    returning the outputs and, of the new state, only the statistics at
    `slots`.
    """

    def run(trainable, non_trainable, x):
        outputs, state = model.stateless_call(
            trainable, non_trainable, x, training=training
        )
        statistics = [
            (state[mean_at], state[variance_at]) for mean_at, variance_at in slots
        ]
        return outputs, statistics

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(run, reduce_retracing=True)
    if backend == "jax":
        import jax

        return jax.jit(run)
    if backend == "torch":
        import torch

        return torch.no_grad()(run)
    return run


@contextlib.contextmanager
def _writing_batch_statistics(layers, unfreeze, holders):
    """A context in which `layers` write their batch statistics in training.

    With momentum 0 (and no debiasing, the biased variance) a layer's
    training-mode update makes its moving statistics exactly this batch's
    mean and variance. A layer in the `"batch"` statistics mode, which
    normalizes with them but never writes them, is put in the `"update"`
    mode. With `unfreeze`, a frozen layer is too (`"frozen"` mode), and the
    `holders` (`_holders`: the layers and those that hold them, a frozen
    submodel, or a `BatchNormLSTM`, which decides for its normalizations)
    are made trainable. Only each object's own flag is set, not its
    sublayers' nor its variables' (as Keras' `trainable` setter would).
    Everything is restored on exit.
    """
    saved = []

    def switch(obj, name, value):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    try:
        for layer in layers:
            switch(layer, "momentum", 0.0)
            if isinstance(layer, BatchNorm):
                switch(layer, "debias", False)
                switch(layer, "unbiased_variance", False)
                # The mode's private attribute: its setter warns about
                # compiled functions, which do not apply to this run.
                if layer.statistics == "batch" or (
                    unfreeze and layer.statistics == "frozen"
                ):
                    switch(layer, "_statistics", "update")
        for holder in holders:
            if not holder.trainable:
                switch(holder, "_trainable", True)
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


@contextlib.contextmanager
def _overriding_domain(layers, domain):
    """A context in which the per-domain layers of `layers` use `domain`."""
    changed = []
    try:
        for layer in layers:
            if getattr(layer, "domains", 1) > 1:
                changed.append(layer)
                layer._domain_override = domain
        yield
    finally:
        for layer in changed:
            layer._domain_override = None


def _check_domain(layers, domain, verb):
    """`domain` checked against the layers: each must keep per-domain statistics.

    A layer with one set of statistics describes every domain's data at
    once; measuring it on one domain's data alone would fit it to that one.
    """
    if domain is None:
        return None
    index = to_int(domain)
    if index is None or index < 0 or isinstance(domain, bool):
        raise ValueError(
            f"`domain` must be a non-negative int. Received: domain={domain!r}"
        )
    shared = [layer.name for layer in layers if getattr(layer, "domains", 1) == 1]
    if shared:
        raise ValueError(
            f"`domain={index}` asks to {verb} one domain's statistics from "
            f"data of that domain, but the layers {shared} keep one set for "
            "every domain (built without `domains`): their statistics would "
            f"fit domain {index} alone. {verb.capitalize()} without `domain`, "
            "on data of every domain. Nothing was changed."
        )
    small = [
        f"{layer.name} (domains={layer.domains})"
        for layer in layers
        if index >= layer.domains
    ]
    if small:
        raise ValueError(
            f"`domain={index}` is out of range for {', '.join(small)}. Nothing "
            "was changed."
        )
    return index


@contextlib.contextmanager
def _counting_calls(layers):
    """Records the `domain` of each call of each layer (a list per layer).

    The calls are made by Python once per trace of a compiled run (and on
    every eager run): what one forward pass does.
    """
    calls = [[] for _ in layers]
    originals = []
    try:
        for layer, seen in zip(layers, calls, strict=True):
            original = layer.call

            def call(*args, _original=original, _seen=seen, **kwargs):
                _seen.append(kwargs.get("domain"))
                return _original(*args, **kwargs)

            originals.append((layer, "call" in vars(layer), original))
            layer.call = call
        yield calls
    finally:
        for layer, own, original in originals:
            if own:
                layer.call = original
            else:
                del layer.call


def _check_single_calls(layers, calls):
    """A `ValueError` for a layer that one forward pass calls more than once.

    Each call overwrites the statistics the last one wrote, so only one
    call's data would be measured: a shared layer of two towers would fit one
    tower's data alone. Per-domain calls with distinct `domain` ints write
    distinct sets, and are fine.
    """
    for layer, domains in zip(layers, calls, strict=True):
        if len(domains) <= 1:
            continue
        ints = all(isinstance(d, int) for d in domains)
        distinct = ints and len(set(domains)) == len(domains)
        if getattr(layer, "domains", 1) > 1 and distinct:
            continue
        raise ValueError(
            f"Layer {layer.name!r} is called {len(domains)} times in one forward "
            "pass of the model (a layer shared by several branches or towers): "
            "precise BN measures one batch of statistics per call, so it would "
            "fit one call's data alone. Give each call its own set of "
            "statistics (`BatchNorm(domains=n)`, with `domain=i` at call i), or "
            "measure a model that calls the layer once. Nothing was changed."
        )


def _holders(model, layers):
    """`layers`, and every layer of `model` (itself included) that holds one."""
    wanted = {id(layer) for layer in layers}
    holders = list(layers)
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if id(layer) not in wanted and any(
            id(inner) in wanted
            for inner in layer._flatten_layers(include_self=False, recursive=True)
        ):
            holders.append(layer)
    return holders


def _frozen(layer):
    """Whether `layer` normalizes with its population statistics in training."""
    return not layer.trainable or getattr(layer, "statistics", "update") == "frozen"


def _all_finite(x):
    for value in tree.flatten(x):
        values = ops.convert_to_numpy(value)
        if np.issubdtype(values.dtype, np.inexact) and not np.isfinite(values).all():
            return False
    return True


class _Pooled:
    """Mean and variance of all values, from per-batch moments (Chan et al.).

    Entry by entry: a batch whose statistic is not finite for an entry (not
    reached by it) adds nothing to that entry.
    """

    def __init__(self):
        self.batches = 0
        self.count = None
        self.mean = None
        self.m2 = None

    def add(self, count, mean, variance):
        mean = np.asarray(mean, dtype="float64")
        variance = np.asarray(variance, dtype="float64")
        usable = np.isfinite(mean) & np.isfinite(variance)
        added = np.where(usable, float(count), 0.0)
        mean = np.where(usable, mean, 0.0)
        m2 = np.where(usable, variance, 0.0) * added
        self.batches += 1
        if self.count is None:
            self.count, self.mean, self.m2 = added, mean, m2
            return
        total = self.count + added
        share = added / np.maximum(total, 1.0)
        delta = mean - self.mean
        self.mean = self.mean + delta * share
        self.m2 = self.m2 + m2 + delta**2 * self.count * share
        self.count = total

    @property
    def reached(self):
        return self.count > 0

    @property
    def variance(self):
        return self.m2 / np.maximum(self.count, 1.0)


def _model_inputs(model):
    """`(input structure, flat input tensors)`, or Nones where `model` has none.

    Functional and `Sequential` models with an `Input` have them; a
    subclassed model does not, and takes whatever its `call` takes.
    """
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        return None, None
    if not inputs:
        return None, None
    return getattr(model, "_inputs_struct", None), tree.flatten(inputs)


def _describe(structure):
    """`structure` with each array replaced by its shape, for a message."""
    return tree.map_structure(
        lambda value: (
            f"array{tuple(value.shape)}" if hasattr(value, "shape") else value
        ),
        structure,
    )


def _check_inputs(x, model_inputs, where, rule):
    """A ValueError unless `x` fits the model's inputs: their number (or a
    dict's keys), rank and known sizes, as Keras' functional models take
    them."""
    structure, inputs = model_inputs
    if inputs is None:
        return
    if isinstance(x, dict):
        # Matched by name; Keras drops unknown keys with a warning.
        if isinstance(structure, dict) and not set(structure) <= set(x):
            raise ValueError(
                f"{where[0].upper()}{where[1:]} lacks the model's input(s) "
                f"{sorted(set(structure) - set(x))}. Received: {_describe(x)}"
            )
        return
    values = tree.flatten(x)
    if len(values) != len(inputs):
        raise ValueError(
            f"The model takes {len(inputs)} input array(s), but {where} holds "
            f"{len(values)}. {rule} Received: {_describe(x)}"
        )
    for tensor, value in zip(inputs, values, strict=True):
        rank, shape = len(tensor.shape), tuple(getattr(value, "shape", ()))
        # Keras adds or drops a trailing axis of size 1 itself.
        fits = (
            len(shape) == rank
            or (len(shape) == rank + 1 and shape[-1] == 1)
            or (len(shape) == rank - 1 and tensor.shape[-1] == 1)
        )
        if not fits:
            raise ValueError(
                f"The model's input {tensor.name!r} takes shape "
                f"{tuple(tensor.shape)}, but {where} gives it an array of shape "
                f"{shape}; is the data batched? Received: {_describe(x)}"
            )
        if len(shape) == rank and any(
            size is not None and given != size
            for size, given in zip(tensor.shape[1:], shape[1:], strict=True)
        ):
            raise ValueError(
                f"The model's input {tensor.name!r} takes shape "
                f"{tuple(tensor.shape)}, but {where} gives it an array of shape "
                f"{shape}. Received: {_describe(x)}"
            )


ARRAY_RULE = (
    "Array `data` is the model's inputs, as `x` in `model.fit(x=...)`: "
    "`(x1, x2)` is two inputs, not `(x, y)`; pass the inputs alone, or batches "
    "as a generator or dataset."
)
BATCH_RULE = (
    "Each batch is unpacked as in `model.fit`: `(x,)`, `(x, y)` or "
    "`(x, y, sample_weight)`, or `x` alone when it is not a tuple or list; "
    "a two-input model's batch is `((x1, x2), y)` or `((x1, x2),)`."
)


def _batches(data, batch_size, model_inputs, y=None):
    """`(iterator of (x, y) batches, number of batches or None)` from `data`.

    Arrays and Keras' data types go through Keras' data adapters, read as
    the backend's train step reads them; other iterables batch by batch. `y`
    (targets for array `data`, or None) is batched along with them; a batch
    without targets has `y` None.
    """
    if data is None:
        raise ValueError(
            "`data` must be the model's inputs as arrays, a dataset, or an "
            "iterable of batches. Received: data=None"
        )
    if array_data_adapter.can_convert_arrays((data,)):
        arrays = tree.flatten(data)
        if not arrays:
            raise ValueError("`data` yielded no batch; nothing was changed.")
        if batch_size is None:
            hint = (
                " A list or tuple of arrays is the model's inputs, as in "
                "`model.fit(x=...)`; pass a list of batches as `iter(batches)`."
                if isinstance(data, (list, tuple))
                else ""
            )
            raise ValueError(
                "`batch_size` is needed to split an array into batches; use the "
                f"training batch size.{hint}"
            )
        _check_inputs(data, model_inputs, "`data`", ARRAY_RULE)
        examples = int(arrays[0].shape[0])
        if y is not None:
            _check_targets(y, examples)
        if examples > 1 and examples % batch_size == 1:
            # A last batch of one example has no spread to measure (BatchNorm
            # refuses it in training mode); it is left out.
            data, y = tree.map_structure(
                lambda value: value[: examples - 1], (data, y), none_is_leaf=False
            )
        adapter = get_data_adapter(data, y, batch_size=batch_size, shuffle=False)
        # The adapter yields `x`, `(x,)` when `x` is a tuple or list, or `(x, y)`.
        return _unpacked(_adapted(adapter), model_inputs), adapter.num_batches
    if y is not None:
        raise ValueError(
            "`y` goes with array `data` only; a dataset or an iterable yields "
            "its targets in its `(x, y)` batches. Received: y with data of type "
            f"{type(data).__name__}"
        )
    if batch_size is not None:
        raise ValueError(
            "`batch_size` applies to array data only (arrays or tensors, or a "
            "dict, list or tuple of them); batch the dataset itself. Received: "
            f"batch_size={batch_size} with data of type {type(data).__name__}"
        )
    if (
        is_tf_dataset(data)
        or is_torch_dataloader(data)
        or isinstance(data, keras.utils.PyDataset)
    ):
        adapter = get_data_adapter(data, shuffle=False)
        return _unpacked(_adapted(adapter), model_inputs), adapter.num_batches
    if isinstance(data, (str, bytes, collections.abc.Mapping)) or not isinstance(
        data, collections.abc.Iterable
    ):
        raise ValueError(
            "`data` must be the model's inputs as arrays (a dict, list or tuple "
            "of them for several inputs), a dataset, or an iterable of batches. "
            f"Received: data of type {type(data).__name__}"
        )
    converted = (
        tree.map_structure(
            # A tf.data batch on the JAX or torch backend goes through NumPy.
            lambda value: value if ops.is_tensor(value) else np.asarray(value),
            batch,
        )
        for batch in data
    )
    return _unpacked(converted, model_inputs), None


def _adapted(adapter):
    """The adapter's batches, in the backend's own tensors where it has them.

    On TensorFlow only a `tf.data.Dataset` stays one: other data go through
    NumPy, which the compiled step takes as well, rather than through
    `tf.data.Dataset.from_generator`, which refuses list-structured inputs.
    """
    backend = keras.backend.backend()
    adapter.on_epoch_begin()
    try:
        if backend == "tensorflow" and isinstance(adapter, TFDatasetAdapter):
            yield from adapter.get_tf_dataset()
        elif backend == "jax":
            yield from adapter.get_jax_iterator()
        elif backend == "torch":
            yield from adapter.get_torch_dataloader()
        else:
            yield from adapter.get_numpy_iterator()
    finally:
        adapter.on_epoch_end()


def _check_targets(y, examples):
    """A ValueError unless `y` is arrays with `examples` examples each."""
    values = tree.flatten(y)
    if not values or not array_data_adapter.can_convert_arrays((y,)):
        raise ValueError(
            "`y` must be an array (or a structure of arrays, as the model's "
            f"outputs) of targets. Received: y of type {type(y).__name__}"
        )
    for value in values:
        shape = tuple(getattr(value, "shape", ()))
        if not shape or shape[0] != examples:
            raise ValueError(
                f"`y` must have one target per example of `data` ({examples}). "
                f"Received: y of shape {shape}"
            )


def _unpacked(batches, model_inputs):
    """`(x, y)` of each `(x,)`, `(x, y)`, `(x, y, w)` or `x` batch (`y` None
    where the batch has none)."""
    for step, batch in enumerate(batches):
        if isinstance(batch, (tuple, list)) and not 1 <= len(batch) <= 3:
            raise ValueError(
                f"Batch {step} of `data` is a {type(batch).__name__} of "
                f"{len(batch)} elements. {BATCH_RULE} Received: {_describe(batch)}"
            )
        x, y, _ = keras.utils.unpack_x_y_sample_weight(batch)
        _check_inputs(x, model_inputs, f"batch {step} of `data`", BATCH_RULE)
        yield x, y
