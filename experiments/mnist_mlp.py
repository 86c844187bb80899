"""Reproduce Figure 1 of the batch-normalization paper on MNIST.

python -m experiments.mnist_mlp                      # the paper's setting
python -m experiments.mnist_mlp --config configs/smoke.toml --out runs/smoke
python -m experiments.mnist_mlp --set steps=2000 --set bn_impl=keras
"""

import sys

from experiments import cli
from experiments.config import DEFAULTS

DESCRIPTION = (
    "Train a 784-100-100-10 sigmoid MLP on MNIST with and without batch "
    "normalization from the same initial weights, record test accuracy and "
    "sigmoid-input statistics, plot the paper's Figure 1, and run the "
    "single-example inference check."
)


def _run():
    from experiments.experiment import run  # imports TensorFlow

    return run


def main(argv=None):
    return cli.main(argv, "experiments.mnist_mlp", DESCRIPTION, DEFAULTS, _run)


if __name__ == "__main__":
    sys.exit(main())
