"""Reproduction of the batch-normalization paper's MNIST experiment (Figure 1)."""
