"""Learned absolute positions with bert4keras's two options: hierarchical decomposition and caller-given position ids.

`HierarchicalPositionEmbedding` keeps the same `embeddings` weight as `PositionEmbedding` (so a checkpoint's
position table loads unchanged) and adds:

- `hierarchical` (`True` means alpha = 0.4, or a float alpha in (0, 1)): with the n learned rows p_0..p_{n-1} and
  u_j = (p_j - alpha * p_0) / (1 - alpha), position i gets alpha * u[i // n] + (1 - alpha) * u[i % n]. Positions
  below n get exactly p_i back; positions up to n * n exist (BERT past 512 tokens without new weights).
- `custom_position_ids`: the layer is called as `layer(x, position_ids)` with int ids `[batch, len]`.
"""

from __future__ import annotations

import keras
from keras import ops

_PACKAGE = "bert4x"

__all__ = ["HierarchicalPositionEmbedding"]


@keras.saving.register_keras_serializable(package=_PACKAGE)
class HierarchicalPositionEmbedding(keras.layers.Layer):
    """Adds learned position embeddings to `[batch, len, dim]` inputs, optionally hierarchical and/or at given ids.

    Args:
        input_dim: rows of the learned table (max_position_embeddings).
        output_dim: width of the table (the embedding size).
        hierarchical: None/False (plain table), True (alpha = 0.4) or a float alpha in (0, 1).
        custom_position_ids: whether the call takes position ids as a second argument.
        embeddings_initializer: initializer of the table.

    Example:
    >>> layer = HierarchicalPositionEmbedding(4, 2, hierarchical=True)
    >>> layer(keras.ops.zeros((1, 9, 2))).shape
    (1, 9, 2)
    """

    def __init__(self, input_dim: int, output_dim: int, hierarchical: bool | float | None = None,
                 custom_position_ids: bool = False, embeddings_initializer="zeros", **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True  # the padding mask of the token embedding passes through
        if hierarchical is True:
            hierarchical = 0.4
        if hierarchical is not None and hierarchical is not False:
            if isinstance(hierarchical, bool) or not 0.0 < float(hierarchical) < 1.0:
                raise ValueError(f"hierarchical must be True, None or an alpha in (0, 1), got {hierarchical!r}.")
            hierarchical = float(hierarchical)
        else:
            hierarchical = None
        self.input_dim = int(input_dim)
        self.output_dim = int(output_dim)
        self.hierarchical = hierarchical
        self.custom_position_ids = bool(custom_position_ids)
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)

    @property
    def max_positions(self) -> int:
        """How many positions the layer can embed."""
        return self.input_dim ** 2 if self.hierarchical else self.input_dim

    def build(self, inputs_shape, position_ids_shape=None):
        input_shape = inputs_shape
        if input_shape[-1] is not None and input_shape[-1] != self.output_dim:
            raise ValueError(f"{self.name}: input width {input_shape[-1]} != output_dim {self.output_dim}.")
        if not self.custom_position_ids and input_shape[1] is not None and input_shape[1] > self.max_positions:
            raise ValueError(
                f"{self.name}: sequence length {input_shape[1]} exceeds the {self.max_positions} positions this "
                "table embeds; truncate the text or set hierarchical_position=True."
            )
        self.embeddings = self.add_weight(name="embeddings", shape=(self.input_dim, self.output_dim),
                                          initializer=self.embeddings_initializer)

    def rows(self, position_ids):
        """The embeddings of int `position_ids` (any shape): `[..., output_dim]`, float32."""
        position_ids = ops.cast(position_ids, "int32")
        table = ops.convert_to_tensor(self.embeddings)
        if self.hierarchical is None:
            return ops.take(table, position_ids, axis=0)
        alpha = self.hierarchical
        u = (table - alpha * table[:1]) / (1.0 - alpha)
        high = ops.take(u, position_ids // self.input_dim, axis=0)
        low = ops.take(u, position_ids % self.input_dim, axis=0)
        return alpha * high + (1.0 - alpha) * low

    def call(self, inputs, position_ids=None):
        if self.custom_position_ids:
            if position_ids is None:
                raise ValueError(f"{self.name} has custom_position_ids=True: call it as layer(x, position_ids).")
            positions = ops.cast(position_ids, "int32")
        else:
            if position_ids is not None:
                raise ValueError(f"{self.name} was built without custom_position_ids; it takes no position ids.")
            length = inputs.shape[1]
            if length is not None and length > self.max_positions:
                raise ValueError(f"{self.name}: sequence length {length} exceeds the {self.max_positions} positions "
                                 "this table embeds; truncate the text or set hierarchical_position=True.")
            positions = ops.expand_dims(ops.arange(ops.shape(inputs)[1], dtype="int32"), 0)
        return inputs + ops.cast(self.rows(positions), inputs.dtype)

    def compute_output_shape(self, inputs_shape, position_ids_shape=None):
        return inputs_shape

    def get_config(self):
        config = super().get_config()
        config.update(input_dim=self.input_dim, output_dim=self.output_dim, hierarchical=self.hierarchical,
                      custom_position_ids=self.custom_position_ids,
                      embeddings_initializer=keras.initializers.serialize(self.embeddings_initializer))
        return config
