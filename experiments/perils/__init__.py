"""On the Perils of Batch Norm (Irpan, 2017): two domains, five ways to train.

Run it with `python -m experiments.perils`.

- `config`: the defaults and the checks of this experiment's keys;
- `main`: the command line, the run and its summary;
- `data`: the two domains (MNIST and the UCI digits) and their mini-batches;
- `models`: the network, its towers and the variants built from its layers;
- `train`: training a variant, evaluating it, the repair and the diagnosis;
- `plots`: the figure, drawn from the metrics file;
- `configs/`: shipped configs (`smoke`).
"""
