"""Host-side prompt checks for the decoding contract: `left_pad_prompts` validates a batch of prompts (ids, segment
ids, lengths against the model's positions) and left-pads it into the arrays a family's `decode_start` reads."""

from __future__ import annotations

import numpy as np


def left_pad_prompts(prompts, segment_ids, pad_to_multiple: int, max_len: int, *, pad_id: int, vocab_size: int,
                     segment_vocab_size: int, max_positions: int | None) -> dict[str, np.ndarray]:
    """Validates prompts for decoding and left-pads them: `token_ids`, `segment_ids` (int32) and `mask` (bool), each
    `[batch, length]` with `length` a multiple of `pad_to_multiple`.

    Args:
        prompts: token ids, one non-empty list per row, each id in `[0, vocab_size)`.
        segment_ids: segment ids of the same lengths in `[0, segment_vocab_size)`, or None (all 0).
        pad_to_multiple: the padded length is rounded up to a multiple of this.
        max_len: tokens to be generated; `longest prompt + max_len` must fit `max_positions`.
        pad_id: the id written at padding positions.
        vocab_size: size of the token vocabulary.
        segment_vocab_size: number of segment ids.
        max_positions: learned positions of the model, or None if unbounded.
    """
    prompts = _id_lists(prompts, "prompts")
    if not prompts:
        raise ValueError("generate: prompts is empty; pass at least one prompt.")
    for n, p in enumerate(prompts):
        if not p:
            raise ValueError(f"generate: prompts[{n}] is empty; start it with at least one token (e.g. [CLS]).")
        bad = [i for i in p if not 0 <= i < vocab_size]
        if bad:
            raise ValueError(f"generate: prompts[{n}] has token ids outside [0, {vocab_size}) (vocab_size): {bad[:5]}.")
    if segment_ids is not None:
        segment_ids = _id_lists(segment_ids, "segment_ids")
        if len(segment_ids) != len(prompts):
            raise ValueError(f"generate: {len(prompts)} prompts but {len(segment_ids)} segment_ids lists.")
        for n, (p, s) in enumerate(zip(prompts, segment_ids)):
            if len(p) != len(s):
                raise ValueError(f"generate: prompts[{n}] has {len(p)} ids but segment_ids[{n}] has {len(s)}.")
            bad = [i for i in s if not 0 <= i < segment_vocab_size]
            if bad:
                raise ValueError(f"generate: segment_ids[{n}] has ids outside [0, {segment_vocab_size}) "
                                 f"(type_vocab_size): {bad[:5]}.")
    longest = max(len(p) for p in prompts)
    if max_positions is not None and longest + max_len > max_positions:
        raise ValueError(
            f"generate: a prompt of {longest} tokens plus max_len={max_len} exceeds the model's {max_positions} "
            "learned positions (max_position_embeddings)."
        )
    length = -(-longest // pad_to_multiple) * pad_to_multiple
    token_ids = np.full((len(prompts), length), pad_id, dtype=np.int32)
    segments = np.zeros((len(prompts), length), dtype=np.int32)
    mask = np.zeros((len(prompts), length), dtype=bool)
    for n, p in enumerate(prompts):
        token_ids[n, length - len(p):] = p
        mask[n, length - len(p):] = True
        if segment_ids is not None:
            segments[n, length - len(p):] = segment_ids[n]
    return {"token_ids": token_ids, "segment_ids": segments, "mask": mask}


def _id_lists(rows, name: str) -> list[list[int]]:
    """`rows` as lists of Python ints; TypeError naming `name` for anything that is not a sequence of integers."""
    if isinstance(rows, (str, bytes)) or not hasattr(rows, "__len__"):
        raise TypeError(f"generate: {name} must be a list of lists of token ids, got {type(rows).__name__}.")
    out = []
    for n, row in enumerate(rows):
        if isinstance(row, (str, bytes)) or not hasattr(row, "__iter__"):
            raise TypeError(f"generate: {name}[{n}] must be a list of integer ids, got {type(row).__name__}.")
        ids = []
        for i in row:
            if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
                raise TypeError(f"generate: {name}[{n}] holds {i!r} ({type(i).__name__}); ids must be integers.")
            ids.append(int(i))
        out.append(ids)
    return out
