"""Reproduction of the batch-normalization paper's MNIST experiment (Figure 1).

TensorFlow reads `TF_CPP_MIN_LOG_LEVEL` once, when it loads: 2 hides its C++
info and warning lines (errors stay). A value the user set wins.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
