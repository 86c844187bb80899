"""Reproduce Figure 1 of the batch-normalization paper on MNIST.

python -m experiments.mnist_mlp                      # the paper's setting
python -m experiments.mnist_mlp --config configs/smoke.toml --out runs/smoke
python -m experiments.mnist_mlp --set steps=2000 --set bn_impl=keras
"""

import sys

from experiments import cli
from experiments.config import DEFAULTS
from experiments.run import Experiment


def run(run_dir, config, data, progress=True):
    from experiments import experiment  # imports TensorFlow

    return experiment.run(run_dir, config, data, progress)


EXPERIMENT = Experiment(
    name="mnist_mlp",
    description=(
        "Train a sigmoid MLP (784-100-100-10 by default) on MNIST with and "
        "without batch normalization from the same initial weights, record test "
        "accuracy and sigmoid-input statistics, plot the paper's Figure 1, and "
        "run the single-example inference check."
    ),
    defaults=DEFAULTS,
    body=run,
)


def main(argv=None):
    return cli.main(argv, EXPERIMENT)


if __name__ == "__main__":
    sys.exit(main())
