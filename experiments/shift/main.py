"""Test-time adaptation of BN statistics under distribution shift, on MNIST.

python -m experiments.shift                       # 3 seeds, severities 3 and 5
python -m experiments.shift --config smoke
python -m experiments.shift --set source_model=runs/lenet_bn-.../bn_keras.keras

A LeNet-BN (`bn_keras.BatchNorm`) trained on clean MNIST (or a saved model)
is tested on MNIST-C-style shifts of the MNIST test set
(`experiments.common.shifts`) and on the UCI digits, five ways: with its
population statistics (the source model), with each test batch's own
statistics, with AdaBN's statistics recomputed on the shifted test set
itself (unlabeled, transductive), and with TENT online and episodic
(entropy minimization of BN's gamma and beta on each test batch); every
setting starts from the source model. The test-batch-size curve runs
test-batch statistics, AdaBN and TENT at batch sizes down to 1, which the
library refuses where a batch's own statistics are needed.
"""

import time

import numpy as np

from experiments.common import cli
from experiments.shift.config import SCHEMA


def run(run_dir, config, data, progress=True):
    """Trains (or loads) each seed's source model, evaluates every method on
    every setting and the batch-size curve; writes every output into `run_dir`."""
    from tqdm.auto import tqdm

    from experiments.common import digits
    from experiments.common.quiet import expected_retracing
    from experiments.shift import data as sdata
    from experiments.shift import methods, study
    from experiments.shift.plots import plot_all

    start = time.perf_counter()
    digits_data = digits.load_digits() if config["digits"] else None
    names = sdata.setting_names(config)
    per_seed = (
        1
        + len(methods.METHODS) * len(names)
        + len(methods.CURVE_METHODS) * len(config["curve_batch_sizes"])
    )
    seeds = config["seeds"]
    results = []
    with (
        expected_retracing(),
        tqdm(total=per_seed * len(seeds), unit="cell", disable=not progress) as bar,
    ):
        for index, seed in enumerate(seeds):

            def tick(cells, index=index):
                bar.update(cells)
                run_dir.stage("evaluating", seed=index + 1, seeds=len(seeds))

            bar.set_description(f"seed {seed}: source model")
            run_dir.stage("training", seed=index + 1, seeds=len(seeds))
            model, seconds = study.source_model(config, data, seed)
            tick(1)
            bar.set_description(f"seed {seed}: methods")
            settings = study.model_inputs(
                model, sdata.make_settings(data, config, seed, digits_data)
            )
            evaluated = study.evaluate(model, settings, config, tick)
            bar.set_description(f"seed {seed}: batch sizes")
            curve_settings = study.model_inputs(
                model, sdata.curve_settings(data, config, seed)
            )
            curve = study.curve(model, curve_settings, config, tick)
            results.append({**evaluated, "curve": curve, "train_seconds": seconds})
            if index == 0 and not config["source_model"]:
                with run_dir.atomic("source_model.keras") as path:
                    model.save(path)
    run_dir.checkpoint("models saved")
    metrics = collect(config, results, time.perf_counter() - start)
    run_dir.write_outputs(metrics, plot_all, summary_table(metrics), progress)
    return metrics


def collect(config, results, seconds):
    """The metrics file's contents from each seed's results."""
    from experiments.shift import data as sdata
    from experiments.shift import methods

    errors = {
        method: {
            name: [r["error"][method][name] for r in results]
            for name in sdata.setting_names(config)
        }
        for method in methods.METHODS
    }

    def mean_over(names):
        return {
            method: [
                float(np.mean([errors[method][n][i] for n in names]))
                for i in range(len(results))
            ]
            for method in methods.METHODS
        }

    return {
        "config": config,
        "seeds": config["seeds"],
        "methods": list(methods.METHODS),
        "settings": sdata.setting_names(config),
        "error": errors,
        "mean_error": mean_over(sdata.shifted_names(config)),
        "mean_error_by_severity": {
            str(v): mean_over(sdata.shifted_names(config, v))
            for v in config["severities"]
        },
        "curve": {
            "batch_sizes": config["curve_batch_sizes"],
            "severity": config["curve_severity"],
            "examples": config["curve_examples"],
            "error": {
                method: [
                    [r["curve"]["error"][method][i] for r in results]
                    for i in range(len(config["curve_batch_sizes"]))
                ]
                for method in methods.CURVE_METHODS
            },
            "source": [r["curve"]["source"] for r in results],
            "refused": results[0]["curve"]["refused"],
        },
        "tent_changed": results[0]["tent_changed"],
        "restored": [r["restored"] for r in results],
        "train_seconds": [r["train_seconds"] for r in results],
        "wall_seconds": seconds,
    }


def _cell(values):
    """`12.3 ± 0.4` over seeds (the sample standard deviation), `12.3` for one."""
    if any(v is None for v in values):
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{np.mean(values):.1f} ± {np.std(values, ddof=1):.1f}"


def summary_table(metrics):
    from experiments.shift import data as sdata
    from experiments.shift import methods

    config = metrics["config"]
    seeds = metrics["seeds"]
    source = "a saved model" if config["source_model"] else "LeNet-BN"
    lines = [
        f"Test error (%) of {source} under shift, by method "
        f"({len(seeds)} seed{'s' * (len(seeds) > 1)}"
        + (", mean ± standard deviation" if len(seeds) > 1 else "")
        + f"; test batch {config['test_batch_size']}; "
        f"{metrics['wall_seconds']:.0f} s):",
        "",
        "| setting | "
        + " | ".join(methods.SHORT_LABELS[m] for m in methods.METHODS)
        + " |",
        "|---|" + "---|" * len(methods.METHODS),
    ]

    def row(label, by_method):
        return (
            f"| {label} | "
            + " | ".join(_cell(by_method[m]) for m in methods.METHODS)
            + " |"
        )

    for name in metrics["settings"]:
        lines.append(
            row(
                sdata.label(name),
                {m: metrics["error"][m][name] for m in methods.METHODS},
            )
        )
    for severity, means in metrics["mean_error_by_severity"].items():
        lines.append(row(f"**mean, severity {severity}**", means))
    lines.append(row("**mean over shifts**", metrics["mean_error"]))
    curve = metrics["curve"]
    sizes = curve["batch_sizes"]
    lines += [
        "",
        f"Test error (%) by test batch size, mean over the shifts at severity "
        f"{curve['severity']} (first {curve['examples']} test images; source "
        f"model: {_cell(curve['source'])} at any batch size):",
        "",
        "| method | " + " | ".join(str(b) for b in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for method in methods.CURVE_METHODS:
        lines.append(
            f"| {methods.SHORT_LABELS[method]} | "
            + " | ".join(_cell(values) for values in curve["error"][method])
            + " |"
        )
    refused = [
        (m, b, why) for m, by in curve["refused"].items() for b, why in by.items()
    ]
    if refused:
        lines += ["", "n/a: refused by bn_keras:", ""]
        lines += [
            f"- {methods.SHORT_LABELS[m]}, batch {b}: {why.split(': ')[0]}"
            for m, b, why in refused
        ]
    changed = metrics["tent_changed"]
    only_affine = bool(changed) and all(
        path.rsplit("/", 1)[-1] in ("gamma", "beta") for path in changed
    )
    lines += [
        "",
        f"TENT changed {len(changed)} variables, all of them BN gamma or beta: "
        f"{'yes' if only_affine else 'NO'}; the source model was restored after "
        f"every method: {'yes' if all(metrics['restored']) else 'NO'}.",
    ]
    return "\n".join(lines) + "\n"


EXPERIMENT = cli.Experiment(
    name="shift",
    description=(
        "Test-time adaptation of BN under distribution shift on MNIST: a "
        "LeNet-BN (bn_keras.BatchNorm) trained on clean MNIST, or a saved "
        "model (source_model), tested on MNIST-C-style shifts (noise, blur, "
        "contrast, brightness, translation, rotation, inversion, stripes, "
        "fog) at several severities and on the UCI digits, with its "
        "population statistics, test-batch statistics, AdaBN (statistics of "
        "the shifted test set) and TENT online and episodic; and the error "
        "against the test batch size, down to 1."
    ),
    schema=SCHEMA,
    body=run,
)


def main(argv=None):
    """Runs the experiment from the command line; returns the exit status."""
    return cli.main(argv, EXPERIMENT)
