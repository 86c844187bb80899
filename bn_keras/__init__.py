"""bn_keras: batch normalization for Keras 3 with population statistics done right."""

from bn_keras.batch_norm import BatchNorm
from bn_keras.precise import batch_norm_layers, recompute_statistics

__all__ = ["BatchNorm", "batch_norm_layers", "recompute_statistics"]
__version__ = "0.1.0"
