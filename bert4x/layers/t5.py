"""Layers that T5 / mT5 add to the core set: the bucketed relative position bias and two padding helpers.

T5's RMS LayerNorm is `keras.layers.RMSNormalization`: it computes `x / sqrt(mean(x²) + eps) * scale` in float32 even
under mixed precision, which is exactly T5's definition, so bert4x reuses it.
"""

from __future__ import annotations

import math

import keras
from keras import ops

__all__ = ["RelativePositionBias", "MaskPadding", "ContextMask", "relative_position_bucket"]

_PACKAGE = "bert4x"


def relative_position_bucket(relative_position, bidirectional: bool = True, num_buckets: int = 32,
                             max_distance: int = 128):
    """T5's bucket of each relative position `key_position - query_position` (an int tensor).

    Half of the buckets (per direction, when bidirectional) hold exact distances 0..n/2-1; the rest cover distances up
    to `max_distance` logarithmically; farther distances share the last bucket. Causal (`bidirectional=False`) maps
    every future position to bucket 0, which the causal mask hides anyway.

    Example:
    >>> buckets = relative_position_bucket(keras.ops.convert_to_tensor([-200, -3, 0, 3, 200]))
    >>> keras.ops.convert_to_numpy(buckets).tolist()
    [15, 3, 0, 19, 31]
    """
    relative_position = ops.cast(relative_position, "int32")
    buckets = ops.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + ops.cast(ops.greater(relative_position, 0), "int32") * num_buckets
        distance = ops.abs(relative_position)
    else:
        distance = ops.maximum(-relative_position, 0)
    max_exact = num_buckets // 2
    is_small = ops.less(distance, max_exact)
    # log of the distance beyond the exact range; max(., 1) keeps log finite where the exact branch is used anyway.
    scaled = ops.log(ops.cast(ops.maximum(distance, 1), "float32") / max_exact)
    scaled = scaled / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    large = ops.minimum(max_exact + ops.cast(scaled, "int32"), num_buckets - 1)
    return buckets + ops.where(is_small, distance, large)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class RelativePositionBias(keras.layers.Layer):
    """T5's learned relative position bias, `[1, heads, q_len, k_len]`, added to the attention logits.

    One table `embeddings[num_buckets, heads]` per stack: the encoder's is bidirectional, the decoder's causal. It is
    computed once (in the first layer) and added in every layer. `layer(x)` gives the bias of a sequence attending to
    itself; `layer.compute_bias(query_positions, key_positions)` gives it for any positions (cached decoding).

    Example:
    >>> tuple(RelativePositionBias(heads=4)(keras.ops.zeros((2, 5, 8))).shape)
    (1, 4, 5, 5)
    """

    def __init__(self, heads: int, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = True,
                 embeddings_initializer=None, **kwargs):
        super().__init__(**kwargs)
        self.heads = heads
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional
        self.embeddings_initializer = keras.initializers.get(
            embeddings_initializer if embeddings_initializer is not None else "truncated_normal"
        )

    def build(self, input_shape=None):
        self.embeddings = self.add_weight(
            name="embeddings", shape=(self.num_buckets, self.heads), initializer=self.embeddings_initializer
        )

    def compute_bias(self, query_positions, key_positions):
        """Bias `[1, heads, len(query_positions), len(key_positions)]` for 1-D int position tensors."""
        relative = ops.expand_dims(key_positions, 0) - ops.expand_dims(query_positions, 1)
        bucket = relative_position_bucket(relative, self.bidirectional, self.num_buckets, self.max_distance)
        values = ops.take(ops.cast(self.embeddings, self.compute_dtype), bucket, axis=0)  # [q, k, heads]
        return ops.expand_dims(ops.transpose(values, (2, 0, 1)), 0)

    def call(self, inputs):
        positions = ops.arange(ops.shape(inputs)[1], dtype="int32")
        return self.compute_bias(positions, positions)

    def compute_output_shape(self, input_shape):
        return (1, self.heads, input_shape[1], input_shape[1])

    def get_config(self):
        config = super().get_config()
        config.update(
            heads=self.heads,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
            bidirectional=self.bidirectional,
            embeddings_initializer=keras.initializers.serialize(self.embeddings_initializer),
        )
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MaskPadding(keras.layers.Layer):
    """Zeroes the vectors of padding tokens: `x * (token_ids != pad_id)`.

    The T5 encoder's output goes through it, so a decoder given only that output can tell padding (all-zero rows,
    see `ContextMask`) from text, as bert4keras's `[context, decoder_ids]` decoder did.

    Example:
    >>> out = MaskPadding()(keras.ops.ones((1, 3, 2)), keras.ops.convert_to_tensor([[5, 6, 0]]))
    >>> keras.ops.convert_to_numpy(out)[0, :, 0].tolist()
    [1.0, 1.0, 0.0]
    """

    def __init__(self, pad_id: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.pad_id = pad_id

    def call(self, inputs, token_ids):
        keep = ops.cast(ops.not_equal(token_ids, self.pad_id), inputs.dtype)
        return inputs * ops.expand_dims(keep, -1)

    def compute_output_spec(self, inputs, token_ids):
        return keras.KerasTensor(inputs.shape, dtype=inputs.dtype)

    def get_config(self):
        config = super().get_config()
        config.update(pad_id=self.pad_id)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ContextMask(keras.layers.Layer):
    """Boolean key mask `[batch, 1, 1, length]` of an encoder output: True where the vector is not all zeros.

    Example:
    >>> context = keras.ops.convert_to_tensor([[[1.0, 2.0], [0.0, 0.0]]])
    >>> tuple(ContextMask()(context).shape)
    (1, 1, 1, 2)
    """

    def call(self, context):
        present = ops.any(ops.not_equal(context, 0), axis=-1)
        return ops.expand_dims(ops.expand_dims(present, 1), 1)

    def compute_output_spec(self, context):
        return keras.KerasTensor((context.shape[0], 1, 1, context.shape[1]), dtype="bool")
