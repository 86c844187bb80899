"""Diagnosis: do a model's population statistics fit the data it is given?"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import keras
import numpy as np
from keras import ops, tree

from bn_keras.precise import (
    _batches,
    _check_domain,
    _frozen,
    _measure,
    _model_inputs,
    _Pooled,
    _validated,
)
from bn_keras.validation import to_float

# A layer is stale past either threshold. Both are several times the
# sampling error of a healthy estimate (an EMA of momentum 0.99 averages
# (1 + m) / (1 - m) = 199 batches, some 6,000 examples in batches of 32: a
# standard error of about 0.013 std for the mean and 2% for the variance) and
# small enough that the error shows in the outputs: a shift of 0.1 moves
# every normalized value by a tenth of its spread, a variance off by 25%
# scales it by 1 / sqrt(1.25) = 0.89.
MAX_SHIFT = 0.1
MAX_VARIANCE_FACTOR = 1.25

# Layers that behave at random in training mode, so also in the
# batch-statistics run.
_NOISE_LAYERS = tuple(
    getattr(keras.layers, name)
    for name in ("Dropout", "AlphaDropout", "GaussianDropout", "GaussianNoise")
    if hasattr(keras.layers, name)
)


@dataclasses.dataclass(frozen=True)
class LayerStatistics:
    """How one BN layer's population statistics compare with the data's.

    An entry is one population statistic: one feature, or one (timestep,
    feature) of a `TimestepBatchNorm`. With `m`, `v` the layer's
    `moving_mean` and `moving_variance`, `mu`, `s2` the data's mean and
    variance at the layer's input, and `epsilon` the layer's:

    - shift: `|m - mu| / sqrt(s2 + epsilon)`, the error of the mean in units
      of the data's standard deviation (0 when exact);
    - variance ratio: `r = (v + epsilon) / (s2 + epsilon)`, the ratio of the
      variances the layer divides by (1 when exact; below 1 the layer
      amplifies, above 1 it shrinks its outputs);
    - variance factor: `max(r, 1 / r)`, how far `r` is from 1 in either
      direction (1 when exact, `inf` for `v + epsilon <= 0`).

    The shift and variance fields are taken over the entries that are
    finite and that the data reached; None when there is none.

    Attributes:
        name: The layer's name.
        type: The layer's class name.
        shape: The shape of its `moving_mean` and `moving_variance`.
        frozen: Whether the layer is frozen (`trainable=False`, or the
            `"frozen"` statistics mode).
        entries: The number of entries, the product of `shape`.
        mean_shift_max: The largest shift (worst entry).
        mean_shift_median: The median shift (typical entry).
        variance_ratio_min: The smallest variance ratio.
        variance_ratio_median: The median variance ratio.
        variance_ratio_max: The largest variance ratio.
        variance_factor_max: The largest variance factor (worst entry).
        variance_factor_median: The median variance factor (typical entry).
        nonfinite: The number of entries whose `moving_mean` or
            `moving_variance` is NaN or inf.
        unreached: The number of entries the data never reached (a feature
            that is always masked, a timestep beyond the data's sequences, an
            input that overflows): the data say nothing about them.
        stale: Whether `mean_shift_max` or `variance_factor_max` is past its
            threshold, or an entry is not finite.
    """

    name: str
    type: str
    shape: tuple[int, ...]
    frozen: bool
    entries: int
    mean_shift_max: float | None
    mean_shift_median: float | None
    variance_ratio_min: float | None
    variance_ratio_median: float | None
    variance_ratio_max: float | None
    variance_factor_max: float | None
    variance_factor_median: float | None
    nonfinite: int
    unreached: int
    stale: bool

    def to_dict(self) -> dict[str, Any]:
        """The fields as strict-JSON values (see `StatisticsReport.to_dict`)."""
        values = dataclasses.asdict(self)
        values["shape"] = list(self.shape)
        return {key: _json_value(value) for key, value in values.items()}


@dataclasses.dataclass(frozen=True)
class StatisticsReport:
    """What `inspect_statistics` found: one entry per BN layer, and the outputs.

    `print(report)` shows a table of the layers and, when a layer is stale,
    what to do about it. `report.to_json()` is strict JSON.

    The model-level fields compare, batch by batch, the model's outputs in
    inference mode (population statistics) with its outputs in the
    batch-statistics run (every BN layer normalizing with the statistics of
    the batch; the run is in training mode, so dropout and noise layers are
    active in it too: see `training_mode_layers`).

    Attributes:
        layers: One `LayerStatistics` per BN layer, in the model's order.
        examples: The number of examples inspected.
        batches: The number of batches inspected.
        max_shift: The mean-shift threshold used.
        max_variance_factor: The variance-factor threshold used.
        output_gap: The mean absolute difference between the inference-mode
            and the batch-statistics outputs, divided by the standard
            deviation of the batch-statistics outputs (over all their
            values); the largest over the model's outputs. 0 when they agree,
            NaN when an output is not finite.
        disagreement: The fraction of predictions whose argmax over the last
            axis differs between the two runs, over the outputs with at least
            two values on their last axis (class scores); None if there is
            none.
        accuracy_inference: With labels, the fraction of predictions whose
            argmax is the label, in inference mode; None without labels.
        accuracy_batch: The same for the batch-statistics outputs.
        nonfinite_outputs: The number of NaN or inf values among the
            inference-mode outputs.
        training_mode_layers: The names of the layers other than BN that
            behave at random in training mode (dropout and noise layers,
            recurrent layers with dropout): they were active in the
            batch-statistics run, and part of `output_gap`, `disagreement`
            and of the accuracy gap is theirs.
    """

    layers: tuple[LayerStatistics, ...]
    examples: int
    batches: int
    max_shift: float
    max_variance_factor: float
    output_gap: float
    disagreement: float | None
    accuracy_inference: float | None
    accuracy_batch: float | None
    nonfinite_outputs: int
    training_mode_layers: tuple[str, ...]

    @property
    def stale(self) -> bool:
        """Whether any layer is stale."""
        return any(layer.stale for layer in self.layers)

    @property
    def stale_layers(self) -> tuple[str, ...]:
        """The names of the stale layers."""
        return tuple(layer.name for layer in self.layers if layer.stale)

    @property
    def accuracy_gap(self) -> float | None:
        """`accuracy_batch - accuracy_inference`: positive when the population
        statistics cost accuracy; None without labels."""
        if self.accuracy_inference is None or self.accuracy_batch is None:
            return None
        return self.accuracy_batch - self.accuracy_inference

    def to_dict(self) -> dict[str, Any]:
        """The report as strict-JSON values.

        The fields, with `layers` a list of `LayerStatistics.to_dict()` and the
        properties `stale`, `stale_layers` and `accuracy_gap` added. Tuples
        are lists; a NaN or infinite number is the string `"nan"`, `"inf"`
        or `"-inf"` (strict JSON has no such numbers), and None (JSON `null`)
        means "not measured". `json.dumps(report.to_dict(), allow_nan=False)`
        works.
        """
        values = {
            field.name: getattr(self, field.name)
            for field in dataclasses.fields(self)
            if field.name != "layers"
        }
        values["training_mode_layers"] = list(self.training_mode_layers)
        values["accuracy_gap"] = self.accuracy_gap
        values["stale"] = self.stale
        values["stale_layers"] = list(self.stale_layers)
        values = {key: _json_value(value) for key, value in values.items()}
        values["layers"] = [layer.to_dict() for layer in self.layers]
        return values

    def to_json(self, indent: int | None = 2) -> str:
        """`to_dict()` as a strict JSON string (no NaN, no Infinity)."""
        return json.dumps(self.to_dict(), allow_nan=False, indent=indent)

    def __str__(self) -> str:
        header = (
            "layer",
            "type",
            "shape",
            "shift max",
            "shift med",
            "var x max",
            "var x med",
            "var ratio",
            "non-finite",
            "unreached",
            "",
        )
        rows = [header]
        for layer in self.layers:
            flags = ["STALE"] if layer.stale else []
            if layer.frozen:
                flags.append("frozen")
            low, high = layer.variance_ratio_min, layer.variance_ratio_max
            rows.append(
                (
                    layer.name,
                    layer.type,
                    str(layer.shape),
                    _format(layer.mean_shift_max),
                    _format(layer.mean_shift_median),
                    _format(layer.variance_factor_max),
                    _format(layer.variance_factor_median),
                    "-" if low is None else f"{_format(low)}..{_format(high)}",
                    str(layer.nonfinite),
                    f"{layer.unreached}/{layer.entries}" if layer.unreached else "0",
                    " ".join(flags),
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = [
            "  ".join(
                cell.ljust(width) for cell, width in zip(row, widths, strict=True)
            ).rstrip()
            for row in rows
        ]
        lines.insert(1, "-" * len(lines[0]))
        lines += [
            "",
            "shift: |moving_mean - data mean| / data std, over the entries",
            "var ratio: the range of r = (moving_variance + epsilon) / "
            "(data variance + epsilon); var x: max(r, 1/r)",
            f"stale: shift max > {_format(self.max_shift)}, var x max > "
            f"{_format(self.max_variance_factor)}, or a non-finite statistic",
            "",
            f"Outputs over {self.examples} examples ({self.batches} batches), "
            "inference mode vs batch statistics:",
            f"  mean |difference| / output std: {_format(self.output_gap)}",
        ]
        if self.disagreement is not None:
            lines.append(f"  argmax disagreement: {self.disagreement:.2%}")
        if self.accuracy_gap is not None:
            lines.append(
                f"  accuracy: {self.accuracy_inference:.2%} (inference), "
                f"{self.accuracy_batch:.2%} (batch statistics), gap "
                f"{self.accuracy_gap:+.2%}"
            )
        if self.nonfinite_outputs:
            lines.append(f"  non-finite inference outputs: {self.nonfinite_outputs}")
        if self.training_mode_layers:
            lines.append(
                "  The batch-statistics run also had these layers in training "
                f"mode, which add their own noise to the gap: "
                f"{', '.join(self.training_mode_layers)}."
            )
        if self.stale:
            lines += ["", *self._advice()]
        return "\n".join(lines)

    def _advice(self) -> list[str]:
        stale = [layer for layer in self.layers if layer.stale]
        noise = 1.0 / math.sqrt(max(self.examples, 1))
        lines = [
            f"{len(stale)} of {len(self.layers)} layers are stale: "
            f"{', '.join(layer.name for layer in stale)}.",
            "- Recompute the statistics on training data: "
            "bn_keras.recompute_statistics(model, x_train, batch_size=...) "
            "(precise BN).",
        ]
        frozen = [layer.name for layer in stale if layer.frozen]
        if frozen:
            lines.append(
                f"- The frozen layers {', '.join(frozen)} keep their statistics "
                "in recompute_statistics: set trainable=True on them for the "
                "recompute if they should follow the data, then freeze them "
                "again."
            )
        lines += [
            f"- Measured on {self.examples} examples, whose own mean is uncertain by "
            f"about 1/sqrt({self.examples}) = {_format(noise)} std per entry (the "
            "worst of many entries by some three times that): if that is near "
            "the threshold, pass more data or steps.",
            "- If `data` is not the training distribution, the gap may be a "
            "domain shift rather than stale statistics: recompute them on the "
            "data the model will see, if that is what it should fit.",
        ]
        return lines


def inspect_statistics(
    model: keras.Model,
    data: Any,
    y: Any = None,
    batch_size: int | None = None,
    steps: int | None = None,
    *,
    max_shift: float = MAX_SHIFT,
    max_variance_factor: float = MAX_VARIANCE_FACTOR,
    progress: bool = True,
    domain: int | None = None,
) -> StatisticsReport:
    """Compares every BN layer's population statistics with those of `data`.

    Each BN layer normalizes in inference with its `moving_mean` and
    `moving_variance`. They go stale when the weights before the layer move
    faster than the moving average follows them, when training ended early,
    when the model was fine-tuned with frozen statistics, or when the data
    change (a domain shift); a NaN or inf (from a bad batch or checkpoint)
    breaks every inference output. This diagnosis measures, for every
    `bn_keras.BatchNorm` (`TimestepBatchNorm` included) and
    `keras.layers.BatchNormalization` at any depth, the mean and variance of
    the values that `data` actually bring to the layer, pooled over all the
    batches as `bn_keras.recompute_statistics` computes them, and compares:

    - the mean shift of each entry (feature, or timestep and feature),
      `|moving_mean - mean| / sqrt(variance + epsilon)`: the error of the
      mean in units of the data's standard deviation;
    - the variance ratio `r = (moving_variance + epsilon) / (variance +
      epsilon)`, and the variance factor `max(r, 1 / r)`, which counts an
      over- and an under-estimate alike;
    - the entries that are not finite, and those the data never reach.

    A layer is stale if its worst shift exceeds `max_shift`, its worst
    variance factor exceeds `max_variance_factor` (the ratio is outside
    `[1 / max_variance_factor, max_variance_factor]`), or a statistic is NaN
    or inf. The defaults, 0.1 and 1.25, are several times the sampling error
    of a healthy moving average, and small enough to matter: a shift of 0.1
    moves every normalized value by a tenth of its spread. The data's
    statistics are an estimate too: with `n` examples an exact mean shows a
    shift of about `1 / sqrt(n)` per entry, and the worst of a few hundred
    entries about three times that, so use a few thousand examples (or
    more) for the default thresholds, or the training data itself, on which
    `recompute_statistics` makes every layer exact.

    The model level compares, batch by batch, the outputs in inference mode
    with the outputs of the batch-statistics run: the mean absolute
    difference relative to the outputs' spread, the fraction of argmax
    predictions that differ, and, with labels, the accuracy of each. Labels
    are the `y` of array `data`, or the `y` of `(x, y)` batches: integer
    class indices (the output's shape without its last axis) or one-hot or
    probability targets (the output's shape); a prediction is correct when
    the argmax of the output over its last axis is the class. Targets from
    batches that are not class labels (a regression target) give no
    accuracy; an explicit `y` that is not is a `ValueError`. Every position
    of an output but its last axis is one prediction (a sequence output has
    one per timestep); with several outputs, each paired with its labels, the
    fractions are over all their predictions.

    The batch-statistics run is the model's training-mode forward pass, run
    statelessly: every BN layer normalizes with the statistics of the
    current batch, which are what it measures, and updates nothing. Other
    layers are in training mode too: dropout and noise layers are active in
    it (as in training and in `recompute_statistics`), so the data
    statistics are those of training, and part of the output gap is
    theirs; the report lists them in `training_mode_layers`.

    Frozen BN layers (`trainable=False`, or the `"frozen"` statistics
    mode), the ones most likely to be stale, are inspected too: for the run
    they are unfrozen (and restored after it), so they normalize with their
    batch statistics as the others do, and every layer's data statistics are
    those it would see if all the population statistics before it were
    exact. `recompute_statistics` instead skips frozen layers and computes
    the layers after them from their inference-mode output: after it, a
    layer behind a stale frozen layer can still look stale here. Fix the
    frozen layer first. A layer in the `"batch"` statistics mode is
    inspected as the others; the model does not use its population
    statistics, and its inference-mode outputs use the batch statistics.

    Nothing changes: the model runs statelessly (compiled, as a train step),
    and its weights, population statistics, counters, optimizer and the
    layers' attributes are as they were, also after an error.

    `data` is read as by `recompute_statistics`, as `model.fit` reads it:
    arrays (or a dict, list or tuple of them, nested as the model's inputs)
    split into batches of `batch_size`, or a `tf.data.Dataset`, a
    `keras.utils.PyDataset`, a torch `DataLoader`, a generator or another
    iterable of batches, `(x,)`, `(x, y)`, `(x, y, sample_weight)` or `x`
    alone. Sample weights are ignored.

    Args:
        model: A built Keras model holding `bn_keras.BatchNorm` or
            `keras.layers.BatchNormalization` layers, at any depth.
        data: The model's inputs as arrays, or a dataset or iterable of
            batches (see above).
        y: Labels for array `data`, one per example (optional): an array,
            or a structure of arrays matching the model's outputs.
        batch_size: Batch size for array `data`, a positive integer: the
            batch statistics depend on it, so use the training batch size.
            A last batch of a single example is left out.
        steps: Number of batches to use, a positive integer (default: all of
            `data`).
        max_shift: Positive float, the mean-shift threshold, in standard
            deviations of the data.
        max_variance_factor: Float above 1, the variance-factor threshold.
        progress: Show a progress bar.
        domain: Optional int: inspect this domain's statistics only, on
            `data` of that domain (`BatchNorm(domains=k)`): every BN layer
            must keep per-domain statistics, and each uses domain `domain`
            in both runs whatever its calls say. Without it, each layer's
            sets are compared with the data that reach them, and sets the
            data never reach count as unreached.

    Returns:
        A `StatisticsReport`: `report.layers` holds a `LayerStatistics` per
        BN layer, with its `stale` flag; `report.stale` says whether any is;
        `print(report)` shows a table and advice; `report.to_json()` is
        strict JSON.

    Raises:
        ValueError: If `model` has no BN layer or is not built, `batch_size`
            or `steps` is not a positive integer, a threshold is out of range,
            `data` does not fit the model's inputs, yields no batch or holds a
            NaN or inf, or `y` does not fit `data` or the model's outputs.
            Nothing is changed then.

    Example:
        ```python
        report = bn_keras.inspect_statistics(model, x_val, batch_size=128)
        print(report)
        if report.stale:
            bn_keras.recompute_statistics(model, x_train, batch_size=128)
        with open("statistics.json", "w") as f:
            f.write(report.to_json())
        ```
    """
    max_shift = to_float(max_shift, "max_shift")
    if not 0.0 < max_shift < math.inf:
        raise ValueError(
            f"`max_shift` must be a positive number. Received: max_shift={max_shift!r}"
        )
    max_variance_factor = to_float(max_variance_factor, "max_variance_factor")
    if not 1.0 < max_variance_factor < math.inf:
        raise ValueError(
            "`max_variance_factor` must be a number above 1. Received: "
            f"max_variance_factor={max_variance_factor!r}"
        )
    batch_size, steps, layers = _validated(model, batch_size, steps, "inspect")
    domain = _check_domain(layers, domain, "inspect")
    source, total_steps = _batches(data, batch_size, _model_inputs(model), y)
    outputs = _Outputs(labels_required=y is not None)
    totals = _measure(
        model,
        layers,
        source,
        total_steps,
        steps,
        progress=progress,
        desc="inspect BN",
        unfreeze=True,
        on_batch=outputs.add,
        domain=domain,
    )
    return StatisticsReport(
        layers=tuple(
            _layer_statistics(layer, total, max_shift, max_variance_factor, domain)
            for layer, total in zip(layers, totals, strict=True)
        ),
        examples=outputs.examples,
        batches=totals[0].batches,
        max_shift=max_shift,
        max_variance_factor=max_variance_factor,
        output_gap=outputs.gap(),
        disagreement=outputs.disagreement(),
        accuracy_inference=outputs.accuracy(0),
        accuracy_batch=outputs.accuracy(1),
        nonfinite_outputs=outputs.nonfinite,
        training_mode_layers=_training_mode_layers(model),
    )


def _layer_statistics(layer, total, max_shift, max_variance_factor, domain=None):
    """A `LayerStatistics` from the layer's statistics and the data's `_Pooled`.

    With `domain`, of that domain's set only.
    """
    moving_mean = ops.convert_to_numpy(layer.moving_mean).astype("float64")
    moving_variance = ops.convert_to_numpy(layer.moving_variance).astype("float64")
    data_mean, data_variance, reached = total.mean, total.variance, total.reached
    if domain is not None:
        moving_mean, moving_variance = moving_mean[domain], moving_variance[domain]
        data_mean, data_variance = data_mean[domain], data_variance[domain]
        reached = reached[domain]
    epsilon = float(layer.epsilon)
    finite = np.isfinite(moving_mean) & np.isfinite(moving_variance)
    usable = finite & reached
    with np.errstate(all="ignore"):
        scale = np.sqrt(data_variance[usable] + epsilon)
        shift = np.abs(moving_mean[usable] - data_mean[usable]) / scale
        ratio = (moving_variance[usable] + epsilon) / (data_variance[usable] + epsilon)
        factor = np.where(ratio > 0, np.maximum(ratio, 1.0 / ratio), np.inf)
    nonfinite = int((~finite).sum())

    def summary(values, reduce):
        return float(reduce(values)) if values.size else None

    shift_max = summary(shift, np.max)
    factor_max = summary(factor, np.max)
    stale = (
        nonfinite > 0
        or (shift_max is not None and shift_max > max_shift)
        or (factor_max is not None and factor_max > max_variance_factor)
    )
    return LayerStatistics(
        name=layer.name,
        type=type(layer).__name__,
        shape=tuple(int(size) for size in moving_mean.shape),
        frozen=_frozen(layer),
        entries=int(moving_mean.size),
        mean_shift_max=shift_max,
        mean_shift_median=summary(shift, np.median),
        variance_ratio_min=summary(ratio, np.min),
        variance_ratio_median=summary(ratio, np.median),
        variance_ratio_max=summary(ratio, np.max),
        variance_factor_max=factor_max,
        variance_factor_median=summary(factor, np.median),
        nonfinite=nonfinite,
        unreached=int((~reached).sum()),
        stale=bool(stale),
    )


class _Outputs:
    """The model-level comparison, accumulated batch by batch."""

    def __init__(self, labels_required):
        self.labels_required = labels_required
        self.examples = 0
        self.nonfinite = 0
        self.spread = None  # one `_Pooled` of the batch-statistics outputs each
        self.difference = None  # sum of |inference - batch| per output
        self.count = None  # values per output
        self.differing = 0
        self.predictions = 0
        # Correct predictions in inference and in batch mode, and labelled
        # predictions; None once a batch has no class labels.
        self.correct = np.zeros(2)
        self.labelled = 0

    def add(self, x, y, outputs, inference_outputs):
        self.examples += int(ops.shape(tree.flatten(x)[0])[0])
        batch = [_as64(value) for value in tree.flatten(outputs)]
        inference = [_as64(value) for value in tree.flatten(inference_outputs)]
        if self.spread is None:
            self.spread = [_Pooled() for _ in batch]
            self.difference = np.zeros(len(batch))
            self.count = np.zeros(len(batch))
        for i, (b, f) in enumerate(zip(batch, inference, strict=True)):
            self.nonfinite += int((~np.isfinite(f)).sum())
            self.difference[i] += np.abs(f - b).sum()
            self.count[i] += b.size
            if b.size:
                self.spread[i].add(b.size, b.mean(), b.var())
            if _is_class_scores(b):
                b_class, f_class = _predicted(b), _predicted(f)
                differ = (b_class != f_class) | (b_class < 0) | (f_class < 0)
                self.differing += int(differ.sum())
                self.predictions += int(differ.size)
        self._add_labels(y, batch, inference)

    def _add_labels(self, y, batch, inference):
        if self.correct is None:
            return
        labels = None if y is None else [_as64(value) for value in tree.flatten(y)]
        if labels is None or len(labels) != len(batch):
            self._no_labels(
                f"`y` holds {0 if labels is None else len(labels)} array(s) for the "
                f"model's {len(batch)} output(s)."
            )
            return
        for label, b, f in zip(labels, batch, inference, strict=True):
            truth = _classes(label, b)
            if truth is None:
                self._no_labels(
                    f"`y` of shape {label.shape} is not class labels for an output "
                    f"of shape {b.shape}: integer classes of shape {b.shape[:-1]}, "
                    f"or one-hot targets of shape {b.shape}, with at least two "
                    "classes on the output's last axis."
                )
                return
            for which, output in enumerate((f, b)):
                predicted = _predicted(output)
                self.correct[which] += ((predicted == truth) & (predicted >= 0)).sum()
            self.labelled += truth.size

    def _no_labels(self, why):
        if self.labels_required:
            raise ValueError(f"No accuracy can be computed: {why}")
        self.correct = None

    def gap(self):
        gaps = []
        for difference, count, spread in zip(
            self.difference, self.count, self.spread, strict=True
        ):
            if count == 0:
                continue
            mean = difference / count
            if math.isnan(mean):
                return math.nan
            std = math.sqrt(spread.variance) if spread.batches else math.nan
            gaps.append(mean / std if std > 0 else (0.0 if mean == 0 else math.inf))
        return max(gaps, default=0.0)

    def disagreement(self):
        return self.differing / self.predictions if self.predictions else None

    def accuracy(self, which):
        if self.correct is None or self.labelled == 0:
            return None
        return float(self.correct[which] / self.labelled)


def _as64(value):
    return np.asarray(ops.convert_to_numpy(value)).astype("float64")


def _predicted(scores):
    """The argmax over the last axis; -1 where a score is not finite."""
    return np.where(np.isfinite(scores).all(-1), scores.argmax(-1), -1)


def _is_class_scores(output):
    return output.ndim >= 2 and output.shape[-1] >= 2


def _classes(label, output):
    """The class index of each prediction of `output`, from `label`, or None
    if `label` is not class labels for it."""
    if not _is_class_scores(output):
        return None
    if label.shape == output.shape:
        return label.argmax(-1)
    if label.shape in (output.shape[:-1], output.shape[:-1] + (1,)):
        label = label.reshape(output.shape[:-1])
        if np.all(np.isfinite(label)) and np.all(label == np.round(label)):
            return label
    return None


def _training_mode_layers(model):
    """The layers other than BN that behave at random in training mode."""
    names = []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, _NOISE_LAYERS):
            amount = getattr(layer, "rate", getattr(layer, "stddev", None))
            if not (isinstance(amount, (int, float)) and amount == 0):
                names.append(layer.name)
        elif any(
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and value > 0
            for value in (
                getattr(layer, "dropout", 0),
                getattr(layer, "recurrent_dropout", 0),
            )
        ):
            names.append(layer.name)
    return tuple(names)


def _json_value(value):
    """`value` for strict JSON: tuples as lists, non-finite floats as strings."""
    if isinstance(value, (tuple, list)):
        return [_json_value(item) for item in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    return value


def _format(value):
    """A number for the table: 3 significant digits, `-` for None."""
    if value is None:
        return "-"
    return f"{value:.3g}"
