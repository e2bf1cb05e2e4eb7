"""LayerNorm over the last axis in two Pallas (Triton) kernels, forward and backward, for jax on NVIDIA GPUs.

XLA runs each of BERT's LayerNorms as several passes over the `[tokens, width]` activations: the statistics, the
normalisation, and in the backward pass the row reductions and separate column sums for gamma and beta
(benchmarks/PROFILE.md). Here
the forward pass reads the input once and writes the output and two floats per row (mean, 1/std); the backward pass
reads the input and the incoming gradient once, writes the input gradient, and sums gamma's and beta's gradients per
program into a small `[programs, width]` float32 array that XLA adds up.

Arithmetic is float32 whatever the input dtype (as Keras's LayerNormalization under mixed precision); the output has
the input's dtype. Widths up to `MAX_WIDTH`, padded in the kernels to the next power of two and masked.

Example (runs on CPU through the interpreter):
>>> import jax.numpy as jnp
>>> y = layer_norm(jnp.array([[1.0, 2.0, 3.0, 6.0]]), jnp.ones(4), jnp.zeros(4), 1e-12, interpret=True)
>>> bool(abs(float(y.mean())) < 1e-6)
True
"""

from __future__ import annotations

import functools
import math

import keras
from keras import ops

from bert4x import backend, config

MAX_WIDTH = 4096
# (forward rows per block, backward rows per block, forward warps, backward warps, most backward programs): the
# fastest forward + backward of benchmarks/bench_layer_norm.py --sweep at width 768 (benchmarks/RESULTS.md).
DEFAULT_BLOCKS = (4, 4, 4, 4, 256)


def supported(shape: tuple) -> str | None:
    """None if the kernels take an input of this shape (normalised over its last axis), else the reason."""
    if any(d is None for d in shape):
        return f"shape {shape} is not fully known"
    if len(shape) < 1 or shape[-1] < 1:
        return f"shape {shape} has no last axis to normalise"
    if shape[-1] > MAX_WIDTH:
        return f"width {shape[-1]} is above {MAX_WIDTH}"
    if math.prod(shape) >= 2**31:
        return f"shape {shape} has 2**31 or more entries (the kernels index with int32)"
    return None


def _next_power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _rows(program, block_rows: int, n_rows: int):
    import jax.numpy as jnp

    rows = program * block_rows + jnp.arange(block_rows)
    return rows, rows < n_rows


def _forward_kernel(x_ref, gamma_ref, beta_ref, y_ref, mean_ref, rstd_ref, *, epsilon, block_rows, block_cols):
    import jax.numpy as jnp
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    n_rows, width = x_ref.shape
    rows, row_ok = _rows(pl.program_id(0), block_rows, n_rows)
    cols = jnp.arange(block_cols)
    col_ok = cols < width
    mask = row_ok[:, None] & col_ok[None, :]
    at = (rows[:, None], cols[None, :])
    x = plgpu.load(x_ref.at[at], mask=mask, other=0.0).astype(jnp.float32)
    mean = jnp.sum(x, axis=1) / width
    centred = jnp.where(mask, x - mean[:, None], 0.0)
    rstd = lax.rsqrt(jnp.sum(centred * centred, axis=1) / width + epsilon)
    gamma = plgpu.load(gamma_ref.at[cols], mask=col_ok, other=0.0).astype(jnp.float32)
    beta = plgpu.load(beta_ref.at[cols], mask=col_ok, other=0.0).astype(jnp.float32)
    y = centred * rstd[:, None] * gamma[None, :] + beta[None, :]
    plgpu.store(y_ref.at[at], y.astype(y_ref.dtype), mask=mask)
    plgpu.store(mean_ref.at[rows], mean, mask=row_ok)
    plgpu.store(rstd_ref.at[rows], rstd, mask=row_ok)


def _backward_kernel(
    x_ref, gamma_ref, mean_ref, rstd_ref, dy_ref, dx_ref, dgamma_ref, dbeta_ref, *, block_rows, block_cols,
    blocks_per_program,
):
    import jax.numpy as jnp
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    n_rows, width = x_ref.shape
    program = pl.program_id(0)
    cols = jnp.arange(block_cols)
    col_ok = cols < width
    gamma = plgpu.load(gamma_ref.at[cols], mask=col_ok, other=0.0).astype(jnp.float32)

    def step(i, sums):
        rows, row_ok = _rows(program * blocks_per_program + i, block_rows, n_rows)
        mask = row_ok[:, None] & col_ok[None, :]
        at = (rows[:, None], cols[None, :])
        x = plgpu.load(x_ref.at[at], mask=mask, other=0.0).astype(jnp.float32)
        dy = plgpu.load(dy_ref.at[at], mask=mask, other=0.0).astype(jnp.float32)
        mean = plgpu.load(mean_ref.at[rows], mask=row_ok, other=0.0)
        rstd = plgpu.load(rstd_ref.at[rows], mask=row_ok, other=0.0)
        normalised = jnp.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        d_normalised = dy * gamma[None, :]
        dx = rstd[:, None] * (
            d_normalised
            - (jnp.sum(d_normalised, axis=1) / width)[:, None]
            - normalised * (jnp.sum(d_normalised * normalised, axis=1) / width)[:, None]
        )
        plgpu.store(dx_ref.at[at], dx.astype(dx_ref.dtype), mask=mask)
        return sums[0] + jnp.sum(dy * normalised, axis=0), sums[1] + jnp.sum(dy, axis=0)

    zeros = jnp.zeros((block_cols,), jnp.float32)
    dgamma, dbeta = lax.fori_loop(0, blocks_per_program, step, (zeros, zeros))
    out = program * width + cols  # this program's row of the flat [programs * width] partial sums
    plgpu.store(dgamma_ref.at[out], dgamma, mask=col_ok)
    plgpu.store(dbeta_ref.at[out], dbeta, mask=col_ok)


@functools.cache
def _build(epsilon: float, interpret: bool, blocks: tuple):
    """The custom-VJP `[rows, width]` LayerNorm for one (epsilon, interpret, tiles) combination."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    forward_rows, backward_rows, forward_warps, backward_warps, max_programs = blocks

    def call(kernel, grid, out_shape, warps, name):
        return pl.pallas_call(
            kernel, grid=grid, out_shape=out_shape, interpret=interpret, name=name,
            compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1),
        )

    def forward(x, gamma, beta):
        n_rows, width = x.shape
        stats = jax.ShapeDtypeStruct((n_rows,), jnp.float32)
        kernel = functools.partial(
            _forward_kernel, epsilon=epsilon, block_rows=forward_rows, block_cols=_next_power_of_two(width)
        )
        return call(
            kernel, (pl.cdiv(n_rows, forward_rows),), [jax.ShapeDtypeStruct(x.shape, x.dtype), stats, stats],
            forward_warps, "bert4x_layer_norm_forward",
        )(x, gamma, beta)

    def backward(x, gamma, mean, rstd, dy):
        n_rows, width = x.shape
        n_blocks = pl.cdiv(n_rows, backward_rows)
        blocks_per_program = pl.cdiv(n_blocks, max_programs)
        programs = pl.cdiv(n_blocks, blocks_per_program)
        partial = jax.ShapeDtypeStruct((programs * width,), jnp.float32)
        kernel = functools.partial(
            _backward_kernel, block_rows=backward_rows, block_cols=_next_power_of_two(width),
            blocks_per_program=blocks_per_program,
        )
        dx, dgamma, dbeta = call(
            kernel, (programs,), [jax.ShapeDtypeStruct(x.shape, x.dtype), partial, partial], backward_warps,
            "bert4x_layer_norm_backward",
        )(x, gamma, mean, rstd, dy)
        return dx, dgamma.reshape(programs, width).sum(0), dbeta.reshape(programs, width).sum(0)

    @jax.custom_vjp
    def norm(x, gamma, beta):
        return forward(x, gamma, beta)[0]

    def norm_forward(x, gamma, beta):
        y, mean, rstd = forward(x, gamma, beta)
        return y, (x, gamma, beta, mean, rstd)

    def norm_backward(residuals, dy):
        x, gamma, beta, mean, rstd = residuals
        dx, dgamma, dbeta = backward(x, gamma, mean, rstd, dy)
        return dx, dgamma.astype(gamma.dtype), dbeta.astype(beta.dtype)

    norm.defvjp(norm_forward, norm_backward)
    return norm


def layer_norm(x, gamma, beta, epsilon: float, interpret: bool = False, blocks: tuple = DEFAULT_BLOCKS):
    """`(x - mean) / sqrt(var + epsilon) * gamma + beta` over the last axis of `x`, in float32, returned in x's dtype.

    Args:
        x: jax array `[..., width]`, any float dtype.
        gamma, beta: `[width]` (float32 under mixed precision); their gradients come back in their dtype.
        epsilon: added to the variance.
        interpret: run the kernels through Pallas' interpreter (any device; for tests).
        blocks: tile sizes, see `DEFAULT_BLOCKS`.
    """
    reason = supported(tuple(x.shape))
    if reason is not None:
        raise ValueError(f"layer_norm: unsupported input ({reason}); use Keras's LayerNormalization.")
    if len(blocks) != 5 or any(not isinstance(b, int) or b < 1 for b in blocks) or any(
        b & (b - 1) for b in blocks[:2]
    ):
        raise ValueError(f"layer_norm: blocks must be 5 positive integers, the first two powers of two, got {blocks}.")
    width = x.shape[-1]
    if gamma.shape != (width,) or beta.shape != (width,):
        raise ValueError(f"layer_norm: gamma {gamma.shape} and beta {beta.shape} must both be ({width},).")
    y = _build(float(epsilon), bool(interpret), tuple(blocks))(x.reshape(-1, width), gamma, beta)
    return y.reshape(x.shape)


# ------------------------------------------------------------------ the choice, and the recomputing version (keras.ops)


def choose(shape, training: bool, dtype: str = "float32") -> str | None:
    """How `bert4x.layers.LayerNormalization` runs an input of `shape` (normalised over its last axis, with gamma
    and beta): 'kernels' (the Pallas kernels: jax, NVIDIA GPU, training), 'interpret' (the kernels through Pallas'
    interpreter, `bert4x.config.set_fused_layer_norm('interpret')`), 'one_pass' (`layer_norm_one_pass`: jax, NVIDIA
    GPU, inference in float16/bfloat16), 'recompute' (`layer_norm_keeping_only_its_input`, jax on CPU) or None
    (Keras's LayerNormalization).

    Args:
        shape: the input's shape.
        training: whether the call is a training call (the kernels' gain is in the backward pass).
        dtype: the layer's compute dtype.
    """
    mode = config.fused_layer_norm()
    if keras.backend.backend() != "jax" or mode == "off":
        return None
    import jax

    kernels_fit = training and supported(tuple(shape)) is None and keras.distribution.distribution() is None
    if mode == "interpret":
        return "interpret" if kernels_fit else None
    if jax.default_backend() == "gpu":
        if not training and keras.backend.standardize_dtype(dtype) in ("float16", "bfloat16"):
            return "one_pass"
        return "kernels" if kernels_fit else None
    return "recompute" if backend.on_jax_cpu() else None


def layer_norm_one_pass(x, gamma, beta, epsilon: float):
    """`LayerNorm(x) * gamma + beta` in float32 whose mean and variance come from one read of `x`.

    XLA runs Keras's LayerNorm as three passes over `x` (the mean, the variance around it, the normalisation), each
    re-reading the residual sum that feeds it; here the two sums (of `x - x[..., :1]` and of its square) share one
    pass. Shifting by each row's first entry keeps `E[d^2] - E[d]^2` from cancelling when the mean is far from 0;
    what is left (about 1e-7 * (1 + z^2) of the variance, z = that entry's distance from the mean in standard
    deviations) is far below half-precision rounding, which is where `choose` picks it.

    Args:
        x: `[..., width]`, any float dtype.
        gamma, beta: `[width]`.
        epsilon: added to the variance.
    """
    x = ops.cast(x, "float32")
    shifted = x - x[..., :1]
    mean = ops.mean(shifted, axis=-1, keepdims=True)
    variance = ops.maximum(ops.mean(ops.square(shifted), axis=-1, keepdims=True) - ops.square(mean), 0.0)
    return (shifted - mean) * ops.rsqrt(variance + epsilon) * ops.cast(gamma, "float32") + ops.cast(beta, "float32")


@ops.custom_gradient
def layer_norm_keeping_only_its_input(x, gamma, beta, epsilon):
    """`LayerNorm(x) * gamma + beta` (float32 arithmetic) whose backward pass keeps only `x`.

    Autodiff of LayerNorm keeps the centred and the normalised input for the backward pass: two more float32
    `[tokens, width]` arrays per LayerNorm. The closed-form gradient here recomputes them from x, kept in its own
    dtype (bfloat16 under mixed precision).

    Args:
        x: the input, normalised over its last axis.
        gamma: float32 `[width]` scale.
        beta: float32 `[width]` offset.
        epsilon: a float32 scalar tensor added to the variance.
    """

    def normalise(x):
        x = ops.cast(x, "float32")
        mean = ops.mean(x, axis=-1, keepdims=True)
        centred = x - mean
        rstd = ops.rsqrt(ops.mean(ops.square(centred), axis=-1, keepdims=True) + epsilon)
        return centred * rstd, rstd

    def grad(*args, upstream=None):
        upstream = ops.cast(backend.upstream_gradient(args, upstream), "float32")
        x_, upstream = backend.recompute_barrier(x, upstream)
        normalised, rstd = normalise(x_)
        rows = tuple(range(len(x.shape) - 1))
        d_normalised = upstream * gamma
        dx = rstd * (
            d_normalised
            - ops.mean(d_normalised, axis=-1, keepdims=True)
            - normalised * ops.mean(d_normalised * normalised, axis=-1, keepdims=True)
        )
        d_gamma, d_beta = ops.sum(upstream * normalised, axis=rows), ops.sum(upstream, axis=rows)
        return ops.cast(dx, x.dtype), d_gamma, d_beta, ops.zeros_like(epsilon)

    return normalise(x)[0] * gamma + beta, grad
