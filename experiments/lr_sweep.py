"""Final accuracy against learning rate, with and without BN, over seeds.

    python -m experiments.lr_sweep --config configs/lr_sweep.toml

The paper claims batch normalization permits much higher learning rates. For
each learning rate in `learning_rates` and each seed in `seeds`, both networks
of Figure 1 train for `steps` steps from the same draw; the test accuracy at
the end (BN with population statistics) is recorded, and the figure shows its
mean and spread over seeds.
"""

import sys
import time

import numpy as np
from tqdm.auto import tqdm

from experiments import cli
from experiments.config import SWEEP_DEFAULTS


def run(config, out_dir, progress=True):
    """Runs the sweep, writing metrics, a figure and a summary into `out_dir`."""
    from experiments import plots
    from experiments.evaluate import Evaluator
    from experiments.experiment import finish_run, finite_or_none, start_run
    from experiments.models import build_networks
    from experiments.train import train_and_evaluate

    start = time.perf_counter()
    out_dir, data = start_run(config, out_dir)
    grid = [(lr, seed) for lr in config["learning_rates"] for seed in config["seeds"]]
    runs = []
    for learning_rate, seed in tqdm(grid, desc="sweep", disable=not progress):
        # Only the final accuracy matters here: evaluate at the end alone.
        run_config = {
            **config,
            "learning_rate": learning_rate,
            "seed": seed,
            "eval_every": config["steps"],
        }
        networks = build_networks(run_config)
        evaluator = Evaluator(networks, data.x_test, data.y_test, config["neurons"])
        final = train_and_evaluate(
            networks, data, run_config, evaluator, progress=False
        )[-1]
        runs.append(
            {
                "learning_rate": learning_rate,
                "seed": seed,
                "plain": final["accuracy_plain"],
                "bn": final["accuracy_bn_population"],
                "bn_batch_stats": final["accuracy_bn_batch_stats"],
                # None (JSON null) where the loss is not finite: diverged.
                "final_train_loss": {
                    "plain": finite_or_none(final["train_loss"][0]),
                    "bn": finite_or_none(final["train_loss"][1]),
                },
            }
        )
    metrics = {
        "config": config,
        "runs": runs,
        "by_learning_rate": aggregate(runs),
        "wall_seconds": time.perf_counter() - start,
    }
    finish_run(out_dir, metrics, plots.plot_lr_sweep, summary_table(metrics), progress)
    return metrics


def aggregate(runs):
    """Mean, standard deviation, min and max over seeds, per learning rate."""
    result = []
    for learning_rate in sorted({r["learning_rate"] for r in runs}):
        group = [r for r in runs if r["learning_rate"] == learning_rate]
        entry = {"learning_rate": learning_rate, "seeds": len(group)}
        for key in ("plain", "bn"):
            values = np.array([r[key] for r in group])
            entry[key] = {
                "mean": float(values.mean()),
                "std": float(values.std()),
                "min": float(values.min()),
                "max": float(values.max()),
            }
        result.append(entry)
    return result


def summary_table(metrics):
    config = metrics["config"]
    lines = [
        f"Test accuracy after {config['steps']} steps, mean ± std over "
        f"{len(config['seeds'])} seeds",
        "",
        "| learning rate | without BN | with BN |",
        "|---|---|---|",
    ]
    for entry in metrics["by_learning_rate"]:
        cells = [
            f"{entry[k]['mean']:.4f} ± {entry[k]['std']:.4f}" for k in ("plain", "bn")
        ]
        lines.append(f"| {entry['learning_rate']:g} | {cells[0]} | {cells[1]} |")
    for key, name in (("plain", "without BN"), ("bn", "with BN")):
        diverged = [r for r in metrics["runs"] if r["final_train_loss"][key] is None]
        if diverged:
            lines += ["", f"{len(diverged)} runs {name} ended with a non-finite loss."]
    return "\n".join(lines) + "\n"


DESCRIPTION = (
    "Sweep the learning rate with and without batch normalization over "
    "several seeds, and plot final test accuracy against learning rate."
)


def main(argv=None):
    return cli.main(argv, "experiments.lr_sweep", DESCRIPTION, SWEEP_DEFAULTS, run)


if __name__ == "__main__":
    sys.exit(main())
