"""Counter-based dropout masks for jax: a keyed hash of (seed, position) instead of jax's threefry bits.

jax draws dropout bits with threefry, 20 rounds of 32-bit arithmetic per pair of words. One MurmurHash3 finaliser
round of the Weyl-scrambled position, keyed by a per-call seed, gives the same keep rate and a fresh mask at every
call, and XLA computes it inside the fusion that applies it. The same seed always gives the same mask, so a backward
pass (or a fused kernel) recomputes it instead of storing it. `bert4x.layers.Dropout` uses `hashed_dropout` on jax;
the attention kernels (`bert4x.kernels.flash_attention`) draw their masks with `dropout_keep_mask`'s hash.

Example:
>>> import jax.numpy as jnp
>>> y = hashed_dropout(jnp.ones((4, 8)), seed=3, rate=0.5)
>>> sorted(set(y.ravel().tolist())) in ([0.0, 2.0], [2.0])
True
"""

from __future__ import annotations

import functools
import math

import numpy as np

__all__ = ["hashed_dropout", "hashed_keep_mask", "dropout_keep_mask", "attention_rate"]

_KEEP_BITS = 24  # hidden-state dropout compares the top 24 bits of the hash: the rate is honoured to 6e-8
_ATTENTION_KEEP_BITS = 16  # attention dropout: 16 bits per entry, two heads per hash (see `_pair_stream`)


def _mix32(h):
    """MurmurHash3's 32-bit finaliser: a bijection on uint32 with full avalanche."""
    import jax.numpy as jnp
    from jax import lax

    h = h ^ lax.shift_right_logical(h, jnp.uint32(16))
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ lax.shift_right_logical(h, jnp.uint32(13))
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ lax.shift_right_logical(h, jnp.uint32(16))


def _threshold(rate: float, bits: int) -> int:
    """Keep an entry where its `bits`-bit hash value is at least this."""
    return int(round(rate * (1 << bits)))


def attention_rate(rate: float) -> float:
    """The attention dropout rate the kernels apply for `rate`: the nearest multiple of 2**-16 (their keep test reads
    16 bits of a hash), within 7.7e-6 of `rate`. Kept probabilities are scaled by 1 / (1 - that rate), so the
    expectation is exact."""
    return _threshold(rate, _ATTENTION_KEEP_BITS) / (1 << _ATTENTION_KEEP_BITS)


def _pair_stream(batch_index, head, heads: int):
    """(stream, half) of one attention map. Heads 2j and 2j+1 share the hash of stream `batch * heads/2 + j`: the
    first keeps where the hash's top 16 bits pass, the second where its low 16 bits pass, so one hash serves two
    entries (half the kernels' integer work). With an odd head count each head has its own stream (top bits)."""
    if heads % 2:
        return batch_index * heads + head, 0
    return batch_index * (heads // 2) + head // 2, head % 2


def _pair_hash(seed, stream, rows, cols, k_len: int):
    import jax.numpy as jnp

    counter = rows.astype(jnp.uint32) * jnp.uint32(k_len) + cols.astype(jnp.uint32)
    return _keyed_hash(counter, _stream_key(seed, stream))


def _half_kept(bits, half, rate: float):
    """Keep decisions from the top (`half` 0) or low (1) 16 bits of a pair hash; `half` may be traced."""
    import jax.numpy as jnp
    from jax import lax

    top = lax.shift_right_logical(bits, jnp.uint32(32 - _ATTENTION_KEEP_BITS))
    low = bits & jnp.uint32((1 << _ATTENTION_KEEP_BITS) - 1)
    chosen = (top if half == 0 else low) if isinstance(half, int) else jnp.where(half == 0, top, low)
    return chosen.astype(jnp.int32) >= _threshold(rate, _ATTENTION_KEEP_BITS)


def _stream_key(seed, stream):
    """Seed and stream mixed into one key (scalar work, once per kernel block), so that each hash costs one
    finaliser round of its counter under that key."""
    import jax.numpy as jnp

    call_key = _mix32(jnp.asarray(seed).astype(jnp.uint32) ^ jnp.uint32(0x9E3779B9))
    return _mix32(jnp.asarray(stream).astype(jnp.uint32) + call_key)


def _keyed_hash(counter, key):
    """One finaliser round of the Weyl-scrambled counter under `key`. Without the multiply, one round leaves keep
    decisions of counters 4096 or 12288 apart correlated (z = 28 over 4M entries); with it, correlations at 1,000
    strides and rates 0.1/0.5 are those of independent bits (mean z^2 = 0.99, as for two full rounds)."""
    import jax.numpy as jnp

    return _mix32((counter * jnp.uint32(0x9E3779B9)) ^ key)


def _kept(bits, rate: float):
    import jax.numpy as jnp
    from jax import lax

    top = lax.shift_right_logical(bits, jnp.uint32(32 - _KEEP_BITS)).astype(jnp.int32)
    return top >= _threshold(rate, _KEEP_BITS)


def hashed_keep_mask(seed, shape: tuple, rate: float):
    """The keep mask of plain (hidden-state) dropout with the same hash: entry i is kept unless the hash of
    (seed, i) falls below `rate`. Cheaper than jax's threefry bits (one finaliser round per entry), and the same
    seed always gives the same mask. `shape` must have fewer than 2**32 entries."""
    import jax.numpy as jnp

    size = math.prod(shape)
    if size >= 2**32:
        raise ValueError(f"hashed_keep_mask: shape {shape} has {size} entries; the counter is 32-bit")
    counter = jnp.arange(size, dtype=jnp.uint32).reshape(shape)
    return _kept(_keyed_hash(counter, _stream_key(seed, 0)), rate)


def hashed_dropout(x, seed, rate: float):
    """`where(hashed_keep_mask(seed), x / (1 - rate), 0)`, the hidden-state dropout of `bert4x.layers.Dropout` on jax.

    Its gradient (the same mask applied to the incoming gradient) is returned through `lax.optimization_barrier`:
    otherwise XLA:GPU fuses the mask into each consumer of that gradient, the weight- and input-gradient matmuls of the
    layer before, which it then runs as Triton GEMMs recomputing the hash instead of cuBLAS on a plain operand
    (see benchmarks/RESULTS.md).

    Args:
        x: the input.
        seed: int32 scalar; a new one per call gives a new mask.
        rate: the fraction of entries dropped, in [0, 1).
    """
    import jax.numpy as jnp

    return _build_hashed_dropout(float(rate))(x, jnp.asarray(seed, jnp.int32))


@functools.cache
def _build_hashed_dropout(rate: float):
    import jax
    import jax.numpy as jnp

    def apply(x, seed):
        keep = hashed_keep_mask(seed, tuple(x.shape), rate)
        return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))

    @jax.custom_vjp
    def dropout(x, seed):
        return apply(x, seed)

    def forward(x, seed):
        return apply(x, seed), seed

    def backward(seed, g):
        return jax.lax.optimization_barrier(apply(g, seed)), np.zeros(seed.shape, jax.dtypes.float0)

    dropout.defvjp(forward, backward)
    return dropout


def dropout_keep_mask(seed, batch: int, heads: int, q_len: int, k_len: int, rate: float):
    """The `[batch, heads, q_len, k_len]` boolean keep mask that the kernels apply for this seed (for tests)."""
    import jax.numpy as jnp

    batch_index = jnp.arange(batch, dtype=jnp.int32).reshape(batch, 1, 1, 1)
    head = jnp.arange(heads, dtype=jnp.int32).reshape(1, heads, 1, 1)
    stream, half = _pair_stream(batch_index, head, heads)
    rows = jnp.arange(q_len, dtype=jnp.int32).reshape(1, 1, q_len, 1)
    cols = jnp.arange(k_len, dtype=jnp.int32).reshape(1, 1, 1, k_len)
    bits = _pair_hash(jnp.asarray(seed, jnp.int32), stream, rows, cols, k_len)
    return _half_kept(bits, half, attention_rate(rate))
