"""Moving hidden states between the padded layout `[batch, len, dim]` and the token layout `[n, dim]` (the rows of
real tokens one after another, as `bert4x.layers.RemovePadding` leaves them).

`positions` (`[n]`) are the tokens' flat indices in `batch * len`; `slots` (`[batch, len]`) each position's row in the
token layout, or `n` at padding (a zero row).
"""

from __future__ import annotations

import keras
from keras import ops

from bert4x import backend

__all__ = ["padded_from_tokens", "tokens_from_padded"]


def _gather_padded(tokens, slots):
    """`[n, ...]` rows -> `[batch, len, ...]` in the layout of `slots` (`n` = a zero row, at padding)."""
    rows = ops.concatenate([tokens, ops.zeros((1,) + tuple(tokens.shape[1:]), tokens.dtype)], axis=0)
    return ops.take(rows, slots, axis=0)


def _gather_tokens(x, positions):
    """`[batch, len, ...]` -> its rows at the flat `positions`, `[n, ...]`."""
    shape = ops.shape(x)
    return ops.take(ops.reshape(x, (-1,) + tuple(shape[2:])), positions, axis=0)


def _gather_with_inverse_gradient(x, gather, inverse):
    """`gather(x)` whose gradient is `inverse(upstream)`. Between the token and padded layouts every row lands in
    exactly one place, so the gradient is the inverse gather, not autodiff's scatter-add (which tensorflow runs as a
    slow segment sum on CPU). On jax, where RemovePadding keeps every position, plain autodiff does."""
    if keras.backend.backend() == "jax":
        return gather(x)

    @ops.custom_gradient
    def gathered(t):
        def grad(*args, upstream=None):
            return inverse(backend.upstream_gradient(args, upstream))

        return gather(t), grad

    return gathered(x)


def padded_from_tokens(tokens, positions, slots):
    """`[n, ...]` tokens -> `[batch, len, ...]`, zeros at padding.

    Args:
        tokens: `[n, ...]` rows in the token layout.
        positions: `[n]` int32 flat positions of the rows.
        slots: `[batch, len]` int32, each position's row (`n` at padding).
    """
    return _gather_with_inverse_gradient(tokens, lambda t: _gather_padded(t, slots),
                                         lambda g: _gather_tokens(g, positions))


def tokens_from_padded(x, positions, slots):
    """`[batch, len, ...]` -> `[n, ...]`, the rows at `positions`.

    Args:
        x: `[batch, len, ...]` in the padded layout.
        positions: `[n]` int32 flat positions to keep.
        slots: `[batch, len]` int32, each position's row (`n` at padding).
    """
    return _gather_with_inverse_gradient(x, lambda t: _gather_tokens(t, positions),
                                         lambda g: ops.reshape(_gather_padded(g, slots), ops.shape(x)))


def gather_tokens(x, positions, batch_and_length):
    """Per-position values (`[batch or 1, len, ...]`, e.g. rotary angles) at the flat `positions` of the token layout,
    `[n, ...]`. A plain gather: meant for values that need no gradient.

    Args:
        x: `[batch or 1, len, ...]`, broadcast to `batch_and_length` first.
        positions: `[n]` int32 flat positions.
        batch_and_length: `(batch, len)` of the padded layout.
    """
    shape = tuple(batch_and_length) + tuple(ops.shape(x)[2:])
    return _gather_tokens(ops.broadcast_to(x, shape), positions)
