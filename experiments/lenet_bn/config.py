"""The LeNet-BN experiment's config: defaults, and the checks of its own keys."""

from pathlib import Path

from experiments.common.config import (
    DATA_DEFAULTS,
    Schema,
    check_batch_norm,
    check_memory,
    check_positive,
)

DEFAULTS = {
    "seed": 0,
    **DATA_DEFAULTS,
    # The first 12,000 training images (a fifth of MNIST): the four networks'
    # 10 epochs then take minutes on two CPU cores (docs/experiments/lenet_bn.md);
    # 0 trains on all 60,000, the chapter's setting, five times as long.
    "train_examples": 12000,
    # "mnist" or "fashion_mnist" (the chapter's data: bring its IDX files with
    # --data-dir, or TFDS' prepared copy).
    "dataset": "mnist",
    # The chapter's training: SGD, softmax cross-entropy averaged over the batch.
    "learning_rate": 1.0,
    "batch_size": 256,
    "epochs": 10,
    # d2l's BN: moving = 0.9 * moving + 0.1 * batch (Keras' momentum 0.9).
    "bn_momentum": 0.9,
    "bn_epsilon": 1e-5,
    # Precise BN after each epoch: this many training batches of batch_size.
    "precise_bn_batches": 50,
    # Passes over the test set timed for the folded and unfolded networks.
    "speed_rounds": 5,
}


def validate(config):
    """Checks the training keys; the debiased statistics need momentum < 1."""
    check_positive(
        config, "learning_rate", "epochs", "precise_bn_batches", "speed_rounds"
    )
    check_batch_norm(config, debiased=True)
    # The networks and the data are of fixed size; the records grow with
    # the epochs: one per epoch of each of the four versions, a few dozen
    # numbers each (about 100 bytes a number, as a Python object and JSON).
    check_memory({"metrics (epochs)": config["epochs"] * 4 * 30 * 100})


SCHEMA = Schema(
    defaults=DEFAULTS,
    configs_dir=Path(__file__).parent / "configs",
    validate=validate,
)
