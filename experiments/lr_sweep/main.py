"""Final accuracy against learning rate, with and without BN, over seeds.

    python -m experiments.lr_sweep

The paper claims batch normalization permits much higher learning rates. For
each learning rate in `learning_rates` and each seed in `seeds`, both networks
of Figure 1 train for `steps` steps from the same draw; the test accuracy at
the end (BN with population statistics) is recorded, and the figure shows its
mean and spread over seeds.

Each (learning rate, seed) pair is a cell, written to `cells/` as soon as it is
done; `--resume DIR` continues an interrupted sweep with the cells missing.
"""

import time

import numpy as np

from experiments.common import cli
from experiments.common.metrics import (
    BN,
    BN_BATCH_STATS,
    BN_POPULATION,
    PLAIN,
    wall_time_note,
)
from experiments.common.run import RunError
from experiments.lr_sweep.config import SCHEMA


def cell_key(learning_rate, seed):
    """The cell's file name (without `.json`): `lr0.1-seed2`."""
    return f"lr{learning_rate!r}-seed{seed}"


def run(run_dir, config, data, progress=True):
    """Runs the sweep (the cells not yet in `run_dir`), writing metrics, a
    figure and a summary into `run_dir`."""
    from tqdm.auto import tqdm

    from experiments.lr_sweep import plots

    start = time.perf_counter()
    grid = [(lr, seed) for lr in config["learning_rates"] for seed in config["seeds"]]
    cells = run_dir.finished_cells()
    earlier = len(cells)
    expected = {cell_key(lr, seed): (lr, seed) for lr, seed in grid}
    for key, result in cells.items():
        if expected.get(key) != (result.get("learning_rate"), result.get("seed")):
            raise RunError(
                f"cannot resume {run_dir.path}: {run_dir.path}/cells/{key}.json is "
                "not a cell of this sweep; move it away"
            )
    with tqdm(total=len(grid), desc="sweep", disable=not progress) as bar:
        bar.update(len(cells))
        for learning_rate, seed in grid:
            key = cell_key(learning_rate, seed)
            if key in cells:
                continue
            run_dir.stage(
                "training",
                cell=f"learning_rate={learning_rate}, seed={seed}",
                cells=len(grid),
                cells_done=len(cells),
            )
            cells[key] = train_cell(config, data, learning_rate, seed, run_dir.progress)
            run_dir.write_cell(key, cells[key], done=len(cells), total=len(grid))
            bar.update(1)
    runs = [cells[cell_key(lr, seed)] for lr, seed in grid]
    metrics = {
        "config": config,
        "runs": runs,
        "by_learning_rate": aggregate(runs),
        "wall_seconds": time.perf_counter() - start,
        "cells_from_earlier_sessions": earlier,
    }
    run_dir.write_outputs(metrics, plots.plot_all, summary_table(metrics), progress)
    return metrics


def train_cell(config, data, learning_rate, seed, report=None):
    """Trains both networks at one learning rate and seed; returns the cell."""
    from experiments.common.metrics import finite_or_none
    from experiments.common.mlp.evaluate import Evaluator
    from experiments.common.mlp.models import build_networks
    from experiments.common.mlp.train import train_and_evaluate

    start = time.perf_counter()
    # Only the final accuracy matters here: evaluate at the end alone.
    cell_config = {
        **config,
        "learning_rate": learning_rate,
        "seed": seed,
        "eval_every": config["steps"],
    }
    networks = build_networks(cell_config)
    evaluator = Evaluator(networks, data.x_test, data.y_test)
    final = train_and_evaluate(
        networks, data, cell_config, evaluator, progress=False, report=report
    )[-1]
    accuracy = final["accuracy"]
    return {
        "learning_rate": learning_rate,
        "seed": seed,
        PLAIN: accuracy[PLAIN],
        BN: accuracy[BN_POPULATION],
        BN_BATCH_STATS: accuracy[BN_BATCH_STATS],
        # null where the loss is not finite: the network diverged.
        "final_train_loss": {
            PLAIN: finite_or_none(final["train_loss"][0]),
            BN: finite_or_none(final["train_loss"][1]),
        },
        "seconds": time.perf_counter() - start,
    }


def aggregate(runs):
    """Mean, standard deviation, min and max over seeds, per learning rate."""
    result = []
    for learning_rate in sorted({r["learning_rate"] for r in runs}):
        group = [r for r in runs if r["learning_rate"] == learning_rate]
        entry = {"learning_rate": learning_rate, "seeds": len(group)}
        for key in (PLAIN, BN):
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
        f"Test accuracy after {config['steps']} steps, mean ± standard deviation "
        f"(ddof=0) over {len(config['seeds'])} seeds",
        "",
        "| learning rate | without BN | with BN |",
        "|---|---|---|",
    ]
    for entry in metrics["by_learning_rate"]:
        cells = [f"{entry[k]['mean']:.4f} ± {entry[k]['std']:.4f}" for k in (PLAIN, BN)]
        lines.append(f"| {entry['learning_rate']:g} | {cells[0]} | {cells[1]} |")
    for key, name in ((PLAIN, "without BN"), (BN, "with BN")):
        diverged = [r for r in metrics["runs"] if r["final_train_loss"][key] is None]
        if diverged:
            lines += ["", f"{len(diverged)} runs {name} ended with a non-finite loss."]
    lines += [
        "",
        wall_time_note(metrics),
    ]
    return "\n".join(lines) + "\n"


EXPERIMENT = cli.Experiment(
    name="lr_sweep",
    description=(
        "Sweep the learning rate with and without batch normalization over "
        "several seeds, and plot final test accuracy against learning rate."
    ),
    schema=SCHEMA,
    body=run,
    resumable=True,
)


def main(argv=None):
    """Runs the sweep from the command line; returns the exit status."""
    return cli.main(argv, EXPERIMENT)
