"""The attention variants of the seed articles as `keras.ops` functions on `[batch, length, heads, head_size]` tensors.

- `linear_attention`: `out_i = sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j)` with `phi(x) = elu(x) + 1`,
  computed as `phi(Q) (phi(K)^T V)` in O(n) (running sums when `causal=True`).
- `performer_attention`: FAVOR+ positive random features `phi(x) = exp(W x - |x|^2 / 2) / sqrt(m)` on q and k scaled
  by `d^(-1/4)`, with orthogonal Gaussian rows in W (`orthogonal_gaussian_projection`). An unbiased estimate of
  softmax attention whose error shrinks as the number of features m grows.
- `keynorm_attention`: softmax attention on `scale * q . k / |k|` (keys L2-normalised, queries left alone).
- `normalized_scores_attention`: the score normalisations of gated attention units (bert4keras's
  `attention_normalize`), with `l_i` the number of keys query i sees: 'softmax_plus' is
  `softmax_j(s_ij * log(max(l_i, min_length)) / log(512))` (the length-scaled softmax of
  https://kexue.fm/archives/8823) and 'squared_relu' is `relu(s_ij)^2 / l_i` (Hua et al. 2022). Values may be
  wider than queries and keys.

`MultiHeadAttention(attention_type=...)` runs these through `bert4x.kernels.attention` (linear and Performer
attention are entries of its table; KeyNorm transforms q and k and then takes the softmax entries). They are also
usable on their own, from here or from `bert4x.layers.attention_variants`.

Masks are booleans broadcastable to `[batch, heads, q_len, k_len]` (True = may attend), as in `MultiHeadAttention`.
A key-only mask (`q_len` axis of size 1, i.e. padding) keeps the linear O(n) form. Any other mask (causal, UniLM)
is honoured exactly by the explicit O(n^2) form; use `causal=True` for the O(n) running-sum causal form.
"""

from __future__ import annotations

import math

import numpy as np
from keras import ops

__all__ = [
    "elu_feature_map",
    "performer_feature_map",
    "kernel_attention",
    "linear_attention",
    "performer_attention",
    "keynorm_attention",
    "orthogonal_gaussian_projection",
    "default_performer_features",
    "NORMALIZED_VARIANTS",
    "normalized_scores_attention",
]

# Score normalisations other than softmax: `normalized_scores_attention` computes them.
NORMALIZED_VARIANTS = ("softmax_plus", "squared_relu")

_EPS = 1e-6


def elu_feature_map(x):
    """`elu(x) + 1`: the positive feature map of linear attention."""
    return ops.elu(x) + 1.0


def _key_mask(mask):
    """`[batch, 1|heads, 1, k]` bool mask -> `[batch, k, 1|heads, 1]` float, to zero padded keys' features."""
    key_mask = ops.transpose(ops.cast(mask[:, :, 0, :], "float32"), (0, 2, 1))
    return ops.expand_dims(key_mask, -1)


def _is_key_only(mask) -> bool:
    return mask is not None and len(mask.shape) == 4 and mask.shape[2] == 1


def kernel_attention(phi_q, phi_k, v, mask=None, causal: bool = False):
    """Attention with a positive kernel: `out_i = sum_j (phi_q_i . phi_k_j) v_j / sum_j (phi_q_i . phi_k_j)`.

    `phi_q`, `phi_k`: `[batch, len, heads, features]` (non-negative); `v`: `[batch, k_len, heads, head_size]`.
    Computed in float32 and returned in `v`'s dtype.

    Example:
    >>> x = keras.ops.ones((1, 3, 2, 4))
    >>> kernel_attention(x, x, x).shape
    (1, 3, 2, 4)
    """
    dtype = v.dtype
    phi_q, phi_k, v = (ops.cast(t, "float32") for t in (phi_q, phi_k, v))
    if mask is not None and not _is_key_only(mask) and not causal:
        # A general mask (causal, UniLM, ...): the explicit quadratic form is the only exact one.
        weights = ops.einsum("bqhf,bkhf->bhqk", phi_q, phi_k) * ops.cast(mask, "float32")
        numerator = ops.einsum("bhqk,bkhd->bqhd", weights, v)
        denominator = ops.transpose(ops.sum(weights, axis=-1), (0, 2, 1))
        return ops.cast(numerator / (ops.expand_dims(denominator, -1) + _EPS), dtype)
    if mask is not None:
        if not _is_key_only(mask):
            raise ValueError(
                "kernel_attention(causal=True) takes only a key (padding) mask of shape [batch, 1|heads, 1, k_len]; "
                f"got a mask of shape {tuple(mask.shape)}."
            )
        phi_k = phi_k * _key_mask(mask)
    if causal:
        # Running sums over positions: O(n) in length, O(features * head_size) state per position.
        kv = ops.cumsum(ops.einsum("bkhf,bkhd->bkhfd", phi_k, v), axis=1)
        numerator = ops.einsum("bqhf,bqhfd->bqhd", phi_q, kv)
        denominator = ops.einsum("bqhf,bqhf->bqh", phi_q, ops.cumsum(phi_k, axis=1))
    else:
        kv = ops.einsum("bkhf,bkhd->bhfd", phi_k, v)
        numerator = ops.einsum("bqhf,bhfd->bqhd", phi_q, kv)
        denominator = ops.einsum("bqhf,bhf->bqh", phi_q, ops.sum(phi_k, axis=1))
    return ops.cast(numerator / (ops.expand_dims(denominator, -1) + _EPS), dtype)


def linear_attention(q, k, v, mask=None, causal: bool = False):
    """Linear attention with `phi(x) = elu(x) + 1` (O(n) in length without a mask, with a padding mask or causal).

    Example:
    >>> q = keras.random.normal((2, 5, 2, 4), seed=0)
    >>> linear_attention(q, q, q, causal=True).shape
    (2, 5, 2, 4)
    """
    q, k = ops.cast(q, "float32"), ops.cast(k, "float32")
    return kernel_attention(elu_feature_map(q), elu_feature_map(k), v, mask=mask, causal=causal)


def performer_feature_map(x, projection, is_query: bool, mask=None):
    """FAVOR+ positive random features of `x` (`[batch, len, heads, d]`), `projection` `[m, d]`.

    `phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(m)` with `x' = x d^(-1/4)`. A stabiliser is subtracted inside the exp:
    each query's own maximum, and for keys one maximum per (batch, head) over all unmasked keys; both cancel in the
    attention ratio, so the result is unchanged while exp cannot overflow.
    """
    x = ops.cast(x, "float32")
    projection = ops.cast(projection, "float32")
    d = x.shape[-1]
    m = projection.shape[0]
    x = x * (float(d) ** -0.25)
    wx = ops.einsum("blhd,md->blhm", x, projection)
    exponent = wx - 0.5 * ops.sum(ops.square(x), axis=-1, keepdims=True)
    if is_query:
        stabiliser = ops.max(exponent, axis=-1, keepdims=True)
    else:
        valid = exponent if mask is None else ops.where(_key_mask(mask) > 0, exponent, -1e30)
        stabiliser = ops.max(valid, axis=(1, 3), keepdims=True)
    return ops.exp(exponent - ops.stop_gradient(stabiliser)) / math.sqrt(m)


def performer_attention(q, k, v, projection, mask=None, causal: bool = False):
    """Performer (FAVOR+) approximation of softmax attention `softmax(q k^T / sqrt(d)) v`.

    `projection` `[m, head_size]`: random features, usually `orthogonal_gaussian_projection(m, head_size, seed)`.

    Example:
    >>> w = orthogonal_gaussian_projection(16, 4, seed=0)
    >>> q = keras.random.normal((1, 5, 2, 4), seed=0)
    >>> performer_attention(q, q, q, w).shape
    (1, 5, 2, 4)
    """
    key_mask = mask if _is_key_only(mask) else None
    phi_q = performer_feature_map(q, projection, is_query=True)
    phi_k = performer_feature_map(k, projection, is_query=False, mask=key_mask)
    return kernel_attention(phi_q, phi_k, v, mask=mask, causal=causal)


def keynorm_attention(q, k, v, scale=1.0, mask=None, bias=None):
    """Softmax attention on `scale * q . k_hat` with `k_hat = k / |k|` (the KeyNorm length-extrapolation article).

    `scale`: a float or a tensor broadcastable to `[heads, 1]` (one scale per head), used in place of `1/sqrt(d)`.

    Example:
    >>> q = keras.random.normal((1, 5, 2, 4), seed=0)
    >>> keynorm_attention(q, q, q, scale=2.0).shape
    (1, 5, 2, 4)
    """
    from bert4x.kernels.dispatch import attention

    return attention(q, k, v, mask=mask, bias=bias, variant="keynorm", keynorm_scale=scale)


def keynorm_inputs(q, k, scale):
    """`(q * scale, k / |k|, 1.0)`: KeyNorm turned into plain dot-product attention with unit scale."""
    k32 = ops.cast(k, "float32")
    k_hat = k32 / ops.sqrt(ops.sum(ops.square(k32), axis=-1, keepdims=True) + 1e-12)
    return q * ops.cast(scale, q.dtype), ops.cast(k_hat, k.dtype), 1.0


def default_performer_features(head_size: int) -> int:
    """The Performer paper's default number of random features, `d log d` (at least `d`)."""
    return max(head_size, int(round(head_size * math.log(max(head_size, 2)))))


def orthogonal_gaussian_projection(num_features: int, dim: int, seed: int = 0) -> np.ndarray:
    """`[num_features, dim]` random rows: blocks of orthogonal directions, each row's norm drawn as a Gaussian vector's.

    Within each block of `dim` rows the directions are exactly orthogonal (QR of a Gaussian matrix); the norms make
    each row marginally N(0, I), which keeps the FAVOR+ estimate unbiased while lowering its variance.
    """
    if num_features <= 0 or dim <= 0:
        raise ValueError(f"num_features and dim must be positive, got {num_features} and {dim}.")
    rng = np.random.default_rng(seed)
    blocks = []
    for _ in range(-(-num_features // dim)):
        orthogonal, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        blocks.append(orthogonal.T)
    directions = np.concatenate(blocks, axis=0)[:num_features]
    norms = np.linalg.norm(rng.standard_normal((num_features, dim)), axis=1, keepdims=True)
    return (directions * norms).astype("float32")


def normalized_scores_attention(q, k, v, method: str, mask=None, scale=1.0, dropout=None, training: bool = False,
                                min_length: int = 16):
    """Attention whose scores `s = scale * q . k` are normalised by `method` instead of a plain softmax.

    With `l_i` the number of keys query i may see (the mask's True entries in its row; every key without a mask):
    'softmax_plus' gives `softmax_j(s_ij * log(max(l_i, min_length)) / log(512))` over the visible keys, and
    'squared_relu' gives `relu(s_ij)^2 / max(l_i, 1)` at visible keys and 0 elsewhere. Computed in float32; the
    output has `v`'s dtype and `v`'s head size, which may differ from that of q and k.

    Args:
        q: `[batch, q_len, heads, key_size]`.
        k: `[batch, k_len, heads, key_size]`.
        v: `[batch, k_len, heads, value_size]`.
        method: 'softmax_plus' or 'squared_relu'.
        mask: booleans broadcastable to `[batch, heads, q_len, k_len]` (True = may attend), or None.
        scale: the score scale.
        dropout: a `bert4x.layers.Dropout` applied to the normalised scores, or None.
        training: whether dropout applies.
        min_length: 'softmax_plus' scales by `log(l_i)` with `l_i` at least this (bert4keras 0.11.5 uses 16; 1 keeps
            the count as it is).

    Example:
    >>> q = keras.random.normal((1, 5, 1, 4), seed=0)
    >>> normalized_scores_attention(q, q, keras.ops.ones((1, 5, 1, 6)), "squared_relu").shape
    (1, 5, 1, 6)
    """
    if method not in NORMALIZED_VARIANTS:
        raise ValueError(f"normalized_scores_attention: method must be one of {NORMALIZED_VARIANTS}, got {method!r}.")
    dtype = v.dtype
    q, k, v = (ops.cast(t, "float32") for t in (q, k, v))
    scores = ops.einsum("bqhd,bkhd->bhqk", q, k) * ops.cast(scale, "float32")
    if mask is None:
        visible = ops.ones_like(scores, dtype="bool")
    else:
        visible = ops.logical_and(ops.cast(mask, "bool"), ops.ones_like(scores, dtype="bool"))  # broadcast to scores
    length = ops.sum(ops.cast(visible, "float32"), axis=-1, keepdims=True)
    if method == "softmax_plus":
        factor = ops.log(ops.maximum(length, float(min_length))) / math.log(512.0)
        scores = ops.where(visible, scores * factor, -1e30)
        probs = ops.softmax(scores, axis=-1)
    else:
        probs = ops.where(visible, ops.square(ops.relu(scores)), 0.0) / ops.maximum(length, 1.0)
    if dropout is not None:  # a layer under a mixed policy returns its compute dtype: back to float32
        probs = ops.cast(dropout(probs, training=training), "float32")
    return ops.cast(ops.einsum("bhqk,bkhd->bqhd", probs, v), dtype)
