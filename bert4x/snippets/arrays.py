"""Array helpers with bert4keras's semantics: `to_array` and `orthogonally_resize`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["to_array", "orthogonally_resize"]


def to_array(*args: Any) -> np.ndarray | list[np.ndarray]:
    """`np.array` of each argument: one array for one argument, a list of arrays for several.

    Example:
    >>> token_ids, segment_ids = to_array([[1, 2]], [[0, 0]])
    >>> token_ids.shape
    (1, 2)
    """
    arrays = [np.array(a) for a in args]
    return arrays[0] if len(arrays) == 1 else arrays


def orthogonally_resize(a: np.ndarray, new_shape: Sequence[int], window: int = 2) -> np.ndarray:
    """Resizes a weight array to `new_shape`, e.g. to start a wider model from a narrower one's weights.

    Each axis that grows from n to m is cut into blocks of `window` entries, each block is repeated
    `ceil(m / n)` times in place, and the result is cut to m; an axis that shrinks is cut. The result is rescaled
    to the Frobenius norm of `a`.

    Args:
        a: the array.
        new_shape: the shape wanted (same rank).
        window: the block size of repetition; a growing axis must be a multiple of it.

    Example:
    >>> a = np.array([1.0, 2.0, 3.0, 4.0])
    >>> b = orthogonally_resize(a, (6,))
    >>> (b / b[0]).round(6).tolist(), bool(np.isclose(np.linalg.norm(b), np.linalg.norm(a)))
    ([1.0, 2.0, 1.0, 2.0, 3.0, 4.0], True)
    """
    a = np.asarray(a)
    if len(new_shape) != a.ndim:
        raise ValueError(f"orthogonally_resize: new_shape {tuple(new_shape)} has rank {len(new_shape)}, "
                         f"a has rank {a.ndim}.")
    norm = np.linalg.norm(a)
    for axis, (old, new) in enumerate(zip(a.shape, new_shape)):
        if new > old:
            if old % window:
                raise ValueError(f"orthogonally_resize: axis {axis} of size {old} grows, so it must be a multiple "
                                 f"of window={window}.")
            repeats = -(-new // old)
            blocks = a.reshape(a.shape[:axis] + (old // window, window) + a.shape[axis + 1:])
            a = np.repeat(blocks, repeats, axis=axis).reshape(a.shape[:axis] + (old * repeats,) + a.shape[axis + 1:])
    a = a[tuple(slice(0, n) for n in new_shape)]
    return a / np.linalg.norm(a) * norm
