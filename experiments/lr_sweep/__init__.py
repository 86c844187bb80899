"""Final accuracy against learning rate, with and without BN.

Run it with `python -m experiments.lr_sweep`.

- `config`: the defaults and the checks of this sweep's keys;
- `main`: the command line, the cells (one per learning rate and seed) and
  the summary;
- `plots`: the figure, drawn from the metrics file;
- `configs/`: shipped configs (`smoke`).
"""
