"""Times the MNIST experiment: the default run against a plain per-step loop,
and Figure 1 over five seeds against one seed.

Variants of the same run (the first three give the same metrics):
- baseline: one compiled training step per network per step, called from
  Python, and one compiled evaluation per network and mode every 50 steps
  (what most users write);
- per-step, shared eval: the same per-step loop with one evaluation call
  (the BN network's two test passes sharing their first layer);
- default: the default run: all the steps between two evaluations, for both
  networks, in one XLA-compiled call, each evaluation overlapping the next
  chunk of training;
- five seeds: the default run with `--seeds 0,1,2,3,4`, every seed's two
  networks trained and tested together (`--config five_seeds`).

Each run is a fresh `python -m experiments.mnist_mlp` process (start-up,
data, training, evaluation, the single-example check, saving, plots), so the
wall time is what a user waits. The variants alternate; the report gives each
run's wall time and peak memory (maximum resident set size), the medians,
their ratios to the baseline, and the two targets: the default run at least
3.5x faster than the baseline, five seeds in at most 2x the default run's time.

Run from the repository root: `python -m benchmarks.bench_experiment`
(about 40 minutes on two CPU cores; `--variants baseline,default` for part of
it, `--set steps=4000` for a quick look). On a shared machine, run it under
`flock /tmp/bn_heavy.lock` so that other benchmarks do not overlap it.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = {
    "baseline": ('loop="simple"', 'evaluation="separate"'),
    "per-step, shared eval": ('loop="simple"', 'evaluation="shared"'),
    "default": (),
    # The seeds of --config five_seeds (given as a key: each variant is a
    # list of --set overrides).
    "five seeds": ("seeds=[0, 1, 2, 3, 4]",),
}
# (name, variant, reference, target ratio, "at least" or "at most"): the
# ratio is reference time / variant time for a speed-up, variant / reference
# for a cost.
TARGETS = (
    ("default run vs baseline (speed-up)", "default", "baseline", 3.5, "at least"),
    ("five seeds vs one seed (time)", "five seeds", "default", 2.0, "at most"),
)


def _run(settings, overrides, out_dir):
    command = [sys.executable, "-m", "experiments.mnist_mlp", "--quiet"]
    command += ["--out", out_dir]
    for item in (*settings, *overrides):
        command += ["--set", item]
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        process = subprocess.Popen(command, stderr=log, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        if status != 0:
            log.seek(0)
            sys.exit(f"error: {' '.join(command)} failed:\n{log.read()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024**2  # Linux reports KiB


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant")
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated subset of: {', '.join(VARIANTS)}",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override passed to every run, e.g. --set steps=4000",
    )
    parser.add_argument(
        "--keep",
        metavar="DIR",
        help="keep each run's folder under DIR (new or empty) instead of deleting it",
    )
    args = parser.parse_args(argv)
    chosen = [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    results = {name: [] for name in chosen}
    tmp = tempfile.mkdtemp(prefix="bench_experiment-")
    try:
        for repeat in range(args.repeats):
            for i, name in enumerate(chosen):
                out = os.path.join(args.keep or tmp, f"{i}-{repeat}")
                seconds, memory = _run(VARIANTS[name], args.overrides, out)
                results[name].append((seconds, memory))
                print(
                    f"run {repeat + 1} {name:22} {seconds:7.1f} s  {memory:5.2f} GiB",
                    flush=True,
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    medians = {
        name: statistics.median(s for s, _ in runs) for name, runs in results.items()
    }
    baseline = medians.get("baseline")
    print()
    print(f"{'variant':22} {'median':>8} {'vs baseline':>12} {'peak memory':>12}")
    for name, runs in results.items():
        peak = max(m for _, m in runs)
        ratio = f"{baseline / medians[name]:11.2f}x" if baseline else f"{'-':>12}"
        print(f"{name:22} {medians[name]:7.1f}s {ratio} {peak:9.2f} GiB")
    print()
    for label, variant, reference, target, sense in TARGETS:
        if variant not in medians or reference not in medians:
            continue
        if sense == "at least":
            ratio = medians[reference] / medians[variant]
            met = ratio >= target
        else:
            ratio = medians[variant] / medians[reference]
            met = ratio <= target
        verdict = "met" if met else "MISSED"
        print(f"{label}: {ratio:.2f}x (target: {sense} {target}x): {verdict}")


if __name__ == "__main__":
    main()
