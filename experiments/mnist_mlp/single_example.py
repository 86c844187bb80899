"""The single-example inference check: the test set predicted one example at a time.

With population statistics, a batch of one is normalized as inside a large
batch, and the predictions equal the batched ones. With each example's own
batch statistics (what a hand-written layer often does at inference) every
BN output is beta, and every example gets the same class.
"""

import numpy as np
import tensorflow as tf
from keras import ops

from experiments.common.data import NUM_CLASSES
from experiments.common.metrics import BATCH_STATS, POPULATION
from experiments.common.mlp.evaluate import forward


def single_example_check(model, x_test, y_test, first=100):
    """Predicts the test examples one at a time, each a batch of one.

    Returns a dict: for population statistics, the accuracy over the first
    `first` examples and over all, the batched-inference accuracy and the
    fraction of predictions equal to the batched ones; for each example's
    own batch statistics, the accuracy, the histogram of predicted classes
    and the fraction of the most frequent class.
    """
    x = tf.constant(x_test)
    labels = np.asarray(y_test)

    @tf.function
    def one_at_a_time(mode):
        def predict(example):
            logits = forward(model, example[None, :], modes=(mode,))[mode][0]
            return ops.argmax(logits[0])

        return tf.map_fn(predict, x, fn_output_signature=tf.int32)

    population = one_at_a_time(POPULATION).numpy()
    own_stats = one_at_a_time(BATCH_STATS).numpy()
    batched = np.argmax(model.predict(x_test, batch_size=1000, verbose=0), axis=-1)
    return single_example_summary(population, own_stats, batched, labels, first)


def single_example_summary(population, own_stats, batched, labels, first=100):
    """`single_example_check`'s dict from the predicted classes: one example at
    a time with population statistics and with its own, and batched."""
    histogram = np.bincount(own_stats, minlength=NUM_CLASSES)
    return {
        POPULATION: {
            "accuracy": float(np.mean(population == labels)),
            f"accuracy_first_{first}": float(
                np.mean(population[:first] == labels[:first])
            ),
            "batched_accuracy": float(np.mean(batched == labels)),
            "agreement_with_batched": float(np.mean(population == batched)),
        },
        BATCH_STATS: {
            "accuracy": float(np.mean(own_stats == labels)),
            "predicted_class_histogram": histogram.tolist(),
            "majority_class_fraction": float(histogram.max() / len(own_stats)),
        },
    }
