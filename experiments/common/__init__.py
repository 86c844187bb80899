"""What the experiments share; it imports no experiment.

- `cli`: the command line every experiment has, and `Experiment`, what it
  needs to know about one;
- `config`: loading TOML configs and `--set` overrides against an
  experiment's `Schema`, and the checks the experiments share;
- `data`: MNIST from the vendored copy, a folder of IDX files or TFDS;
- `run`: run folders that never lose or fake a result;
- `metrics`: the names in the metrics files, and strict-JSON numbers;
- `plotting`: matplotlib set up for files, and atomic saving;
- `quiet`: a TensorFlow start without its log noise;
- `shifts`: MNIST-C-style distribution shifts of MNIST images;
- `lenet`: LeNet-BN (d2l 7.5) and its training, shared by `lenet_bn` and
  `shift`;
- `mlp`: the Figure-1 network, its training and evaluation, shared by
  `mnist_mlp`, `population_study` and `lr_sweep`.
"""
