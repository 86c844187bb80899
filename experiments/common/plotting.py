"""Plotting helpers shared by the experiments' figures.

Figures are drawn from a run's metrics file, never inside the training loop,
and each is written like every other output: to a temporary name, then
renamed into place (`experiments.common.run.atomic_path`). Importing this
module selects matplotlib's non-interactive Agg backend.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments.common.run import atomic_path, read_json  # noqa: E402

__all__ = ["load_metrics", "plt", "save"]


def save(fig, path):
    """Saves `fig` to `path` atomically and closes it; returns `path`."""
    try:
        with atomic_path(path) as temp:
            fig.savefig(temp, dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(path)


def load_metrics(metrics_path, out_dir=None):
    """`(metrics, out_dir)`: the metrics file's contents, and the folder the
    figures go to (`out_dir`, or the metrics file's own folder)."""
    metrics_path = Path(metrics_path)
    out_dir = Path(out_dir) if out_dir is not None else metrics_path.parent
    return read_json(metrics_path), out_dir
