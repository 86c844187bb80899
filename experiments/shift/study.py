"""The study of one seed: its source model, every method on every setting,
and the test-batch-size curve.

Data flows one way: `source_model` trains LeNet-BN (`bn_keras.BatchNorm`,
`experiments.common.lenet`) or loads a saved model; `evaluate` runs each
of `methods.METHODS` on every setting of `data.make_settings` and checks that
the model is the source model again after each method; `curve` runs
`methods.CURVE_METHODS` at each test batch size on `data.curve_settings`,
recording what the library refuses (a test batch of one) instead of a number.
"""

from __future__ import annotations

import time

import keras
import numpy as np

import bn_keras
from experiments.common import lenet
from experiments.common.data import IMAGE_SIZE
from experiments.shift import methods


def source_model(config: dict, data, seed: int):
    """`(model, seconds)`: the source model of `seed` and its training time.

    LeNet-BN with `bn_keras.BatchNorm` trained as experiments/lenet_bn trains
    it (SGD at `learning_rate`, `epochs` of `batch_size`, from `seed`), its
    statistics then recomputed from the training images
    (`source_statistics="precise"`) or left as trained (`"ema"`); or the
    model saved at `config["source_model"]` (Keras' own BN layers converted to
    `bn_keras.BatchNorm`), trained on nothing here (0 seconds).
    """
    if config["source_model"]:
        model = keras.models.load_model(config["source_model"], compile=False)
        if any(
            not isinstance(layer, bn_keras.BatchNorm)
            for layer in bn_keras.batch_norm_layers(model)
        ):
            model = bn_keras.convert_batch_norms(model)
        return model, 0.0
    keras.utils.set_random_seed(seed)
    model = lenet.build_lenet(
        lambda name: bn_keras.BatchNorm(
            momentum=config["bn_momentum"], epsilon=config["bn_epsilon"], name=name
        ),
        name="lenet_bn_keras",
    )
    lenet.compile_lenet(model, config)
    begin = time.perf_counter()
    lenet.fit_epochs(
        model,
        lenet.images(data.x_train),
        data.y_train,
        {**config, "seed": seed},
    )
    if config["source_statistics"] == "precise":
        bn_keras.recompute_statistics(
            model,
            lenet.images(data.x_train),
            batch_size=config["batch_size"],
            progress=False,
        )
    return model, time.perf_counter() - begin


def model_inputs(model, settings):
    """`settings` with images shaped as `model` takes them: `(N, 28, 28, 1)`
    for LeNet, flat rows of 784 for an MLP saved by another experiment."""
    shape = tuple(model.inputs[0].shape[1:])
    if shape == (IMAGE_SIZE, IMAGE_SIZE, 1):
        return settings
    return [s._replace(x=s.x.reshape((len(s.x), *shape))) for s in settings]


def evaluate(model, settings, config: dict, tick=None) -> dict:
    """Every method on every setting, in test batches of `test_batch_size`.

    Returns:
        `{"error": {method: {setting: percent}}, "tent_changed": [paths],
        "restored": bool}`: the variables TENT changed (on the first
        setting), and whether the model was the source model again (values,
        modes, flags) after every method.
    """
    source = methods.snapshot(model)
    observe, restored, errors = {}, True, {}
    for method in methods.METHODS:
        errors[method] = methods.errors(
            model,
            method,
            settings,
            config["test_batch_size"],
            config,
            observe if method == methods.TENT_ONLINE else None,
        )
        restored = restored and not methods.changed(source, methods.snapshot(model))
        if tick is not None:
            tick(len(settings))
    return {
        "error": errors,
        "tent_changed": sorted(observe.get("changed", [])),
        "restored": restored,
    }


def curve(model, settings, config: dict, tick=None) -> dict:
    """`methods.CURVE_METHODS` at each of `curve_batch_sizes` on `settings`.

    Returns:
        `{"error": {method: [mean percent over settings, or None]},
        "refused": {method: {batch size: why}}, "source": percent}`, in the
        order of `curve_batch_sizes`; None where `bn_keras` refused the batch
        size; `source`: the source model's mean error, the reference.
    """
    source = methods.errors(
        model, methods.SOURCE, settings, config["test_batch_size"], config
    )
    errors, refused = {}, {}
    for method in methods.CURVE_METHODS:
        errors[method], refused[method] = [], {}
        for batch_size in config["curve_batch_sizes"]:
            try:
                by_setting = methods.errors(model, method, settings, batch_size, config)
            except ValueError as err:
                errors[method].append(None)
                refused[method][str(batch_size)] = methods.refusal(err)
            else:
                errors[method].append(float(np.mean(list(by_setting.values()))))
            if tick is not None:
                tick(1)
    return {
        "error": errors,
        "refused": refused,
        "source": float(np.mean(list(source.values()))),
    }
