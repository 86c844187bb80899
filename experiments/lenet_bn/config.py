"""The LeNet-BN experiment's config: defaults, and the checks of its own keys."""

from pathlib import Path

from experiments.common.config import (
    DATA_DEFAULTS,
    ConfigError,
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
    # The callbacks study (callbacks_study.py): the diagnosis at each epoch's
    # end and the six networks trained again with callbacks, most of the run's
    # time. false trains and folds the four versions alone (no callbacks.png,
    # no study in the metrics and the summary), e.g. to try another dataset.
    "callbacks_study": True,
    # Precise BN after each epoch: this many training batches of batch_size.
    # The callbacks study draws its own sample of this size once, for the
    # PreciseBN callback and the diagnosis.
    "precise_bn_batches": 50,
    # bn_keras.inspect_statistics at each epoch's end reads this many batches
    # of that sample (all of it if fewer): a few, to keep its cost small.
    "diagnosis_batches": 8,
    # The callbacks study's FreezeStatistics runs freeze the statistics for
    # the last epochs; fewer than `epochs`, so that some epoch measured them.
    "freeze_last_epochs": 3,
    # Its decayed runs train those last epochs at this learning rate: frozen
    # statistics take away what lets BN train at 1.0 (plain LeNet does not
    # learn at 1.0), so FrozenBN needs the decay Wu & Johnson freeze after.
    "decay_learning_rate": 0.01,
    # The use_ema runs: SGD(use_ema=True), Keras' default ema_momentum.
    "ema_momentum": 0.99,
    # Passes over the test set timed for the folded and unfolded networks.
    "speed_rounds": 5,
}


def validate(config):
    """Checks the training keys; the debiased statistics need momentum < 1."""
    check_positive(
        config,
        "learning_rate",
        "epochs",
        "precise_bn_batches",
        "speed_rounds",
        "diagnosis_batches",
        "freeze_last_epochs",
        "decay_learning_rate",
    )
    check_batch_norm(config, debiased=True)
    if config["callbacks_study"] and config["freeze_last_epochs"] >= config["epochs"]:
        raise ConfigError(
            f"config key 'freeze_last_epochs' ({config['freeze_last_epochs']}) "
            f"must be less than 'epochs' ({config['epochs']}): FreezeStatistics "
            "fixes the statistics of the epochs before, so some epoch must "
            "measure them"
        )
    if not 0.0 <= config["ema_momentum"] < 1.0:
        raise ConfigError(
            "config key 'ema_momentum' must be in [0, 1) (1 would keep the "
            f"initial weights). Received: {config['ema_momentum']!r}"
        )
    # The networks and the data are of fixed size; the records grow with
    # the epochs: one per epoch of each of the four versions and of the
    # study's four runs, a few dozen numbers each (about 100 bytes a number,
    # as a Python object and JSON).
    check_memory({"metrics (epochs)": config["epochs"] * 8 * 30 * 100})


SCHEMA = Schema(
    defaults=DEFAULTS,
    configs_dir=Path(__file__).parent / "configs",
    validate=validate,
)
