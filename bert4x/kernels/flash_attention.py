"""Flash attention with dropout inside the kernel, for jax on NVIDIA GPUs (Pallas, Triton backend).

With attention dropout active, `keras.ops.dot_product_attention` cannot be used (it has no dropout), and XLA
attention writes the `[batch, heads, q_len, k_len]` probabilities and a random mask of the same size to memory,
forward and backward (benchmarks/PROFILE.md). Here the probabilities never leave the chip: each kernel walks the keys
block by block with an online softmax, and the dropout mask is recomputed wherever it is needed from a counter-based
hash of `(seed, head pair, query, key)` (`bert4x.kernels.dropout`), so forward and backward drop exactly the same
entries without storing them.

Semantics are those of `softmax(q k^T * scale + key_bias) -> dropout(rate) -> @ v`, with the row normaliser taken
before dropout (as in every BERT). Masks are key-padding masks only (`[batch, k_len]`, True = may attend); other
inputs take another entry of `bert4x.kernels`' table. `bert4x.kernels.flash_varlen` has the same kernels for rows
stored without padding; `_build_recomputed` is the same algorithm on whole arrays in XLA (any jax device).

`dropout_keep_mask` gives the exact mask the kernels use, so tests can compare against plain jnp attention.
`interpret=True` runs the same kernels through Pallas' interpreter on any device (tests on CPU).

Example (runs on CPU through the interpreter):
>>> import jax, jax.numpy as jnp
>>> q = k = v = jnp.ones((1, 16, 2, 16), jnp.float32)
>>> out = flash_attention(q, k, v, None, seed=jnp.int32(0), rate=0.0, scale=0.25, interpret=True)
>>> out.shape
(1, 16, 2, 16)
"""

from __future__ import annotations

import functools
import math

import numpy as np

from bert4x import backend
from bert4x.kernels.dropout import _half_kept, _pair_hash, _pair_stream, attention_rate, dropout_keep_mask

__all__ = ["flash_attention", "flash_self_attention", "reference_attention", "supported", "attention_rate",
           "dropout_keep_mask", "DEFAULT_BLOCKS", "IMPLEMENTATIONS"]

LOG2_E = math.log2(math.e)
# Keys hidden by the mask get this added logit (float32, in the kernels' log2 domain): finite, so a row with no visible
# key is a uniform average instead of NaN, and exp2 of it underflows to exactly 0 next to any visible key.
MASKED_LOGIT = -1e9
BLOCK_SIZES = (128, 64, 32, 16)
HEAD_SIZES = (16, 32, 64, 128)


def reference_attention(q, k, v, key_mask, seed, rate: float, scale: float):
    """Plain jnp attention with the kernels' dropout mask: what `flash_attention` computes, written the obvious way."""
    import jax
    import jax.numpy as jnp

    batch, q_len, heads, _ = q.shape
    k_len = k.shape[1]
    rate = attention_rate(rate)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if key_mask is not None:
        logits = jnp.where(key_mask[:, None, None, :], logits, MASKED_LOGIT / LOG2_E)
    probs = jax.nn.softmax(logits, axis=-1)
    if rate > 0:
        keep = dropout_keep_mask(seed, batch, heads, q_len, k_len, rate)
        probs = jnp.where(keep, probs / (1.0 - rate), 0.0)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32).astype(q.dtype)


IMPLEMENTATIONS = ("pallas", "recompute")


def supported(q_shape, k_shape, dtype, implementation: str = "pallas") -> str | None:
    """None if `implementation` takes these inputs, else the reason it does not (the caller falls back to XLA)."""
    if q_shape[1] * k_shape[1] >= 2**32:
        return "q_len * k_len does not fit the 32-bit dropout counter"
    if implementation == "recompute":
        return None
    head_size = q_shape[3]
    if head_size not in HEAD_SIZES:
        return f"head size {head_size} not in {HEAD_SIZES}"
    if q_shape[1] % 16 or k_shape[1] % 16:
        return f"lengths {q_shape[1]}/{k_shape[1]} are not multiples of 16"
    if np.dtype(dtype).name not in ("bfloat16", "float16", "float32"):
        return f"dtype {dtype}"
    return None


def _block(length: int, largest: int) -> int:
    return next(b for b in BLOCK_SIZES if b <= largest and length % b == 0)


def _scores(q, k, bias, scale: float):
    """Logits of a (query block, key block) pair in the log2 domain, float32."""
    import jax.numpy as jnp

    s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * (scale * LOG2_E)
    return s + bias[None, :]


def _program_maps(seed_ref, heads: int, per_program: int):
    """(seed, stream, halves) of this program's attention maps. The grid is (blocks, batch, head groups) and a group
    is `per_program` adjacent heads: 2 = one pair, whose two maps share every hash; 1 = one head (its half)."""
    from jax.experimental import pallas as pl

    batch_index, group = pl.program_id(1), pl.program_id(2)
    if per_program == 2:
        return seed_ref[0], batch_index * (heads // 2) + group, (0, 1)
    stream, half = _pair_stream(batch_index, group, heads)
    return seed_ref[0], stream, (half,)


def _block_keeps(seed, stream, halves, q_start, k_start, block_q: int, block_k: int, k_len: int, rate: float):
    """Keep masks of one (query block, key block) pair for each map of the program (None at rate 0)."""
    import jax.numpy as jnp
    from jax import lax

    if rate == 0:
        return (None,) * len(halves)
    rows = q_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
    cols = k_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
    bits = _pair_hash(seed, stream, rows, cols, k_len)
    return tuple(_half_kept(bits, half, rate) for half in halves)


def _blocks_to_length(length_ref, block: int):
    """Blocks of `block` positions up to the row's last visible key (`length_ref`, see `_visible_lengths`): the key
    blocks a program walks (those after it add exactly 0 to every sum: their probabilities underflow to 0), or, when
    padded queries are skipped, the query blocks that are not all padding."""
    return (length_ref[0] + block - 1) // block


def _starts_before_length(length_ref, start):
    """1 if a block starting at `start` starts before the row's last visible key, else 0. An int32 to multiply a
    loop bound by: Pallas' Triton lowering typed a select of two int literals as i1, i.e. 0 and 0."""
    import jax.numpy as jnp

    return (start < length_ref[0]).astype(jnp.int32)


def _key_blocks_walked(length_ref, block_k: int, q_start, skip_queries: bool):
    """The loop bound of a forward or dQ program: the key blocks to the row's last visible key, or none for a block
    of padded queries only when those are skipped (its outputs are zeros; see `flash_attention`)."""
    blocks = _blocks_to_length(length_ref, block_k)
    return blocks * _starts_before_length(length_ref, q_start) if skip_queries else blocks


def _online_softmax_step(s, keep, load_v, acc, row_max, row_sum):
    """One key block of the forward pass: the running (acc, max, sum) updated with logits `s` (log2 domain),
    the dropout keep mask (or None) applied after the row sum, and `load_v()`'s values accumulated."""
    import jax.numpy as jnp

    new_max = jnp.maximum(row_max, jnp.max(s, axis=1))
    correction = jnp.exp2(row_max - new_max)
    p = jnp.exp2(s - new_max[:, None])
    row_sum = row_sum * correction + jnp.sum(p, axis=1)
    if keep is not None:
        p = jnp.where(keep, p, 0.0)
    v = load_v()
    acc = acc * correction[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return acc, new_max, row_sum


def _forward_kernel(seed_ref, length_ref, q_ref, k_ref, v_ref, bias_ref, o_ref, lse_ref, *, scale, rate, block_k,
                    heads, skip_queries=False):
    import jax.numpy as jnp
    from jax import lax
    from jax.experimental import pallas as pl

    block_q, per_program, head_size = q_ref.shape
    k_len = k_ref.shape[0]
    q_start = pl.program_id(0) * block_q
    seed, stream, halves = _program_maps(seed_ref, heads, per_program)
    queries = [q_ref[:, j, :] for j in range(per_program)]

    def step(i, carry):
        keys = pl.ds(i * block_k, block_k)
        bias = bias_ref[keys]
        keeps = _block_keeps(seed, stream, halves, q_start, i * block_k, block_q, block_k, k_len, rate)
        updated = []
        for j, state in enumerate(carry):
            s = _scores(queries[j], k_ref[keys, j, :], bias, scale)
            updated.append(_online_softmax_step(s, keeps[j], lambda j=j: v_ref[keys, j, :], *state))
        return tuple(updated)

    init = tuple(
        (jnp.zeros((block_q, head_size), jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
         jnp.zeros((block_q,), jnp.float32))
        for _ in halves
    )
    key_blocks = _key_blocks_walked(length_ref, block_k, q_start, skip_queries)
    for j, (acc, row_max, row_sum) in enumerate(lax.fori_loop(0, key_blocks, step, init)):
        if skip_queries:
            computed = row_sum > 0
            row_sum, row_max = jnp.where(computed, row_sum, 1.0), jnp.where(computed, row_max, 0.0)
        o_ref[:, j, :] = (acc * (1.0 / ((1.0 - rate) * row_sum))[:, None]).astype(o_ref.dtype)
        lse_ref[j, :] = row_max + jnp.log2(row_sum)


def _probs_and_score_grads(q, k, v, do, bias, lse, delta, keep, scale, rate):
    """Recomputed probabilities p (before dropout), dropped probs p*z, and d(logits) for one block pair."""
    import jax.numpy as jnp

    p = jnp.exp2(_scores(q, k, bias, scale) - lse[:, None])
    dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
    if keep is not None:
        z = jnp.where(keep, 1.0 / (1.0 - rate), 0.0)
        pz, dp = p * z, dp * z
    else:
        pz = p
    ds = p * (dp - delta[:, None]) * scale
    return pz, ds


def _dkdv_kernel(
    seed_ref, length_ref, q_ref, k_ref, v_ref, bias_ref, do_ref, lse_ref, delta_ref, *out_refs, scale, rate,
    block_q, heads, skip_queries=False
):
    """Writes dK and dV to `out_refs` = (dk_ref, dv_ref), or, for packed q/k/v, to parts 1 and 2 of the one block
    `[block_k, 3, heads per program, head_size]` of d(qkv) (part 0, dQ, is the dQ kernel's)."""
    import jax.numpy as jnp
    from jax import lax
    from jax.experimental import pallas as pl

    block_k, per_program, head_size = k_ref.shape
    q_len, k_len = q_ref.shape[0], bias_ref.shape[0]
    k_start = pl.program_id(0) * block_k
    seed, stream, halves = _program_maps(seed_ref, heads, per_program)
    keys = [k_ref[:, j, :] for j in range(per_program)]
    values = [v_ref[:, j, :] for j in range(per_program)]
    bias = bias_ref[pl.ds(k_start, block_k)]

    def step(i, carry):
        rows = pl.ds(i * block_q, block_q)
        keeps = _block_keeps(seed, stream, halves, i * block_q, k_start, block_q, block_k, k_len, rate)
        updated = []
        for j, (dk, dv) in enumerate(carry):
            q, do = q_ref[rows, j, :], do_ref[rows, j, :]
            pz, ds = _probs_and_score_grads(
                q, keys[j], values[j], do, bias, lse_ref[j, rows], delta_ref[j, rows], keeps[j], scale, rate
            )
            dv = dv + jnp.dot(pz.astype(do.dtype).T, do, preferred_element_type=jnp.float32)
            dk = dk + jnp.dot(ds.astype(q.dtype).T, q, preferred_element_type=jnp.float32)
            updated.append((dk, dv))
        return tuple(updated)

    zeros = jnp.zeros((block_k, head_size), jnp.float32)
    # A key block past the row's last visible key has p = 0 for every query: zero gradients, no work. Skipping
    # padded queries: only the query blocks that start before that key.
    query_blocks = _starts_before_length(length_ref, k_start) * (
        _blocks_to_length(length_ref, block_q) if skip_queries else q_len // block_q)
    for j, (dk, dv) in enumerate(lax.fori_loop(0, query_blocks, step, tuple((zeros, zeros) for _ in halves))):
        if len(out_refs) == 1:
            out_refs[0][:, 1, j, :] = dk.astype(out_refs[0].dtype)
            out_refs[0][:, 2, j, :] = dv.astype(out_refs[0].dtype)
        else:
            out_refs[0][:, j, :] = dk.astype(out_refs[0].dtype)
            out_refs[1][:, j, :] = dv.astype(out_refs[1].dtype)


def _dq_kernel(
    seed_ref, length_ref, q_ref, k_ref, v_ref, bias_ref, do_ref, lse_ref, delta_ref, *refs, scale, rate, block_k,
    heads, skip_queries=False
):
    """Writes dQ to the last of `refs`. For packed q/k/v, `refs` = (d(qkv) from the dK/dV kernel, the same buffer
    aliased as the output, seen at part 0): the kernel never reads the input, it only fills in part 0."""
    import jax.numpy as jnp
    from jax import lax
    from jax.experimental import pallas as pl

    dq_ref = refs[-1]
    block_q, per_program, head_size = q_ref.shape
    k_len = k_ref.shape[0]
    q_start = pl.program_id(0) * block_q
    seed, stream, halves = _program_maps(seed_ref, heads, per_program)
    rows = [(q_ref[:, j, :], do_ref[:, j, :], lse_ref[j, :], delta_ref[j, :]) for j in range(per_program)]

    def step(i, carry):
        keys = pl.ds(i * block_k, block_k)
        bias = bias_ref[keys]
        keeps = _block_keeps(seed, stream, halves, q_start, i * block_k, block_q, block_k, k_len, rate)
        updated = []
        for j, dq in enumerate(carry):
            q, do, lse, delta = rows[j]
            k = k_ref[keys, j, :]
            _, ds = _probs_and_score_grads(q, k, v_ref[keys, j, :], do, bias, lse, delta, keeps[j], scale, rate)
            updated.append(dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32))
        return tuple(updated)

    zeros = jnp.zeros((block_q, head_size), jnp.float32)
    key_blocks = _key_blocks_walked(length_ref, block_k, q_start, skip_queries)
    for j, dq in enumerate(lax.fori_loop(0, key_blocks, step, tuple(zeros for _ in halves))):
        dq_ref[:, j, :] = dq.astype(dq_ref.dtype)


def _heads_per_program(pairing: int, heads: int, blocks_along_length: int, batch: int) -> int:
    """1 or 2 (a head pair) for a kernel whose grid is (blocks_along_length, batch, heads / heads per program)."""
    if heads % 2 or pairing == 1:
        return 1
    return 2 if pairing == 2 or blocks_along_length * batch * (heads // 2) >= PAIRED_MIN_PROGRAMS else 1


def _specs(block: int, per_program: int, head_size: int, full: bool = False, part: int | None = None):
    """BlockSpec of a `[batch, len, heads, head_size]` array seen by a (block, batch, head group) grid: `block` rows
    (or the whole length, `full`) of the group's `per_program` adjacent heads. With `part` (0, 1, 2 = q, k, v), the
    same block of that part of a packed `[batch, len, 3, heads, head_size]` array: the kernel sees the same block
    shape, read in place (no copy of q, k and v out of the projection's output)."""
    from jax.experimental import pallas as pl

    def rows(i):
        return 0 if full else i

    if part is None:
        return pl.BlockSpec((None, block, per_program, head_size), lambda i, b, g: (b, rows(i), g, 0))
    return pl.BlockSpec((None, block, None, per_program, head_size), lambda i, b, g: (b, rows(i), part, g, 0))


def _call(kernel, grid, in_specs, out_specs, out_shape, interpret: bool, name: str, num_warps: int, num_stages: int,
          aliases: dict | None = None):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=name,
        input_output_aliases=aliases or {},
    )


def _no_gradient(x):
    """The zero cotangent of a float input, or jax's float0 one of an integer input."""
    import jax
    import jax.numpy as jnp

    if jnp.issubdtype(x.dtype, jnp.integer):
        return np.zeros(x.shape, jax.dtypes.float0)
    return jnp.zeros_like(x)


def _with_vjp(forward, backward):
    """`attention(seed, *inputs, bias)` with a custom VJP from `forward(seed, *inputs, bias) -> (out, lse)` and
    `backward(seed, *inputs, bias, out, lse, do) -> gradients of inputs`, where `inputs` is (q, k, v) or (qkv,); the
    seed and the last argument (the mask bias, or the rows' lengths) get no gradient."""
    import jax

    @jax.custom_vjp
    def attention(seed, *inputs):
        return forward(seed, *inputs)[0]

    def attention_forward(seed, *inputs):
        out, lse = forward(seed, *inputs)
        return out, (seed, *inputs, out, lse)

    def attention_backward(residuals, do):
        seed, bias = residuals[0], residuals[-3]
        grads = backward(*residuals, do)
        return (np.zeros(seed.shape, jax.dtypes.float0), *grads, _no_gradient(bias))

    attention.defvjp(attention_forward, attention_backward)
    return attention


def _visible_lengths(bias):
    """Per row, 1 + the index of its last visible key (bias 0), or the whole length when no key is visible (the
    kernels then average over every key, as the unfused path does): `[batch]` int32."""
    import jax.numpy as jnp

    k_len = bias.shape[1]
    last = jnp.max(jnp.where(bias == 0, jnp.arange(1, k_len + 1, dtype=jnp.int32), 0), axis=1)
    return jnp.where(last == 0, k_len, last).astype(jnp.int32)


@functools.cache
def _build(scale: float, rate: float, interpret: bool, blocks: tuple, skip_queries: bool = False,
           packed: bool = False):
    """The custom-VJP attention function for one (scale, rate, interpret, tiles, query skipping) combination:
    `attention(seed, q, k, v, bias)`, or with `packed`, `attention(seed, qkv, bias)` for self-attention whose q, k
    and v are the parts of one `[batch, len, 3, heads, head_size]` array (read in place; the backward pass writes
    d(qkv) as one array, dK/dV first and dQ into the same buffer)."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl

    fwd_q, fwd_k, bwd_q, bwd_k, warps, stages = blocks[:6]
    pairing = blocks[6] if len(blocks) > 6 else 1
    seed_spec = pl.BlockSpec((1,), lambda i, b, g: (0,))
    length_spec = pl.BlockSpec((1,), lambda i, b, g: (b,))
    parts = (0, 1, 2) if packed else (None, None, None)

    def lse_spec(block, per_program, full=False):
        if full:
            return pl.BlockSpec((None, per_program, block), lambda i, b, g: (b, g, 0))
        return pl.BlockSpec((None, per_program, block), lambda i, b, g: (b, g, i))

    def bias_spec(length):
        return pl.BlockSpec((None, length), lambda i, b, g: (b, 0))

    def unpack(arrays):
        """(q, k, v) as the kernels' inputs (the packed array three times), and the shapes."""
        if packed:
            (qkv,) = arrays
            batch, q_len, _, heads, head_size = qkv.shape
            return (qkv,) * 3, batch, q_len, q_len, heads, head_size
        q, k, v = arrays
        batch, q_len, heads, head_size = q.shape
        return (q, k, v), batch, q_len, k.shape[1], heads, head_size

    def forward(seed, *tensors):
        *arrays, bias = tensors
        (q, k, v), batch, q_len, k_len, heads, head_size = unpack(arrays)
        block_q, block_k = _block(q_len, fwd_q), _block(k_len, fwd_k)
        per_program = _heads_per_program(pairing, heads, q_len // block_q, batch)
        return _call(
            functools.partial(_forward_kernel, scale=scale, rate=rate, block_k=block_k, heads=heads,
                              skip_queries=skip_queries),
            (q_len // block_q, batch, heads // per_program),
            [seed_spec, length_spec, _specs(block_q, per_program, head_size, part=parts[0]),
             _specs(k_len, per_program, head_size, True, parts[1]),
             _specs(k_len, per_program, head_size, True, parts[2]),
             bias_spec(k_len)],
            [_specs(block_q, per_program, head_size), lse_spec(block_q, per_program)],
            [jax.ShapeDtypeStruct((batch, q_len, heads, head_size), q.dtype),
             jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32)],
            interpret, "bert4x_flash_attention_forward", warps, stages,
        )(seed, _visible_lengths(bias), q, k, v, bias)

    def backward(seed, *rest):
        *arrays, bias, out, lse, do = rest
        (q, k, v), batch, q_len, k_len, heads, head_size = unpack(arrays)
        block_q, block_k = _block(q_len, bwd_q), _block(k_len, bwd_k)
        delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), do.astype(jnp.float32))
        common = dict(scale=scale, rate=rate, heads=heads, skip_queries=skip_queries)
        args = (seed, _visible_lengths(bias), q, k, v, bias, do, lse, delta)
        per_program = _heads_per_program(pairing, heads, k_len // block_k, batch)
        key_rows = [_specs(block_k, per_program, head_size, part=part) for part in parts[1:]]
        if packed:  # one output, d(qkv): this kernel writes its parts 1 and 2
            dkdv_out = pl.BlockSpec((None, block_k, 3, per_program, head_size), lambda i, b, g: (b, i, 0, g, 0))
            dkdv_shape = jax.ShapeDtypeStruct(q.shape, q.dtype)
        else:
            dkdv_out = key_rows
            dkdv_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
        dkdv = _call(
            functools.partial(_dkdv_kernel, block_q=block_q, **common),
            (k_len // block_k, batch, heads // per_program),
            [seed_spec, length_spec, _specs(q_len, per_program, head_size, True, parts[0]), *key_rows,
             bias_spec(k_len), _specs(q_len, per_program, head_size, True), lse_spec(q_len, per_program, True),
             lse_spec(q_len, per_program, True)],
            dkdv_out, dkdv_shape, interpret, "bert4x_flash_attention_dkdv", warps, stages,
        )(*args)
        per_program = _heads_per_program(pairing, heads, q_len // block_q, batch)
        query_rows = _specs(block_q, per_program, head_size, part=parts[0])
        in_specs = [seed_spec, length_spec, query_rows,
                    *(_specs(k_len, per_program, head_size, True, part) for part in parts[1:]), bias_spec(k_len),
                    _specs(block_q, per_program, head_size), lse_spec(block_q, per_program),
                    lse_spec(block_q, per_program)]
        # Packed: d(qkv) again, aliased as the output, of which this kernel fills in part 0.
        filled = (dkdv,) if packed else ()
        dq = _call(
            functools.partial(_dq_kernel, block_k=block_k, **common),
            (q_len // block_q, batch, heads // per_program), in_specs + [query_rows] * len(filled), query_rows,
            jax.ShapeDtypeStruct(q.shape, q.dtype), interpret, "bert4x_flash_attention_dq", warps, stages,
            aliases={len(args): 0} if packed else None,
        )(*args, *filled)
        return (dq,) if packed else (dq, *dkdv)

    return _with_vjp(forward, backward)


@functools.cache
def _build_recomputed(scale: float, rate: float):
    """The kernels' algorithm on whole arrays in XLA (any jax device): the backward pass recomputes the probabilities
    and the dropout mask from q, k, the seed and the saved log-sum-exp instead of keeping them from the forward."""
    import jax.numpy as jnp

    def probabilities(seed, q, k, bias, lse=None):
        """Probabilities p before dropout, the dropout multiplier z (keep / (1 - rate), or None at rate 0), lse."""
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * (scale * LOG2_E)
        s = s + bias[:, None, None, :]
        if lse is None:
            lse = jnp.max(s, axis=-1) + jnp.log2(jnp.sum(jnp.exp2(s - jnp.max(s, axis=-1, keepdims=True)), axis=-1))
        p = jnp.exp2(s - lse[..., None])
        if rate == 0:
            return p, None, lse
        batch, heads, q_len, k_len = p.shape
        keep = dropout_keep_mask(seed[0], batch, heads, q_len, k_len, rate)
        return p, jnp.where(keep, 1.0 / (1.0 - rate), 0.0), lse

    def forward(seed, q, k, v, bias):
        p, z, lse = probabilities(seed, q, k, bias)
        dropped = p if z is None else p * z
        out = jnp.einsum("bhqk,bkhd->bqhd", dropped.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return out.astype(q.dtype), lse

    def backward(seed, q, k, v, bias, out, lse, do):
        (seed, q, k, bias, lse), do = backend.recompute_barrier((seed, q, k, bias, lse), do)
        p, z, _ = probabilities(seed, q, k, bias, lse)
        dropped, dp = p, jnp.einsum("bqhd,bkhd->bhqk", do, v, preferred_element_type=jnp.float32)
        if z is not None:
            dropped, dp = p * z, dp * z
        dv = jnp.einsum("bhqk,bqhd->bkhd", dropped.astype(do.dtype), do, preferred_element_type=jnp.float32)
        delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), do.astype(jnp.float32))
        ds = p * (dp - delta[..., None]) * scale
        dq = jnp.einsum("bhqk,bkhd->bqhd", ds.astype(k.dtype), k, preferred_element_type=jnp.float32)
        dk = jnp.einsum("bhqk,bqhd->bkhd", ds.astype(q.dtype), q, preferred_element_type=jnp.float32)
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)

    return _with_vjp(forward, backward)


# (forward block_q, forward block_k, backward block_q, backward block_k, num_warps, num_stages[, head pairing]):
# the fastest of benchmarks/bench_flash_attention.py --sweep (benchmarks/RESULTS.md).
# Head pairing: 1 = one head per program; 2 = a head pair per program, sharing each dropout hash (even head counts);
# 0 = pairs wherever a kernel still has PAIRED_MIN_PROGRAMS programs (with fewer, pairing leaves the GPU underused).
# The mask never depends on it.
DEFAULT_BLOCKS = (64, 64, 64, 64, 4, 2, 0)
PAIRED_MIN_PROGRAMS = 1024


def flash_attention(
    q,
    k,
    v,
    key_mask,
    seed,
    rate: float,
    scale: float,
    interpret: bool = False,
    blocks: tuple = DEFAULT_BLOCKS,
    implementation: str = "pallas",
    skip_padded_queries: bool = False,
):
    """`dropout(softmax(q k^T * scale, keys hidden by key_mask)) @ v` in fused kernels.

    Args:
        q, k, v: `[batch, len, heads, head_size]` jax arrays (k and v share their length).
        key_mask: `[batch, k_len]` booleans (True = may attend), or None.
        seed: int32 scalar; a new one per training step gives new dropout masks (see `dropout_keep_mask`).
        rate: attention dropout rate in [0, 1), applied as `attention_rate(rate)` (a multiple of 2**-16).
        scale: logit scale, usually `1 / sqrt(head_size)`.
        interpret: run the kernels through Pallas' interpreter (any device; for tests).
        blocks: tile sizes, see `DEFAULT_BLOCKS`.
        implementation: "pallas" (the fused kernels, NVIDIA GPUs) or "recompute" (the same algorithm on whole arrays
            in XLA, any jax device and shape: it saves only the log-sum-exp for the backward pass, not the
            `[batch, heads, q_len, k_len]` probabilities and mask; what jax uses on CPU).
        skip_padded_queries: the Pallas kernels skip query blocks that start at or after each row's last visible
            key: their outputs are 0 and they add nothing to the gradients. Meant for self-attention over
            right-padded rows whose padded positions are never read (a model whose outputs read [CLS] only).
            Off (the default), every query gets its exact output.
    """
    bias, seed, rate = _checked_arguments("flash_attention", q.shape, k.shape, q.dtype, key_mask, seed, rate, blocks,
                                          implementation)
    if implementation == "recompute":
        return _build_recomputed(float(scale), rate)(seed, q, k, v, bias)
    return _build(float(scale), rate, bool(interpret), tuple(blocks), bool(skip_padded_queries))(seed, q, k, v, bias)


def flash_self_attention(
    qkv,
    key_mask,
    seed,
    rate: float,
    scale: float,
    interpret: bool = False,
    blocks: tuple = DEFAULT_BLOCKS,
    implementation: str = "pallas",
    skip_padded_queries: bool = False,
):
    """`flash_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], ...)` for q, k and v packed in one
    `[batch, len, 3, heads, head_size]` array, as a fused QKV projection makes them.

    The same values and gradients; the Pallas kernels read the three parts in place and the backward pass writes the
    gradient of `qkv` as one array, so no copy of q, k and v is made out of the packed array nor of their gradients
    back into it.
    Arguments as in `flash_attention`.

    Example (runs on CPU through the interpreter):
    >>> import jax.numpy as jnp
    >>> qkv = jnp.ones((1, 16, 3, 2, 16), jnp.float32)
    >>> flash_self_attention(qkv, None, seed=jnp.int32(0), rate=0.0, scale=0.25, interpret=True).shape
    (1, 16, 2, 16)
    """
    if len(qkv.shape) != 5 or qkv.shape[2] != 3:
        raise ValueError(f"flash_self_attention: qkv must be [batch, len, 3, heads, head_size], got {qkv.shape}.")
    if implementation == "recompute":
        return flash_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], key_mask, seed, rate, scale,
                               implementation=implementation)
    shape = tuple(qkv.shape[:2]) + tuple(qkv.shape[3:])
    bias, seed, rate = _checked_arguments("flash_self_attention", shape, shape, qkv.dtype, key_mask, seed, rate,
                                          blocks, implementation)
    return _build(float(scale), rate, bool(interpret), tuple(blocks), bool(skip_padded_queries), True)(seed, qkv, bias)


def _checked_arguments(caller: str, q_shape, k_shape, dtype, key_mask, seed, rate: float, blocks: tuple,
                       implementation: str):
    """The kernels' mask bias `[batch, k_len]`, seed `[1]` and rate (as applied), after checking the arguments."""
    import jax.numpy as jnp

    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{caller}: rate must be in [0, 1), got {rate}.")
    if len(blocks) not in (6, 7) or (len(blocks) == 7 and blocks[6] not in (0, 1, 2)):
        raise ValueError(f"{caller}: blocks must be 6 tile sizes and optionally a head pairing of 0 (auto), 1 "
                         f"or 2, got {blocks}.")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"{caller}: implementation must be 'pallas' or 'recompute', got {implementation!r}.")
    reason = supported(q_shape, k_shape, dtype, implementation)
    if reason is not None:
        raise ValueError(f"{caller}: unsupported input ({reason}); use the XLA attention path.")
    batch, k_len = k_shape[0], k_shape[1]
    if key_mask is None:
        bias = jnp.zeros((batch, k_len), jnp.float32)
    else:
        bias = jnp.where(jnp.broadcast_to(key_mask, (batch, k_len)), 0.0, MASKED_LOGIT).astype(jnp.float32)
    return bias, jnp.reshape(jnp.asarray(seed, jnp.int32), (1,)), attention_rate(float(rate))
