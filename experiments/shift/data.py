"""The test settings: clean MNIST, each shift at each severity, the UCI digits.

A setting is a name (`CLEAN`, `"fog-5"`, `DIGITS`), its images as
`(N, 28, 28, 1)` float32 in `[0, 1]` and its labels. The shifted sets are
made from the test images used by `experiments.common.shifts.corrupt`
with the run's seed; the labels are the clean ones.
"""

from __future__ import annotations

import typing

import numpy as np

from experiments.common import digits, shifts
from experiments.common.lenet import images

CLEAN = "clean"
DIGITS = "uci_digits"
LABELS = {CLEAN: "clean MNIST", DIGITS: "UCI digits (another source)"}


class Setting(typing.NamedTuple):
    """One test set: its name, shift (None: clean or another source),
    severity (None where it has none), images and labels."""

    name: str
    shift: str | None
    severity: int | None
    x: np.ndarray
    y: np.ndarray


def setting_name(shift: str, severity: int) -> str:
    """`"fog-5"`: the name of `shift` at `severity`."""
    return f"{shift}-{severity}"


def label(name: str) -> str:
    """How tables and figures name a setting: `fog 5`, `clean MNIST`."""
    return LABELS.get(name, name.replace("-", " ").replace("_", " "))


def setting_names(config: dict) -> list[str]:
    """The settings of `config`, in the order of the tables: clean, each
    shift at each severity, the digits."""
    names = [CLEAN]
    names += [
        setting_name(s, v) for s in config["shifts"] for v in config["severities"]
    ]
    return names + ([DIGITS] if config["digits"] else [])


def shifted_names(config: dict, severity: int | None = None) -> list[str]:
    """The MNIST shifts (at `severity`, or at every severity): the settings
    that the mean over shifts averages; the digits are apart."""
    severities = config["severities"] if severity is None else [severity]
    return [setting_name(s, v) for s in config["shifts"] for v in severities]


def make_settings(data, config: dict, seed: int, digits_data=None) -> list[Setting]:
    """Every setting of `config` (see `setting_names`), shifted with `seed`.

    Args:
        data: An `Mnist` tuple (flat images); its test images are shifted.
        config: The run's config.
        seed: The seed of the shifts' random draws.
        digits_data: `experiments.common.digits.load_digits()`, loaded once
            for every seed (None loads it here, if `config["digits"]`).
    """
    x, y = data.x_test, data.y_test
    settings = [Setting(CLEAN, None, None, images(x), y)]
    for shift in config["shifts"]:
        for severity in config["severities"]:
            shifted = shifts.corrupt(x, shift, severity, seed=seed)
            name = setting_name(shift, severity)
            settings.append(Setting(name, shift, severity, images(shifted), y))
    if config["digits"]:
        digits_data = digits_data or digits.load_digits()
        settings.append(
            Setting(DIGITS, None, None, images(digits_data.x_test), digits_data.y_test)
        )
    return settings


def curve_settings(data, config: dict, seed: int) -> list[Setting]:
    """The curve's settings: the first `curve_examples` test images under
    every shift at `curve_severity`."""
    x, y = (
        data.x_test[: config["curve_examples"]],
        data.y_test[: config["curve_examples"]],
    )
    severity = config["curve_severity"]
    return [
        Setting(
            setting_name(shift, severity),
            shift,
            severity,
            images(shifts.corrupt(x, shift, severity, seed=seed)),
            y,
        )
        for shift in config["shifts"]
    ]
