"""The flash attention kernels of `bert4x.kernels.flash_attention` for rows stored without padding (jax Pallas).

`flash_varlen_self_attention` takes q, k and v of rows of different lengths laid one after another, as
`bert4x.layers.RemovePadding` leaves the hidden states, so that the dense layers, LayerNorms and dropouts around
attention run on real tokens only and attention needs no gather into the padded layout and back.
"""

from __future__ import annotations

import functools

from bert4x.kernels.flash_attention import (
    DEFAULT_BLOCKS,
    MASKED_LOGIT,
    _block,
    _block_keeps,
    _blocks_to_length,
    _call,
    _checked_arguments,
    _heads_per_program,
    _online_softmax_step,
    _probs_and_score_grads,
    _program_maps,
    _scores,
    _with_vjp,
)

__all__ = ["flash_varlen_self_attention"]


# ------------------------------------------------------------------ token layout (rows of varying length)
# q, k and v are the parts of one `[tokens, 3, heads, head_size]` array holding the rows' real tokens one row after
# another (row b at `starts[b]`, `lengths[b]` tokens), then a tail of unused slots up to the array's capacity. The
# grid is the padded layout's (blocks of the longest possible row, batch, head groups), and each program loads its
# blocks at the row's offset with masked loads and stores, so the dropout hash sees the same (row, query, key)
# counters and every entry is that of `flash_self_attention` on the padded rows. Programs of an extra batch index
# write zeros to the tail: its outputs and gradients, which nothing else writes, are then 0, not whatever the
# buffer held.

def _token_rows(first, block: int, start, length):
    """(rows of `block` tokens from row position `first` at the row's offset `start`, their validity mask)."""
    import jax.numpy as jnp
    from jax import lax
    from jax.experimental import pallas as pl

    valid = first + lax.broadcasted_iota(jnp.int32, (block,), 0) < length
    return pl.ds(start + first, block), valid


def _row_view(ref, rows, valid, index: tuple):
    """(`ref.at[rows, *index, :]`, `valid` broadcast to it as the mask of a masked load or store)."""
    import jax.numpy as jnp

    view = ref.at[(rows, *(jnp.int32(i) if isinstance(i, int) else i for i in index), slice(None))]
    return view, jnp.broadcast_to(valid[:, None], view.shape)


def _load_rows(ref, rows, valid, *index):
    """`ref[rows, *index, :]` where `valid`, else 0 (masked: no read past the row, nor past the array)."""
    from jax.experimental.pallas import triton as pltriton

    view, mask = _row_view(ref, rows, valid, index)
    return pltriton.load(view, mask=mask, other=0)


def _load_deltas(ref, rows, valid, head):
    """`ref[head, rows]` of the `[heads, tokens]` row sums of o * dO where `valid`, else 0."""
    from jax.experimental.pallas import triton as pltriton

    return pltriton.load(ref.at[head, rows], mask=valid, other=0)


def _store_rows(ref, rows, valid, value, *index):
    """`ref[rows, *index, :] = value` where `valid` (masked: no write past the row, nor past the array)."""
    from jax.experimental.pallas import triton as pltriton

    view, mask = _row_view(ref, rows, valid, index)
    pltriton.store(view, value.astype(ref.dtype), mask=mask)


def _zero_tail(ref, start, block: int, parts: tuple, program_heads: list):
    """The tail program's work: zeros at slots `start` .. end of `ref` (the extra batch index's `start` is the
    total of the row lengths), in this program's head group, chunk by chunk along grid axis 0."""
    import jax.numpy as jnp
    from jax import lax
    from jax.experimental import pallas as pl

    is_tail = (pl.program_id(1) == pl.num_programs(1) - 1).astype(jnp.int32)
    chunks = (ref.shape[0] - start + block - 1) // block * is_tail
    stride, first = pl.num_programs(0), pl.program_id(0)

    def zero(n, carry):
        rows, valid = _token_rows((first + n * stride) * block, block, start, ref.shape[0] - start)
        for head in program_heads:
            for part in parts:
                _store_rows(ref, rows, valid, jnp.zeros((block, ref.shape[-1]), jnp.float32), *part, head)
        return carry

    lax.fori_loop(0, (chunks - first + stride - 1) // stride, zero, 0)


def _varlen_program(seed_ref, start_ref, length_ref, lse_ref, heads: int):
    """A token-layout program's row (first slot, length), its dropout maps (see `_program_maps`) and its heads."""
    from jax.experimental import pallas as pl

    per_program = lse_ref.shape[0]
    program_heads = [pl.program_id(2) * per_program + j for j in range(per_program)]
    return start_ref[0], length_ref[0], _program_maps(seed_ref, heads, per_program), program_heads


def _varlen_forward_kernel(seed_ref, start_ref, length_ref, qkv_ref, o_ref, lse_ref, *, scale, rate, block_q,
                           block_k, heads, max_len):
    import jax.numpy as jnp
    from jax import lax
    from jax.experimental import pallas as pl

    start, length, (seed, stream, halves), program_heads = _varlen_program(seed_ref, start_ref, length_ref, lse_ref,
                                                                            heads)
    q_start = pl.program_id(0) * block_q
    rows, row_valid = _token_rows(q_start, block_q, start, length)
    queries = [_load_rows(qkv_ref, rows, row_valid, 0, head) for head in program_heads]

    def step(i, carry):
        keys, key_valid = _token_rows(i * block_k, block_k, start, length)
        bias = jnp.where(key_valid, 0.0, MASKED_LOGIT)
        keeps = _block_keeps(seed, stream, halves, q_start, i * block_k, block_q, block_k, max_len, rate)
        updated = []
        for j, state in enumerate(carry):
            head = program_heads[j]
            s = _scores(queries[j], _load_rows(qkv_ref, keys, key_valid, 1, head), bias, scale)
            updated.append(_online_softmax_step(s, keeps[j], lambda h=head: _load_rows(qkv_ref, keys, key_valid, 2, h),
                                                *state))
        return tuple(updated)

    head_size = qkv_ref.shape[-1]
    init = tuple(
        (jnp.zeros((block_q, head_size), jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
         jnp.zeros((block_q,), jnp.float32))
        for _ in halves
    )
    key_blocks = _blocks_to_length(length_ref, block_k) * (q_start < length).astype(jnp.int32)
    for j, (acc, row_max, row_sum) in enumerate(lax.fori_loop(0, key_blocks, step, init)):
        computed = row_sum > 0  # blocks past the row: no keys walked, a finite log-sum-exp of 0
        row_sum, row_max = jnp.where(computed, row_sum, 1.0), jnp.where(computed, row_max, 0.0)
        _store_rows(o_ref, rows, row_valid, acc * (1.0 / ((1.0 - rate) * row_sum))[:, None], program_heads[j])
        lse_ref[j, :] = row_max + jnp.log2(row_sum)
    _zero_tail(o_ref, start, block_q, ((),), program_heads)


def _varlen_dkdv_kernel(seed_ref, start_ref, length_ref, qkv_ref, do_ref, lse_ref, delta_ref, dqkv_ref, *, scale,
                        rate, block_q, block_k, heads, max_len):
    """dK and dV of a key block into parts 1 and 2 of d(qkv); the tail program zeroes all three parts there."""
    import jax.numpy as jnp
    from jax import lax
    from jax.experimental import pallas as pl

    start, length, (seed, stream, halves), program_heads = _varlen_program(seed_ref, start_ref, length_ref, lse_ref,
                                                                            heads)
    k_start = pl.program_id(0) * block_k
    keys, key_valid = _token_rows(k_start, block_k, start, length)
    bias = jnp.where(key_valid, 0.0, MASKED_LOGIT)
    kv = [(_load_rows(qkv_ref, keys, key_valid, 1, head), _load_rows(qkv_ref, keys, key_valid, 2, head))
          for head in program_heads]

    def step(i, carry):
        rows, row_valid = _token_rows(i * block_q, block_q, start, length)
        keeps = _block_keeps(seed, stream, halves, i * block_q, k_start, block_q, block_k, max_len, rate)
        updated = []
        for j, (dk, dv) in enumerate(carry):
            head = program_heads[j]
            q, do = _load_rows(qkv_ref, rows, row_valid, 0, head), _load_rows(do_ref, rows, row_valid, head)
            delta = _load_deltas(delta_ref, rows, row_valid, head)
            pz, ds = _probs_and_score_grads(q, kv[j][0], kv[j][1], do, bias, lse_ref[j, pl.ds(i * block_q, block_q)],
                                            delta, keeps[j], scale, rate)
            dv = dv + jnp.dot(pz.astype(do.dtype).T, do, preferred_element_type=jnp.float32)
            dk = dk + jnp.dot(ds.astype(q.dtype).T, q, preferred_element_type=jnp.float32)
            updated.append((dk, dv))
        return tuple(updated)

    zeros = jnp.zeros((block_k, qkv_ref.shape[-1]), jnp.float32)
    query_blocks = _blocks_to_length(length_ref, block_q) * (k_start < length).astype(jnp.int32)
    for j, (dk, dv) in enumerate(lax.fori_loop(0, query_blocks, step, tuple((zeros, zeros) for _ in halves))):
        _store_rows(dqkv_ref, keys, key_valid, dk, 1, program_heads[j])
        _store_rows(dqkv_ref, keys, key_valid, dv, 2, program_heads[j])
    _zero_tail(dqkv_ref, start, block_k, ((0,), (1,), (2,)), program_heads)


def _varlen_dq_kernel(seed_ref, start_ref, length_ref, qkv_ref, do_ref, lse_ref, delta_ref, _, dqkv_ref, *, scale,
                      rate, block_q, block_k, heads, max_len):
    """dQ of a query block into part 0 of d(qkv) (the dK/dV kernel's output, aliased: never read here)."""
    import jax.numpy as jnp
    from jax import lax
    from jax.experimental import pallas as pl

    start, length, (seed, stream, halves), program_heads = _varlen_program(seed_ref, start_ref, length_ref, lse_ref,
                                                                            heads)
    q_start = pl.program_id(0) * block_q
    rows, row_valid = _token_rows(q_start, block_q, start, length)
    inputs = [(_load_rows(qkv_ref, rows, row_valid, 0, head), _load_rows(do_ref, rows, row_valid, head),
               lse_ref[j, :], _load_deltas(delta_ref, rows, row_valid, head))
              for j, head in enumerate(program_heads)]

    def step(i, carry):
        keys, key_valid = _token_rows(i * block_k, block_k, start, length)
        bias = jnp.where(key_valid, 0.0, MASKED_LOGIT)
        keeps = _block_keeps(seed, stream, halves, q_start, i * block_k, block_q, block_k, max_len, rate)
        updated = []
        for j, dq in enumerate(carry):
            q, do, lse, delta = inputs[j]
            k = _load_rows(qkv_ref, keys, key_valid, 1, program_heads[j])
            v = _load_rows(qkv_ref, keys, key_valid, 2, program_heads[j])
            _, ds = _probs_and_score_grads(q, k, v, do, bias, lse, delta, keeps[j], scale, rate)
            updated.append(dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32))
        return tuple(updated)

    zeros = jnp.zeros((block_q, qkv_ref.shape[-1]), jnp.float32)
    key_blocks = _blocks_to_length(length_ref, block_k) * (q_start < length).astype(jnp.int32)
    for j, dq in enumerate(lax.fori_loop(0, key_blocks, step, tuple(zeros for _ in halves))):
        _store_rows(dqkv_ref, rows, row_valid, dq, 0, program_heads[j])


@functools.cache
def _build_varlen(scale: float, rate: float, interpret: bool, blocks: tuple, max_len: int):
    """`attention(seed, qkv, lengths)` with a custom VJP for q, k and v in the token layout (see `_token_rows`):
    `qkv` `[tokens, 3, heads, head_size]`, `lengths` `[batch]` int32, rows of at most `max_len` tokens."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl

    fwd_q, fwd_k, bwd_q, bwd_k, warps, stages = blocks[:6]
    pairing = blocks[6] if len(blocks) > 6 else 1
    seed_spec = pl.BlockSpec((1,), lambda i, b, g: (0,))
    row_spec = pl.BlockSpec((1,), lambda i, b, g: (b,))

    def whole(shape):
        return pl.BlockSpec(tuple(shape), lambda i, b, g: (0,) * len(shape))

    def lse_spec(block, per_program, full=False):
        return pl.BlockSpec((None, per_program, block), lambda i, b, g: (b, g, 0 if full else i))

    def offsets(lengths):
        """Per row and for the tail (one more entry): the first slot and the length (the tail's is 0: its
        programs only write zeros)."""
        ends = jnp.cumsum(lengths)
        starts = jnp.concatenate([ends - lengths, ends[-1:]]).astype(jnp.int32)
        return starts, jnp.concatenate([lengths, jnp.zeros((1,), jnp.int32)])

    def forward(seed, qkv, lengths):
        tokens, _, heads, head_size = qkv.shape
        batch = lengths.shape[0]
        block_q, block_k = _block(max_len, fwd_q), _block(max_len, fwd_k)
        per_program = _heads_per_program(pairing, heads, max_len // block_q, batch)
        kernel = functools.partial(_varlen_forward_kernel, scale=scale, rate=rate, block_q=block_q, block_k=block_k,
                                   heads=heads, max_len=max_len)
        return _call(
            kernel, (max_len // block_q, batch + 1, heads // per_program),
            [seed_spec, row_spec, row_spec, whole(qkv.shape)],
            [whole((tokens, heads, head_size)), lse_spec(block_q, per_program)],
            [jax.ShapeDtypeStruct((tokens, heads, head_size), qkv.dtype),
             jax.ShapeDtypeStruct((batch + 1, heads, max_len), jnp.float32)],
            interpret, "bert4x_varlen_attention_forward", warps, stages,
        )(seed, *offsets(lengths), qkv)

    def backward(seed, qkv, lengths, out, lse, do):
        tokens, _, heads, head_size = qkv.shape
        batch = lengths.shape[0]
        block_q, block_k = _block(max_len, bwd_q), _block(max_len, bwd_k)
        delta = jnp.einsum("thd,thd->ht", out.astype(jnp.float32), do.astype(jnp.float32))
        common = dict(scale=scale, rate=rate, block_q=block_q, block_k=block_k, heads=heads, max_len=max_len)
        args = (seed, *offsets(lengths), qkv, do, lse, delta)
        per_program = _heads_per_program(pairing, heads, max_len // block_k, batch)
        in_specs = [seed_spec, row_spec, row_spec, whole(qkv.shape), whole(do.shape)]
        dqkv_shape = jax.ShapeDtypeStruct(qkv.shape, qkv.dtype)
        dkdv = _call(
            functools.partial(_varlen_dkdv_kernel, **common), (max_len // block_k, batch + 1, heads // per_program),
            in_specs + [lse_spec(max_len, per_program, True), whole(delta.shape)], whole(qkv.shape), dqkv_shape,
            interpret, "bert4x_varlen_attention_dkdv", warps, stages,
        )(*args)
        per_program = _heads_per_program(pairing, heads, max_len // block_q, batch)
        dqkv = _call(
            functools.partial(_varlen_dq_kernel, **common), (max_len // block_q, batch, heads // per_program),
            in_specs + [lse_spec(block_q, per_program), whole(delta.shape), whole(qkv.shape)], whole(qkv.shape),
            dqkv_shape, interpret, "bert4x_varlen_attention_dq", warps, stages, aliases={len(args): 0},
        )(*args, dkdv)
        return (dqkv,)

    return _with_vjp(forward, backward)


def flash_varlen_self_attention(
    qkv,
    lengths,
    seed,
    rate: float,
    scale: float,
    max_len: int,
    interpret: bool = False,
    blocks: tuple = DEFAULT_BLOCKS,
):
    """Self-attention of rows of different lengths stored without padding, one row after another.

    Args:
        qkv: `[tokens, 3, heads, head_size]`: row b's q, k and v at slots `sum(lengths[:b])` to
            `sum(lengths[:b + 1])`, then unused slots up to `tokens` (a capacity chosen on the host, see
            `bert4x.snippets.packing_positions`), whose outputs and gradients are 0.
        lengths: `[batch]` int32, each at most `max_len`, summing to at most `tokens`.
        max_len: the rows' padded length (a multiple of 16): dropout draws the mask that `flash_self_attention`
            draws for the same rows right-padded to it, so both give the same values at every real token.
        seed, rate, scale, interpret, blocks: as in `flash_attention`.

    Returns `[tokens, heads, head_size]`. The kernels read each row's blocks at its offset (masked loads), so the
    model's dense layers, LayerNorms and dropouts run on real tokens only and attention needs no gather into the
    padded layout and back.

    Example (runs on CPU through the interpreter):
    >>> import jax.numpy as jnp
    >>> qkv = jnp.ones((48, 3, 2, 16), jnp.float32)  # rows of 20 and 16 tokens, 12 unused slots
    >>> lengths = jnp.array([20, 16], jnp.int32)
    >>> flash_varlen_self_attention(qkv, lengths, 0, 0.0, 0.25, max_len=32, interpret=True).shape
    (48, 2, 16)
    """
    import jax.numpy as jnp

    if len(qkv.shape) != 4 or qkv.shape[1] != 3:
        raise ValueError(f"flash_varlen_self_attention: qkv must be [tokens, 3, heads, head_size], got {qkv.shape}.")
    if len(lengths.shape) != 1 or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"flash_varlen_self_attention: lengths must be a [batch] integer array, got "
                         f"{lengths.dtype}{tuple(lengths.shape)}.")
    shape = (1, int(max_len)) + tuple(qkv.shape[2:])
    _, seed, rate = _checked_arguments("flash_varlen_self_attention", shape, shape, qkv.dtype, None, seed, rate,
                                       blocks, "pallas")
    attention = _build_varlen(float(scale), rate, bool(interpret), tuple(blocks), int(max_len))
    return attention(seed, qkv, lengths.astype(jnp.int32))
