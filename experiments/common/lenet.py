"""LeNet with batch normalization (Dive into Deep Learning 7.5) and its training.

The chapter's sigmoid LeNet on 28 x 28 images, with a BN layer (of any kind,
or none) after every convolution and dense layer but the last
(`build_lenet`), and its training: SGD with softmax cross-entropy
(`compile_lenet`) on mini-batches that depend on the seed and the step alone
(`EpochBatches`, `fit_epochs`). Shared by `lenet_bn` (the chapter's three BN
layers from the same weights) and `shift` (the bn_keras network adapted to
shifted test data), so that no experiment imports another.

Reference:
    A. Zhang, Z. C. Lipton, M. Li, A. J. Smola, "Dive into Deep Learning",
    section 7.5 (8.5 in the PyTorch-first edition), https://d2l.ai
"""

from __future__ import annotations

from collections.abc import Iterator

import keras
import numpy as np

from experiments.common.data import IMAGE_SIZE, NUM_CLASSES

# The layers that a BN layer follows, in order; the last dense layer has none.
NORMALIZED = ("conv1", "conv2", "dense1", "dense2")


def images(x: np.ndarray) -> np.ndarray:
    """Flat 784-pixel rows as `(N, 28, 28, 1)` images."""
    return x.reshape(-1, IMAGE_SIZE, IMAGE_SIZE, 1)


def build_lenet(batch_norm=None, name: str = "lenet") -> keras.Sequential:
    """The chapter's LeNet on `(28, 28, 1)` images, with BN where `batch_norm` gives it.

    `Conv2D(6, 5, same) -> [BN] -> sigmoid -> AvgPool(2) -> Conv2D(16, 5) ->
    [BN] -> sigmoid -> AvgPool(2) -> Flatten -> Dense(120) -> [BN] -> sigmoid
    -> Dense(84) -> [BN] -> sigmoid -> Dense(10)`, returning logits.

    Args:
        batch_norm: `batch_norm(name) -> layer`, or None for plain LeNet.
        name: The model's name.
    """
    producers = {
        "conv1": lambda: keras.layers.Conv2D(6, 5, padding="same", name="conv1"),
        "conv2": lambda: keras.layers.Conv2D(16, 5, name="conv2"),
        "dense1": lambda: keras.layers.Dense(120, name="dense1"),
        "dense2": lambda: keras.layers.Dense(84, name="dense2"),
    }
    layers = [keras.Input((IMAGE_SIZE, IMAGE_SIZE, 1))]
    for producer in NORMALIZED:
        if producer == "dense1":
            layers.append(keras.layers.Flatten(name="flatten"))
        layers.append(producers[producer]())
        if batch_norm is not None:
            layers.append(batch_norm(f"{producer}_bn"))
        layers.append(keras.layers.Activation("sigmoid", name=f"{producer}_sigmoid"))
        if producer.startswith("conv"):
            layers.append(keras.layers.AveragePooling2D(2, 2, name=f"{producer}_pool"))
    layers.append(keras.layers.Dense(NUM_CLASSES, name="logits"))
    return keras.Sequential(layers, name=name)


def copy_initial_weights(source: keras.Model, target: keras.Model) -> None:
    """Gives `target` the convolution and dense weights of `source`, by name."""
    for layer in (*NORMALIZED, "logits"):
        target.get_layer(layer).set_weights(source.get_layer(layer).get_weights())


def compile_lenet(model, config: dict, **optimizer_options) -> None:
    """The chapter's training: SGD at `learning_rate` (with `optimizer_options`,
    e.g. `use_ema=True`), softmax cross-entropy on the logits, accuracy."""
    model.compile(
        optimizer=keras.optimizers.SGD(config["learning_rate"], **optimizer_options),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def epoch_orders(num_examples: int, seed: int) -> Iterator[np.ndarray]:
    """The order of the training examples in each epoch, the same for every
    network: drawn one epoch at a time, as long as they are asked for, never
    all the run's up front."""
    rng = np.random.default_rng([seed, 1])
    while True:
        yield rng.permutation(num_examples)


class EpochBatches(keras.utils.PyDataset):
    """The training mini-batches of every epoch, one endless sequence for `fit`.

    Batch `i` is batch `i % steps_per_epoch` of epoch `i // steps_per_epoch`
    in `epoch_orders`' order for that epoch (the last batch of an epoch may be
    smaller), so what `fit` trains on depends on the step alone: not on when
    Keras' prefetching reads ahead, nor on the callbacks. An epoch's order is
    drawn when its first batch is read.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, seed: int):
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size
        self.steps_per_epoch = -(-len(x) // batch_size)
        self._orders = epoch_orders(len(x), seed)
        self._epoch, self._order = -1, None

    @property
    def num_batches(self):
        return None  # endless: `fit` is given `steps_per_epoch`

    def __getitem__(self, index):
        epoch, step = divmod(index, self.steps_per_epoch)
        while self._epoch < epoch:
            self._order, self._epoch = next(self._orders), self._epoch + 1
        if epoch != self._epoch:
            raise IndexError(
                f"batch {index} is of epoch {epoch + 1}, already past: the "
                f"batches are read in order (now at epoch {self._epoch + 1})"
            )
        chosen = self._order[step * self.batch_size : (step + 1) * self.batch_size]
        return self.x[chosen], self.y[chosen]


def fit_epochs(model, x, y, config: dict, callbacks=()) -> None:
    """Trains `model` for `config["epochs"]` epochs of `EpochBatches`, in one
    `fit` (so that callbacks see the whole training, and an optimizer with
    `use_ema=True` swaps in its averages once, at the end)."""
    batches = EpochBatches(x, y, config["batch_size"], config["seed"])
    model.fit(
        batches,
        epochs=config["epochs"],
        steps_per_epoch=batches.steps_per_epoch,
        shuffle=False,
        verbose=0,
        callbacks=list(callbacks),
    )
