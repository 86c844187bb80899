"""The sigmoid MLP of the paper's Figure 1, shared by three experiments.

`mnist_mlp` (Figure 1), `population_study` and `lr_sweep` train the same
784-100-100-10 networks with and without batch normalization: their shared
config keys (`config`), the networks (`models`), plain SGD on the same
mini-batches (`train`) and the test-set evaluation with the single-example
check (`evaluate`) live here, so that no experiment imports another.
"""
