"""Skipping padding tokens: the hidden states of real tokens only, and back to the padded layout.

`RemovePadding` turns `[batch, len, dim]` hidden states into `(tokens, positions, slots)`; a model then passes them
from layer to layer as an `Unpadded` value (position-wise layers run on `tokens`, attention takes
`padding_index=(positions, slots)`), and `RestorePadding` brings the sequence back.
"""

from __future__ import annotations

from typing import NamedTuple

import keras
from keras import ops

from bert4x.kernels import layout
from bert4x.layers._common import PACKAGE

__all__ = ["RemovePadding", "RestorePadding", "Unpadded"]


class Unpadded(NamedTuple):
    """Hidden states without padding as they flow between a model's layers: what `RemovePadding` returns.

    Args:
        tokens: `[n, dim]` hidden states of the real tokens.
        positions: `[n]` their flat positions in `batch * len`.
        slots: `[batch, len]` each position's row in `tokens` (`n` at padding).

    Example:
    >>> ids = keras.ops.convert_to_tensor([[5, 6, 0]])
    >>> x = Unpadded(*RemovePadding()(keras.ops.ones((1, 3, 2)), ids))
    >>> tuple(x.with_tokens(x.tokens * 2).restore().shape)
    (1, 3, 2)
    """

    tokens: object
    positions: object
    slots: object

    @property
    def index(self) -> tuple:
        """`(positions, slots)`: what `MultiHeadAttention(padding_index=...)` takes."""
        return self.positions, self.slots

    def with_tokens(self, tokens) -> Unpadded:
        """The same layout holding new `tokens` (the output of a position-wise layer)."""
        return Unpadded(tokens, self.positions, self.slots)

    def restore(self, name: str | None = None):
        """`[batch, len, dim]` hidden states, zeros at padding (`RestorePadding`)."""
        return RestorePadding(name=name)(self.tokens, self.positions, self.slots)


def _lists_the_real_tokens(positions, keep, slots):
    """Whether `positions` (`[capacity]`, -1 for unused slots) is `packing_positions`' list for the flat mask `keep`:
    slot i < (number of real tokens) holds the real position whose slot (`slots`, flat: `capacity` at padding) is i,
    and every later slot -1. A scalar bool, computed on the device."""
    listed = positions >= 0
    index = ops.arange(ops.shape(positions)[0], dtype="int32")
    prefix = ops.all(ops.equal(listed, index < ops.sum(ops.cast(keep, "int32"))))
    in_place = ops.all(ops.logical_or(ops.logical_not(listed), ops.take(slots, ops.maximum(positions, 0)) == index))
    return ops.logical_and(prefix, in_place)


@keras.saving.register_keras_serializable(package=PACKAGE)
class RemovePadding(keras.layers.Layer):
    """Keeps the non-padding tokens: `[batch, len, dim]` and token ids -> `(tokens, positions, slots)`.

    `tokens` is `[n, dim]`, the rows whose token id is not `pad_id`, in order; `positions` (`[n]`) their flat
    index in `batch * len`; `slots` (`[batch, len]`) each position's row in `tokens`, or `n` at padding.
    Position-wise layers (dense, LayerNorm, dropout, feed-forward) then skip padding altogether;
    `MultiHeadAttention(padding_index=(positions, slots))` attends in the padded layout and `RestorePadding` brings
    the sequence back, with zeros at padding.

    `n` depends on the data, which tensorflow and torch handle (tensorflow's XLA pads it back to its bound: the same
    results, without the saving). jax compiles with static shapes: there every position is kept, unless `packing`
    (`[batch, capacity / batch]`, from `bert4x.snippets.packing_positions`) gives the positions on the host; then
    `tokens` has `capacity` rows, the real tokens and then copies of a padding position, which nothing reads. A
    `packing` that is not this batch's list (too small a capacity, another batch's positions) makes `tokens` NaN: a
    compiled step cannot raise, and nothing is computed from a partial or wrong list.

    The outputs carry no Keras mask. Models pass the three tensors on as data (`Unpadded`), see
    `bert4x.models.BERT(remove_padding=...)`.

    Args:
        pad_id: the token id of padding.
        **kwargs: `keras.layers.Layer` arguments.

    Example:
    >>> ids = keras.ops.convert_to_tensor([[5, 6, 0], [7, 0, 0]])
    >>> tokens, positions, slots = RemovePadding()(keras.ops.ones((2, 3, 4)), ids)
    >>> tuple(slots.shape), tokens.shape[-1]
    ((2, 3), 4)
    """

    def __init__(self, pad_id: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.pad_id = pad_id

    def call(self, inputs, token_ids, packing=None):
        shape = ops.shape(token_ids)
        if keras.backend.backend() == "jax" and packing is not None:
            return self._packed(inputs, token_ids, packing)
        if keras.backend.backend() == "jax":  # static shapes: keep every position
            positions = ops.arange(shape[0] * shape[1], dtype="int32")
            return ops.reshape(inputs, (-1, ops.shape(inputs)[-1])), positions, ops.reshape(positions, shape)
        keep = ops.reshape(ops.not_equal(token_ids, self.pad_id), (-1,))
        positions = ops.cast(ops.nonzero(keep)[0], "int32")
        slots = _slots(keep, shape, padding_slot=ops.shape(positions)[0])
        return layout.tokens_from_padded(inputs, positions, slots), positions, slots

    def _packed(self, inputs, token_ids, packing):
        keep = ops.reshape(ops.not_equal(token_ids, self.pad_id), (-1,))
        given = ops.reshape(ops.cast(packing, "int32"), (-1,))
        capacity = ops.shape(given)[0]
        # Unused slots take a padding position (there is one whenever the capacity exceeds the real tokens).
        positions = ops.where(given >= 0, given, ops.cast(ops.argmin(ops.cast(keep, "int32")), "int32"))
        slots = _slots(keep, ops.shape(token_ids), padding_slot=capacity)
        tokens = layout.tokens_from_padded(inputs, positions, slots)
        wrong = ops.logical_not(_lists_the_real_tokens(given, keep, ops.reshape(slots, (-1,))))
        return ops.where(wrong, ops.cast(float("nan"), tokens.dtype), tokens), positions, ops.cast(slots, "int32")

    def compute_mask(self, inputs, mask=None):
        return None

    def compute_output_spec(self, inputs, token_ids, packing=None):
        return (keras.KerasTensor((None, inputs.shape[-1]), dtype=inputs.dtype),
                keras.KerasTensor((None,), dtype="int32"),
                keras.KerasTensor(tuple(token_ids.shape), dtype="int32"))

    def get_config(self):
        config = super().get_config()
        config.update(pad_id=self.pad_id)
        return config


def _slots(keep, shape, padding_slot):
    """Each position's row among the kept tokens (`keep`, flat, in order), `padding_slot` at padding; as `shape`."""
    return ops.reshape(ops.where(keep, ops.cumsum(ops.cast(keep, "int32")) - 1, padding_slot), shape)


@keras.saving.register_keras_serializable(package=PACKAGE)
class RestorePadding(keras.layers.Layer):
    """The inverse of `RemovePadding`: `[n, dim]` tokens, positions, slots -> `[batch, len, dim]`, zeros at padding.

    The output carries a Keras mask, True at the positions `RemovePadding` kept (`slots < n`): with token ids, the
    padding mask of the sequence (on jax without `packing` every position is kept, so it is all True).

    Args:
        **kwargs: `keras.layers.Layer` arguments.

    Example:
    >>> ids = keras.ops.convert_to_tensor([[5, 6, 0]])
    >>> tokens, positions, slots = RemovePadding()(keras.ops.ones((1, 3, 2)), ids)
    >>> RestorePadding()(tokens, positions, slots).shape
    (1, 3, 2)
    """

    def __call__(self, tokens, positions, slots, **kwargs):
        # Keras hands compute_mask the first argument only; the mask needs the slots of this same call.
        self._call_index = (positions, slots)
        try:
            return super().__call__(tokens, positions, slots, **kwargs)
        finally:
            self._call_index = None

    def call(self, tokens, positions, slots):
        return layout.padded_from_tokens(tokens, positions, slots)

    def compute_mask(self, tokens, mask=None):
        index = getattr(self, "_call_index", None)
        if index is None:
            return None
        positions, slots = index
        # The number of tokens, as an op on `positions` so that a symbolic mask stays connected to the graph.
        return ops.less(slots, ops.sum(ops.ones_like(positions, dtype="int32")))

    def compute_output_shape(self, tokens_shape, positions_shape, slots_shape):
        return tuple(slots_shape) + (tokens_shape[-1],)
