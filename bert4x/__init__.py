"""bert4x: bert4keras's workflow on Keras 3."""

__version__ = "0.1.0"
