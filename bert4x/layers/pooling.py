"""Taking the first ([CLS]) token of a sequence: BERT's pooler input."""

from __future__ import annotations

import keras
from keras import ops

from bert4x import backend
from bert4x.layers._common import PACKAGE

__all__ = ["FirstToken"]


@ops.custom_gradient
def _first_token_kept(inputs):
    # The gradient of a slice is a pad, which XLA:GPU fuses into the last LayerNorm's backward reduction as one slow
    # kernel. Written as a product with a one-hot column it fuses like any other.
    def grad(*args, upstream=None):
        upstream = backend.upstream_gradient(args, upstream)
        first = ops.cast(ops.arange(ops.shape(inputs)[1]) == 0, upstream.dtype)
        return upstream * ops.expand_dims(first, -1)

    return inputs[:, :1], grad


def _first_token(inputs, keepdims: bool = False):
    first = _first_token_kept(inputs)
    # Indexing, not squeeze: tensorflow's custom gradient drops the static length 1, and squeeze then refuses it.
    return first if keepdims else first[:, 0]


@keras.saving.register_keras_serializable(package=PACKAGE)
class FirstToken(keras.layers.Layer):
    """Takes the hidden state of the first ([CLS]) token: `[batch, length, dim] -> [batch, dim]`
    (`[batch, 1, dim]` with `keepdims=True`).

    The output carries no Keras mask (it has no sequence axis).

    Args:
        keepdims: keep the length axis (of size 1).
        **kwargs: `keras.layers.Layer` arguments.

    Example:
    >>> FirstToken()(keras.ops.ones((2, 5, 8))).shape
    (2, 8)
    >>> FirstToken(keepdims=True)(keras.ops.ones((2, 5, 8))).shape
    (2, 1, 8)
    """

    def __init__(self, keepdims: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.keepdims = keepdims

    def call(self, inputs):
        return _first_token(inputs, self.keepdims)

    def compute_mask(self, inputs, mask=None):
        return None

    def compute_output_shape(self, input_shape):
        if self.keepdims:
            return (input_shape[0], 1, input_shape[2])
        return (input_shape[0], input_shape[2])

    def get_config(self):
        config = super().get_config()
        config.update(keepdims=self.keepdims)
        return config
