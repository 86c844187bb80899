"""The names in the sequential-MNIST metrics file, defined once."""

from experiments.common.metrics import EMA, PRECISE

# The two networks, and the splits they are evaluated on.
LSTM = "lstm"
BN_LSTM = "bn_lstm"
NETWORKS = (LSTM, BN_LSTM)
VALIDATION = "validation"
TEST = "test"
SPLITS = (VALIDATION, TEST)

# The BN-LSTM's population statistics: the moving averages kept during
# training (what a Keras BN layer gives), and the statistics recomputed after
# training from training sequences with the weights frozen (precise BN).
ESTIMATES = (EMA, PRECISE)
# The trained BN-LSTM with recomputed statistics, beside NETWORKS in the
# final accuracies and the saved models.
BN_LSTM_PRECISE = "bn_lstm_precise"

# The inference check: the BN-LSTM's test accuracy with each estimate used
# per timestep (true inference), as one statistic shared by all timesteps
# (the common mistake), and one sequence at a time; and with each test
# batch's own statistics, which need no estimate.
PER_TIMESTEP = "per_timestep"
SHARED = "shared"
ONE_AT_A_TIME = "one_at_a_time"
CHECKS = (PER_TIMESTEP, SHARED, ONE_AT_A_TIME)

# The BN-LSTM's normalizations whose population statistics are plotted.
PLOTTED_NORMS = ("recurrent_norm", "cell_norm")
