"""bn_keras: batch normalization for Keras 3 with population statistics done right."""

from bn_keras.batch_norm import BatchNorm

__all__ = ["BatchNorm"]
__version__ = "0.1.0"
