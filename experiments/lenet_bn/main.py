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
folded BN networks' test accuracy, agreement and inference speed. The
callbacks study (`callbacks_study`) diagnoses the bn_keras network's
statistics at each epoch's end (`bn_keras.inspect_statistics`) and trains it
again with `bn_keras.callbacks.PreciseBN`, with `FreezeStatistics` and with
`SGD(use_ema=True)`; `--set callbacks_study=false` leaves it out.
"""

import time

from experiments.common import cli
from experiments.common.metrics import finite_or_none
from experiments.lenet_bn.config import SCHEMA


def run(run_dir, config, data, progress=True):
    """Trains the versions, runs the studies, writes every output into `run_dir`."""
    from experiments.lenet_bn import callbacks_study as cs
    from experiments.lenet_bn import models as lm
    from experiments.lenet_bn import train as lt
    from experiments.lenet_bn.plots import plot_all

    start = time.perf_counter()
    run_dir.stage("training")
    models = lt.build_versions(config)
    initial_weights = models[lm.BN_KERAS].get_weights()
    study = cs.Study(data, config) if config["callbacks_study"] else None
    records = lt.train_versions(
        models,
        data,
        config,
        progress=progress,
        report=run_dir.progress,
        observe=None if study is None else study.observe,
    )
    studied = {}
    if study is not None:
        run_dir.stage("callbacks study")
        studied = study.run(
            initial_weights,
            records[lm.BN_KERAS],
            progress=progress,
            report=lambda step, steps: run_dir.stage(
                "callbacks study", step=step, steps=steps
            ),
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
        **studied,
        "wall_seconds": time.perf_counter() - start,
    }
    run_dir.write_outputs(metrics, plot_all, summary_table(metrics), progress)
    return metrics


def _number(value, spec):
    return "n/a" if value is None else format(value, spec)


def _ratio_range(record):
    low, high = record["variance_ratio_min"], record["variance_ratio_max"]
    return f"{_number(low, '.3g')}..{_number(high, '.3g')}"


def _study_summary(metrics):
    """The callbacks study's part of the summary: the diagnosis per epoch and
    of the worst epoch, the callbacks' accuracy per epoch, the use_ema gap."""
    from experiments.lenet_bn import callbacks_study as cs

    config = metrics["config"]
    epochs = metrics["epochs"]
    diagnosis = metrics["diagnosis"]
    layers = len(diagnosis["worst"]["report"]["layers"])
    lines = [
        "",
        "Diagnosis of the bn_keras network at each epoch's end "
        f"(bn_keras.inspect_statistics on {diagnosis['examples']} training "
        f"examples in {diagnosis['batches']} batches; a layer is stale past a "
        f"mean shift of {diagnosis['max_shift']:g} or a variance factor of "
        f"{diagnosis['max_variance_factor']:g}):",
        "",
        "| epoch | test acc (moving averages) | stale BN layers | worst mean shift "
        "| variance ratio | output gap | accuracy gap (sample) |",
        "|---|---|---|---|---|---|---|",
    ]
    for index, epoch in enumerate(epochs):
        record = {field: diagnosis[field][index] for field in cs.DIAGNOSIS_FIELDS}
        lines.append(
            f"| {epoch} | {metrics['versions']['bn_keras']['test_accuracy'][index]:.3f}"
            f" | {record['stale_layers']} of {layers} | "
            f"{_number(record['mean_shift_max'], '.3g')} | {_ratio_range(record)} | "
            f"{_number(record['output_gap'], '.3f')} | "
            f"{_number(record['accuracy_gap'], '+.3f')} |"
        )
    worst = diagnosis["worst"]
    lines += [
        "",
        f"The diagnosis of epoch {worst['epoch']}, the lowest test accuracy "
        f"({worst[cs.TEST_ACCURACY]:.3f}):",
        "",
        "```text",
        worst["table"],
        "```",
        "",
        "Test accuracy per epoch of the bn_keras network with callbacks, from "
        "the same weights on the same batches (population statistics, as "
        f"model.evaluate gives it; learning rate {config['learning_rate']} "
        "but where a decay is named), and the training loss of the last epoch:",
        "",
        "| callback | "
        + " | ".join(str(e) for e in epochs)
        + " | train loss (last epoch) |",
        "|---|" + "---|" * (len(epochs) + 1),
    ]
    runs = metrics["callbacks"]
    for run in cs.CALLBACK_RUNS:
        lines.append(
            f"| {cs.run_label(run, config)} | "
            + " | ".join(f"{a:.3f}" for a in runs[run][cs.TEST_ACCURACY])
            + f" | {_number(runs[run][cs.TRAIN_LOSS][-1], '.3f')} |"
        )
    seconds = sorted(runs[cs.PRECISE_BN][cs.PRECISE_BN_SECONDS])
    train = sorted(metrics["versions"]["bn_keras"]["train_seconds"])
    lines += [
        "",
        f"PreciseBN took {seconds[len(seconds) // 2]:.2f} s an epoch (median), a "
        f"training epoch {train[len(train) // 2]:.2f} s.",
    ]
    ema = metrics["use_ema"]
    stale, precise = (ema["runs"][run] for run in cs.EMA_RUNS)
    lines += [
        "",
        f"use_ema: SGD(use_ema=True, ema_momentum={config['ema_momentum']}), test "
        "accuracy after fit():",
        "",
        "| weights | population statistics | test acc |",
        "|---|---|---|",
        "| last step's (no use_ema) | moving averages | "
        f"{metrics['versions']['bn_keras']['test_accuracy'][-1]:.4f} |",
        "| last step's (no use_ema) | PreciseBN | "
        f"{runs[cs.PRECISE_BN][cs.TEST_ACCURACY][-1]:.4f} |",
        "| averaged (use_ema) | moving averages fit() leaves (stale) | "
        f"{stale[cs.FINAL_TEST_ACCURACY]:.4f} |",
        "| averaged (use_ema) | PreciseBN (at the end of training) | "
        f"{precise[cs.FINAL_TEST_ACCURACY]:.4f} |",
        "",
        "The diagnosis of the averaged weights with the stale statistics: "
        f"{ema['diagnosis']['stale_layers']} of {layers} BN layers stale, worst "
        f"mean shift {_number(ema['diagnosis']['mean_shift_max'], '.3g')}, "
        f"variance ratio {_ratio_range(ema['diagnosis'])}:",
        "",
        "```text",
        ema["diagnosis"]["table"],
        "```",
    ]
    return lines


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
    if "callbacks" in metrics:
        lines += _study_summary(metrics)
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
        "networks' accuracy and inference speed. The callbacks study "
        "diagnoses the bn_keras network's statistics at each epoch's end "
        "(inspect_statistics) and trains it again with the PreciseBN and "
        "FreezeStatistics callbacks and with SGD(use_ema=True)."
    ),
    schema=SCHEMA,
    body=run,
)


def main(argv=None):
    """Runs the experiment from the command line; returns the exit status."""
    return cli.main(argv, EXPERIMENT)
