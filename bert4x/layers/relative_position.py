"""NEZHA's functional relative positions: fixed sinusoids of the clipped relative distance, one table per model."""

from __future__ import annotations

import keras
from keras import ops

from bert4x.layers._common import PACKAGE

__all__ = ["RelativePositionEmbedding"]


@keras.saving.register_keras_serializable(package=PACKAGE)
class RelativePositionEmbedding(keras.layers.Layer):
    """Sinusoidal embeddings of relative distances (NEZHA's "functional relative positional encoding").

    For query position i and key position j, with `r = clip(j - i, -max_relative_position, max_relative_position) +
    max_relative_position`, the output is `a[i, j, 2k] = sin(r / 10000^(2k/d))` and
    `a[i, j, 2k+1] = cos(r / 10000^(2k/d))`, `d = output_dim`. Nothing is learned: the layer has no weights, and its
    output depends only on the lengths of its inputs. `MultiHeadAttention` takes it as `relative_keys` and
    `relative_values`.

    Args:
        output_dim: width of each embedding (the attention head size); must be even.
        max_relative_position: distances are clipped to `[-max_relative_position, max_relative_position]`.
        **kwargs: `keras.layers.Layer` arguments.

    Call arguments:
        inputs: `[batch, q_len, ...]`: the queries' sequence (only its length is read).
        key: `[batch, k_len, ...]`: the keys' sequence; `inputs` when None.

    Returns:
        `[q_len, k_len, output_dim]` in the layer's compute dtype.

    Example:
    >>> layer = RelativePositionEmbedding(output_dim=4, max_relative_position=2)
    >>> layer(keras.ops.ones((1, 5, 8))).shape
    (5, 5, 4)
    """

    def __init__(self, output_dim: int, max_relative_position: int = 64, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(output_dim, int) or output_dim <= 0 or output_dim % 2:
            raise ValueError(f"output_dim must be a positive even integer (sin/cos pairs), got {output_dim!r}.")
        if not isinstance(max_relative_position, int) or max_relative_position < 0:
            raise ValueError(f"max_relative_position must be a non-negative integer, got {max_relative_position!r}.")
        self.output_dim = output_dim
        self.max_relative_position = max_relative_position
        self.supports_masking = True

    def call(self, inputs, key=None):
        q_len = ops.shape(inputs)[1]
        k_len = ops.shape(inputs if key is None else key)[1]
        return self.between(ops.arange(q_len), ops.arange(k_len))

    def between(self, query_positions, key_positions):
        """The table between queries and keys at the given positions (a cached decoding step: one query against
        every cache slot).

        Args:
            query_positions: int `[q_len]`.
            key_positions: int `[k_len]`.

        Returns:
            `[q_len, k_len, output_dim]` in the layer's compute dtype.
        """
        limit = self.max_relative_position
        distance = ops.expand_dims(ops.cast(key_positions, "int32"), 0) - ops.expand_dims(
            ops.cast(query_positions, "int32"), 1)
        index = ops.cast(ops.clip(distance, -limit, limit) + limit, "float32")  # [q_len, k_len]
        # 10000^(-2k/d) for k = 0 .. d/2 - 1; angles in float32 (they reach 2 * max_relative_position radians).
        inv_freq = ops.power(10000.0, -ops.arange(0, self.output_dim, 2, dtype="float32") / self.output_dim)
        angles = ops.expand_dims(index, -1) * inv_freq  # [q_len, k_len, d/2]
        table = ops.stack([ops.sin(angles), ops.cos(angles)], axis=-1)  # interleaved: sin at 2k, cos at 2k+1
        shape = (ops.shape(query_positions)[0], ops.shape(key_positions)[0], self.output_dim)
        table = ops.reshape(table, shape)
        return ops.cast(table, self.compute_dtype)

    def compute_output_spec(self, inputs, key=None):
        k_len = (inputs if key is None else key).shape[1]
        return keras.KerasTensor((inputs.shape[1], k_len, self.output_dim), dtype=self.compute_dtype)

    def compute_mask(self, inputs, mask=None):
        return None  # the output has no batch or token axis to mask

    def get_config(self):
        config = super().get_config()
        config.update(output_dim=self.output_dim, max_relative_position=self.max_relative_position)
        return config
