"""The command line of the Figure-1 experiment.

python -m experiments.mnist_mlp                      # the paper's setting
python -m experiments.mnist_mlp --config smoke --out runs/smoke
python -m experiments.mnist_mlp --set steps=2000 --set bn_impl=keras
"""

from experiments.common import cli
from experiments.mnist_mlp.config import SCHEMA


def run(run_dir, config, data, progress=True):
    from experiments.mnist_mlp import experiment  # imports TensorFlow

    return experiment.run(run_dir, config, data, progress)


EXPERIMENT = cli.Experiment(
    name="mnist_mlp",
    description=(
        "Train a sigmoid MLP (784-100-100-10 by default) on MNIST with and "
        "without batch normalization from the same initial weights, record test "
        "accuracy and sigmoid-input statistics, plot the paper's Figure 1, and "
        "run the single-example inference check."
    ),
    schema=SCHEMA,
    body=run,
)


def main(argv=None):
    """Runs the experiment from the command line; returns the exit status."""
    return cli.main(argv, EXPERIMENT)
