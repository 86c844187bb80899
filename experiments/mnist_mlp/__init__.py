"""Figure 1 of the batch-normalization paper on MNIST.

Run it with `python -m experiments.mnist_mlp`.

Two 784-100-100-10 sigmoid networks, without and with BN, train from the same
initial weights on the same mini-batches; the run plots the paper's Figure 1
and checks inference one example at a time.

- `config`: the defaults and the checks of this experiment's keys;
- `main`: the command line, the run, its metrics file and summary;
- `train`: every seed's networks trained and tested, stacked or one by one;
- `stacked`: every seed's two networks in stacked weights;
- `single_example`: the single-example inference check;
- `plots`: the three figures, drawn from the metrics file;
- `configs/`: shipped configs (`paper`, `five_seeds`, `smoke`).

The networks, their SGD training and evaluation are shared with the studies,
in `experiments.common.mlp`.
"""
