"""LeNet with batch normalization: Dive into Deep Learning, section 7.5.

python -m experiments.lenet_bn                      # the chapter's setting, on MNIST
python -m experiments.lenet_bn --config smoke
python -m experiments.lenet_bn --data-dir DIR --set dataset=fashion_mnist

Sigmoid LeNet with BN after every convolution and dense layer but the last,
SGD at learning rate 1.0, batch 256, 10 epochs, in three versions (the
chapter's from-scratch layer in `keras.ops`, `bn_keras.BatchNorm`,
`keras.layers.BatchNormalization`) and plain LeNet as the baseline, all from
the same initial weights on the same mini-batches. The run records per epoch
the training loss and accuracy, test accuracy and examples per second; the
bn_keras network's test accuracy with its moving averages, debiased moving
averages, statistics recomputed after the epoch (precise BN) and each test
batch's own statistics; the first BN layer's learned gamma and beta; and the
folded BN networks' test accuracy, agreement and inference speed.
"""

import time

from experiments.common import cli
from experiments.common.metrics import finite_or_none
from experiments.lenet_bn.config import SCHEMA


def run(run_dir, config, data, progress=True):
    """Trains the versions, runs the studies, writes every output into `run_dir`."""
    from experiments.lenet_bn import models as lm
    from experiments.lenet_bn import train as lt
    from experiments.lenet_bn.plots import plot_all

    start = time.perf_counter()
    run_dir.stage("training")
    models = lt.build_versions(config)
    records = lt.train_versions(
        models, data, config, progress=progress, report=run_dir.progress
    )
    run_dir.stage("folding")
    folded, fold = {}, {}
    for version in (lm.BN_KERAS, lm.KERAS):
        folded[version], fold[version] = lt.fold_check(
            models[version], data, config["speed_rounds"]
        )
    run_dir.stage("saving models")
    saved = {**models, **{f"{v}_folded": m for v, m in folded.items()}}
    for name, model in saved.items():
        with run_dir.atomic(f"{name}.keras") as path:
            model.save(path)
    run_dir.checkpoint("models saved")
    metrics = {
        "config": config,
        "epochs": list(range(1, config["epochs"] + 1)),
        "versions": {
            version: {
                key: [finite_or_none(r[key]) for r in records[version]]
                for key in (
                    "train_loss",
                    "train_accuracy",
                    "test_accuracy",
                    "examples_per_second",
                    "train_seconds",
                )
            }
            for version in lm.VERSIONS
        },
        "statistics": {
            name: [r["statistics"][name] for r in records[lm.BN_KERAS]]
            for name in lt.STATISTICS
        },
        "first_bn": {
            version: lt.first_bn_parameters(models[version])
            for version in lm.VERSIONS
            if version != lm.PLAIN
        },
        "fold": fold,
        "wall_seconds": time.perf_counter() - start,
    }
    run_dir.write_outputs(metrics, plot_all, summary_table(metrics), progress)
    return metrics


def _number(value, spec):
    return "n/a" if value is None else format(value, spec)


def summary_table(metrics):
    from experiments.lenet_bn.models import LABELS, VERSIONS
    from experiments.lenet_bn.plots import STATISTICS_LABELS

    config = metrics["config"]
    epochs = metrics["epochs"]
    lines = [
        f"LeNet-BN (d2l 7.5) on {config['dataset']}: {epochs[-1]} epochs, batch "
        f"{config['batch_size']}, learning rate {config['learning_rate']} "
        f"({metrics['wall_seconds']:.0f} s)",
        "",
        "| version | train loss | train acc | test acc | examples/s (median epoch) |",
        "|---|---|---|---|---|",
    ]
    for version in VERSIONS:
        curves = metrics["versions"][version]
        speeds = sorted(curves["examples_per_second"])
        lines.append(
            f"| {LABELS[version]} | {_number(curves['train_loss'][-1], '.3f')} | "
            f"{curves['train_accuracy'][-1]:.3f} | {curves['test_accuracy'][-1]:.3f} "
            f"| {speeds[len(speeds) // 2]:.0f} |"
        )
    lines += [
        "",
        "Test accuracy per epoch of the bn_keras network by population statistics:",
        "",
        "| statistics | " + " | ".join(str(e) for e in epochs) + " |",
        "|---|" + "---|" * len(epochs),
    ]
    for name, values in metrics["statistics"].items():
        lines.append(
            f"| {STATISTICS_LABELS[name]} | "
            + " | ".join(f"{v:.3f}" for v in values)
            + " |"
        )
    lines += [
        "",
        "Folded (bn_keras.fold_batch_norms) against unfolded, on the test set:",
        "",
        "| version | BN layers | test acc | folded test acc | identical "
        "predictions | max logit diff | examples/s | folded examples/s | speedup |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for version, fold in metrics["fold"].items():
        lines.append(
            f"| {LABELS[version]} | {fold['bn_layers']} -> "
            f"{fold['bn_layers_after_folding']} | {fold['test_accuracy']:.4f} | "
            f"{fold['folded_test_accuracy']:.4f} | "
            f"{'yes' if fold['predictions_identical'] else 'NO'} "
            f"({fold['differing_predictions']} differ) | "
            f"{fold['max_abs_logit_difference']:.1e} | "
            f"{fold['examples_per_second']:.0f} | "
            f"{fold['folded_examples_per_second']:.0f} | {fold['speedup']:.2f}x |"
        )
    lines += ["", "Learned gamma and beta of the first BN layer (after conv1):", ""]
    for version, params in metrics["first_bn"].items():
        for name in ("gamma", "beta"):
            values = ", ".join(f"{v:.3f}" for v in params[name])
            lines.append(f"- {LABELS[version]}, {name}: [{values}]")
    return "\n".join(lines) + "\n"


EXPERIMENT = cli.Experiment(
    name="lenet_bn",
    description=(
        "Dive into Deep Learning 7.5: train sigmoid LeNet with the chapter's "
        "from-scratch BN (keras.ops), bn_keras.BatchNorm, Keras' "
        "BatchNormalization and no BN from the same weights at learning rate "
        "1.0; record per-epoch loss, accuracy and speed, the bn_keras "
        "network's test accuracy with EMA, debiased and recomputed (precise "
        "BN) statistics, the first BN layer's gamma and beta, and the folded "
        "networks' accuracy and inference speed."
    ),
    schema=SCHEMA,
    body=run,
)


def main(argv=None):
    """Runs the experiment from the command line; returns the exit status."""
    return cli.main(argv, EXPERIMENT)
