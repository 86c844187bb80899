"""The ways of running a source model on shifted test data, each undone after.

- `SOURCE`: the population statistics of the training data, as deployed;
- `BATCH_STATS`: each test batch normalized with its own statistics
  (`bn_keras.statistics_mode(model, "batch")`), nothing learned;
- `ADABN`: AdaBN (Li et al. 2016): `bn_keras.adapt_statistics` recomputes
  every BN layer's statistics from the shifted test set itself, unlabeled
  (the transductive setting of the literature: the statistics see the very
  images then classified), predicts with them, and `restore_statistics`
  puts the source statistics back;
- `TENT_ONLINE`, `TENT_EPISODIC`: TENT (Wang et al. 2021), `bn_keras.Tent`:
  test-batch statistics, and a step of Adam on BN's gamma and beta per
  test batch lowering the entropy of the predictions; online the
  adaptation carries over from batch to batch through the whole setting,
  episodic it starts from the source model at every batch. The `Tent` is
  restored after each setting: every setting starts from the source model.

`errors` runs one of `METHODS` on every setting and leaves the model exactly
as it found it (weights, statistics, modes and `trainable` flags);
`snapshot` and `changed` let the study check that.
"""

from __future__ import annotations

import re

import keras
import numpy as np

import bn_keras
from experiments.common.metrics import BATCH_STATS, POPULATION

SOURCE = POPULATION
ADABN = "adabn"
TENT_ONLINE = "tent_online"
TENT_EPISODIC = "tent_episodic"
METHODS = (SOURCE, BATCH_STATS, ADABN, TENT_ONLINE, TENT_EPISODIC)
LABELS = {
    SOURCE: "source (population statistics)",
    BATCH_STATS: "test-batch statistics",
    ADABN: "AdaBN (statistics of the shifted set)",
    TENT_ONLINE: "TENT, online",
    TENT_EPISODIC: "TENT, episodic",
}
SHORT_LABELS = {
    SOURCE: "source",
    BATCH_STATS: "test-batch stats",
    ADABN: "AdaBN",
    TENT_ONLINE: "TENT online",
    TENT_EPISODIC: "TENT episodic",
}
# The methods whose result depends on the test batch: the curve's.
CURVE_METHODS = (BATCH_STATS, ADABN, TENT_ONLINE)


def snapshot(model) -> dict:
    """Every variable of `model` by path, its BN layers' modes and the
    variables' `trainable` flags: what `changed` compares."""
    return {
        "values": {
            v.path: np.array(keras.ops.convert_to_numpy(v)) for v in model.variables
        },
        "trainable": {v.path: v.trainable for v in model.variables},
        "modes": {
            layer.name: layer.statistics
            for layer in bn_keras.batch_norm_layers(model)
            if isinstance(layer, bn_keras.BatchNorm)
        },
    }


def changed(before: dict, after: dict) -> list[str]:
    """The variable paths (and `mode:LAYER`, `trainable:PATH`) that differ."""
    paths = [
        path
        for path, value in before["values"].items()
        if not np.array_equal(value, after["values"][path])
    ]
    paths += [
        f"trainable:{path}"
        for path, flag in before["trainable"].items()
        if flag != after["trainable"][path]
    ]
    paths += [
        f"mode:{name}"
        for name, mode in before["modes"].items()
        if mode != after["modes"][name]
    ]
    return paths


def errors(
    model, method: str, settings, batch_size: int, config: dict, observe=None
) -> dict[str, float]:
    """The test error (percent) of `method` on each setting, in test batches
    of `batch_size`; every setting starts from the source model.

    The settings are taken one method at a time, so that the model changes
    mode (and Keras compiles its functions) once per method, not once per
    setting: one `Tent` adapts on every setting, `reset()` between them
    (gamma, beta and Adam's state back to the source model's), and is
    restored at the end.

    Args:
        model: The source model (`bn_keras` BN layers).
        method: One of `METHODS`.
        settings: `experiments.shift.data.Setting`s.
        batch_size: The test batch: of `model.predict` (population or batch
            statistics), of AdaBN's statistics, of each TENT step.
        config: The run's config (`tent_learning_rate`, `tent_steps`).
        observe: Optional dict; TENT writes into it under `"changed"` the
            paths of the variables whose values adapting on the first
            setting changed, before the model is restored.

    Returns:
        `{setting name: error in percent}`.

    Raises:
        ValueError: What `bn_keras` refuses (a test batch of one example for
            batch statistics); the model is left as it was.
    """
    if method == SOURCE:
        return {s.name: _predict_error(model, s, batch_size) for s in settings}
    if method == BATCH_STATS:
        with bn_keras.statistics_mode(model, "batch"):
            return {s.name: _predict_error(model, s, batch_size) for s in settings}
    if method == ADABN:
        return {s.name: _adabn_error(model, s, batch_size) for s in settings}
    if method in (TENT_ONLINE, TENT_EPISODIC):
        return _tent_errors(model, method, settings, batch_size, config, observe)
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")


def _error(logits, y):
    return 100.0 * float(np.mean(np.argmax(logits, axis=-1) != y))


def _predict_error(model, setting, batch_size):
    logits = model.predict(setting.x, batch_size=batch_size, verbose=0)
    return _error(logits, setting.y)


def _adabn_error(model, setting, batch_size):
    saved = bn_keras.adapt_statistics(
        model, setting.x, batch_size=batch_size, progress=False
    )
    try:
        return _predict_error(model, setting, batch_size)
    finally:
        bn_keras.restore_statistics(model, saved)


def _tent_errors(model, method, settings, batch_size, config, observe):
    before = snapshot(model) if observe is not None else None
    tent = bn_keras.Tent(
        model,
        optimizer=keras.optimizers.Adam(config["tent_learning_rate"]),
        steps=config["tent_steps"],
        episodic=method == TENT_EPISODIC,
    )
    results = {}
    try:
        for index, setting in enumerate(settings):
            if index:
                tent.reset()
            logits = tent.predict(setting.x, batch_size=batch_size)
            results[setting.name] = _error(logits, setting.y)
            if index == 0 and observe is not None:
                # Its modes and flags differ while a Tent holds the model.
                difference = changed(before, snapshot(model))
                observe["changed"] = [p for p in difference if ":" not in p]
    finally:
        tent.restore()
    return results


def refusal(err: Exception) -> str:
    """The line of `bn_keras`' error that says why: the layer's own message
    where the error comes from inside a compiled function."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if "single value" in line or "2 or more examples" in line:
            return line
    return lines[0] if lines else type(err).__name__
