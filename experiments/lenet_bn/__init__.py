"""LeNet with batch normalization (Dive into Deep Learning 7.5).

Run it with `python -m experiments.lenet_bn`.

- `config`: the defaults and the checks of this experiment's keys;
- `main`: the command line, the run and its summary;
- `models`: LeNet, and the chapter's from-scratch BN layer in `keras.ops`;
- `train`: training the versions, the statistics study, folding;
- `callbacks_study`: the diagnosis of each epoch, and the bn_keras network
  trained again with PreciseBN, FreezeStatistics and use_ema;
- `plots`: the three figures, drawn from the metrics file;
- `configs/`: shipped configs (`smoke`).
"""
