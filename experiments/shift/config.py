"""The shift experiment's config: defaults, and the checks of its own keys."""

from pathlib import Path

from experiments.common import digits
from experiments.common.config import (
    DATA_DEFAULTS,
    ConfigError,
    Schema,
    check_at_most,
    check_batch_norm,
    check_distinct,
    check_positive,
)
from experiments.common.shifts import SEVERITIES, SHIFTS

SOURCE_STATISTICS = ("precise", "ema")
# MNIST's test set.
MNIST_TEST_IMAGES = 10_000

DEFAULTS = {
    # One source model per seed (its initial weights and batches), and the
    # seed of that seed's shifted test sets.
    # Three: the run then takes minutes (docs/experiments/shift.md);
    # configs/five_seeds.toml runs five.
    "seeds": [0, 1, 2],
    **DATA_DEFAULTS,
    # The source model: LeNet-BN (bn_keras.BatchNorm) as experiments/lenet_bn
    # trains it, on the first 12,000 training images as there; or, with
    # source_model, a saved model (a .keras file, e.g. a lenet_bn run's
    # bn_keras.keras), trained on nothing here.
    "train_examples": 12000,
    # Each setting: the first 2,000 test images (a standard error of about
    # half a point at 5% error), to keep the 24 settings x 5 methods quick.
    "test_examples": 2000,
    "source_model": "",
    "learning_rate": 1.0,
    "batch_size": 256,
    "epochs": 10,
    "bn_momentum": 0.9,
    "bn_epsilon": 1e-5,
    # The source model's statistics after training: "precise" recomputes
    # them exactly from the training images used (bn_keras.
    # recompute_statistics, as AdaBN recomputes them from the shifted ones,
    # so that the two differ only in the data), "ema" keeps the moving
    # averages, which lag the weights in a short training (lenet_bn).
    "source_statistics": "precise",
    # The test settings: every shift of experiments.common.shifts at these
    # severities (1 mild .. 5 severe), and the UCI digits (scikit-learn's,
    # in MNIST's frame); each on the test images used (test_examples; the
    # digits' 599 test images always).
    "shifts": list(SHIFTS),
    "severities": [3, 5],
    "digits": True,
    # The test batch of test-batch statistics, AdaBN's batches and TENT's:
    # the authors' 200 on CIFAR-10-C.
    "test_batch_size": 200,
    # TENT: the authors' Adam at 1e-3, one step per test batch.
    "tent_learning_rate": 0.001,
    "tent_steps": 1,
    # The test-batch-size curve: the methods that use test batches at these
    # sizes, on the first curve_examples test images of every shift at
    # curve_severity (1 shows what the library refuses).
    "curve_batch_sizes": [1, 2, 8, 32, 200],
    "curve_examples": 500,
    "curve_severity": 5,
}


def validate(config):
    """Checks the training, shift, TENT and curve keys."""
    check_positive(
        config,
        "learning_rate",
        "epochs",
        "test_batch_size",
        "tent_learning_rate",
        "tent_steps",
        "curve_batch_sizes",
        "curve_examples",
    )
    check_batch_norm(config)
    check_distinct(config, "shifts", "severities", "curve_batch_sizes")
    unknown = [s for s in config["shifts"] if s not in SHIFTS]
    if unknown:
        raise ConfigError(
            f"config key 'shifts' names unknown shifts {unknown}; choose from "
            f"{', '.join(SHIFTS)}. Received: {config['shifts']!r}"
        )
    for key in ("severities", "curve_severity"):
        values = config[key] if isinstance(config[key], list) else [config[key]]
        if not all(v in SEVERITIES for v in values):
            raise ConfigError(
                f"config key {key!r} must hold severities from {SEVERITIES[0]} to "
                f"{SEVERITIES[-1]}. Received: {config[key]!r}"
            )
    if config["test_batch_size"] < 2:
        raise ConfigError(
            "config key 'test_batch_size' must be at least 2: test-batch "
            "statistics and TENT normalize each test batch with its own "
            f"statistics. Received: {config['test_batch_size']}"
        )
    sizes = {"test_examples": config["test_examples"] or MNIST_TEST_IMAGES}
    if config["digits"]:
        sizes["the UCI digits' test images"] = digits.NUM_TEST
    for what, size in sizes.items():
        if size % config["test_batch_size"] == 1:
            raise ConfigError(
                f"{what} ({size}) in batches of test_batch_size "
                f"({config['test_batch_size']}) leave a last batch of one "
                "example, which test-batch statistics cannot normalize; pick "
                "another test_batch_size"
            )
    check_at_most(
        config, "curve_batch_sizes", config["curve_examples"], "the curve's examples"
    )
    check_at_most(
        config, "curve_examples", sizes["test_examples"], "the test images used"
    )
    left = {b: config["curve_examples"] % b for b in config["curve_batch_sizes"]}
    ones = [b for b, r in left.items() if r == 1 and b > 1]
    if ones:
        raise ConfigError(
            f"config key 'curve_examples' ({config['curve_examples']}) leaves a "
            f"last batch of one example at curve batch sizes {ones}, which "
            "test-batch statistics cannot normalize; pick another number"
        )
    if config["source_model"]:
        path = Path(config["source_model"])
        if path.suffix != ".keras" or not path.is_file():
            raise ConfigError(
                f"config key 'source_model' must name a saved .keras model file "
                f"(a lenet_bn run's bn_keras.keras, say); {path} is "
                f"{'not a .keras file' if path.is_file() else 'not a file'}"
            )


SCHEMA = Schema(
    defaults=DEFAULTS,
    configs_dir=Path(__file__).parent / "configs",
    choices={"source_statistics": SOURCE_STATISTICS},
    validate=validate,
)
