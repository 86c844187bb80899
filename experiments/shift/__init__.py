"""Test-time adaptation of BN statistics under distribution shift (AdaBN, TENT).

Run it with `python -m experiments.shift`.

- `config`: the defaults and the checks of this experiment's keys;
- `main`: the command line, the run and its summary;
- `data`: the test settings: clean MNIST, MNIST-C-style shifts
  (`experiments.common.shifts`) at each severity, the UCI digits;
- `methods`: the source model, test-batch statistics, AdaBN and TENT, each
  leaving the model as it found it;
- `study`: the source model (trained or loaded), every method on every
  setting, and the test-batch-size curve;
- `plots`: the two figures, drawn from the metrics file;
- `configs/`: shipped configs (`smoke`, `five_seeds`).
"""
