"""Backend-agnostic helpers built on `keras.ops` only (no `tf.*`), shared by layers and models."""

from __future__ import annotations

import functools
import math

import keras
import numpy as np
from keras import ops

# A finite "minus infinity" for masked attention logits. Logits are masked in float32 (see `masked_softmax`),
# where this is exact; it is never added in float16/bfloat16, so it cannot overflow to -inf and make NaNs.
MASK_VALUE = -1e9


def recompute_barrier(saved, upstream):
    """Ties the values a custom gradient recomputes from to the incoming gradient, so that XLA can neither merge the
    recomputation with the forward pass's identical ops nor schedule it early (either keeps forward-sized
    intermediates alive and undoes the saving); what `jax.checkpoint` means to do. jax only: an identity elsewhere.

    The optimization barrier stops the merging. XLA:CPU drops barriers before it schedules, though, so the order comes
    from a data dependency: each array (integer ones too, such as a dropout seed) gets `0 * upstream[0]` added (itself
    for any finite gradient; with a non-finite one the gradient is non-finite anyway)."""
    if keras.backend.backend() != "jax":
        return saved, upstream
    import jax
    import jax.numpy as jnp

    saved, upstream = jax.lax.optimization_barrier((saved, upstream))
    zero = jnp.ravel(upstream)[0] * 0

    def tie(value):
        return value if value.dtype == jnp.bool_ else value + zero.astype(value.dtype)

    return jax.tree_util.tree_map(tie, saved), upstream


def on_jax_cpu() -> bool:
    """Whether Keras runs on jax with CPU as jax's default device (where bert4x trades recomputation for memory)."""
    if keras.backend.backend() != "jax":
        return False
    import jax

    return jax.default_backend() == "cpu"


def upstream_gradient(args: tuple, upstream=None):
    """The incoming gradient inside an `ops.custom_gradient` backward function `grad(*args, upstream=None)`: jax and
    torch pass it by keyword, tensorflow positionally."""
    if upstream is None:
        (upstream,) = args
    return upstream


def _normal_cdf(x):
    # Google's erf formula, not jax's erfc one: XLA expands erfc into both of its branches (an exp and a division),
    # which made GELU the slowest elementwise kernel of a BERT-base step (0.158 vs 0.086 ms a layer, H200, 32 x 512).
    return 0.5 * (1.0 + ops.erf(x * 0.7071067811865476))


@ops.custom_gradient
def _gelu_erf_keeping_only_its_input(x):
    # Autodiff of erf-GELU keeps several [tokens, ffn] intermediates per layer for the backward pass (~330 MiB for
    # BERT-base at 8 x 128 on jax); the closed-form derivative needs only x.
    def grad(*args, upstream=None):
        saved, upstream = x, upstream_gradient(args, upstream)
        if on_jax_cpu():
            # Without the barrier XLA shares the forward's normal CDF with this one and keeps it alive until the
            # backward pass: one more [tokens, ffn] array a layer (+132 MiB of temporaries for BERT-base at 8 x 128).
            # Not on GPUs, where the shared CDF is the faster choice (0.8% a step, BERT-base on an H200).
            saved, upstream = recompute_barrier(saved, upstream)
        pdf = 0.3989422804014327 * ops.exp(-0.5 * ops.square(saved))
        return upstream * (_normal_cdf(saved) + saved * pdf)

    return x * _normal_cdf(x), grad


@keras.saving.register_keras_serializable(package="bert4x")
def gelu_erf(x):
    """GELU with the exact erf form, as in Google's BERT and Hugging Face's `gelu`."""
    return _gelu_erf_keeping_only_its_input(x)


@keras.saving.register_keras_serializable(package="bert4x")
def gelu_tanh(x):
    """GELU with the tanh approximation (`gelu_new` in Hugging Face, `gelu_pytorch_tanh`, T5's `gelu`)."""
    return keras.activations.gelu(x, approximate=True)


def _host_array(shape: tuple, dtype) -> np.ndarray:
    """An empty numpy array in a block of at least 33 MiB: glibc maps blocks that large from the OS and unmaps them
    when freed (its mmap threshold tops out at 32 MiB), so drawing weights leaves no freed blocks between the
    weights in the heap (a BERT-base build held 30-60 MiB of them)."""
    count = int(np.prod(shape))
    itemsize = np.dtype(dtype).itemsize
    block = np.empty(max(count * itemsize, 33 * 2**20), np.uint8)
    return block[: count * itemsize].view(dtype).reshape(shape)


@keras.saving.register_keras_serializable(package="bert4x")
class TruncatedNormal(keras.initializers.TruncatedNormal):
    """Keras's `TruncatedNormal` (normal, redrawn beyond 2 standard deviations), drawn on the host with numpy.

    Same distribution and seeding rules as Keras's (an int `seed` repeats, `seed=None` follows
    `keras.utils.set_random_seed`), but one float32 array per weight: Keras's jax version materialises several
    full-size temporaries per weight, which the allocator keeps, and that alone made a BERT-base build hold ~140 MiB
    more than its weights. Inside a traced function, where host arrays cannot be made, it defers to Keras's version.

    Example:
    >>> init = TruncatedNormal(stddev=0.02, seed=1)
    >>> values = keras.ops.convert_to_numpy(init((256, 64)))
    >>> bool(abs(values).max() <= 0.04)
    True
    """

    def __call__(self, shape, dtype=None):
        dtype = keras.backend.standardize_dtype(dtype or keras.backend.floatx())
        try:
            seed = int(ops.convert_to_numpy(keras.random.randint((), 0, 2**31 - 1, seed=self.seed)))
        except Exception:  # a symbolic/traced context: no host values to draw from
            return super().__call__(shape, dtype)
        rng = np.random.default_rng(seed)
        values = _host_array(tuple(shape), np.float32)
        rng.standard_normal(out=values, dtype=np.float32)
        outside, below = _host_array(values.shape, bool), _host_array(values.shape, bool)

        def mark_outside():
            np.greater(values, 2.0, out=outside)
            np.logical_or(outside, np.less(values, -2.0, out=below), out=outside)
            return outside.any()

        while mark_outside():
            values[outside] = rng.standard_normal(int(outside.sum()), dtype=np.float32)
        values *= np.float32(self.stddev)
        values += np.float32(self.mean)
        return ops.convert_to_tensor(values, dtype=dtype)


# Activation names used by Google, Hugging Face and bert4keras configs, mapped to one implementation each.
ACTIVATIONS = {
    "gelu": "gelu_erf",
    "gelu_erf": "gelu_erf",
    "gelu_new": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "swish": "silu",
    "silu": "silu",
    "tanh": "tanh",
    "linear": "linear",
    "softmax": "softmax",
    "sigmoid": "sigmoid",
}


def canonical_activation(name: str | None) -> str:
    """Returns the canonical name of an activation given any of its usual aliases; raises on an unknown one."""
    if name is None:
        return "linear"
    if name not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


def get_activation(name: str | None):
    """Returns the callable for an activation name (any alias accepted by `canonical_activation`)."""
    name = canonical_activation(name)
    if name == "gelu_erf":
        return gelu_erf
    if name == "gelu_tanh":
        return gelu_tanh
    return keras.activations.get(name)


def masked_softmax(logits, mask=None, axis: int = -1):
    """Softmax in float32 over `logits` with positions where `mask` is False excluded.

    The result is cast back to the dtype of `logits`, so mixed precision stays numerically safe.
    """
    dtype = logits.dtype
    logits = ops.cast(logits, "float32")
    if mask is not None:
        logits = ops.where(mask, logits, MASK_VALUE)
    return ops.cast(ops.softmax(logits, axis=axis), dtype)


def padding_mask(token_ids, pad_id: int = 0):
    """Boolean key mask `[batch, 1, 1, length]`: True where the token is not padding."""
    return ops.expand_dims(ops.expand_dims(ops.not_equal(token_ids, pad_id), 1), 1)


def causal_mask(query_length, key_length=None):
    """Boolean `[1, 1, q, k]` mask letting query i see keys j <= i + (k - q) (the last q queries of k keys)."""
    key_length = query_length if key_length is None else key_length
    i = ops.expand_dims(ops.arange(query_length), 1) + (key_length - query_length)
    j = ops.expand_dims(ops.arange(key_length), 0)
    return ops.expand_dims(ops.expand_dims(ops.greater_equal(i, j), 0), 0)


def unilm_mask(segment_ids):
    """Boolean `[batch, 1, length, length]` UniLM mask: i sees j iff cumsum(segment)[j] <= cumsum(segment)[i].

    Segment 0 (the source) is bidirectional; segment 1 (the target) sees the whole source and its own past.
    """
    c = ops.cumsum(ops.cast(segment_ids, "int32"), axis=1)
    return ops.expand_dims(ops.less_equal(ops.expand_dims(c, 1), ops.expand_dims(c, 2)), 1)


def sinusoidal_angles(positions, dim: int, base: float = 10000.0):
    """Angles `positions[..., None] * base**(-2i/dim)` for i in [0, dim/2), shape `positions.shape + (dim/2,)`."""
    if dim % 2:
        raise ValueError(f"Rotary/sinusoidal dimension must be even, got {dim}.")
    inv_freq = ops.power(base, -ops.arange(0, dim, 2, dtype="float32") / dim)
    return ops.expand_dims(ops.cast(positions, "float32"), -1) * inv_freq


def apply_rotary(x, cos, sin):
    """Rotates adjacent pairs (x[2i], x[2i+1]) of the last axis by angles whose cos/sin are given.

    This is the interleaved RoPE of RoFormer's checkpoints. `cos`/`sin` have `x.shape[-1] // 2` entries on their
    last axis and broadcast against `x` on the others.
    """
    dtype = x.dtype
    x = ops.cast(x, "float32")
    cos, sin = ops.cast(cos, "float32"), ops.cast(sin, "float32")  # layers may have autocast them to bfloat16
    shape = ops.shape(x)
    pairs = ops.reshape(x, tuple(shape[:-1]) + (shape[-1] // 2, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = ops.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
    return ops.cast(ops.reshape(rotated, shape), dtype)


def rotary_cos_sin(positions, dim: int, base: float = 10000.0):
    """1-D RoPE: `(cos, sin)` of the angles m·θ_i, θ_i = base**(-2i/dim), for the positions m given.

    Each has shape `positions.shape + (dim // 2,)`; pass them to `apply_rotary` (or to MultiHeadAttention's `rotary=`).

    Example:
    >>> cos, sin = rotary_cos_sin(keras.ops.arange(5)[None], 8)
    >>> tuple(cos.shape)
    (1, 5, 4)
    """
    angles = sinusoidal_angles(positions, dim, base)
    return ops.cos(angles), ops.sin(angles)


def rotary_cos_sin_2d(x_positions, y_positions, dim: int, base: float = 10000.0):
    """2-D RoPE for points (x, y), e.g. image patches: the first half of the `dim` dimensions is rotated by the 1-D
    rule (over dim/2 dimensions) at position x, the second half at position y.

    `x_positions` and `y_positions` have the same shape; the result has `shape + (dim // 2,)` like `rotary_cos_sin`.

    Example:
    >>> rows, cols = keras.ops.meshgrid(keras.ops.arange(2), keras.ops.arange(3), indexing="ij")
    >>> cos, sin = rotary_cos_sin_2d(keras.ops.reshape(rows, (1, 6)), keras.ops.reshape(cols, (1, 6)), 8)
    >>> tuple(cos.shape)
    (1, 6, 4)
    """
    if dim % 4:
        raise ValueError(f"2-D rotary dimension must be a multiple of 4 (two halves of rotated pairs), got {dim}.")
    cos_x, sin_x = rotary_cos_sin(x_positions, dim // 2, base)
    cos_y, sin_y = rotary_cos_sin(y_positions, dim // 2, base)
    return ops.concatenate([cos_x, cos_y], axis=-1), ops.concatenate([sin_x, sin_y], axis=-1)


def attention_scale(head_size: int) -> float:
    return 1.0 / math.sqrt(head_size)


@functools.cache
def float32_matmul_relative_error() -> float:
    """Measured relative error of a float32 matmul on the default device, against float64.

    About 1e-7 at full float32 precision; about 1e-3 where the backend runs float32 matmuls as TF32 (jax's and
    TensorFlow's default on NVIDIA GPUs). Numerical self-checks use it to pick a tolerance that fits the hardware.
    """
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((64, 64)), rng.standard_normal((64, 64))
    product = ops.convert_to_numpy(ops.matmul(ops.convert_to_tensor(a, "float32"), ops.convert_to_tensor(b, "float32")))
    exact = a @ b
    return float(np.max(np.abs(product - exact)) / np.max(np.abs(exact)))
