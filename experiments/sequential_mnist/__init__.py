"""Sequential MNIST with an LSTM and a BN-LSTM.

Run it with `python -m experiments.sequential_mnist`.

- `config`: the defaults, the tasks and the checks of this experiment's keys;
- `main`: the command line, the run and its summary;
- `metrics`: the names in its metrics file;
- `models`: digits as sequences, the LSTM and the BN-LSTM;
- `train`: both networks trained on the same mini-batches;
- `evaluate`: precise BN and the inference check;
- `plots`: the two figures, drawn from the metrics file;
- `configs/`: shipped configs (`pixels`, `permuted`, `smoke`).
"""
