"""LeNet-BN: training the versions, the statistics study, folding and its speed.

Data flows one way: `train_versions` trains every version of `models`
from the same initial weights on the same mini-batches (`fit_epochs`: one
`model.fit` over `EpochBatches`, from `experiments.common.lenet`),
recording per epoch the training loss and accuracy (averaged over the
epoch in training mode, as the chapter reports them), the test accuracy
and the training throughput. For the `bn_keras` version it also tests, at
each epoch's end, the same weights with other population statistics
(`STATISTICS`): evaluating them is cheap, training another network is not.
`fold_check` folds the trained BN networks and compares predictions and
inference speed.
"""

from __future__ import annotations

import time

import keras
import numpy as np
from tqdm.auto import tqdm

import bn_keras

# LeNet's training is shared with other experiments; this experiment's
# modules and tests find it here too.
from experiments.common.lenet import EpochBatches as EpochBatches
from experiments.common.lenet import compile_lenet as compile_lenet
from experiments.common.lenet import epoch_orders as epoch_orders
from experiments.common.lenet import fit_epochs as fit_epochs
from experiments.common.lenet import images as images
from experiments.common.metrics import BATCH_STATS, DEBIASED_EMA, EMA, PRECISE
from experiments.common.quiet import expected_retracing
from experiments.lenet_bn import models as lm

# The bn_keras network's test accuracy by population statistics: its moving
# averages (Keras' EMA), the same zero-debiased (what `BatchNorm(debias=True)`
# holds after the same updates), recomputed from training batches after the
# epoch (precise BN), and each test batch's own statistics (no estimate).
STATISTICS = (EMA, DEBIASED_EMA, PRECISE, BATCH_STATS)
EVAL_BATCH = 1000


def build_versions(config: dict) -> dict:
    """Every version of `lm.VERSIONS`, compiled, with the same initial weights."""
    keras.utils.set_random_seed(config["seed"])
    models = {}
    for version in (lm.PLAIN, *[v for v in lm.VERSIONS if v != lm.PLAIN]):
        factory = lm.batch_norm_factory(
            version, config["bn_momentum"], config["bn_epsilon"]
        )
        models[version] = lm.build_lenet(factory, name=f"lenet_{version}")
        if version != lm.PLAIN:
            lm.copy_initial_weights(models[lm.PLAIN], models[version])
    for model in models.values():
        compile_lenet(model, config)
    return {version: models[version] for version in lm.VERSIONS}


def accuracy(model, x, y, training: bool = False) -> float:
    """Test accuracy; `training=True` normalizes each batch of `EVAL_BATCH`
    with its own statistics (and updates nothing)."""
    correct = 0
    for start in range(0, len(x), EVAL_BATCH):
        batch = x[start : start + EVAL_BATCH]
        if training:
            logits, _ = model.stateless_call(
                model.trainable_variables,
                model.non_trainable_variables,
                batch,
                training=True,
            )
        else:
            logits = model.predict_on_batch(batch)
        predicted = np.argmax(keras.ops.convert_to_numpy(logits), axis=-1)
        correct += int(np.sum(predicted == y[start : start + EVAL_BATCH]))
    return correct / len(x)


def debias(model, updates: int, momentum: float) -> None:
    """Zero-debiases every BN layer's moving averages after `updates` updates.

    Keras' EMA after `t` updates is `m^t * init + sum_i (1 - m) m^(t-i) x_i`;
    `BatchNorm(debias=True)` holds `sum_i (1 - m) m^(t-i) x_i / (1 - m^t)`
    instead. Training does not read the population statistics, so the same
    network trained with `debias=True` would hold exactly this.
    """
    decay = momentum**updates
    for layer in bn_keras.batch_norm_layers(model):
        for variable, init in ((layer.moving_mean, 0.0), (layer.moving_variance, 1.0)):
            value = keras.ops.convert_to_numpy(variable).astype(np.float64)
            variable.assign(((value - decay * init) / (1.0 - decay)).astype("float32"))


class _EpochRecorder(keras.callbacks.Callback):
    """Times each epoch's training and evaluates the version at its end."""

    def __init__(self, evaluate, bar, report, steps_per_epoch, epochs):
        super().__init__()
        self.evaluate = evaluate
        self.bar = bar
        self.report = report
        self.steps_per_epoch = steps_per_epoch
        self.epochs = epochs
        self.records = []

    def on_epoch_begin(self, epoch, logs=None):
        self.begin = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.bar.update(1)

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self.begin
        record = {
            "train_loss": float(logs["loss"]),
            "train_accuracy": float(logs["accuracy"]),
            "train_seconds": seconds,
            **self.evaluate(epoch),
        }
        self.records.append(record)
        self.bar.set_postfix(test=f"{record['test_accuracy']:.4f}", refresh=False)
        if self.report is not None:
            self.report((epoch + 1) * self.steps_per_epoch)


def train_versions(
    models: dict, data, config: dict, progress=True, report=None, observe=None
):
    """Trains every version on the same mini-batches; returns per-epoch records.

    Args:
        models: `{version: compiled model}` from `build_versions`.
        data: An `Mnist` tuple (flat images).
        config: The run's config (`epochs`, `batch_size`, `seed`,
            `bn_momentum`, `precise_bn_batches`).
        progress: Whether to show a progress bar.
        report: Optional `report(step, steps)` after each epoch, steps
            counted over all versions.
        observe: Optional `observe(model, epoch) -> dict`, called at the end
            of each epoch of the `bn_keras` version, after its test
            accuracies; it must leave the model as it found it.

    Returns:
        `{version: [record per epoch]}`; a record holds `train_loss`,
        `train_accuracy`, `train_seconds`, `examples_per_second`,
        `test_accuracy`, and for `bn_keras` `statistics`: the test accuracy
        with each of `STATISTICS`, and `observed`: what `observe` returned.
    """
    x_train, y_train = images(data.x_train), data.y_train
    x_test, y_test = images(data.x_test), data.y_test
    epochs, batch_size = config["epochs"], config["batch_size"]
    steps_per_epoch = -(-len(x_train) // batch_size)
    total = steps_per_epoch * epochs * len(models)
    rng = np.random.default_rng([config["seed"], 2])
    sample = min(config["precise_bn_batches"] * batch_size, len(x_train))
    records = {}
    with (
        expected_retracing(),
        tqdm(total=total, unit="step", disable=not progress) as bar,
    ):
        for index, (version, model) in enumerate(models.items()):
            bar.set_description(lm.LABELS[version])
            variant = None
            if version == lm.BN_KERAS:
                variant = keras.models.clone_model(model)

            def evaluate(epoch, model=model, variant=variant):
                result = {"test_accuracy": accuracy(model, x_test, y_test)}
                if variant is None:
                    return result
                by_statistics = {EMA: result["test_accuracy"]}
                by_statistics[BATCH_STATS] = accuracy(
                    model, x_test, y_test, training=True
                )
                variant.set_weights(model.get_weights())
                debias(variant, (epoch + 1) * steps_per_epoch, config["bn_momentum"])
                by_statistics[DEBIASED_EMA] = accuracy(variant, x_test, y_test)
                chosen = rng.choice(len(x_train), size=sample, replace=False)
                bn_keras.recompute_statistics(
                    variant, x_train[chosen], batch_size=batch_size, progress=False
                )
                by_statistics[PRECISE] = accuracy(variant, x_test, y_test)
                result["statistics"] = {s: by_statistics[s] for s in STATISTICS}
                if observe is not None:
                    result["observed"] = observe(model, epoch)
                return result

            done = index * steps_per_epoch * epochs
            recorder = _EpochRecorder(
                evaluate,
                bar,
                None
                if report is None
                else lambda step, done=done: report(done + step, total),
                steps_per_epoch,
                epochs,
            )
            fit_epochs(model, x_train, y_train, config, [recorder])
            for record in recorder.records:
                record["examples_per_second"] = len(x_train) / record["train_seconds"]
            records[version] = recorder.records
    return records


def _timed_inference(model, x, rounds: int) -> float:
    """Examples per second of `predict_on_batch` over `x` (batches of
    `EVAL_BATCH`), the median of `rounds` passes after a warm-up pass."""
    batches = [x[s : s + EVAL_BATCH] for s in range(0, len(x), EVAL_BATCH)]
    for batch in batches:
        model.predict_on_batch(batch)
    seconds = []
    for _ in range(rounds):
        begin = time.perf_counter()
        for batch in batches:
            keras.ops.convert_to_numpy(model.predict_on_batch(batch))
        seconds.append(time.perf_counter() - begin)
    return len(x) / float(np.median(seconds))


def _logits(model, x):
    return np.concatenate(
        [
            keras.ops.convert_to_numpy(model.predict_on_batch(x[s : s + EVAL_BATCH]))
            for s in range(0, len(x), EVAL_BATCH)
        ]
    )


def fold_check(model, data, rounds: int) -> tuple[keras.Model, dict]:
    """Folds `model`'s BN layers and compares the folded model with it.

    Returns:
        The folded model and a dict: BN layers before and after, test
        accuracy of each, whether every test prediction (argmax) agrees, the
        largest absolute logit difference, and inference examples per second
        of each.
    """
    x_test, y_test = images(data.x_test), data.y_test
    folded = bn_keras.fold_batch_norms(model)
    with expected_retracing():
        logits, folded_logits = _logits(model, x_test), _logits(folded, x_test)
    predictions = np.argmax(logits, axis=-1)
    folded_predictions = np.argmax(folded_logits, axis=-1)
    result = {
        "bn_layers": len(bn_keras.batch_norm_layers(model)),
        "bn_layers_after_folding": len(bn_keras.batch_norm_layers(folded)),
        "test_accuracy": float(np.mean(predictions == y_test)),
        "folded_test_accuracy": float(np.mean(folded_predictions == y_test)),
        "predictions_identical": bool(np.array_equal(predictions, folded_predictions)),
        "differing_predictions": int(np.sum(predictions != folded_predictions)),
        "max_abs_logit_difference": float(np.max(np.abs(logits - folded_logits))),
    }
    with expected_retracing():
        result["examples_per_second"] = _timed_inference(model, x_test, rounds)
        result["folded_examples_per_second"] = _timed_inference(folded, x_test, rounds)
    result["speedup"] = (
        result["folded_examples_per_second"] / result["examples_per_second"]
    )
    return folded, result


def first_bn_parameters(model) -> dict:
    """The learned gamma and beta of the first BN layer, as lists."""
    layer = lm.first_batch_norm(model)
    return {
        name: keras.ops.convert_to_numpy(getattr(layer, name)).astype(float).tolist()
        for name in ("gamma", "beta")
    }
