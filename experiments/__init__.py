"""The reproductions, one package per experiment; shared plumbing in `common`.

Run one with `python -m experiments.NAME` (see experiments/README.md).

TensorFlow reads `TF_CPP_MIN_LOG_LEVEL` once, when it loads: 2 hides its C++
info and warning lines (errors stay). A value the user set wins.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
