"""Sequential MNIST's data and networks: digits as sequences, an LSTM and a BN-LSTM.

`sequences` turns the flat MNIST arrays into sequences (row by row, pixel by
pixel, or pixels in a fixed random order); `build_models` makes the LSTM and
the BN-LSTM (Cooijmans et al., 2016) from the same seed.
"""

from __future__ import annotations

import typing

import keras
import numpy as np

from bn_keras import BatchNormLSTM, TimestepBatchNorm
from experiments.common.data import IMAGE_SIZE, NUM_CLASSES, NUM_PIXELS
from experiments.sequential_mnist.config import PERMUTED_PIXELS, ROWS
from experiments.sequential_mnist.metrics import LSTM, NETWORKS


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
            return x.reshape(len(x), IMAGE_SIZE, IMAGE_SIZE)
        if task == PERMUTED_PIXELS:
            order = np.random.default_rng([seed, NUM_PIXELS]).permutation(NUM_PIXELS)
            x = x[:, order]
        return x.reshape(len(x), NUM_PIXELS, 1)

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
        outputs = keras.layers.Dense(NUM_CLASSES, activation="softmax", name="softmax")(
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


def timestep_norms(model):
    """The `TimestepBatchNorm` layers of `model`, at any depth."""
    return [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, TimestepBatchNorm)
    ]
