"""Sequential MNIST: sequences, the LSTM and BN-LSTM, training and the inference check.

Data flows one way: `sequences` turns the flat MNIST arrays into sequences,
`build_models` makes the two networks from the same seed, `train_and_evaluate`
trains them on the same mini-batches and records validation and test
accuracy, `recompute` gives a copy of the trained BN-LSTM whose population
statistics are recomputed from training sequences (precise BN),
`inference_check` tests the BN-LSTM with its moving averages and with the
recomputed statistics, and `population_statistics` reads both for the figure.
"""

from __future__ import annotations

import typing

import keras
import numpy as np
from keras import ops
from tqdm.auto import tqdm

import bn_keras
from bn_keras import BatchNormLSTM, TimestepBatchNorm
from experiments.common.metrics import BATCH_STATS, EMA, PRECISE
from experiments.sequential_mnist.config import PERMUTED_PIXELS, ROWS

# The two networks, and the splits they are evaluated on.
LSTM = "lstm"
BN_LSTM = "bn_lstm"
NETWORKS = (LSTM, BN_LSTM)
VALIDATION = "validation"
TEST = "test"
SPLITS = (VALIDATION, TEST)

# The BN-LSTM's population statistics: the moving averages kept during
# training (what a Keras BN layer gives), and the statistics recomputed after
# training from training sequences with the weights frozen (precise BN).
ESTIMATES = (EMA, PRECISE)
# The trained BN-LSTM with recomputed statistics, beside NETWORKS in the
# final accuracies and the saved models.
BN_LSTM_PRECISE = "bn_lstm_precise"

# The inference check: the BN-LSTM's test accuracy with each estimate used
# per timestep (true inference), as one statistic shared by all timesteps
# (the common mistake), and one sequence at a time; and with each test
# batch's own statistics, which need no estimate.
PER_TIMESTEP = "per_timestep"
SHARED = "shared"
ONE_AT_A_TIME = "one_at_a_time"
CHECKS = (PER_TIMESTEP, SHARED, ONE_AT_A_TIME)

# The BN-LSTM's normalizations whose population statistics are plotted.
PLOTTED_NORMS = ("recurrent_norm", "cell_norm")

EVAL_BATCH = 1000


class Sequences(typing.NamedTuple):
    """The splits as `(examples, timesteps, features)` float32 sequences."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_validation: np.ndarray
    y_validation: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def sequences(data, task: str, validation_examples: int, seed: int) -> Sequences:
    """MNIST read as sequences; the last `validation_examples` training images
    are held out for validation.

    `rows`: 28 timesteps of 28 pixels. `pixels`: 784 timesteps of one pixel.
    `permuted_pixels`: the same with the pixels in a fixed random order drawn
    from `seed` (the same order for every image).
    """

    def convert(x):
        if task == ROWS:
            return x.reshape(len(x), 28, 28)
        if task == PERMUTED_PIXELS:
            x = x[:, np.random.default_rng([seed, 784]).permutation(784)]
        return x.reshape(len(x), 784, 1)

    split = len(data.x_train) - validation_examples
    x_train = convert(data.x_train)
    return Sequences(
        x_train[:split],
        data.y_train[:split],
        x_train[split:],
        data.y_train[split:],
        convert(data.x_test),
        data.y_test,
    )


def build_models(config: dict, timesteps: int, features: int) -> dict:
    """The LSTM and the BN-LSTM, each with a softmax layer, from `config["seed"]`."""
    units = config["hidden_units"][0]
    models = {}
    for name in NETWORKS:
        keras.utils.set_random_seed(config["seed"])
        inputs = keras.Input((timesteps, features), name="sequence")
        if name == LSTM:
            recurrent = keras.layers.LSTM(units, name="lstm")
        else:
            recurrent = BatchNormLSTM(
                units,
                max_timesteps=timesteps,
                momentum=config["bn_momentum"],
                epsilon=config["bn_epsilon"],
                name="bn_lstm",
            )
        outputs = keras.layers.Dense(10, activation="softmax", name="softmax")(
            recurrent(inputs)
        )
        model = keras.Model(inputs, outputs, name=name)
        # The paper's optimizer: RMSProp, gradients clipped to norm 1.
        model.compile(
            optimizer=keras.optimizers.RMSprop(
                config["learning_rate"], clipnorm=config["clipnorm"]
            ),
            loss="sparse_categorical_crossentropy",
        )
        models[name] = model
    return models


def accuracy(model, x, y, batch_size: int = EVAL_BATCH) -> float:
    """Test accuracy in inference mode (population statistics)."""
    probabilities = model.predict(x, batch_size=batch_size, verbose=0)
    return float(np.mean(np.argmax(probabilities, axis=-1) == y))


def train_and_evaluate(models, data: Sequences, config, progress=True, report=None):
    """Trains the networks on the same mini-batches, evaluating every
    `eval_every` steps (and at step 0) on the validation and test sets.

    Returns one record per evaluation: `step`, `accuracy[network][split]`
    and `train_loss[network]` (the mean since the last evaluation; None at
    step 0).
    """
    rng = np.random.default_rng([config["seed"], 1])
    batch_size, steps, every = (
        config["batch_size"],
        config["steps"],
        config["eval_every"],
    )
    per_epoch = len(data.x_train) // batch_size

    def batches():
        while True:
            order = rng.permutation(len(data.x_train))
            for i in range(per_epoch):
                yield order[i * batch_size : (i + 1) * batch_size]

    def evaluate(step, losses):
        return {
            "step": step,
            "accuracy": {
                name: {
                    VALIDATION: accuracy(model, data.x_validation, data.y_validation),
                    TEST: accuracy(model, data.x_test, data.y_test),
                }
                for name, model in models.items()
            },
            "train_loss": {
                name: (float(np.mean(losses[name])) if losses[name] else None)
                for name in models
            },
        }

    records = [evaluate(0, {name: [] for name in models})]
    if report is not None:
        report(0, steps)
    stream = batches()
    bar = tqdm(total=steps, unit="step", disable=not progress, desc="LSTM, BN-LSTM")
    with bar:
        for start in range(0, steps, every):
            losses = {name: [] for name in models}
            for _ in range(every):
                index = next(stream)
                x, y = data.x_train[index], data.y_train[index]
                for name, model in models.items():
                    losses[name].append(float(model.train_on_batch(x, y)))
                bar.update(1)
            records.append(evaluate(start + every, losses))
            bar.set_postfix(
                {
                    f"{name} {TEST}": f"{records[-1]['accuracy'][name][TEST]:.4f}"
                    for name in models
                },
                refresh=False,
            )
            if report is not None:
                report(start + every, steps)
    return records


def _timestep_norms(model):
    return [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, TimestepBatchNorm)
    ]


def _copy(model):
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def _share_statistics(model):
    """Gives every timestep the statistics of all timesteps pooled: the mean
    of the per-timestep means and the pooled variance (mean variance plus the
    variance of the means), what one statistic for the whole sequence
    estimates."""
    for norm in _timestep_norms(model):
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
