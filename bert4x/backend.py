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
    # which made GELU the slowest elementwise kernel of a BERT-base step (benchmarks/PROFILE.md, "Library choices").
    return 0.5 * (1.0 + ops.erf(x * 0.7071067811865476))


@ops.custom_gradient
def _gelu_erf_keeping_only_its_input(x):
    # Autodiff of erf-GELU keeps several [tokens, ffn] intermediates per layer for the backward pass; the
    # closed-form derivative needs only x.
    def grad(*args, upstream=None):
        saved, upstream = x, upstream_gradient(args, upstream)
        if on_jax_cpu():
            # Without the barrier XLA shares the forward's normal CDF with this one and keeps it alive until the
            # backward pass: one more [tokens, ffn] array a layer. Not on GPUs, where sharing it is faster
            # (benchmarks/PROFILE.md, "Library choices").
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
    weights in the heap."""
    count = int(np.prod(shape))
    itemsize = np.dtype(dtype).itemsize
    block = np.empty(max(count * itemsize, 33 * 2**20), np.uint8)
    return block[: count * itemsize].view(dtype).reshape(shape)


@keras.saving.register_keras_serializable(package="bert4x")
class TruncatedNormal(keras.initializers.TruncatedNormal):
    """Keras's `TruncatedNormal` (normal, redrawn beyond 2 standard deviations), drawn on the host with numpy.

    Same distribution and seeding rules as Keras's (an int `seed` repeats, `seed=None` follows
    `keras.utils.set_random_seed`), but one float32 array per weight: Keras's jax version materialises several
    full-size temporaries per weight, which the allocator keeps (benchmarks/PROFILE.md, "Library choices").
    Inside a traced function, where host arrays cannot be made, it defers to Keras's version.

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


# ------------------------------------------------------------------------------------------ bert4keras names
def set_gelu(version: str) -> None:
    """Chooses what the activation name "gelu" means in configs read afterwards, as bert4keras's `set_gelu`.

    Args:
        version: "erf" (exact GELU, Google BERT's; the default) or "tanh" (the tanh approximation).

    Example:
    >>> set_gelu("tanh"); get_activation("gelu") is gelu_tanh
    True
    >>> set_gelu("erf")
    """
    version = str(version).lower()
    if version not in ("erf", "tanh"):
        raise ValueError(f"set_gelu: version must be 'erf' or 'tanh', got {version!r}.")
    ACTIVATIONS["gelu"] = "gelu_erf" if version == "erf" else "gelu_tanh"


def _large_value(dtype) -> float:
    """bert4keras's `K.infinity()`: a finite stand-in for infinity that the dtype can hold."""
    return 1e4 if keras.backend.standardize_dtype(dtype) in ("float16", "bfloat16") else 1e12


def sequence_masking(x, mask=None, value=0, axis: int | None = None):
    """Sets the positions of `x` where `mask` is 0/False to `value`, as bert4keras's `sequence_masking`.

    Args:
        x: a tensor of rank >= 2.
        mask: `[batch, length]` (0/1 or bool), or None to return `x` unchanged.
        value: the fill value; the strings "-inf" / "inf" mean a large finite negative / positive number
            (1e12, or 1e4 in 16-bit floats), so that a following softmax or max ignores those positions.
        axis: the axis of `x` that `mask`'s length runs along (default 1); `mask` is broadcast over the others.

    Example:
    >>> y = sequence_masking(keras.ops.ones((1, 3, 2)), keras.ops.array([[1, 1, 0]]), "-inf")
    >>> keras.ops.convert_to_numpy(y)[0, :, 0] < -1e11
    array([False, False,  True])
    """
    if mask is None:
        return x
    x = ops.convert_to_tensor(x)
    if isinstance(value, str):
        if value not in ("-inf", "inf"):
            raise ValueError(f"sequence_masking: value must be a number, '-inf' or 'inf', got {value!r}.")
        value = _large_value(x.dtype) * (-1 if value == "-inf" else 1)
    ndim = len(x.shape)
    axis = 1 if axis is None else axis
    axis = axis + ndim if axis < 0 else axis
    if not 1 <= axis < ndim:
        raise ValueError(f"sequence_masking: axis must be in [1, {ndim}) for x of rank {ndim}, got {axis}.")
    mask = ops.cast(mask, "bool")
    if len(mask.shape) != 2:
        raise ValueError(f"sequence_masking: mask must be [batch, length], got shape {tuple(mask.shape)}.")
    for _ in range(axis - 1):
        mask = ops.expand_dims(mask, 1)
    for _ in range(ndim - axis - 1):
        mask = ops.expand_dims(mask, -1)
    return ops.where(mask, x, ops.cast(value, x.dtype))


def batch_gather(params, indices):
    """`out[b..., k] = params[b..., indices[b..., k]]`: a gather along the first non-batch axis per batch row,
    as bert4keras's `batch_gather` (`tf.gather(..., batch_dims=rank(indices) - 1)`).

    Args:
        params: `[*batch, n, *rest]`.
        indices: integer `[*batch, k]` (same leading batch dims as `params`).

    Returns:
        `[*batch, k, *rest]`.

    Example:
    >>> out = batch_gather(keras.ops.array([[10, 11, 12], [20, 21, 22]]), keras.ops.array([[2, 0], [1, 1]]))
    >>> keras.ops.convert_to_numpy(out).tolist()
    [[12, 10], [21, 21]]
    """
    params, indices = ops.convert_to_tensor(params), ops.cast(indices, "int32")
    axis = len(indices.shape) - 1
    if axis < 0 or len(params.shape) <= axis:
        raise ValueError(f"batch_gather: indices of rank {len(indices.shape)} need params of rank > {axis}, "
                         f"got {len(params.shape)}.")
    rest = tuple(params.shape[axis + 1:])
    if any(d is None for d in rest):
        rest = tuple(ops.shape(params)[axis + 1:])
    expanded = ops.reshape(indices, tuple(ops.shape(indices)) + (1,) * len(rest))
    expanded = ops.broadcast_to(expanded, tuple(ops.shape(indices)) + rest)
    return ops.take_along_axis(params, expanded, axis=axis)


def search_layer(inputs, name: str, exclude_from=None):
    """The layer named `name` among the layers that produced the Keras tensor `inputs` (searched upstream, breadth
    first), or None, as bert4keras's `search_layer`.

    Args:
        inputs: a symbolic Keras tensor (e.g. `model.output`), or a layer whose input is searched from.
        name: the layer's name.
        exclude_from: layers not to search through (a set, filled as the search goes).

    Example:
    >>> x = keras.Input((3,)); y = keras.layers.Dense(2, name="head")(keras.layers.Dense(4, name="body")(x))
    >>> search_layer(y, "body").name
    'body'
    """
    exclude_from = set() if exclude_from is None else exclude_from
    if isinstance(inputs, keras.layers.Layer):
        inputs = inputs.input
    queue = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    while queue:
        tensor = queue.pop(0)
        history = getattr(tensor, "_keras_history", None)
        if history is None:
            continue
        layer = history.operation
        if id(layer) in exclude_from:
            continue
        exclude_from.add(id(layer))
        if layer.name == name:
            return layer
        if history.node_index < len(layer._inbound_nodes):
            queue.extend(layer._inbound_nodes[history.node_index].input_tensors)
    return None


class _KerasBackendFunctions:
    """`K`: the `keras.backend` functions bert4keras scripts call, written with `keras.ops` so that they run on every
    backend. Not a re-export of TensorFlow's backend: graph-mode tools (`K.learning_phase`, `K.function`,
    `K.placeholder`, `K.get_session`, `K.update`) have no Keras 3 counterpart and are absent; pass `training=` to
    layers and use `model.predict` instead.

    Example:
    >>> from bert4x.backend import K
    >>> float(K.sum(K.cast(K.not_equal(keras.ops.array([1, 0, 2]), 0), K.floatx())))
    2.0
    """

    # Reductions and elementwise math.
    @staticmethod
    def sum(x, axis=None, keepdims=False):
        return ops.sum(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def mean(x, axis=None, keepdims=False):
        return ops.mean(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def max(x, axis=None, keepdims=False):
        return ops.max(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def min(x, axis=None, keepdims=False):
        return ops.min(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def prod(x, axis=None, keepdims=False):
        return ops.prod(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def any(x, axis=None, keepdims=False):
        return ops.any(ops.cast(x, "bool"), axis=axis, keepdims=keepdims)

    @staticmethod
    def all(x, axis=None, keepdims=False):
        return ops.all(ops.cast(x, "bool"), axis=axis, keepdims=keepdims)

    @staticmethod
    def var(x, axis=None, keepdims=False):
        return ops.var(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def std(x, axis=None, keepdims=False):
        return ops.std(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def logsumexp(x, axis=None, keepdims=False):
        return ops.logsumexp(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def cumsum(x, axis=0):
        return ops.cumsum(x, axis=axis)

    clip = staticmethod(ops.clip)
    pow = staticmethod(ops.power)

    @staticmethod
    def l2_normalize(x, axis=None):
        x = ops.convert_to_tensor(x)
        squares = ops.sum(ops.square(x), axis=axis, keepdims=True)
        return x * ops.rsqrt(ops.maximum(squares, ops.cast(1e-12, x.dtype)))

    # Types and shapes.
    cast = staticmethod(ops.cast)

    @staticmethod
    def floatx():
        return keras.backend.floatx()

    @staticmethod
    def epsilon():
        return keras.backend.epsilon()

    @staticmethod
    def dtype(x):
        return keras.backend.standardize_dtype(x.dtype)

    shape = staticmethod(ops.shape)

    @staticmethod
    def int_shape(x):
        return tuple(d if isinstance(d, int) or d is None else None for d in x.shape)

    @staticmethod
    def ndim(x):
        return len(x.shape)

    reshape = staticmethod(ops.reshape)

    @staticmethod
    def concatenate(tensors, axis=-1):
        return ops.concatenate(list(tensors), axis=axis)

    @staticmethod
    def stack(tensors, axis=0):
        return ops.stack(list(tensors), axis=axis)

    @staticmethod
    def expand_dims(x, axis=-1):
        return ops.expand_dims(x, axis)

    squeeze = staticmethod(ops.squeeze)

    @staticmethod
    def flatten(x):
        return ops.reshape(x, (-1,))

    @staticmethod
    def batch_flatten(x):
        return ops.reshape(x, (ops.shape(x)[0], -1))

    permute_dimensions = staticmethod(ops.transpose)
    tile = staticmethod(ops.tile)

    @staticmethod
    def gather(reference, indices):
        return ops.take(reference, ops.cast(indices, "int32"), axis=0)

    @staticmethod
    def constant(value, dtype=None, shape=None):
        value = ops.convert_to_tensor(value, dtype=dtype or keras.backend.floatx())
        return value if shape is None else ops.broadcast_to(value, shape)

    @staticmethod
    def arange(start, stop=None, step=1, dtype="int32"):
        return ops.arange(start, stop, step, dtype=dtype)

    @staticmethod
    def ones_like(x, dtype=None):
        return ops.ones_like(x, dtype=dtype)

    @staticmethod
    def zeros_like(x, dtype=None):
        return ops.zeros_like(x, dtype=dtype)

    @staticmethod
    def ones(shape, dtype=None):
        return ops.ones(shape, dtype=dtype or keras.backend.floatx())

    @staticmethod
    def zeros(shape, dtype=None):
        return ops.zeros(shape, dtype=dtype or keras.backend.floatx())

    @staticmethod
    def eye(size, dtype=None):
        return ops.eye(size, dtype=dtype or keras.backend.floatx())

    @staticmethod
    def one_hot(indices, num_classes):
        return ops.one_hot(ops.cast(indices, "int32"), num_classes)

    @staticmethod
    def argmax(x, axis=-1):
        return ops.argmax(x, axis=axis)

    @staticmethod
    def argmin(x, axis=-1):
        return ops.argmin(x, axis=axis)

    # Products.
    @staticmethod
    def dot(x, y):
        """Contracts the last axis of `x` with the second-to-last of `y` (the last when `y` is 1-D)."""
        y_axis = len(y.shape) - 2 if len(y.shape) >= 2 else 0
        return ops.tensordot(x, y, axes=[[len(x.shape) - 1], [y_axis]])

    @staticmethod
    def batch_dot(x, y, axes=None):
        """Per-batch-row contraction of `x`'s axis `axes[0]` with `y`'s `axes[1]` (Keras 2's defaults: x's last axis
        with y's second-to-last, or last for a 2-D `y`); a 2-D result gets a trailing axis of size 1, as in Keras 2."""
        x_ndim, y_ndim = len(x.shape), len(y.shape)
        if axes is None:
            axes = (x_ndim - 1, y_ndim - 2 if y_ndim > 2 else y_ndim - 1)
        elif isinstance(axes, int):
            axes = (axes, axes)
        ax, ay = (a % n for a, n in zip(axes, (x_ndim, y_ndim)))
        if ax == 0 or ay == 0:
            raise ValueError(f"K.batch_dot cannot contract the batch axis, got axes={axes}.")
        letters = "bcdefghijklmnopqrstuvw"
        x_sub = ["a"] + list(letters[: x_ndim - 1])
        y_sub = ["a"] + list(letters[x_ndim - 1: x_ndim + y_ndim - 2])
        y_sub[ay] = x_sub[ax]
        out = [s for i, s in enumerate(x_sub) if i != ax] + [s for i, s in enumerate(y_sub) if i not in (0, ay)]
        result = ops.einsum(f"{''.join(x_sub)},{''.join(y_sub)}->{''.join(out)}", x, y)
        return ops.expand_dims(result, -1) if len(out) == 1 else result

    # Comparisons and selection.
    equal = staticmethod(ops.equal)
    not_equal = staticmethod(ops.not_equal)
    greater = staticmethod(ops.greater)
    greater_equal = staticmethod(ops.greater_equal)
    less = staticmethod(ops.less)
    less_equal = staticmethod(ops.less_equal)
    minimum = staticmethod(ops.minimum)
    maximum = staticmethod(ops.maximum)

    @staticmethod
    def switch(condition, then_expression, else_expression):
        """`where(condition, then, else)`; a lower-rank `condition` is broadcast over the trailing axes (Keras 2)."""
        condition = ops.cast(condition, "bool")
        then_expression = ops.convert_to_tensor(then_expression)
        for _ in range(len(then_expression.shape) - len(condition.shape)):
            condition = ops.expand_dims(condition, -1)
        return ops.where(condition, then_expression, else_expression)

    stop_gradient = staticmethod(ops.stop_gradient)

    # Losses and activations.
    @staticmethod
    def sparse_categorical_crossentropy(target, output, from_logits=False, axis=-1):
        target = ops.cast(target, "int32")
        if len(target.shape) == len(output.shape):
            target = ops.squeeze(target, axis)
        return ops.sparse_categorical_crossentropy(target, output, from_logits=from_logits, axis=axis)

    @staticmethod
    def categorical_crossentropy(target, output, from_logits=False, axis=-1):
        return ops.categorical_crossentropy(target, output, from_logits=from_logits, axis=axis)

    @staticmethod
    def binary_crossentropy(target, output, from_logits=False):
        return ops.binary_crossentropy(target, output, from_logits=from_logits)

    @staticmethod
    def softmax(x, axis=-1):
        return ops.softmax(x, axis=axis)

    sigmoid = staticmethod(ops.sigmoid)
    relu = staticmethod(ops.relu)
    tanh = staticmethod(ops.tanh)
    log = staticmethod(ops.log)
    exp = staticmethod(ops.exp)
    square = staticmethod(ops.square)
    sqrt = staticmethod(ops.sqrt)
    abs = staticmethod(ops.abs)
    sign = staticmethod(ops.sign)
    round = staticmethod(ops.round)

    # Variables.
    get_value = staticmethod(ops.convert_to_numpy)
    eval = staticmethod(ops.convert_to_numpy)

    @staticmethod
    def set_value(variable, value):
        variable.assign(value)

    @staticmethod
    def batch_get_value(tensors):
        return [ops.convert_to_numpy(x) for x in tensors]

    @staticmethod
    def batch_set_value(pairs):
        for variable, value in pairs:
            variable.assign(value)

    @staticmethod
    def clear_session():
        keras.backend.clear_session()


K = _KerasBackendFunctions()
