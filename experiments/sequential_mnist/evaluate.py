"""The BN-LSTM's population statistics: recomputed (precise BN) and checked.

`recompute` gives a copy of the trained BN-LSTM whose population statistics
are recomputed from training sequences with the weights frozen (precise BN);
`inference_check` tests the BN-LSTM with its moving averages and with the
recomputed statistics, per timestep, pooled over timesteps and one sequence
at a time; `population_statistics` reads both estimates for the figure.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops
from tqdm.auto import tqdm

import bn_keras
from experiments.common.metrics import BATCH_STATS, EMA
from experiments.sequential_mnist.metrics import (
    ESTIMATES,
    ONE_AT_A_TIME,
    PER_TIMESTEP,
    PLOTTED_NORMS,
    SHARED,
)
from experiments.sequential_mnist.models import timestep_norms

EVAL_BATCH = 1000


def accuracy(model, x, y, batch_size: int = EVAL_BATCH) -> float:
    """Test accuracy in inference mode (population statistics)."""
    probabilities = model.predict(x, batch_size=batch_size, verbose=0)
    return float(np.mean(np.argmax(probabilities, axis=-1) == y))


def _copy(model):
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def _share_statistics(model):
    """Gives every timestep the statistics of all timesteps pooled: the mean
    of the per-timestep means and the pooled variance (mean variance plus the
    variance of the means), what one statistic for the whole sequence
    estimates."""
    for norm in timestep_norms(model):
        mean = ops.convert_to_numpy(norm.moving_mean).astype(np.float64)
        variance = ops.convert_to_numpy(norm.moving_variance).astype(np.float64)
        pooled_mean = mean.mean(axis=0)
        pooled_variance = (variance + (mean - pooled_mean) ** 2).mean(axis=0)
        norm.moving_mean.assign(np.broadcast_to(pooled_mean, mean.shape))
        norm.moving_variance.assign(np.broadcast_to(pooled_variance, mean.shape))


def precise_sample(x, examples: int, seed: int) -> np.ndarray:
    """`examples` sequences of `x` drawn without replacement from `seed`."""
    order = np.random.default_rng([seed, 2]).permutation(len(x))
    return x[order[:examples]]


def recompute(model, x_train, batches: int, batch_size: int, seed: int, progress=True):
    """A copy of `model` with its population statistics recomputed (precise BN).

    `bn_keras.recompute_statistics` over `batches` batches of `batch_size`
    training sequences drawn from `seed`, the weights of `model` frozen:
    each timestep's statistics become the moments of its pre-activations
    over those sequences. `model` keeps its moving averages.
    """
    copy = _copy(model)
    bn_keras.recompute_statistics(
        copy,
        precise_sample(x_train, batches * batch_size, seed),
        batch_size=batch_size,
        steps=batches,
        progress=progress,
    )
    return copy


def _population_check(model, x, y, progress):
    """Accuracy with the population statistics of `model`, in three ways."""
    batched = model.predict(x, batch_size=EVAL_BATCH, verbose=0)
    shared = _copy(model)
    _share_statistics(shared)
    singles = np.concatenate(
        [
            model.predict_on_batch(x[i : i + 1])
            for i in tqdm(
                range(len(x)), disable=not progress, desc="one sequence at a time"
            )
        ]
    )
    return {
        PER_TIMESTEP: _correct(batched, y),
        SHARED: _correct(shared.predict(x, batch_size=EVAL_BATCH, verbose=0), y),
        ONE_AT_A_TIME: _correct(singles, y),
        "one_at_a_time_agreement": float(
            np.mean(np.argmax(singles, -1) == np.argmax(batched, -1))
        ),
        "one_at_a_time_max_abs_difference": float(np.max(np.abs(singles - batched))),
    }


def _batch_statistics_predictions(model, x, batch_size):
    """Each batch of `batch_size` normalized with its own statistics."""
    own = _copy(model)
    predictions = []
    for start in range(0, len(x), batch_size):
        chunk = x[start : start + batch_size]
        if len(chunk) < 2:  # a batch of one has no statistics of its own
            chunk = x[start - 1 : start + 1]
            predictions.append(ops.convert_to_numpy(own(chunk, training=True))[1:])
            continue
        predictions.append(ops.convert_to_numpy(own(chunk, training=True)))
    return np.concatenate(predictions)


def _correct(probabilities, y):
    return float(np.mean(np.argmax(probabilities, axis=-1) == y))


def inference_check(models, x, y, batch_size: int, progress=True) -> dict:
    """The BN-LSTM's test accuracy with each source of normalization statistics.

    Args:
        models: `{EMA: the trained BN-LSTM, PRECISE: its copy from recompute}`.

    Returns:
        For each estimate (`EMA`, `PRECISE`): the accuracy with its statistics
        per timestep, batched (`PER_TIMESTEP`, true inference); pooled into one
        statistic shared by all timesteps (`SHARED`); one sequence at a time
        (`ONE_AT_A_TIME`), with how often its predictions agree with the
        batched ones and their largest probability difference. And the
        accuracy with each test batch of `batch_size` normalized with its own
        statistics (`BATCH_STATS`).
    """
    check = {
        estimate: _population_check(models[estimate], x, y, progress)
        for estimate in ESTIMATES
    }
    check[BATCH_STATS] = _correct(
        _batch_statistics_predictions(models[EMA], x, batch_size), y
    )
    check["examples"] = len(x)
    return check


def population_statistics(models, neurons) -> dict:
    """Per-timestep population mean and variance of the plotted units.

    `{estimate: {norm: {"mean": [timestep][unit], "variance": ...}}}` for
    `models = {EMA: ..., PRECISE: ...}`, of the BN-LSTM's hidden-to-hidden
    (input gate: units 0 to units - 1) and cell normalizations.
    """
    result = {}
    for estimate in ESTIMATES:
        layer = models[estimate].get_layer("bn_lstm")
        result[estimate] = {}
        for name in PLOTTED_NORMS:
            norm = getattr(layer, name)
            result[estimate][name] = {
                key: ops.convert_to_numpy(variable)[:, neurons].tolist()
                for key, variable in (
                    ("mean", norm.moving_mean),
                    ("variance", norm.moving_variance),
                )
            }
    return result
