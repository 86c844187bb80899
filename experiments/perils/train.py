"""Training a variant on the two domains, and testing it with population statistics.

Every variant of a seed starts from the same draw (`models.initial_weights`)
and trains with the same optimizer (SGD with momentum) on the same batches
(`data.all_batch_indices`): at step `i` one batch of `n = batch_size` MNIST
examples and one of `n` digits. Every example's cross-entropy is weighted by
`1 / (2n)`, in every variant:

- merged: one batch of `2n`, both domains, through one network; the loss is
  its mean;
- two towers (shared or per-domain statistics): the MNIST batch through one
  tower, the digits batch through the other; the loss is the sum of both
  towers' summed cross-entropies over `2n`, the merged loss's value when
  both normalize alike;
- alternating: two optimizer steps per step `i`, the MNIST batch and then
  the digits batch, each loss its summed cross-entropy over `2n`. With plain
  SGD the two steps together move the weights as one merged step would
  (but for the gradient of the second being taken after the first); with
  momentum, the same up to that. So the budget is the same in examples,
  gradient evaluations and loss weight; the alternating variant takes
  twice the (half-size) optimizer steps.

With `lr_schedule="cosine"` the learning rate decays to zero over each
variant's updates (twice as many for the alternating one), so every variant
is at the same point of its schedule after the same data.
"""

from __future__ import annotations

import hashlib

import keras
import numpy as np
import tensorflow as tf

from experiments.common.quiet import expected_retracing
from experiments.perils import models as pm
from experiments.perils.config import COSINE


def weights_digest(layers):
    """SHA-256 of the trainable weights of `layers`, by name."""
    digest = hashlib.sha256()
    for name, variable in sorted(pm.trainable_by_name(layers).items()):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(variable)))
    return digest.hexdigest()


def build_variant(variant, config, weights):
    """`(layers, training model)` of a trained variant, given the draw `weights`."""
    domains = 2 if variant == pm.PER_DOMAIN else 1
    layers = pm.build_layers(config, domains=domains)
    if variant in (pm.MERGED, pm.ALTERNATING):
        model = pm.single_model(layers, name=variant)
    else:
        model = pm.two_tower_model(layers, name=variant)
    pm.assign_initial(layers, weights)
    return layers, model


class Trainer:
    """Trains one variant's `model` on the batches `indices` of `domains`.

    `train(start, stop)` performs steps `start` to `stop - 1` (each one batch
    of each domain) in one compiled call and returns their mean loss.
    """

    def __init__(self, variant, model, domains, indices, config):
        if variant not in pm.TRAINED:
            raise ValueError(
                f"variant must be one of {pm.TRAINED}. Received: {variant!r}"
            )
        self.variant = variant
        self.model = model
        self.indices = indices
        self.x = {d: tf.constant(domains[d].x_train) for d in pm.DOMAINS}
        self.y = {d: tf.constant(domains[d].y_train) for d in pm.DOMAINS}
        self.scale = 1.0 / (2 * config["batch_size"])
        # The alternating variant makes two (half-weight) updates per step.
        updates = config["steps"] * (2 if variant == pm.ALTERNATING else 1)
        learning_rate = config["learning_rate"]
        if config["lr_schedule"] == COSINE:
            learning_rate = keras.optimizers.schedules.CosineDecay(
                learning_rate, decay_steps=updates
            )
        self.optimizer = keras.optimizers.SGD(
            learning_rate, momentum=config["sgd_momentum"]
        )
        self.optimizer.build(model.trainable_variables)
        self._chunk = tf.function(self._chunk_graph, jit_compile=True)

    def _loss(self, logits, labels):
        losses = keras.losses.sparse_categorical_crossentropy(
            labels, logits, from_logits=True
        )
        return tf.reduce_sum(losses) * self.scale

    def _update(self, loss_of):
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            loss = loss_of()
        gradients = tape.gradient(loss, variables)
        self.optimizer.apply_gradients(zip(gradients, variables, strict=True))
        return loss

    def _step(self, batches):
        (xa, ya), (xb, yb) = (
            (tf.gather(self.x[d], b), tf.gather(self.y[d], b))
            for d, b in zip(pm.DOMAINS, batches, strict=True)
        )
        model = self.model
        if self.variant == pm.MERGED:
            x, y = tf.concat([xa, xb], 0), tf.concat([ya, yb], 0)
            return self._update(lambda: self._loss(model(x, training=True), y))
        if self.variant == pm.ALTERNATING:
            first = self._update(lambda: self._loss(model(xa, training=True), ya))
            return first + self._update(
                lambda: self._loss(model(xb, training=True), yb)
            )

        def towers():
            logits_a, logits_b = model([xa, xb], training=True)
            return self._loss(logits_a, ya) + self._loss(logits_b, yb)

        return self._update(towers)

    def _chunk_graph(self, indices_a, indices_b):
        total = tf.constant(0.0)
        steps = tf.shape(indices_a)[0]
        for i in tf.range(steps):
            total += self._step((indices_a[i], indices_b[i]))
        return total / tf.cast(steps, total.dtype)

    def train(self, start, stop):
        a, b = (self.indices[d][start:stop] for d in pm.DOMAINS)
        with expected_retracing():
            return float(self._chunk(tf.constant(a), tf.constant(b)))


def inference_models(layers, variant):
    """`{domain: single-input model}` testing `layers` on each domain: the
    shared network, or for per-domain layers the domain's own statistics."""
    return {
        domain: pm.single_model(
            layers,
            index if layers.domains > 1 else None,
            name=f"{variant}_{domain}",
        )
        for index, domain in enumerate(pm.DOMAINS)
    }


def accuracy(model, x, y):
    """Accuracy in inference mode (population statistics), in one call."""
    logits = keras.ops.convert_to_numpy(model(x, training=False))
    return float(np.mean(np.argmax(logits, axis=-1) == y))


def population_accuracy(layers, variant, domains):
    """`{domain: test accuracy}` with population statistics, and `overall`,
    the mean of the two (each domain weighs as in training)."""
    result = {
        domain: accuracy(model, domains[domain].x_test, domains[domain].y_test)
        for domain, model in inference_models(layers, variant).items()
    }
    result[pm.OVERALL] = float(np.mean([result[d] for d in pm.DOMAINS]))
    return result
