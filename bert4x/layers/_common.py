"""Small helpers shared by the modules of `bert4x.layers`."""

from __future__ import annotations

import keras

from bert4x import backend

PACKAGE = "bert4x"


def initializer(value):
    """`keras.initializers.get(value)`, or BERT's truncated normal (stddev 0.02) when `value` is None."""
    return keras.initializers.get(value) if value is not None else backend.TruncatedNormal(stddev=0.02)
