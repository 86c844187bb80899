"""bn_keras: batch normalization for Keras 3 with population statistics done right.

Importing `bn_keras` registers `BatchNorm` with Keras' serialization: import it
before loading a `.keras` file that holds the layer.
"""

from bn_keras import callbacks
from bn_keras.adapt import Tent, adapt_statistics, restore_statistics
from bn_keras.batch_norm import BatchNorm
from bn_keras.convert import convert_batch_norms
from bn_keras.diagnosis import LayerStatistics, StatisticsReport, inspect_statistics
from bn_keras.fold import fold_batch_norms
from bn_keras.lstm import BatchNormLSTM
from bn_keras.modes import set_statistics, statistics_mode
from bn_keras.precise import batch_norm_layers, recompute_statistics
from bn_keras.timestep import TimestepBatchNorm

__all__ = [
    "BatchNorm",
    "BatchNormLSTM",
    "LayerStatistics",
    "StatisticsReport",
    "Tent",
    "TimestepBatchNorm",
    "__version__",
    "adapt_statistics",
    "batch_norm_layers",
    "callbacks",
    "convert_batch_norms",
    "fold_batch_norms",
    "inspect_statistics",
    "recompute_statistics",
    "restore_statistics",
    "set_statistics",
    "statistics_mode",
]
__version__ = "0.2.0"
