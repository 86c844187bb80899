"""Where the BN network's population statistics come from.

Run it with `python -m experiments.population_study`.

- `config`: the defaults and the checks of this study's keys;
- `main`: the command line, the cells (one training per estimator) and the
  summary;
- `plots`: the figure, drawn from the metrics file;
- `configs/`: shipped configs (`smoke`).
"""
