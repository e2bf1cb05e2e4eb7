"""One seam for attention: an ordered table of implementations, and the function every attention layer calls.

`attention(q, k, v, ...)` describes its inputs as an `AttentionSpec` (backend, device, dtype, shapes, mask kind,
dropout, training, distribution, the additive terms present, `bert4x.config` switches) and walks `IMPLEMENTATIONS` in
order: each entry's `supports(spec)` answers None (it runs) or a short reason it refuses, and the first that takes
the spec runs. The last entry, XLA with an explicit softmax and dropout, takes every softmax input. `choose(spec)`
gives the decision without running anything, and `explain(model)` (`bert4x.kernels.explain`) reports it for every
attention layer of a model.

What attention computes, with q, k, v `[batch, len, heads, head_size]`:

    scores[b, h, i, j] = scale * (q_i . k_j + q_i . a_K[i, j]) + bias[b, h, i, j] + residual[b, h, i, j]
    p = dropout(softmax_j(scores where mask, else -inf))
    out_i = sum_j p_ij v_j + sum_j p_ij a_V[i, j]

`a_K` / `a_V` (`relative_keys` / `relative_values`, `[q_len, k_len, head_size]`) are relative-position terms on keys
and values (NEZHA), `bias` an additive score bias broadcastable to `[batch, heads, q_len, k_len]` (T5's buckets) and
`residual` the previous layer's scores (RealFormer), of which `return_scores=True` returns the new ones (the pre-softmax
`scores`, before the mask) for the next layer.

Example:
>>> q = keras.ops.ones((1, 4, 2, 8))
>>> attention(q, q, q).shape
(1, 4, 2, 8)
>>> choose(AttentionSpec(backend="tensorflow", platform="cpu", dtype="float32", batch=1, q_len=4, k_len=4,
...                      heads=2, head_size=8)).name
'dot_product_attention'
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import keras
from keras import ops

from bert4x import backend, config
from bert4x.kernels import layout, variants

__all__ = ["AttentionSpec", "Implementation", "Choice", "IMPLEMENTATIONS", "attention", "choose", "make_spec",
           "implementation_names", "key_padding_attention"]

HALF_DTYPES = ("bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Everything the choice of an attention implementation depends on.

    Args:
        backend: the Keras backend ('tensorflow', 'jax', 'torch').
        platform: the device kind the backend computes on ('cpu', 'gpu', 'tpu').
        dtype: the compute dtype of q, k and v.
        batch: batch size (None if unknown).
        q_len: query length (None if unknown).
        k_len: key length (None if unknown).
        heads: number of heads.
        head_size: size of each head of q and k.
        value_head_size: size of each head of v when it differs from `head_size` (`attention_key_size`), else None.
        layout: 'padded' (`[batch, len, heads, head_size]`) or 'tokens' (rows without padding, one after another).
        mask: 'none', 'keys' (a key-padding mask, `[batch or 1, 1, 1, k_len]`) or 'full' (one row per query).
        dropout_rate: attention dropout rate.
        training: whether the call is a training call.
        distributed: whether a `keras.distribution` is set.
        variant: 'softmax', 'keynorm', 'linear' or 'performer' (`MultiHeadAttention(attention_type=...)`), or
            'softmax_plus' / 'squared_relu' (`GatedAttentionUnit(normalization=...)`).
        bias: an additive score bias is present.
        relative_keys: relative-position terms on keys are present.
        relative_values: relative-position terms on values are present.
        residual_scores: residual (previous layer's) scores are added.
        return_scores: the caller wants the pre-softmax scores back.
        packed_qkv: q, k and v are the parts of one packed `[..., 3, heads, head_size]` projection.
        skip_padded_queries: outputs at padded queries are never read (kernels may skip them).
        fused_attention: `bert4x.config.fused_attention()` when the spec was made.
        preferred: `bert4x.config.attention_implementation()` when the spec was made.
    """

    backend: str
    platform: str
    dtype: str
    batch: int | None
    q_len: int | None
    k_len: int | None
    heads: int
    head_size: int
    value_head_size: int | None = None
    layout: str = "padded"
    mask: str = "none"
    dropout_rate: float = 0.0
    training: bool = False
    distributed: bool = False
    variant: str = "softmax"
    bias: bool = False
    relative_keys: bool = False
    relative_values: bool = False
    residual_scores: bool = False
    return_scores: bool = False
    packed_qkv: bool = False
    skip_padded_queries: bool = False
    fused_attention: str = "auto"
    preferred: str | None = None

    def terms(self) -> list[str]:
        """The additive terms and extra outputs present, in words."""
        named = (("bias", "an attention bias"), ("relative_keys", "relative positions on keys"),
                 ("relative_values", "relative positions on values"), ("residual_scores", "residual scores"),
                 ("return_scores", "returning the scores"))
        return [words for field, words in named if getattr(self, field)]

    def __str__(self) -> str:
        values = "" if self.value_head_size is None else f", values {self.heads}x{self.value_head_size}"
        shape = f"[{self.batch}, {self.q_len}->{self.k_len}, {self.heads}x{self.head_size}{values}]"
        parts = [f"{self.backend}/{self.platform}", self.dtype, shape, f"mask={self.mask}"]
        if self.layout != "padded":
            parts.append(f"layout={self.layout}")
        if self.dropout_rate:
            parts.append(f"dropout={self.dropout_rate:g}")
        if self.variant != "softmax":
            parts.append(self.variant)
        parts.extend(self.terms())
        return ", ".join(parts)


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One entry of the table.

    Args:
        name: short name (what `bert4x.config.set_attention_implementation` takes).
        description: one line on what it runs.
        supports: `supports(spec)` -> None if it takes the spec, else the reason it refuses.
        run: `run(inputs)` -> `(output, scores or None)`, with `inputs` an `_Inputs`.
        layouts: the layouts it runs in; any other is gathered into the padded layout first.
    """

    name: str
    description: str
    supports: Callable[[AttentionSpec], str | None]
    run: Callable
    layouts: tuple = ("padded",)


@dataclasses.dataclass(frozen=True)
class Choice:
    """What `choose` decided: the implementation, why each earlier entry refused, and whether the inputs are gathered
    into the padded layout first."""

    implementation: Implementation
    refusals: tuple
    gathered: bool = False

    @property
    def name(self) -> str:
        return self.implementation.name

    def __str__(self) -> str:
        lines = [self.name + (" (after gathering the tokens into the padded layout)" if self.gathered else "")]
        # Entries for another attention_type are left out of the printout (they stay in `refusals`).
        lines.extend(f"  {name} refused: {reason}" for name, reason in self.refusals
                     if not reason.startswith("attention_type is "))
        return "\n".join(lines)


@dataclasses.dataclass
class _Inputs:
    q: object
    k: object
    v: object
    mask: object = None
    bias: object = None
    scale: float = 1.0
    dropout: object = None
    training: bool = False
    relative_keys: object = None
    relative_values: object = None
    residual_scores: object = None
    return_scores: bool = False
    packed_qkv: object = None
    padding: tuple | None = None
    skip_padded_queries: bool = False
    performer_projection: object = None
    variant: str = "softmax"
    min_length: int = 16

    @property
    def rate(self) -> float:
        """The attention dropout rate of this call: 0 at inference."""
        return float(self.dropout.rate) if self.dropout is not None and self.training else 0.0

    def seed(self):
        return self.dropout.draw_seed() if self.rate > 0 else 0


# ------------------------------------------------------------------ supports(spec)


def _quadratic_variant(spec: AttentionSpec) -> str | None:
    if spec.variant in ("linear", "performer"):
        return f"attention_type={spec.variant!r} forms no softmax over scores"
    if spec.variant in variants.NORMALIZED_VARIANTS:
        return f"attention_type={spec.variant!r} normalises the scores by the number of visible keys"
    return None


def _no_terms(spec: AttentionSpec) -> str | None:
    terms = spec.terms()
    return f"cannot add {', '.join(terms)}" if terms else None


def _one_head_size(spec: AttentionSpec) -> str | None:
    if spec.value_head_size is not None and spec.value_head_size != spec.head_size:
        return (f"takes one head size for q, k and v (q/k heads are {spec.head_size} wide, v heads "
                f"{spec.value_head_size}: attention_key_size)")
    return None


def _jax_training_kernels(spec: AttentionSpec) -> str | None:
    """Refusals shared by the jax training kernels (Pallas and the recomputing version)."""
    if spec.backend == "jax" and not spec.training:
        return "training only (at inference nothing is kept for a backward pass)"
    return _jax_kernels(spec)


def _jax_kernels(spec: AttentionSpec) -> str | None:
    """Refusals shared by bert4x's own jax kernels, in training and at inference."""
    if spec.backend != "jax":
        return f"jax only (backend is {spec.backend})"
    if spec.fused_attention == "off":
        return "bert4x.config.fused_attention() is 'off'"
    if spec.distributed:
        return "not under a keras.distribution (the kernel call is not sharded)"
    if spec.mask == "full":
        return "the mask has one row per query; takes key-padding masks only"
    return _quadratic_variant(spec) or _no_terms(spec) or _one_head_size(spec)


def _pallas_mode(spec: AttentionSpec, any_rate: bool) -> str | None:
    """Refusals of the Pallas kernels from the mode, device and dtype."""
    mode = spec.fused_attention
    if mode == "recompute":
        return "bert4x.config.fused_attention() is 'recompute'"
    if mode == "interpret":
        return None
    if spec.platform != "gpu":
        return f"NVIDIA GPUs only (device is {spec.platform})"
    if spec.dtype not in HALF_DTYPES:
        return f"float16/bfloat16 only (dtype is {spec.dtype}; XLA or cuDNN runs float32)"
    if not any_rate and spec.dropout_rate <= 0:
        return "no attention dropout: cuDNN runs it"
    return None


def _kernel_shapes(spec: AttentionSpec, implementation: str) -> str | None:
    if spec.q_len is None or spec.k_len is None:
        return "sequence length unknown (decided when the step is traced)"
    from bert4x.kernels import flash_attention

    shape = (spec.batch or 1, spec.q_len, spec.heads, spec.head_size)
    k_shape = (spec.batch or 1, spec.k_len, spec.heads, spec.head_size)
    return flash_attention.supported(shape, k_shape, spec.dtype, implementation)


def _supports_pallas_tokens(spec: AttentionSpec) -> str | None:
    if spec.layout != "tokens":
        return "hidden states keep their padding (remove_padding is off)"
    if spec.variant != "softmax":
        return f"attention_type={spec.variant!r}"
    if not spec.packed_qkv:
        return _one_head_size(spec) or ("q, k and v are not the parts of one projection (rotary positions or a "
                                        "cache transform them)")
    # At inference too: the alternative gathers q, k and v into the padded layout and scatters the output back.
    return _jax_kernels(spec) or _pallas_mode(spec, any_rate=True) or _kernel_shapes(spec, "pallas")


def _supports_pallas(spec: AttentionSpec) -> str | None:
    return _jax_training_kernels(spec) or _pallas_mode(spec, any_rate=False) or _kernel_shapes(spec, "pallas")


def _supports_recompute(spec: AttentionSpec) -> str | None:
    refusal = _jax_training_kernels(spec)
    if refusal:
        return refusal
    if spec.fused_attention == "interpret":
        return "bert4x.config.fused_attention() is 'interpret' (the Pallas kernels only)"
    if spec.fused_attention == "auto" and spec.platform == "gpu":
        return "on GPUs the Pallas kernels or cuDNN run"
    if spec.q_len is not None and spec.k_len is not None:
        return _kernel_shapes(spec, "recompute")
    return None


def _dropout_in_training(spec: AttentionSpec, who: str) -> str | None:
    if spec.training and spec.dropout_rate > 0:
        return f"attention dropout in training ({who} has no dropout)"
    return None


def _supports_cudnn(spec: AttentionSpec) -> str | None:
    if spec.backend != "jax":
        return f"jax only (backend is {spec.backend})"
    if spec.platform != "gpu":
        return f"NVIDIA GPUs only (device is {spec.platform})"
    if spec.dtype not in HALF_DTYPES:
        return f"float16/bfloat16 only (dtype is {spec.dtype})"
    if spec.mask == "full":
        return "the mask has one row per query; cuDNN's padding mode takes key-padding masks only"
    return (_dropout_in_training(spec, "cuDNN") or _quadratic_variant(spec) or _no_terms(spec)
            or _one_head_size(spec))


def _supports_dot_product_attention(spec: AttentionSpec) -> str | None:
    refusal = (_dropout_in_training(spec, "keras.ops.dot_product_attention") or _quadratic_variant(spec)
               or _one_head_size(spec))
    if refusal:
        return refusal
    others = [t for t in spec.terms() if t != "an attention bias"]
    return f"cannot add {', '.join(others)}" if others else None


def _supports_xla(spec: AttentionSpec) -> str | None:
    return _quadratic_variant(spec)


def _supports_kernel_variant(name: str):
    def supports(spec: AttentionSpec) -> str | None:
        if spec.variant != name:
            return f"attention_type is {spec.variant!r}"
        terms = spec.terms()
        if terms:
            return (f"{name} attention forms no attention scores to add an attention_bias or other terms to "
                    f"({', '.join(terms)}); use 'softmax' or 'keynorm' attention")
        return None

    return supports


def _supports_normalized_scores(spec: AttentionSpec) -> str | None:
    if spec.variant not in variants.NORMALIZED_VARIANTS:
        return f"attention_type is {spec.variant!r}"
    return _no_terms(spec)


# ------------------------------------------------------------------ run(inputs)


def _run_pallas(x: _Inputs):
    from bert4x.kernels import flash_attention

    interpret = config.fused_attention() == "interpret"
    key_mask = _key_mask(x.mask, x.k)
    if x.packed_qkv is not None:
        out = flash_attention.flash_self_attention(x.packed_qkv, key_mask, x.seed(), x.rate, x.scale,
                                                   interpret=interpret, skip_padded_queries=x.skip_padded_queries)
    else:
        out = flash_attention.flash_attention(x.q, x.k, x.v, key_mask, x.seed(), x.rate, x.scale, interpret=interpret,
                                              skip_padded_queries=x.skip_padded_queries)
    return out, None


def _run_recompute(x: _Inputs):
    from bert4x.kernels import flash_attention

    out = flash_attention.flash_attention(x.q, x.k, x.v, _key_mask(x.mask, x.k), x.seed(), x.rate, x.scale,
                                          implementation="recompute", skip_padded_queries=x.skip_padded_queries)
    return out, None


def _run_pallas_tokens(x: _Inputs):
    from bert4x.kernels import flash_varlen

    positions, slots = x.padding
    tokens, heads, head_size = ops.shape(x.packed_qkv)[0], x.packed_qkv.shape[2], x.packed_qkv.shape[3]
    lengths = ops.sum(ops.cast(ops.less(slots, tokens), "int32"), axis=1)
    out = flash_varlen.flash_varlen_self_attention(
        x.packed_qkv, lengths, x.seed(), x.rate, x.scale, ops.shape(slots)[1],
        interpret=config.fused_attention() == "interpret")
    return ops.reshape(out, (tokens, heads, head_size)), None


def _key_mask(mask, k):
    """`[batch, k_len]` booleans of a key-padding mask `[batch or 1, 1, 1, k_len]`, or None."""
    if mask is None:
        return None
    return ops.broadcast_to(ops.cast(mask[:, 0, 0, :], "bool"), (ops.shape(k)[0], ops.shape(k)[1]))


_PERMUTE_KEYS = []


def _jax_permute_keys():
    """`permute(x, order)` = x[b, order[b, i]] on axis 1, whose gradient is the inverse gather (autodiff of a
    gather would scatter-add instead, which is slow on GPUs)."""
    if not _PERMUTE_KEYS:
        import jax
        import jax.numpy as jnp

        def gather(x, order):
            return jnp.take_along_axis(x, order[:, :, None, None], axis=1)

        @jax.custom_vjp
        def permute(x, order):
            return gather(x, order)

        def forward(x, order):
            return gather(x, order), jnp.argsort(order, axis=-1)

        def backward(inverse, grad):
            return gather(grad, inverse), None

        permute.defvjp(forward, backward)
        _PERMUTE_KEYS.append(permute)
    return _PERMUTE_KEYS[0]


def key_padding_attention(q, k, v, mask, scale: float, implementation: str = "cudnn"):
    """jax's flash attention (`jax.nn.dot_product_attention`) for masks that only hide keys, or None if it fails.

    `keras.ops.dot_product_attention` turns such a mask into an additive bias, which cuDNN rejects (it wants one bias
    row per query), so jax would fall back to unfused XLA attention. cuDNN's padding mode takes a count of valid keys
    per row instead. Kept keys are moved to the front (stable sort) before counting, which is exact for any key mask,
    not only right padding, since attention does not depend on the order of keys.

    Args:
        q, k, v: `[batch, len, heads, head_size]` jax arrays.
        mask: None or booleans `[batch or 1, 1, 1, k_len]`.
        scale: the score scale.
        implementation: 'cudnn', or 'xla' (the same reordering through XLA: how tests check it on CPU).
    """
    import jax
    import jax.numpy as jnp

    try:
        if mask is None:
            return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation)
        if not (len(mask.shape) == 4 and mask.shape[1] == 1 and mask.shape[2] == 1):
            return None
        keep = jnp.broadcast_to(mask[:, 0, 0, :], k.shape[:2])
        order = jnp.argsort(jnp.logical_not(keep), axis=-1, stable=True)
        permute = _jax_permute_keys()
        k, v = permute(k, order), permute(v, order)
        # A row with no visible key attends to its first key rather than dividing by zero.
        lengths = jnp.maximum(jnp.sum(keep, axis=-1, dtype=jnp.int32), 1)
        return jax.nn.dot_product_attention(
            q, k, v, scale=scale, key_value_seq_lengths=lengths, implementation=implementation
        )
    except Exception:  # noqa: BLE001 - cuDNN missing or refusing these shapes: the next entry runs
        return None


def _run_cudnn(x: _Inputs):
    out = key_padding_attention(x.q, x.k, x.v, x.mask, x.scale)
    if out is None:  # cuDNN refused at trace time (a shape it does not take): the next entry in the table
        return _run_dot_product_attention(x)
    return out, None


def _run_dot_product_attention(x: _Inputs):
    bias = None if x.bias is None else ops.cast(x.bias, x.q.dtype)
    return ops.dot_product_attention(x.q, x.k, x.v, bias=bias, mask=x.mask, scale=x.scale), None


def _run_xla(x: _Inputs):
    q = x.q
    logits = ops.einsum("bqhd,bkhd->bhqk", q, x.k)
    if x.relative_keys is not None:
        logits = logits + ops.einsum("bqhd,qkd->bhqk", q, ops.cast(x.relative_keys, q.dtype))
    logits = logits * ops.cast(x.scale, q.dtype)
    if x.bias is not None:
        logits = logits + ops.cast(x.bias, q.dtype)
    if x.residual_scores is not None:
        logits = logits + ops.cast(x.residual_scores, q.dtype)
    probs = backend.masked_softmax(logits, x.mask)
    if x.dropout is not None:
        probs = x.dropout(probs, training=x.training)
    out = ops.einsum("bhqk,bkhd->bqhd", probs, x.v)
    if x.relative_values is not None:
        out = out + ops.einsum("bhqk,qkd->bqhd", probs, ops.cast(x.relative_values, probs.dtype))
    return out, (logits if x.return_scores else None)


def _run_linear(x: _Inputs):
    return variants.linear_attention(x.q, x.k, x.v, mask=x.mask), None


def _run_performer(x: _Inputs):
    return variants.performer_attention(x.q, x.k, x.v, x.performer_projection, mask=x.mask), None


def _run_normalized_scores(x: _Inputs):
    out = variants.normalized_scores_attention(x.q, x.k, x.v, x.variant, mask=x.mask, scale=x.scale,
                                               dropout=x.dropout, training=x.training, min_length=x.min_length)
    return out, None


IMPLEMENTATIONS: tuple[Implementation, ...] = (
    Implementation("linear", "linear attention, phi(x) = elu(x) + 1 (bert4x.kernels.variants)",
                   _supports_kernel_variant("linear"), _run_linear),
    Implementation("performer", "Performer FAVOR+ random features (bert4x.kernels.variants)",
                   _supports_kernel_variant("performer"), _run_performer),
    Implementation("normalized_scores", "explicit scores under softmax_plus or squared_relu (bert4x.kernels.variants)",
                   _supports_normalized_scores, _run_normalized_scores),
    Implementation("pallas_tokens", "fused Pallas kernels on the rows without padding (flash_varlen)",
                   _supports_pallas_tokens, _run_pallas_tokens, layouts=("tokens",)),
    Implementation("pallas", "fused Pallas kernels with dropout inside (flash_attention)", _supports_pallas,
                   _run_pallas),
    Implementation("recompute", "XLA attention whose backward pass recomputes the probabilities", _supports_recompute,
                   _run_recompute),
    Implementation("cudnn", "jax.nn.dot_product_attention (cuDNN) with a key-length count", _supports_cudnn,
                   _run_cudnn),
    Implementation("dot_product_attention", "keras.ops.dot_product_attention", _supports_dot_product_attention,
                   _run_dot_product_attention),
    Implementation("xla", "explicit scores, softmax and dropout (takes every term)", _supports_xla, _run_xla),
)


def implementation_names() -> tuple[str, ...]:
    """The names of `IMPLEMENTATIONS`, in the order they are tried."""
    return tuple(entry.name for entry in IMPLEMENTATIONS)


def choose(spec: AttentionSpec) -> Choice:
    """The implementation that runs `spec` and why each one tried before it refused.

    `spec.preferred` (`bert4x.config.attention_implementation()`) is tried first; then the table in order. A spec in
    the token layout that no token-layout entry takes runs in the padded layout (the inputs are gathered first).

    Args:
        spec: the inputs, as `make_spec` describes them.

    Raises:
        ValueError: no implementation takes the spec (every reason is listed).
    """
    entries = list(IMPLEMENTATIONS)
    if spec.preferred is not None:
        preferred = [e for e in entries if e.name == spec.preferred]
        if not preferred:
            raise ValueError(f"bert4x.config.attention_implementation() is {spec.preferred!r}, which is not one of "
                             f"{implementation_names()}.")
        entries = preferred + [e for e in entries if e.name != spec.preferred]
    refusals = []
    for entry in entries:
        gathered = spec.layout == "tokens" and "tokens" not in entry.layouts
        reason = entry.supports(dataclasses.replace(spec, layout="padded") if gathered else spec)
        if reason is None:
            return Choice(entry, tuple(refusals), gathered)
        refusals.append((entry.name, reason))
    raise ValueError("No attention implementation takes these inputs (" + str(spec) + "):\n"
                     + "\n".join(f"  {name}: {reason}" for name, reason in refusals))


@functools.cache
def _platform(backend_name: str) -> str:
    if backend_name == "jax":
        import jax

        return jax.default_backend()
    if backend_name == "torch":
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    try:
        return "gpu" if keras.distribution.list_devices("gpu") else "cpu"
    except (AttributeError, NotImplementedError, RuntimeError, ValueError):
        return "cpu"


def _distributed() -> bool:
    try:
        return keras.distribution.distribution() is not None
    except (AttributeError, NotImplementedError):  # a backend without keras.distribution
        return False


def mask_kind(mask_shape) -> str:
    """'none', 'keys' (`[batch or 1, 1, 1, k_len]`: hides keys only) or 'full' for a mask of this shape (or None)."""
    if mask_shape is None:
        return "none"
    if len(mask_shape) == 4 and mask_shape[1] == 1 and mask_shape[2] == 1:
        return "keys"
    return "full"


def make_spec(q_shape, k_shape, dtype, *, mask_shape=None, dropout_rate: float = 0.0, training: bool = False,
              layout: str = "padded", variant: str = "softmax", value_head_size: int | None = None,
              **terms) -> AttentionSpec:
    """An `AttentionSpec` for the current backend, device, distribution and `bert4x.config`.

    Args:
        q_shape: `[batch, q_len, heads, head_size]` (dims may be None).
        k_shape: `[batch, k_len, heads, head_size]`.
        dtype: the compute dtype.
        mask_shape: the boolean mask's shape, or None.
        value_head_size: the head size of v when it differs from q's and k's, else None.
        dropout_rate: attention dropout rate.
        training: whether this is a training call.
        layout: 'padded' or 'tokens'.
        variant: 'softmax', 'keynorm', 'linear' or 'performer'.
        **terms: boolean `AttentionSpec` fields (bias, relative_keys, relative_values, residual_scores,
            return_scores, packed_qkv, skip_padded_queries).
    """
    name = keras.backend.backend()
    return AttentionSpec(
        backend=name, platform=_platform(name), dtype=keras.backend.standardize_dtype(dtype),
        batch=q_shape[0], q_len=q_shape[1], k_len=k_shape[1], heads=q_shape[2], head_size=q_shape[3],
        value_head_size=value_head_size if value_head_size != q_shape[3] else None,
        layout=layout, mask=mask_kind(mask_shape), dropout_rate=float(dropout_rate), training=bool(training),
        distributed=_distributed(), variant=variant,
        fused_attention=config.fused_attention(), preferred=config.attention_implementation(),
        **{field: bool(value) for field, value in terms.items()},
    )


def _static(shape) -> tuple:
    return tuple(d if isinstance(d, int) else None for d in shape)


def attention(
    q,
    k,
    v,
    *,
    mask=None,
    bias=None,
    scale: float | None = None,
    dropout=None,
    training: bool = False,
    relative_keys=None,
    relative_values=None,
    residual_scores=None,
    return_scores: bool = False,
    packed_qkv=None,
    padding: tuple | None = None,
    skip_padded_queries: bool = False,
    variant: str = "softmax",
    keynorm_scale=1.0,
    performer_projection=None,
    softmax_plus_min_length: int = 16,
):
    """Attention over q, k and v by the first implementation of `IMPLEMENTATIONS` that takes them.

    Args:
        q: `[batch, q_len, heads, head_size]` (`[tokens, heads, head_size]` with `padding`).
        k: `[batch, k_len, heads, head_size]` (likewise).
        v: as k, with its own head size when q and k have another (`attention_key_size`).
        mask: booleans broadcastable to `[batch, heads, q_len, k_len]`, True = may attend; or None.
        bias: float scores bias broadcastable to `[batch, heads, q_len, k_len]` (T5's relative positions).
        scale: score scale; `1 / sqrt(head_size)` when None.
        dropout: a `bert4x.layers.Dropout` (its `rate`, `draw_seed()` and call) for attention dropout, or None.
        training: whether this is a training call (dropout applies).
        relative_keys: `[q_len, k_len, head_size]`: adds `q_i . a_K[i, j]` to the scores before scaling.
        relative_values: `[q_len, k_len, head_size]`: adds `sum_j p_ij a_V[i, j]` to the output.
        residual_scores: `[batch, heads, q_len, k_len]`: the previous layer's scores, added to these.
        return_scores: also return the scores (after every term, before the mask): `(output, scores)`.
        packed_qkv: `[batch, len, 3, heads, head_size]` (`[tokens, 3, heads, head_size]` with `padding`) whose parts
            are q, k and v, when they are: the fused kernels then read them in place.
        padding: `(positions, slots)` from `bert4x.layers.RemovePadding`: q, k and v are in the token layout (rows
            without padding); mask, bias and terms stay in the padded layout. The output is in the token layout.
        skip_padded_queries: outputs at queries past each row's last visible key are never read (kernels may skip
            them and give zeros there).
        variant: 'softmax', 'keynorm' (q and k are transformed, then softmax), 'linear', 'performer', or the
            gated attention unit's normalisations 'softmax_plus' and 'squared_relu'
            (`bert4x.kernels.variants.normalized_scores_attention`; v may then be wider than q and k).
        keynorm_scale: KeyNorm's scale (a float, or a tensor broadcastable to `[heads, 1]`).
        performer_projection: `[features, head_size]` Performer random features.
        softmax_plus_min_length: 'softmax_plus' scales the scores by `log(max(visible keys, this)) / log(512)`.

    Returns:
        `[batch, q_len, heads, head_size]` (or the token layout), and the scores if `return_scores`.

    Example:
    >>> x = keras.ops.ones((2, 3, 2, 4))
    >>> out, scores = attention(x, x, x, bias=keras.ops.zeros((1, 2, 3, 3)), return_scores=True)
    >>> tuple(out.shape), tuple(scores.shape)
    ((2, 3, 2, 4), (2, 2, 3, 3))
    """
    head_size = q.shape[-1]
    if scale is None:
        scale = backend.attention_scale(head_size)
    if variant == "keynorm":
        q, k, scale = variants.keynorm_inputs(q, k, keynorm_scale)
        packed_qkv = None  # q and k were transformed: no longer the parts of the projection
    if padding is not None:
        batch_and_len = _static(padding[1].shape)
        q_shape = batch_and_len + _static(q.shape[-2:])
        k_shape = q_shape
    else:
        q_shape, k_shape = _static(q.shape), _static(k.shape)
    rate = float(dropout.rate) if dropout is not None else 0.0
    spec = make_spec(
        q_shape, k_shape, q.dtype, mask_shape=None if mask is None else tuple(mask.shape), dropout_rate=rate,
        training=training, layout="tokens" if padding is not None else "padded", variant=variant,
        bias=bias is not None, relative_keys=relative_keys is not None, relative_values=relative_values is not None,
        residual_scores=residual_scores is not None, return_scores=return_scores, packed_qkv=packed_qkv is not None,
        skip_padded_queries=skip_padded_queries, value_head_size=_static(v.shape)[-1],
    )
    choice = choose(spec)
    inputs = _Inputs(q, k, v, mask, bias, float(scale) if isinstance(scale, (int, float)) else scale, dropout,
                     bool(training), relative_keys, relative_values, residual_scores, return_scores, packed_qkv,
                     padding, skip_padded_queries, performer_projection, variant, softmax_plus_min_length)
    if choice.gathered:  # token layout -> padded, run, and back
        positions, slots = padding
        if packed_qkv is not None:
            packed = layout.padded_from_tokens(packed_qkv, positions, slots)
            inputs.packed_qkv, inputs.q, inputs.k, inputs.v = packed, packed[:, :, 0], packed[:, :, 1], packed[:, :, 2]
        else:
            inputs.q, inputs.k, inputs.v = (layout.padded_from_tokens(t, positions, slots) for t in (q, k, v))
        inputs.padding = None
    out, scores = choice.implementation.run(inputs)
    if choice.gathered:
        out = layout.tokens_from_padded(out, *padding)
    return (out, scores) if return_scores else out
