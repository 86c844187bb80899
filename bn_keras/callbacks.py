"""Callbacks that steer the population statistics inside `fit()`.

`PreciseBN` recomputes them from training data at the end of epochs and of
training; `FreezeStatistics` fixes them for the last epochs.
"""

from __future__ import annotations

import collections.abc
import time
from typing import Any

import keras

from bn_keras import modes
from bn_keras.batch_norm import BatchNorm
from bn_keras.precise import batch_norm_layers, recompute_statistics
from bn_keras.validation import validate_positive_int


class PreciseBN(keras.callbacks.Callback):
    """Recomputes the population statistics during and after `fit()` (precise BN).

    Every `every_n_epochs` epochs, and once more at the end of training,
    `bn_keras.recompute_statistics(model, data, ...)` replaces the moving
    averages of every BN layer (ours or Keras') with the exact statistics of
    `data` under the current weights, the "precise BN" of Wu & Johnson (2021).
    Within an epoch with validation, this happens before the validation pass,
    so `val_*` metrics are those of the recomputed statistics.

    At the end of training it recomputes again if the weights changed since
    the last recomputation: training stopped before an epoch that was due
    (early stopping, `epochs` not a multiple of `every_n_epochs`), or the
    optimizer has `use_ema=True`, whose averaged weights Keras swaps in at the
    end of `fit()`, after the last epoch: their statistics were never measured
    by any moving average.

    Layers in the `"frozen"` statistics mode or with `trainable=False` keep
    their statistics, as in `recompute_statistics` (at the end of training,
    the modes of the last epoch count, whatever a `FreezeStatistics` restored
    before this callback ran).

    Its cost is logged: the `precise_bn_seconds` entry of each epoch's logs
    (and so of `model.fit(...).history`), 0 for an epoch without it, and
    `self.records`, one dict per recomputation. `recompute_statistics` changes
    nothing until it has read every batch, so an interrupt during it leaves
    the statistics as they were.

    Args:
        data: A sample of the training data, as `recompute_statistics` takes
            it: arrays of the model's inputs (with `batch_size`), or a dataset
            or iterable of batches; labels are ignored. Use training batches,
            without augmentation you do not want measured. A generator (or
            other iterator) is used up by one recomputation: a second one is
            a `ValueError`, raised when training begins if it is sure to come.
        every_n_epochs: Positive integer: recompute after every N-th epoch.
        steps: Number of batches of `data` to use each time (default: all).
            Wu & Johnson use a few thousand examples.
        batch_size: The batch size for array `data`: use the training one.
        verbose: `1` prints one line per recomputation, `0` nothing.

    Example:
        ```python
        precise = bn_keras.callbacks.PreciseBN(x_train[:5000], batch_size=64)
        model.fit(x_train, y_train, batch_size=64, epochs=5, callbacks=[precise])
        ```

    Reference:
        - [Wu & Johnson, 2021](https://arxiv.org/abs/2105.07576),
          "Rethinking 'Batch' in BatchNorm", Section 3.
    """

    def __init__(
        self,
        data: Any,
        every_n_epochs: int = 1,
        steps: int | None = None,
        batch_size: int | None = None,
        verbose: int = 1,
    ) -> None:
        super().__init__()
        if data is None:
            raise ValueError(
                "`data` must be a sample of the training data to recompute the "
                "statistics from. Received: data=None"
            )
        self.data = data
        self.every_n_epochs = validate_positive_int(every_n_epochs, "every_n_epochs")
        self.steps = None if steps is None else validate_positive_int(steps, "steps")
        self.batch_size = (
            None
            if batch_size is None
            else validate_positive_int(batch_size, "batch_size")
        )
        self.verbose = int(verbose)
        self.records: list[dict[str, Any]] = []
        self._epoch = None
        self._stale = False
        self._last_modes = None
        self._iterator_read = False

    def on_train_begin(self, logs=None):
        if not batch_norm_layers(self.model):
            raise ValueError(
                f"PreciseBN: model {self.model.name!r} has no batch-normalization "
                "layer to recompute."
            )
        # Due epochs, and the end of training after an EMA swap.
        epochs = self.params.get("epochs") or 0
        swapped = getattr(self.model.optimizer, "use_ema", False)
        self._check_readable(epochs // self.every_n_epochs + bool(swapped))
        self.records = []
        self._stale = False
        self._last_modes = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._recomputed = False
        self._stale = True

    def on_test_begin(self, logs=None):
        # Validation inside fit(): measure the statistics first.
        if self._epoch is not None and not self._recomputed and self._due():
            self._recompute("epoch")

    def on_epoch_end(self, epoch, logs=None):
        if not self._recomputed and self._due():
            self._recompute("epoch")
        self._last_modes = _modes(self.model)
        self._last_epoch = epoch
        if logs is not None:
            logs["precise_bn_seconds"] = (
                self.records[-1]["seconds"] if self._recomputed else 0.0
            )
        self._epoch = None

    def on_train_end(self, logs=None):
        swapped = getattr(self.model.optimizer, "use_ema", False)
        if self._last_modes is None or not (self._stale or swapped):
            return
        current = _modes(self.model)
        _apply(self._last_modes)
        try:
            self._recompute("train_end")
        finally:
            _apply(current)

    def _due(self):
        return (self._epoch + 1) % self.every_n_epochs == 0

    def _recompute(self, when):
        layers = batch_norm_layers(self.model)
        measured = [
            layer
            for layer in layers
            if layer.trainable and getattr(layer, "statistics", "update") != "frozen"
        ]
        if not measured:
            self._say(f"PreciseBN: every BN layer is frozen; statistics kept ({when}).")
            self._recomputed, self._stale = True, False
            return
        self._check_readable()
        if isinstance(self.data, collections.abc.Iterator):
            self._iterator_read = True
        start = time.perf_counter()
        recompute_statistics(
            self.model,
            self.data,
            batch_size=self.batch_size,
            steps=self.steps,
            progress=False,
        )
        seconds = time.perf_counter() - start
        self._recomputed, self._stale = True, False
        epoch = self._epoch if when == "epoch" else self._last_epoch
        self.records.append(
            {
                "epoch": epoch,
                "when": when,
                "layers": len(measured),
                "seconds": seconds,
            }
        )
        where = f"epoch {epoch + 1}" if when == "epoch" else "end of training"
        self._say(
            f"PreciseBN: recomputed the statistics of {len(measured)} BN layers "
            f"({where}) in {seconds:.2f} s."
        )

    def _check_readable(self, reads=1):
        """A ValueError if `data` is an iterator that would be read again.

        `reads`: how many recomputations are still to come for sure.
        """
        if not isinstance(self.data, collections.abc.Iterator):
            return
        if reads + self._iterator_read > 1:
            raise ValueError(
                "PreciseBN reads `data` at every recomputation, but it is an "
                f"iterator ({type(self.data).__name__}), used up by the first. "
                "Pass arrays with `batch_size`, or a tf.data.Dataset, a "
                "keras.utils.PyDataset or a torch DataLoader, which start over "
                "at each pass."
            )

    def _say(self, message):
        if self.verbose:
            print(message)


class FreezeStatistics(keras.callbacks.Callback):
    """Fixes the population statistics for the last epochs of `fit()` (FrozenBN).

    From epoch `epochs - last_epochs` on, every `bn_keras` BN layer of the
    model gets the `"frozen"` statistics mode: in training it normalizes with
    the population statistics, which no longer change, while gamma, beta and
    every other weight keep training. The network thus finishes training
    with the normalization it will have at inference, the remedy of Wu &
    Johnson (2021) for the train/inference gap. At the end of training each
    layer gets back the mode it had.

    - Early stopping before the last epochs: nothing is frozen. With
      `initial_epoch`, the last epochs are counted from `epochs` all the same.
    - An interrupt (`Ctrl-C`) or an error inside `fit()` skips Keras' end of
      training: the model stays in the `"frozen"` mode, consistent (every
      layer frozen, statistics unchanged since the freeze). Call `restore()`
      to give the layers their modes back.
    - Keras' own BN layers have no modes: the callback raises a `ValueError`
      naming `bn_keras.convert_batch_norms` when training begins.

    Args:
        last_epochs: Positive integer, the number of final epochs with
            frozen statistics.
        verbose: `1` prints one line when it freezes, `0` nothing.

    Example:
        ```python
        model.fit(x, y, epochs=10, callbacks=[FreezeStatistics(last_epochs=2)])
        ```

    Reference:
        - [Wu & Johnson, 2021](https://arxiv.org/abs/2105.07576),
          "Rethinking 'Batch' in BatchNorm", Section 4 (FrozenBN).
    """

    def __init__(self, last_epochs: int, verbose: int = 1) -> None:
        super().__init__()
        self.last_epochs = validate_positive_int(last_epochs, "last_epochs")
        self.verbose = int(verbose)
        self._previous = None

    def on_train_begin(self, logs=None):
        # The same errors as set_statistics, before the first epoch.
        modes._check(self.model)
        self._epochs = self.params.get("epochs")

    def on_epoch_begin(self, epoch, logs=None):
        if self._previous is not None or self._epochs is None:
            return
        if epoch >= self._epochs - self.last_epochs:
            self._previous = modes._set(self.model, "frozen")
            if self.verbose:
                print(
                    f"FreezeStatistics: population statistics frozen from epoch "
                    f"{epoch + 1} of {self._epochs}."
                )

    def on_train_end(self, logs=None):
        self.restore()

    def restore(self) -> None:
        """Gives each layer the mode it had before the freeze (if any)."""
        if self._previous is not None:
            modes._restore(self.model, self._previous)
            self._previous = None


def _modes(model):
    return [
        (layer, layer._statistics)
        for layer in batch_norm_layers(model)
        if isinstance(layer, BatchNorm)
    ]


def _apply(snapshot):
    for layer, mode in snapshot:
        layer._statistics = mode
