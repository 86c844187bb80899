"""Test-time adaptation of BN: AdaBN (`adapt_statistics`) and TENT (`Tent`)."""

from __future__ import annotations

import weakref
from typing import Any

import keras
import numpy as np
from keras import ops, tree

from bn_keras import modes
from bn_keras.precise import (
    _batches,
    _check_domain,
    _model_inputs,
    _replace_statistics,
    _validated,
    batch_norm_layers,
)
from bn_keras.validation import validate_positive_int

_STATISTICS = ("moving_mean", "moving_variance", "moving_stddev")


def adapt_statistics(
    model: keras.Model,
    data: Any,
    batch_size: int | None = None,
    steps: int | None = None,
    domain: int | None = None,
    progress: bool = True,
) -> dict[str, dict[str, np.ndarray]]:
    """AdaBN: replaces every BN layer's statistics with those of target data.

    Li et al. (2016): a network's weights carry over to a shifted domain, its
    population statistics do not. This recomputes them from unlabeled
    `data` of the target domain, exactly as `bn_keras.recompute_statistics`
    does from training data (the pooled mean and variance of each layer's
    input over the batches, all weights fixed), for every BN layer of the
    model, ours and Keras', at any depth: frozen layers (`trainable=False`,
    the `"frozen"` mode) included, since a deployed model is often frozen,
    and their statistics are what adapts.

    It returns the statistics it replaced; `restore_statistics(model,
    saved)` puts them back. Nothing else changes: weights, optimizer,
    counters, modes and flags.

    Use batches as large as at training: the statistics of each batch are
    pooled, so their size matters less than for test-batch statistics, but a
    batch of one example has no spread and is left out of array `data`.

    Args:
        model: A built Keras model with BN layers (`bn_keras.BatchNorm` or
            `keras.layers.BatchNormalization`).
        data: Unlabeled inputs of the target domain: arrays (with
            `batch_size`), or a dataset or iterable of input batches, read
            as `recompute_statistics` reads them. Labels are an error: AdaBN
            uses none, and a `(x, y)` pair of arrays would be taken for two
            inputs.
        batch_size: Batch size for array `data`.
        steps: Number of batches to use (default: all of `data`).
        domain: With per-domain layers (`BatchNorm(domains=k)`), adapt only
            this domain's statistics (see `recompute_statistics`).
        progress: Show a progress bar.

    Returns:
        The previous statistics, `{layer name: {"moving_mean": ...,
        "moving_variance": ...}}` as NumPy arrays (and `"moving_stddev"`
        under renorm), for `restore_statistics`.

    Raises:
        ValueError: If `model` has no BN layer or is not built, the layer
            names are not unique (the saved statistics are keyed by them),
            `data` is empty, holds a NaN or inf, carries labels or does not
            fit the model's inputs, or as `recompute_statistics`. Nothing is
            changed then.

    Example:
        ```python
        saved = bn_keras.adapt_statistics(model, x_target, batch_size=128)
        predictions = model.predict(x_target)
        bn_keras.restore_statistics(model, saved)  # the source model again
        ```

    Reference:
        - [Li et al., 2016](https://arxiv.org/abs/1603.04779), "Revisiting
          Batch Normalization For Practical Domain Adaptation".
    """
    batch_size, steps, layers = _validated(model, batch_size, steps, "adapt")
    domain = _check_domain(layers, domain, "adapt")
    names = [layer.name for layer in layers]
    if len(set(names)) < len(names):
        repeated = sorted({name for name in names if names.count(name) > 1})
        raise ValueError(
            f"The BN layers of model {model.name!r} must have unique names to "
            f"save their statistics; these repeat: {repeated}. Nothing was "
            "changed."
        )
    source, total_steps = _batches(data, batch_size, _model_inputs(model))
    saved = _snapshot(layers)
    _replace_statistics(
        model,
        layers,
        _unlabeled(source),
        total_steps,
        steps,
        progress,
        domain,
        "AdaBN",
        unfreeze=True,
    )
    return saved


def restore_statistics(
    model: keras.Model, saved: dict[str, dict[str, np.ndarray]]
) -> None:
    """Puts back the statistics that `adapt_statistics` returned.

    Args:
        model: The model given to `adapt_statistics`.
        saved: Its return value.

    Raises:
        ValueError: If `saved` does not name exactly the model's BN layers
            with statistics of their shapes. Nothing is changed then.
    """
    layers = {layer.name: layer for layer in batch_norm_layers(model)}
    if not isinstance(saved, dict) or set(saved) != set(layers):
        raise ValueError(
            "`saved` must be what `adapt_statistics` returned for this model: "
            f"statistics of its BN layers {sorted(layers)}. Received: "
            f"{sorted(saved) if isinstance(saved, dict) else type(saved).__name__}"
        )
    assignments = []
    for name, values in saved.items():
        for attribute, value in values.items():
            variable = getattr(layers[name], attribute, None)
            if variable is None or tuple(np.shape(value)) != tuple(variable.shape):
                raise ValueError(
                    f"`saved` holds {attribute} of shape {np.shape(value)} for "
                    f"layer {name!r}, which has "
                    f"{None if variable is None else tuple(variable.shape)}. "
                    "Nothing was changed."
                )
            assignments.append((variable, value))
    for variable, value in assignments:
        variable.assign(value)


def _snapshot(layers):
    return {
        layer.name: {
            name: np.array(ops.convert_to_numpy(getattr(layer, name)))
            for name in _STATISTICS
            if getattr(layer, name, None) is not None
        }
        for layer in layers
    }


def _unlabeled(source):
    for step, (x, y) in enumerate(source):
        if y is not None:
            raise ValueError(
                f"Batch {step} of `data` carries labels: adaptation uses the "
                "inputs alone (unlabeled target data). Pass the inputs only. "
                "Nothing was changed."
            )
        yield x, y


class Tent:
    """TENT: test-time adaptation of BN's gamma and beta by entropy minimization.

    Wang et al. (2021): on each test batch, every BN layer normalizes with
    the batch's own statistics (the `"batch"` statistics mode) and an
    optimizer step on gamma and beta, and nothing else, lowers the mean
    entropy of the model's predictions on that batch. `predict` returns, for
    each batch, the predictions of the forward pass that the (last) step
    started from, as the authors' code does: online, the adaptation carries
    over from batch to batch; `episodic=True` resets it before every batch.

    The step is Keras' own compiled train step (`train_on_batch` of a model
    wrapping `model`, with an entropy loss), so it runs on TensorFlow, JAX
    and torch alike. While the `Tent` exists, `model` is in the `"batch"`
    mode with only the BN layers' gamma and beta trainable; `reset()` gives
    gamma, beta and the optimizer their source values, `restore()` also the
    modes and `trainable` flags: the source model, exactly. `Tent` is also a
    context manager that restores on exit.

    - A test batch of one example has no statistics to normalize with: it is
      a `ValueError` before anything is adapted (`predict` checks the last
      batch too).
    - Keras' own BN layers have no modes: a `ValueError` names
      `bn_keras.convert_batch_norms`.
    - Outputs that do not fit `from_logits` (probabilities with
      `from_logits=True`, logits with `False`), or fewer than 2 classes on
      the last axis, are a `ValueError` at the first batch, before anything
      is adapted: the step would lower another quantity.
    - One `Tent` per model at a time: a second one on BN layers that an
      open `Tent` adapts is a `ValueError` (it would take the adapted model
      for the source one).
    - An interrupt during `predict` leaves gamma and beta partly adapted:
      `reset()` or `restore()` undo it.
    - Dropout and other training-mode layers are active in the adaptation
      step (as in the authors' `model.train()`), not in the predictions.

    Args:
        model: A built model with `bn_keras` BN layers, whose single output
            is class scores.
        optimizer: The optimizer of gamma and beta (default: the authors'
            `keras.optimizers.Adam(1e-3)`). Its state is reset by `reset()`.
        steps: Positive integer, optimizer steps per test batch.
        episodic: Reset to the source model before every batch.
        from_logits: Whether the model outputs logits (`True`) or
            probabilities (`False`, e.g. a final softmax).

    Example:
        ```python
        with bn_keras.Tent(model, from_logits=False) as tent:
            predictions = tent.predict(x_shifted, batch_size=128)
        # model is the source model again
        ```

    Reference:
        - [Wang et al., 2021](https://arxiv.org/abs/2006.10726), "Tent: Fully
          Test-Time Adaptation by Entropy Minimization".
    """

    def __init__(
        self,
        model: keras.Model,
        optimizer: keras.optimizers.Optimizer | None = None,
        steps: int = 1,
        episodic: bool = False,
        from_logits: bool = True,
    ) -> None:
        self.steps = validate_positive_int(steps, "steps")
        self.episodic = bool(episodic)
        self.from_logits = bool(from_logits)
        if not isinstance(model, keras.Model) or not model.built:
            raise ValueError(
                f"Tent needs a built Keras model. Received: model={model!r}"
            )
        layers = modes._check(model)
        open_tents = [
            layer.name
            for layer in layers
            if getattr(layer, "_tent", None) is not None
            and layer._tent() is not None
            and not layer._tent()._restored
        ]
        if open_tents:
            # A second Tent would take the first one's adapted gamma, beta
            # and "batch" mode for the source model, and restore those.
            raise ValueError(
                f"The BN layers {open_tents} of model {model.name!r} are already "
                "adapted by an open Tent: `restore()` it (or leave its `with` "
                "block) before creating another. Nothing was changed."
            )
        self.model = model
        self._layers = layers
        self._parameters = [
            variable
            for layer in layers
            for variable in (layer.gamma, layer.beta)
            if variable is not None
        ]
        if not self._parameters:
            raise ValueError(
                f"The BN layers of model {model.name!r} have neither gamma nor "
                "beta (`scale=False`, `center=False`): Tent has nothing to adapt."
            )
        self._source = [np.array(ops.convert_to_numpy(v)) for v in self._parameters]
        self._flags = _train_only(model, self._parameters)
        self._modes = modes._set(model, "batch")
        self._wrapper = _Wrapped(model)
        self._optimizer = optimizer or keras.optimizers.Adam(1e-3)
        self._wrapper.compile(
            optimizer=self._optimizer, loss=self._entropy, jit_compile=False
        )
        self._optimizer.build(self._wrapper.trainable_variables)
        self._optimizer_source = [
            np.array(ops.convert_to_numpy(v)) for v in self._optimizer.variables
        ]
        self._restored = False
        for layer in layers:
            layer._tent = weakref.ref(self)

    def _entropy(self, y_true, y_pred):
        del y_true  # unlabeled
        if self.from_logits:
            log_p = ops.log_softmax(y_pred, axis=-1)
        else:
            log_p = ops.log(ops.clip(y_pred, 1e-7, 1.0))
        return -ops.sum(ops.exp(log_p) * log_p, axis=-1)

    def __call__(self, x: Any) -> Any:
        """Adapts on the batch `x` (`steps` steps); returns its predictions."""
        self._check_open()
        examples = _examples(x)
        if examples < 2:
            raise ValueError(
                "Tent normalizes each test batch with its own statistics: a "
                f"batch of {examples} example(s) has none (every output would "
                "be beta). Use test batches of 2 or more examples. Nothing "
                "was adapted."
            )
        if not all(
            np.isfinite(ops.convert_to_numpy(v)).all()
            for v in tree.flatten(x)
            if np.issubdtype(np.asarray(ops.convert_to_numpy(v)).dtype, np.inexact)
        ):
            raise ValueError("The test batch holds a NaN or inf; nothing was adapted.")
        if self.episodic:
            self.reset()
        dummy = np.zeros((examples,), "float32")
        for step in range(self.steps):
            outputs = self._wrapper.predict_on_batch(x)
            if step == 0:
                self._check_outputs(outputs)
            self._wrapper.train_on_batch(x, dummy)
        return outputs

    def _check_outputs(self, outputs):
        """Refuses outputs whose entropy is not what `from_logits` says.

        Otherwise the step would lower another quantity, silently: the
        entropy of a softmax of probabilities, or of one score (always 0).
        """
        values = tree.flatten(outputs)
        shape = tuple(ops.shape(values[0])) if len(values) == 1 else None
        if shape is None or len(shape) < 2 or shape[-1] < 2:
            raise ValueError(
                "Tent lowers the entropy of the model's class scores, one "
                "output with 2 or more classes on its last axis. Received: "
                f"outputs of shape {shape if shape else len(values)}. Nothing "
                "was adapted."
            )
        p = np.asarray(ops.convert_to_numpy(values[0]), "float64")
        probabilities = (
            p.min() >= 0.0 and p.max() <= 1.0 and np.allclose(p.sum(-1), 1.0, atol=1e-3)
        )
        if self.from_logits and probabilities:
            raise ValueError(
                "The model's outputs are probabilities (in [0, 1], summing to "
                "1: a final softmax), but Tent was created with "
                "`from_logits=True`. Pass `from_logits=False`. Nothing was "
                "adapted."
            )
        if not self.from_logits and not (
            p.min() >= 0.0 and np.allclose(p.sum(-1), 1.0, atol=1e-2)
        ):
            raise ValueError(
                "Tent was created with `from_logits=False`, but the model's "
                "outputs are not probabilities (not in [0, 1], or not summing "
                "to 1 over the last axis): pass `from_logits=True` for logits. "
                "Nothing was adapted."
            )

    def predict(self, x: Any, batch_size: int = 32) -> np.ndarray:
        """Adapts on each batch of the arrays `x` in order; returns the predictions.

        Args:
            x: The model's inputs, arrays (a list or dict of them for several
                inputs), split into consecutive batches of `batch_size`.
            batch_size: The test-batch size, at least 2; the last batch too
                must hold 2 examples or more.

        Returns:
            The predictions of every example, in order, as NumPy.
        """
        self._check_open()
        batch_size = validate_positive_int(batch_size, "batch_size")
        examples = _examples(x)
        if examples == 0:
            raise ValueError("`x` holds no example; nothing was adapted.")
        last = examples % batch_size or batch_size
        if batch_size < 2 or last < 2:
            raise ValueError(
                "Tent normalizes each test batch with its own statistics, so "
                f"every batch needs 2 or more examples: {examples} examples in "
                f"batches of {batch_size} leave a batch of {min(last, batch_size)}."
                " Pick another batch size. Nothing was adapted."
            )
        outputs = []
        for start in range(0, examples, batch_size):
            batch = tree.map_structure(
                lambda v, start=start: v[start : start + batch_size], x
            )
            outputs.append(np.asarray(ops.convert_to_numpy(self(batch))))
        return np.concatenate(outputs)

    def reset(self) -> None:
        """Gives gamma, beta and the optimizer's state their source values."""
        for variable, value in zip(self._parameters, self._source, strict=True):
            variable.assign(value)
        for variable, value in zip(
            self._optimizer.variables, self._optimizer_source, strict=True
        ):
            variable.assign(value)

    def restore(self) -> None:
        """Gives the model back as it was: parameters, modes, `trainable` flags."""
        if self._restored:
            return
        self.reset()
        modes._restore(self.model, self._modes)
        for variable, flag in self._flags:
            variable.trainable = flag
        for layer in self._layers:
            layer._tent = None
        self._restored = True

    def _check_open(self):
        if self._restored:
            raise ValueError(
                "This Tent has restored its model; create a new Tent to adapt again."
            )

    def __enter__(self) -> Tent:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.restore()


class _Wrapped(keras.Model):
    """`model`, as a model of its own to compile with the entropy loss."""

    def __init__(self, model):
        super().__init__(name=f"tent_{model.name}")
        self.inner = model

    def call(self, x, training=False):
        return self.inner(x, training=training)


def _train_only(model, parameters):
    """Makes `parameters` the only trainable variables of `model`.

    Only the variables' own flags change (a model's `trainable_variables` are
    those of its variables that are trainable), not the layers' `trainable`,
    which decides more than that (Keras' BN switches to inference). Returns
    `[(variable, previous flag)]` of the changed ones.
    """
    wanted = {id(variable) for variable in parameters}
    changed = []
    for variable in model.variables:
        flag = id(variable) in wanted
        if variable.trainable != flag:
            changed.append((variable, variable.trainable))
            variable.trainable = flag
    return changed


def _examples(x):
    values = tree.flatten(x)
    if not values:
        return 0
    shape = ops.shape(values[0])
    return int(shape[0]) if len(shape) else 0
