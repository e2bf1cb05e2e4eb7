"""The building blocks of every bert4x model. Each one is a serializable `keras.layers.Layer` using `keras.ops` only."""

from __future__ import annotations

import functools
import os

import keras
import numpy as np
from keras import ops

from bert4x import backend

__all__ = [
    "Embedding",
    "PositionEmbedding",
    "MultiHeadAttention",
    "FeedForward",
    "BiasAdd",
    "FirstToken",
    "AttentionMask",
    "LayerNormalization",
    "Dropout",
    "RemovePadding",
    "RestorePadding",
]

_PACKAGE = "bert4x"


def _initializer(value):
    return keras.initializers.get(value) if value is not None else backend.TruncatedNormal(stddev=0.02)


def tied_projection(hidden, table):
    """`hidden @ table.T` (logits over a `[vocab, dim]` embedding table), written as `(table @ hidden.T).T` so the
    table stays in its stored layout: inside a decoding loop XLA:CPU otherwise copies the transposed table on every
    step (BERT-base on tensorflow: 38 ms per token instead of 22)."""
    shape = ops.shape(hidden)
    rows = ops.reshape(hidden, (-1, shape[-1]))
    logits = ops.transpose(ops.matmul(table, ops.transpose(rows)))
    return ops.reshape(logits, tuple(shape[:-1]) + (ops.shape(table)[0],))


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Dropout(keras.layers.Dropout):
    """`keras.layers.Dropout` whose mask, on the jax backend, comes from a counter-based hash of (seed, position).

    Why: jax draws dropout bits with threefry, 20 rounds of 32-bit arithmetic per pair of words. The hash (one
    MurmurHash3 finaliser round of the Weyl-scrambled position, keyed by a seed from this layer's `seed_generator`, as
    in bert4x's fused attention) gives the same keep rate and a fresh mask at every call, and XLA computes it inside
    the fusion that applies it: on an H200, BERT-base fine-tuning at 32 x 512 spent 2.4 ms a step less on dropout and
    elementwise work (benchmarks/PROFILE.md). Its gradient is written once, behind an optimization barrier, so that
    XLA:GPU does not recompute the mask inside the matmuls that read it (+3% a step there). Other backends, and
    `noise_shape`, use Keras's own dropout.

    Example:
    >>> layer = Dropout(0.5, seed=1)
    >>> y = layer(keras.ops.ones((4, 8)), training=True)
    >>> sorted(set(keras.ops.convert_to_numpy(y).ravel().tolist())) in ([0.0, 2.0], [2.0])
    True
    """

    def draw_seed(self):
        """A fresh int32 seed from this layer's generator: what a hashed mask (here or in the fused attention) is keyed
        by, so every training call drops different entries."""
        return keras.random.randint((), 0, 2**31 - 1, seed=self.seed_generator, dtype="int32")

    def call(self, inputs, training=False):
        if not training or self.rate <= 0 or self.noise_shape is not None or keras.backend.backend() != "jax":
            return super().call(inputs, training=training)
        from bert4x.layers import flash_attention

        return flash_attention.hashed_dropout(inputs, self.draw_seed(), self.rate)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Embedding(keras.layers.Embedding):
    """A token embedding that can also be called in reverse, as the tied output projection of an LM head.

    `layer(ids)` looks rows up; `layer(hidden, mode="dense")` returns `hidden @ embeddings.T` (logits over the vocab).
    Tables of at most `SMALL_TABLE_ROWS` rows (segment embeddings) are read as a one-hot weighted sum, so that their
    gradient is a reduction rather than a scatter-add (ids outside the table then give zeros).

    Example:
    >>> emb = Embedding(10, 4)
    >>> emb(keras.ops.ones((2, 3), "int32")).shape, emb(keras.ops.ones((2, 3, 4)), mode="dense").shape
    ((2, 3, 4), (2, 3, 10))
    """

    # A scatter-add into a few rows that every token hits serialises on GPUs: BERT-base's 2-row segment table took
    # 27 of the 38 GPU-busy ms of a 32x128 fine-tuning step on an H200 (benchmarks/PROFILE.md). The one-hot sum is
    # exact in float32.
    SMALL_TABLE_ROWS = 16

    def add_weight(self, *args, **kwargs):
        # The table is not autocast: rows are gathered from float32 and then cast (Keras's Embedding.call casts its
        # output). Gathered from an autocast bfloat16 copy, the table's gradient is a bfloat16 scatter-add, in which
        # a token used more than 256 times in a batch stops adding up (4,096 uses of one id summed to 256).
        if kwargs.get("name") == "embeddings":
            kwargs.setdefault("autocast", False)
        return super().add_weight(*args, **kwargs)

    def call(self, inputs, mode: str = "embedding"):
        if mode == "dense":
            return tied_projection(inputs, ops.cast(self.embeddings, self.compute_dtype))
        if mode != "embedding":
            raise ValueError(f"Embedding mode must be 'embedding' or 'dense', got {mode!r}.")
        if self.input_dim <= self.SMALL_TABLE_ROWS:
            table = self.embeddings
            one_hot = ops.one_hot(ops.cast(inputs, "int32"), self.input_dim, dtype=table.dtype)
            rows = ops.sum(ops.expand_dims(one_hot, -1) * table, axis=-2)
            return ops.cast(rows, self.compute_dtype)
        return super().call(inputs)

    def compute_output_shape(self, input_shape, mode: str = "embedding"):
        if mode == "dense":
            return tuple(input_shape[:-1]) + (self.input_dim,)
        return super().compute_output_shape(input_shape)

    def compute_output_spec(self, inputs, mode: str = "embedding"):
        shape = self.compute_output_shape(inputs.shape, mode=mode)
        return keras.KerasTensor(shape, dtype=self.compute_dtype)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class PositionEmbedding(keras.layers.Layer):
    """Learned absolute positions: adds `embeddings[:length]` to a `[batch, length, dim]` input.

    Example:
    >>> PositionEmbedding(512, 8)(keras.ops.zeros((2, 5, 8))).shape
    (2, 5, 8)
    """

    def __init__(self, input_dim: int, output_dim: int, embeddings_initializer=None, **kwargs):
        super().__init__(**kwargs)
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.embeddings_initializer = _initializer(embeddings_initializer)

    def build(self, input_shape):
        if input_shape[-1] is not None and input_shape[-1] != self.output_dim:
            raise ValueError(f"{self.name}: input width {input_shape[-1]} != output_dim {self.output_dim}.")
        if input_shape[1] is not None and input_shape[1] > self.input_dim:
            raise ValueError(
                f"{self.name}: sequence length {input_shape[1]} exceeds the {self.input_dim} learned positions "
                "(max_position_embeddings); truncate the text (Tokenizer.encode(maxlen=...))."
            )
        self.embeddings = self.add_weight(
            name="embeddings", shape=(self.input_dim, self.output_dim), initializer=self.embeddings_initializer
        )

    def call(self, inputs):
        length = ops.shape(inputs)[1]
        table = ops.cast(self.embeddings[:length], inputs.dtype)
        return _add_positions(inputs, table)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            input_dim=self.input_dim,
            output_dim=self.output_dim,
            embeddings_initializer=keras.initializers.serialize(self.embeddings_initializer),
        )
        return config


@ops.custom_gradient
def _add_positions(inputs, table):
    # The table's gradient is the batch sum of the upstream gradient. Written as a reduction, XLA:GPU laid the whole
    # residual stream out batch-minor to make it cheap (BERT-base 32 x 512 on an H200), which turned every residual,
    # dropout and LayerNorm kernel into a transpose: 9% of the step. As a matmul with a row of ones it sets no layout.
    def grad(*args, upstream=None):
        upstream = backend.upstream_gradient(args, upstream)
        batch = ops.shape(upstream)[0]
        rows = ops.reshape(upstream, (batch, -1))
        return upstream, ops.reshape(ops.matmul(ops.ones((1, batch), upstream.dtype), rows), ops.shape(table))

    return inputs + ops.expand_dims(table, 0), grad


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MultiHeadAttention(keras.layers.Layer):
    """Multi-head attention with fused projections, masks, additive biases, rotary positions and a KV cache.

    Self-attention (`cross_attention=False`) projects q, k and v with one fused kernel `qkv`; cross-attention projects
    the query with `q` and keys/values from `key_value` with one fused kernel `kv`. Scores go through
    `keras.ops.dot_product_attention` (flash/cuDNN where the backend has it). In training on jax, attention keeps no
    `[batch, heads, q_len, k_len]` tensor for the backward pass (`bert4x.layers.flash_attention`: with dropout, fused
    Pallas kernels on NVIDIA GPUs, which read self-attention's q, k and v in place from the `qkv` projection; on CPU,
    a version that recomputes; `BERT4X_FUSED_ATTENTION=off` turns this off). Elsewhere, attention dropout takes the
    explicit softmax path.

    Call arguments:
        query: `[batch, q_len, dim]`.
        key_value: `[batch, k_len, dim]` for cross-attention. In self-attention, optional: the sequence, with
            `query` its first q_len positions (e.g. `[CLS]` alone). Keys and values come from the whole sequence,
            queries (and rotary angles and mask/bias rows) from those positions only.
        attention_mask: boolean, broadcastable to `[batch, heads, q_len, k_len]`; True = may attend.
        attention_bias: float, broadcastable to `[batch, heads, q_len, k_len]` (e.g. T5's relative position bias).
        rotary: `(cos, sin)`, each `[batch or 1, q_len, head_size // 2]`: RoPE applied to q and the new k.
        cache: `[batch, 2, cache_len, heads, head_size]` keys/values. With `cache_update_index` the new k/v are
            written at that index and attention runs over the whole cache; without it the cache is used as is
            (precomputed cross-attention keys/values). The layer then returns `(output, cache)`.
        padding_index: `(positions, slots)` from `RemovePadding`: `query` then holds only the non-padding tokens,
            `[tokens, dim]`. The projections run on those rows; attention (mask, bias, rotary) runs in the padded
            `[batch, len]` layout, with zero keys/values at padding (the mask hides them); returns `[tokens, out]`.
        skip_padded_queries: a promise that outputs at padded query positions (past each row's last visible key)
            are never read; the attention kernels then skip them (zeros there). Self-attention over a key-padding
            mask on jax GPUs in training; elsewhere ignored.

    Example:
    >>> mha = MultiHeadAttention(heads=2, head_size=4)
    >>> mha(keras.ops.ones((1, 3, 8))).shape
    (1, 3, 8)
    """

    def __init__(
        self,
        heads: int,
        head_size: int,
        out_dim: int | None = None,
        use_bias: bool = True,
        scaled: bool = True,
        attention_dropout: float = 0.0,
        cross_attention: bool = False,
        kernel_initializer=None,
        attention_type: str = "softmax",
        performer_features: int | None = None,
        performer_seed: int = 0,
        keynorm_scale: float = 1.0,
        keynorm_learnable_scale: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        # attention_type: 'softmax' | 'linear' | 'performer' | 'keynorm' (see bert4x.layers.attention_variants).
        _check_attention_type(attention_type, attention_dropout)
        self.attention_type = attention_type
        self.performer_features = performer_features
        self.performer_seed = performer_seed
        self.keynorm_scale = keynorm_scale
        self.keynorm_learnable_scale = keynorm_learnable_scale
        self.heads = heads
        self.head_size = head_size
        self.out_dim = out_dim
        self.use_bias = use_bias
        self.scaled = scaled
        self.attention_dropout = attention_dropout
        self.cross_attention = cross_attention
        self.kernel_initializer = _initializer(kernel_initializer)
        inner = heads * head_size
        dense = dict(use_bias=use_bias, kernel_initializer=self.kernel_initializer, dtype=self.dtype_policy)
        if cross_attention:
            self.q_dense = keras.layers.Dense(inner, name="q", **dense)
            self.kv_dense = keras.layers.Dense(2 * inner, name="kv", **dense)
        else:
            self.qkv_dense = keras.layers.Dense(3 * inner, name="qkv", **dense)
        self.dropout = Dropout(attention_dropout, dtype=self.dtype_policy)
        self.output_dense = None  # needs the input width unless out_dim is given: made in build()

    def build(self, query_shape, key_value_shape=None):
        if self.cross_attention:
            self.q_dense.build(query_shape)
            self.kv_dense.build(key_value_shape if key_value_shape is not None else query_shape)
        else:
            self.qkv_dense.build(query_shape)
        self.output_dense = keras.layers.Dense(
            self.out_dim or query_shape[-1],
            use_bias=self.use_bias,
            kernel_initializer=self.kernel_initializer,
            dtype=self.dtype_policy,
            name="output",
        )
        self.output_dense.build(tuple(query_shape[:-1]) + (self.heads * self.head_size,))
        self._build_attention_variant()

    def _build_attention_variant(self):
        if self.attention_type == "performer":
            from bert4x.layers import attention_variants as av

            features = self.performer_features or av.default_performer_features(self.head_size)
            self.performer_projection = self.add_weight(
                name="performer_projection", shape=(features, self.head_size),
                initializer=av.OrthogonalRandomFeatures(self.performer_seed), trainable=False,
            )
        elif self.attention_type == "keynorm" and self.keynorm_learnable_scale:
            self.keynorm_scale_weight = self.add_weight(
                name="keynorm_scale", shape=(self.heads, 1),
                initializer=keras.initializers.Constant(self.keynorm_scale),
            )

    def _split_heads(self, x, parts: int):
        shape = ops.shape(x)
        return ops.reshape(x, (shape[0], shape[1], parts, self.heads, self.head_size))

    def call(
        self,
        query,
        key_value=None,
        attention_mask=None,
        attention_bias=None,
        rotary=None,
        cache=None,
        cache_update_index=None,
        padding_index=None,
        skip_padded_queries=False,
        training=None,
    ):
        if padding_index is not None and (self.cross_attention or key_value is not None or cache is not None):
            raise ValueError(f"{self.name}: padding_index (tokens without padding) is for self-attention without "
                             "key_value or cache.")
        skip_padded_queries = skip_padded_queries and not self.cross_attention and key_value is None and cache is None
        precomputed_kv = cache is not None and cache_update_index is None
        packed_qkv = None
        query_rotary = rotary
        if self.cross_attention:
            q = self._split_heads(self.q_dense(query), 1)[:, :, 0]
            if precomputed_kv:
                k, v = cache[:, 0], cache[:, 1]
            else:
                kv = self._split_heads(self.kv_dense(query if key_value is None else key_value), 2)
                k, v = kv[:, :, 0], kv[:, :, 1]
        elif key_value is None:
            qkv = self.qkv_dense(query)
            if padding_index is not None and rotary is None and attention_bias is None and training:
                out = self._attend_tokens(qkv, padding_index[1], attention_mask)
                if out is not None:
                    return self.output_dense(out)
            if padding_index is not None:  # attention runs in the padded layout, zeros at padding (masked keys)
                qkv = _padded_from_tokens(qkv, *padding_index)
            qkv = self._split_heads(qkv, 3)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
            if rotary is None and cache is None:  # the fused kernels read q, k, v in place (jax training)
                packed_qkv = qkv
        else:
            if cache is not None:
                raise ValueError(f"{self.name}: self-attention takes either key_value (queries at its leading "
                                 "positions) or a cache, not both.")
            q, k, v = self._leading_queries_projections(query, key_value)
            leading = ops.shape(q)[1]
            attention_mask, attention_bias = (_leading_rows(t, leading) for t in (attention_mask, attention_bias))
            if rotary is not None:
                query_rotary = tuple(t[:, :leading] for t in rotary)
        if rotary is not None:
            q = backend.apply_rotary(q, *(ops.expand_dims(t, -2) for t in query_rotary))
            if not precomputed_kv:
                k = backend.apply_rotary(k, *(ops.expand_dims(t, -2) for t in rotary))
        if cache is not None and cache_update_index is not None:
            start = [0, 0, cache_update_index, 0, 0]
            cache = ops.slice_update(cache, start, ops.stack([k, v], axis=1))
            k, v = cache[:, 0], cache[:, 1]
        elif cache is not None and not precomputed_kv:
            cache = ops.stack([k, v], axis=1)
        out = self._attend(q, k, v, attention_mask, attention_bias, training, skip_padded_queries, packed_qkv)
        shape = ops.shape(out)
        out = ops.reshape(out, (shape[0], shape[1], self.heads * self.head_size))
        if padding_index is not None:
            out = _tokens_from_padded(out, *padding_index)
        out = self.output_dense(out)
        return (out, cache) if cache is not None else out

    def _leading_queries_projections(self, query, key_value):
        """q from `query`, k and v from `key_value`, through the slices of the fused `qkv` kernel (so the sequence's
        own queries are never computed)."""
        dense, inner = self.qkv_dense, self.heads * self.head_size
        if dense.quantization_mode is not None:  # a quantized kernel cannot be sliced: project both, keep the parts
            q = self._split_heads(dense(query), 3)[:, :, 0]
            kv = self._split_heads(dense(key_value), 3)[:, :, 1:]
        else:
            kernel = ops.cast(dense.kernel, self.compute_dtype)
            q, kv = ops.matmul(query, kernel[:, :inner]), ops.matmul(key_value, kernel[:, inner:])
            if dense.use_bias:
                bias = ops.cast(dense.bias, self.compute_dtype)
                q, kv = q + bias[:inner], kv + bias[inner:]
            q, kv = self._split_heads(q, 1)[:, :, 0], self._split_heads(kv, 2)
        return q, kv[:, :, 0], kv[:, :, 1]

    def _attend_tokens(self, qkv, slots, mask):
        """Training-time attention on the tokens without padding (`[tokens, 3 * width]`, rows one after another, as
        `RemovePadding` leaves them) in the fused kernels for that layout, or None where they do not apply."""
        if self.attention_type != "softmax" or not self.scaled or not _hides_keys_only(mask):
            return None
        tokens, (batch, length) = ops.shape(qkv)[0], ops.shape(slots)
        shape = (batch, length, self.heads, self.head_size)
        if _jax_training_implementation(shape, shape, qkv.dtype, self.attention_dropout, any_rate=True) != "pallas":
            return None
        from bert4x.layers import flash_attention

        lengths = ops.sum(ops.cast(ops.less(slots, tokens), "int32"), axis=1)
        seed = self.dropout.draw_seed() if self.attention_dropout > 0 else 0
        out = flash_attention.flash_varlen_self_attention(
            ops.reshape(qkv, (tokens, 3, self.heads, self.head_size)), lengths, seed, self.attention_dropout,
            backend.attention_scale(self.head_size), length,
            interpret=_kernel_mode("BERT4X_FUSED_ATTENTION", _FUSED_MODES) == "interpret")
        return ops.reshape(out, (tokens, self.heads * self.head_size))

    def _attend(self, q, k, v, mask, bias, training, skip_padded_queries: bool = False, packed_qkv=None):
        """`packed_qkv`: `[batch, len, 3, heads, head_size]` whose parts are q, k and v, when they are (self-attention
        without rotary positions or cache); the fused training kernels then read them in place."""
        scale = backend.attention_scale(self.head_size) if self.scaled else 1.0
        if self.attention_type != "softmax":
            q, k, scale, out = self._attend_variant(q, k, v, mask, bias)
            if out is not None:
                return out
            packed_qkv = None  # q and k were transformed: no longer the parts of qkv
        if bias is not None:
            bias = ops.cast(bias, q.dtype)
        if training and bias is None and isinstance(scale, float):
            out = _jax_training_attention(q, k, v, mask, scale, self.attention_dropout, self.dropout,
                                          skip_padded_queries, packed_qkv)
            if out is not None:
                return out
        if not (training and self.attention_dropout > 0):
            if bias is None and isinstance(scale, float):
                out = _fused_key_padding_attention(q, k, v, mask, scale)
                if out is not None:
                    return out
            return ops.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale)
        logits = ops.einsum("bqhd,bkhd->bhqk", q, k) * ops.cast(scale, q.dtype)
        if bias is not None:
            logits = logits + bias
        probs = self.dropout(backend.masked_softmax(logits, mask), training=training)
        return ops.einsum("bhqk,bkhd->bqhd", probs, v)

    def _attend_variant(self, q, k, v, mask, bias):
        """Linear/Performer attention -> (q, k, scale, output); KeyNorm -> (q * scale, k / |k|, 1, None)."""
        from bert4x.layers import attention_variants as av

        if self.attention_type == "keynorm":
            scale = self.keynorm_scale_weight if self.keynorm_learnable_scale else self.keynorm_scale
            return (*av.keynorm_inputs(q, k, scale), None)
        if bias is not None:
            raise ValueError(
                f"{self.name}: attention_type={self.attention_type!r} has no attention logits to add an "
                "attention_bias to; use 'softmax' or 'keynorm' attention with relative position biases."
            )
        if self.attention_type == "linear":
            out = av.linear_attention(q, k, v, mask=mask)
        else:
            out = av.performer_attention(q, k, v, self.performer_projection, mask=mask)
        return q, k, 1.0, out

    def compute_output_shape(self, query_shape, key_value_shape=None):
        return tuple(query_shape[:-1]) + (self.out_dim or query_shape[-1],)

    def get_config(self):
        config = super().get_config()
        config.update(
            heads=self.heads,
            head_size=self.head_size,
            out_dim=self.out_dim,
            use_bias=self.use_bias,
            scaled=self.scaled,
            attention_dropout=self.attention_dropout,
            cross_attention=self.cross_attention,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
        )
        if self.attention_type != "softmax":
            config.update(
                attention_type=self.attention_type,
                performer_features=self.performer_features,
                performer_seed=self.performer_seed,
                keynorm_scale=self.keynorm_scale,
                keynorm_learnable_scale=self.keynorm_learnable_scale,
            )
        return config


ATTENTION_TYPES = ("softmax", "linear", "performer", "keynorm")


def _check_attention_type(attention_type: str, attention_dropout: float) -> None:
    if attention_type not in ATTENTION_TYPES:
        raise ValueError(f"attention_type must be one of {ATTENTION_TYPES}, got {attention_type!r}.")
    if attention_type in ("linear", "performer") and attention_dropout:
        raise ValueError(
            f"attention_type={attention_type!r} forms no attention probabilities to drop out; "
            f"set attention_dropout (attention_dropout_rate / attention_probs_dropout_prob) to 0, got {attention_dropout}."
        )


def _leading_rows(mask_or_bias, rows):
    """The first `rows` query rows of a mask or bias broadcastable to `[batch, heads, q_len, k_len]`."""
    if mask_or_bias is None or len(mask_or_bias.shape) < 2:
        return mask_or_bias
    return mask_or_bias[..., :rows, :]


_PERMUTE_KEYS = []


def _jax_permute_keys():
    """`permute(x, order)` = x[b, order[b, i]] on axis 1, whose gradient is the inverse gather. (Autodiff of a gather
    would scatter-add instead: 0.66 ms per BERT-base 32x128 step on an H200, most of what the cuDNN kernels save.)"""
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


def _hides_keys_only(mask) -> bool:
    """True for no mask or a key-padding mask (`[batch or 1, 1, 1, k_len]`), the masks the fused paths take."""
    return mask is None or (len(mask.shape) == 4 and mask.shape[1] == 1 and mask.shape[2] == 1)


def _fused_key_padding_attention(q, k, v, mask, scale: float, implementation: str = "cudnn"):
    """cuDNN flash attention on jax GPUs for masks that only hide keys (`[batch or 1, 1, 1, k_len]`, i.e. padding).

    `keras.ops.dot_product_attention` turns such a mask into an additive bias, which cuDNN rejects (it wants one
    bias row per query), so jax falls back to unfused XLA attention. cuDNN's padding mode takes a count of valid keys
    per row instead. Kept keys are moved to the front (stable sort) before counting, which is exact for any key mask,
    not only right padding, since attention does not depend on the order of keys. Returns None where this does not
    apply (another backend, no GPU, float32, other masks, a shape cuDNN does not take): the caller falls back.
    `implementation="xla"` runs the same reordering through XLA (tests check it on CPU).
    """
    if keras.backend.backend() != "jax" or keras.backend.standardize_dtype(q.dtype) not in ("bfloat16", "float16"):
        return None
    if not _hides_keys_only(mask):
        return None
    import jax
    import jax.numpy as jnp

    if implementation == "cudnn" and jax.default_backend() != "gpu":
        return None
    try:
        if mask is None:
            return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation)
        keep = jnp.broadcast_to(mask[:, 0, 0, :], k.shape[:2])
        order = jnp.argsort(jnp.logical_not(keep), axis=-1, stable=True)
        permute = _jax_permute_keys()
        k, v = permute(k, order), permute(v, order)
        # A row with no visible key attends to its first key rather than dividing by zero.
        lengths = jnp.maximum(jnp.sum(keep, axis=-1, dtype=jnp.int32), 1)
        return jax.nn.dot_product_attention(
            q, k, v, scale=scale, key_value_seq_lengths=lengths, implementation=implementation
        )
    except Exception:  # noqa: BLE001 - cuDNN missing or refusing these shapes: the general path handles them
        return None


def _kernel_mode(variable: str, choices: tuple) -> str:
    """Environment switch `variable` (default "auto"): one of `choices`, else a ValueError naming the variable."""
    mode = os.environ.get(variable, "auto").lower()
    if mode not in choices:
        raise ValueError(f"{variable} must be one of {', '.join(repr(c) for c in choices)}, got {mode!r}.")
    return mode


_FUSED_MODES = ("auto", "recompute", "interpret", "off")


def _jax_training_implementation(q_shape, k_shape, dtype, rate: float, any_rate: bool = False) -> str | None:
    """The `bert4x.layers.flash_attention` implementation that jax training attention takes for these inputs
    ("pallas" or "recompute"), or None for the Keras/XLA path (see `_jax_training_attention`). `any_rate`: the
    Pallas kernels also without attention dropout (the token layout, which cuDNN does not take)."""
    mode = _kernel_mode("BERT4X_FUSED_ATTENTION", _FUSED_MODES)
    if keras.backend.backend() != "jax" or mode == "off" or keras.distribution.distribution() is not None:
        return None
    import jax

    from bert4x.layers import flash_attention

    half = keras.backend.standardize_dtype(dtype) in ("bfloat16", "float16")
    if mode == "interpret":
        implementation = "pallas"
    elif mode == "recompute" or jax.default_backend() != "gpu":
        implementation = "recompute"
    elif (rate > 0 or any_rate) and half:
        implementation = "pallas"
    else:
        return None  # GPUs: cuDNN without dropout, XLA in float32
    return implementation if flash_attention.supported(q_shape, k_shape, dtype, implementation) is None else None


def _jax_training_attention(q, k, v, mask, scale: float, rate: float, dropout_layer, skip_padded_queries=False,
                            packed_qkv=None):
    """Training-time attention on jax that keeps no `[batch, heads, q_len, k_len]` tensor for the backward pass
    (`bert4x.layers.flash_attention`), or None to fall back to the Keras/XLA path.

    `BERT4X_FUSED_ATTENTION` picks the implementation: `auto` (default: with attention dropout, the Pallas kernels on
    NVIDIA GPUs in float16/bfloat16; without it, GPUs keep the cuDNN path; on other devices, e.g. CPU, the
    recomputing XLA version, which saves memory), `recompute` (that version everywhere), `interpret` (the Pallas
    kernels through Pallas' interpreter, any device: how tests run them on CPU) or `off`. Only key-padding masks
    (`[batch or 1, 1, 1, k_len]`) are taken; not under a `keras.distribution` (the Pallas call is not sharded).
    `packed_qkv` (`[batch, len, 3, heads, head_size]`, whose parts are q, k, v) lets the Pallas kernels read them
    in place (`flash_self_attention`).
    """
    if not _hides_keys_only(mask):
        return None
    implementation = _jax_training_implementation(q.shape, k.shape, q.dtype, rate)
    if implementation is None:
        return None
    import jax.numpy as jnp

    from bert4x.layers import flash_attention

    mode = _kernel_mode("BERT4X_FUSED_ATTENTION", _FUSED_MODES)
    key_mask = None if mask is None else jnp.broadcast_to(mask[:, 0, 0, :].astype(bool), (k.shape[0], k.shape[1]))
    seed = dropout_layer.draw_seed() if rate > 0 else 0
    if packed_qkv is not None and implementation == "pallas":
        return flash_attention.flash_self_attention(
            packed_qkv, key_mask, seed, rate, scale, interpret=mode == "interpret",
            skip_padded_queries=skip_padded_queries)
    return flash_attention.flash_attention(
        q, k, v, key_mask, seed, rate, scale, interpret=mode == "interpret", implementation=implementation,
        skip_padded_queries=skip_padded_queries,
    )


@ops.custom_gradient
def _layer_norm_keeping_only_its_input(x, gamma, beta, epsilon):
    # Autodiff of LayerNorm keeps the centred and the normalised input for the backward pass: two more float32
    # [tokens, width] arrays per LayerNorm (25 in BERT-base). The closed-form gradient recomputes them from x, kept in
    # its own dtype (bfloat16 under mixed precision); the arithmetic is float32.
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


@keras.saving.register_keras_serializable(package=_PACKAGE)
class LayerNormalization(keras.layers.LayerNormalization):
    """Keras's `LayerNormalization` (same weights, config and float32 arithmetic) with faster jax paths.

    Over the last axis with both gamma and beta (BERT's LayerNorms), on jax:
    - on NVIDIA GPUs in training, forward and backward run as two Pallas kernels (`bert4x.layers.fused_layer_norm`):
      one pass over the activations each way instead of XLA's several (benchmarks/PROFILE.md). At inference XLA's
      own LayerNorm stays: it fuses with the neighbouring ops, and the kernels' gain is in the backward pass;
    - on CPU, the backward pass recomputes the normalised input from x instead of keeping two extra
      `[tokens, width]` float32 arrays per LayerNorm (BERT-base training at 8 x 128: 72 MiB less); on an H200 a first
      version of that cost 4% speed and 1 GiB at 32 x 512 (benchmarks/RESULTS.md).
    Elsewhere it runs Keras's. `BERT4X_FUSED_LAYER_NORM` picks: `auto` (default, as above), `interpret` (the kernels
    through Pallas' interpreter, any jax device: how tests run them on CPU) or `off` (Keras's everywhere).

    Example:
    >>> norm = LayerNormalization(epsilon=1e-12)
    >>> y = keras.ops.convert_to_numpy(norm(keras.ops.convert_to_tensor([[1.0, 2.0, 3.0, 6.0]])))
    >>> bool(abs(y.mean()) < 1e-6)
    True
    """

    def call(self, inputs, training=None):
        last_axis_only = list(self.axis) in ([-1], [len(inputs.shape) - 1])
        plain = self.scale and self.center and not getattr(self, "rms_scaling", False)
        path = _layer_norm_path(inputs.shape, bool(training)) if last_axis_only and plain else None
        if path is None:
            return super().call(inputs)
        gamma, beta = ops.cast(self.gamma, "float32"), ops.cast(self.beta, "float32")
        if path == "recompute":
            epsilon = ops.convert_to_tensor(self.epsilon, "float32")
            y = _layer_norm_keeping_only_its_input(inputs, gamma, beta, epsilon)
        else:
            from bert4x.layers import fused_layer_norm

            y = fused_layer_norm.layer_norm(inputs, gamma, beta, self.epsilon, interpret=path == "interpret")
        return ops.cast(y, self.compute_dtype)


def _layer_norm_path(shape, training: bool) -> str | None:
    """"kernels", "interpret", "recompute" or None (Keras's LayerNorm); see `LayerNormalization`."""
    mode = _kernel_mode("BERT4X_FUSED_LAYER_NORM", ("auto", "interpret", "off"))
    if keras.backend.backend() != "jax" or mode == "off":
        return None
    import jax

    from bert4x.layers import fused_layer_norm

    kernels_fit = (training and fused_layer_norm.supported(tuple(shape)) is None
                   and keras.distribution.distribution() is None)
    if mode == "interpret":
        return "interpret" if kernels_fit else None
    if jax.default_backend() == "gpu":
        return "kernels" if kernels_fit else None
    return "recompute" if backend.on_jax_cpu() else None


@functools.cache
def _activation_then_projection(activation, rate: float):
    """`dropout(activation(hidden)) @ kernel + bias` on jax, whose backward pass recomputes the activation and the
    dropout mask from `hidden` and the seed, after the incoming gradient arrives, instead of keeping them."""
    import jax

    from bert4x.layers import flash_attention

    def forward(hidden, kernel, bias, seed):
        x = activation(hidden)
        if rate > 0:
            x = flash_attention.hashed_dropout(x, seed, rate)
        return ops.matmul(x, kernel) + bias

    @jax.custom_vjp
    def project(hidden, kernel, bias, seed):
        return forward(hidden, kernel, bias, seed)

    def project_forward(hidden, kernel, bias, seed):
        return forward(hidden, kernel, bias, seed), (hidden, kernel, bias, seed)

    def project_backward(saved, upstream):
        hidden, kernel, bias, seed = saved
        (hidden, seed), upstream = backend.recompute_barrier((hidden, seed), upstream)  # what is recomputed from
        _, pullback = jax.vjp(lambda h, k, b: forward(h, k, b, seed), hidden, kernel, bias)
        return (*pullback(upstream), np.zeros(seed.shape, jax.dtypes.float0))

    project.defvjp(project_forward, project_backward)
    return project


@keras.saving.register_keras_serializable(package=_PACKAGE)
class FeedForward(keras.layers.Layer):
    """Position-wise feed-forward: `output(act(inner(x)))`, or gated `output(act(inner(x)) * gate(x))`.

    The gated form is T5.1.1's gated-GELU (`wi_0` = inner, `wi_1` = gate, `wo` = output). In training on jax's CPU
    backend the ungated form recomputes `dropout(act(inner(x)))` in the backward pass (from `inner(x)` and the dropout
    seed) instead of keeping it for the output projection's weight gradient: the same gradients, one
    `[tokens, units]` array a layer less of host memory.

    Example:
    >>> FeedForward(16, activation="gelu")(keras.ops.ones((2, 3, 8))).shape
    (2, 3, 8)
    """

    def __init__(
        self,
        units: int,
        activation: str = "gelu",
        gated: bool = False,
        use_bias: bool = True,
        dropout_rate: float = 0.0,
        kernel_initializer=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.units = units
        self.activation = backend.canonical_activation(activation)
        self.gated = gated
        self.use_bias = use_bias
        self.dropout_rate = dropout_rate
        self.kernel_initializer = _initializer(kernel_initializer)
        dense = dict(use_bias=use_bias, kernel_initializer=self.kernel_initializer, dtype=self.dtype_policy)
        self.inner_dense = keras.layers.Dense(units, name="inner", **dense)
        self.gate_dense = keras.layers.Dense(units, name="gate", **dense) if gated else None
        self.dropout = Dropout(dropout_rate, dtype=self.dtype_policy)
        self.output_dense = None  # its width is the input's: made in build()
        self._act = backend.get_activation(self.activation)

    def build(self, input_shape):
        self.inner_dense.build(input_shape)
        if self.gate_dense is not None:
            self.gate_dense.build(input_shape)
        self.output_dense = keras.layers.Dense(
            input_shape[-1],
            use_bias=self.use_bias,
            kernel_initializer=self.kernel_initializer,
            dtype=self.dtype_policy,
            name="output",
        )
        self.output_dense.build(tuple(input_shape[:-1]) + (self.units,))

    def call(self, inputs, training=None):
        hidden = self.inner_dense(inputs)
        if training and self._recomputes_activation():
            return self._output_recomputing_activation(hidden)
        x = self._act(hidden)
        if self.gate_dense is not None:
            x = x * self.gate_dense(inputs)
        return self.output_dense(self.dropout(x, training=training))

    def _recomputes_activation(self) -> bool:
        # In training on jax CPU. Autodiff keeps act(inner(x)), which the output projection's weight gradient reads,
        # next to inner(x), which the activation's gradient reads: recomputing the first from the second keeps one
        # [tokens, units] array a layer less (132 MiB for BERT-base at 8 x 128) for one more activation a layer.
        dense = self.output_dense
        return (self.gate_dense is None and backend.on_jax_cpu() and dense.quantization_mode is None
                and not dense.lora_enabled and self.dropout.noise_shape is None)

    def _output_recomputing_activation(self, hidden):
        rate = self.dropout.rate
        seed = self.dropout.draw_seed() if rate > 0 else ops.zeros((), "int32")  # drawn once: recomputed masks match
        dense = self.output_dense
        kernel = ops.cast(dense.kernel, hidden.dtype)
        bias = ops.zeros((), hidden.dtype) if dense.bias is None else ops.cast(dense.bias, hidden.dtype)
        return _activation_then_projection(self._act, float(rate))(hidden, kernel, bias, seed)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            units=self.units,
            activation=self.activation,
            gated=self.gated,
            use_bias=self.use_bias,
            dropout_rate=self.dropout_rate,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
        )
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class BiasAdd(keras.layers.Layer):
    """Adds a learned bias over the last axis (the MLM output bias).

    Example:
    >>> BiasAdd()(keras.ops.zeros((2, 5))).shape
    (2, 5)
    """

    def build(self, input_shape):
        self.bias = self.add_weight(name="bias", shape=(input_shape[-1],), initializer="zeros")

    def call(self, inputs):
        return inputs + ops.cast(self.bias, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape


@ops.custom_gradient
def _first_token_kept(inputs):
    # The gradient of a slice is a pad; XLA:GPU fused that pad into the last LayerNorm's backward reduction as one
    # 0.5 ms kernel (BERT-base 32 x 512, H200). Written as a product with a one-hot column it fuses like any other.
    def grad(*args, upstream=None):
        upstream = backend.upstream_gradient(args, upstream)
        first = ops.cast(ops.arange(ops.shape(inputs)[1]) == 0, upstream.dtype)
        return upstream * ops.expand_dims(first, -1)

    return inputs[:, :1], grad


def _first_token(inputs, keepdims: bool = False):
    first = _first_token_kept(inputs)
    # Indexing, not squeeze: tensorflow's custom gradient drops the static length 1, and squeeze then refuses it.
    return first if keepdims else first[:, 0]


@keras.saving.register_keras_serializable(package=_PACKAGE)
class FirstToken(keras.layers.Layer):
    """Takes the hidden state of the first ([CLS]) token: `[batch, length, dim] -> [batch, dim]`
    (`[batch, 1, dim]` with `keepdims=True`).

    Example:
    >>> FirstToken()(keras.ops.ones((2, 5, 8))).shape
    (2, 8)
    >>> FirstToken(keepdims=True)(keras.ops.ones((2, 5, 8))).shape
    (2, 1, 8)
    """

    def __init__(self, keepdims: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.keepdims = keepdims

    def call(self, inputs):
        return _first_token(inputs, self.keepdims)

    def compute_output_shape(self, input_shape):
        if self.keepdims:
            return (input_shape[0], 1, input_shape[2])
        return (input_shape[0], input_shape[2])

    def get_config(self):
        config = super().get_config()
        config.update(keepdims=self.keepdims)
        return config


def _gather_padded(tokens, slots):
    """`[n, dim]` rows -> `[batch, len, dim]` in the layout of `slots` (`n` = a zero row, at padding)."""
    rows = ops.concatenate([tokens, ops.zeros((1, ops.shape(tokens)[-1]), tokens.dtype)], axis=0)
    return ops.take(rows, slots, axis=0)


def _gather_tokens(x, positions):
    """`[batch, len, dim]` -> its rows at the flat `positions`, `[n, dim]`."""
    return ops.take(ops.reshape(x, (-1, ops.shape(x)[-1])), positions, axis=0)


def _gather_with_inverse_gradient(x, gather, inverse):
    """`gather(x)` whose gradient is `inverse(upstream)`. Between the token and padded layouts every row lands in
    exactly one place, so the gradient is the inverse gather, not autodiff's scatter-add (which tensorflow runs as a
    slow segment sum on CPU). On jax, where RemovePadding keeps every position, plain autodiff does."""
    if keras.backend.backend() == "jax":
        return gather(x)

    @ops.custom_gradient
    def gathered(t):
        def grad(*args, upstream=None):
            return inverse(backend.upstream_gradient(args, upstream))

        return gather(t), grad

    return gathered(x)


def _padded_from_tokens(tokens, positions, slots):
    return _gather_with_inverse_gradient(tokens, lambda t: _gather_padded(t, slots),
                                         lambda g: _gather_tokens(g, positions))


def _tokens_from_padded(x, positions, slots):
    return _gather_with_inverse_gradient(x, lambda t: _gather_tokens(t, positions),
                                         lambda g: ops.reshape(_gather_padded(g, slots), ops.shape(x)))


def _lists_the_real_tokens(positions, keep, slots):
    """Whether `positions` (`[capacity]`, -1 for unused slots) is `packing_positions`' list for the flat mask `keep`:
    slot i < (number of real tokens) holds the real position whose slot (`slots`, flat: `capacity` at padding) is i,
    and every later slot -1. A scalar bool, computed on the device."""
    listed = positions >= 0
    index = ops.arange(ops.shape(positions)[0], dtype="int32")
    prefix = ops.all(ops.equal(listed, index < ops.sum(ops.cast(keep, "int32"))))
    in_place = ops.all(ops.logical_or(ops.logical_not(listed), ops.take(slots, ops.maximum(positions, 0)) == index))
    return ops.logical_and(prefix, in_place)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class RemovePadding(keras.layers.Layer):
    """Keeps the non-padding tokens: `[batch, len, dim]` and token ids -> `(tokens, positions, slots)`.

    `tokens` is `[n, dim]`, the rows whose token id is not `pad_id`, in order; `positions` (`[n]`) their flat
    index in `batch * len`; `slots` (`[batch, len]`) each position's row in `tokens`, or `n` at padding.
    Position-wise layers (dense, LayerNorm, dropout, feed-forward) then skip padding altogether;
    `MultiHeadAttention(padding_index=(positions, slots))` attends in the padded layout and `RestorePadding` brings
    the sequence back, with zeros at padding.

    `n` depends on the data, which tensorflow and torch handle (tensorflow's XLA pads it back to its bound: the same
    results, without the saving). jax compiles with static shapes: there every position is kept, unless `packing`
    (`[batch, capacity / batch]`, from `bert4x.snippets.packing_positions`) gives the positions on the host; then
    `tokens` has `capacity` rows, the real tokens and then copies of a padding position, which nothing reads. A
    `packing` that is not this batch's list (too small a capacity, another batch's positions) makes `tokens` NaN: a
    compiled step cannot raise, and nothing is computed from a partial or wrong list.

    Example:
    >>> ids = keras.ops.convert_to_tensor([[5, 6, 0], [7, 0, 0]])
    >>> tokens, positions, slots = RemovePadding()(keras.ops.ones((2, 3, 4)), ids)
    >>> tuple(slots.shape), tokens.shape[-1]
    ((2, 3), 4)
    """

    def __init__(self, pad_id: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.pad_id = pad_id

    def call(self, inputs, token_ids, packing=None):
        shape = ops.shape(token_ids)
        if keras.backend.backend() == "jax" and packing is not None:
            return self._packed(inputs, token_ids, packing)
        if keras.backend.backend() == "jax":  # static shapes: keep every position
            positions = ops.arange(shape[0] * shape[1], dtype="int32")
            return ops.reshape(inputs, (-1, ops.shape(inputs)[-1])), positions, ops.reshape(positions, shape)
        keep = ops.reshape(ops.not_equal(token_ids, self.pad_id), (-1,))
        positions = ops.cast(ops.nonzero(keep)[0], "int32")
        slots = _slots(keep, shape, padding_slot=ops.shape(positions)[0])
        return _tokens_from_padded(inputs, positions, slots), positions, slots

    def _packed(self, inputs, token_ids, packing):
        keep = ops.reshape(ops.not_equal(token_ids, self.pad_id), (-1,))
        given = ops.reshape(ops.cast(packing, "int32"), (-1,))
        capacity = ops.shape(given)[0]
        # Unused slots take a padding position (there is one whenever the capacity exceeds the real tokens).
        positions = ops.where(given >= 0, given, ops.cast(ops.argmin(ops.cast(keep, "int32")), "int32"))
        slots = _slots(keep, ops.shape(token_ids), padding_slot=capacity)
        tokens = _tokens_from_padded(inputs, positions, slots)
        wrong = ops.logical_not(_lists_the_real_tokens(given, keep, ops.reshape(slots, (-1,))))
        return ops.where(wrong, ops.cast(float("nan"), tokens.dtype), tokens), positions, ops.cast(slots, "int32")

    def compute_output_spec(self, inputs, token_ids, packing=None):
        return (keras.KerasTensor((None, inputs.shape[-1]), dtype=inputs.dtype),
                keras.KerasTensor((None,), dtype="int32"),
                keras.KerasTensor(tuple(token_ids.shape), dtype="int32"))

    def get_config(self):
        config = super().get_config()
        config.update(pad_id=self.pad_id)
        return config


def _slots(keep, shape, padding_slot):
    """Each position's row among the kept tokens (`keep`, flat, in order), `padding_slot` at padding; as `shape`."""
    return ops.reshape(ops.where(keep, ops.cumsum(ops.cast(keep, "int32")) - 1, padding_slot), shape)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class RestorePadding(keras.layers.Layer):
    """The inverse of `RemovePadding`: `[n, dim]` tokens, positions, slots -> `[batch, len, dim]`, zeros at padding.

    Example:
    >>> ids = keras.ops.convert_to_tensor([[5, 6, 0]])
    >>> tokens, positions, slots = RemovePadding()(keras.ops.ones((1, 3, 2)), ids)
    >>> RestorePadding()(tokens, positions, slots).shape
    (1, 3, 2)
    """

    def call(self, tokens, positions, slots):
        return _padded_from_tokens(tokens, positions, slots)

    def compute_output_shape(self, tokens_shape, positions_shape, slots_shape):
        return tuple(slots_shape) + (tokens_shape[-1],)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class AttentionMask(keras.layers.Layer):
    """Builds the boolean attention mask of an application from token (and segment) ids.

    Modes: 'encoder' (bidirectional; padding keys hidden, `[batch, 1, 1, len]`), 'lm' (causal, `[batch, 1, len, len]`)
    and 'unilm' (UniLM seq2seq: with c = cumsum(segment_ids), i sees j iff c[j] <= c[i]). Token id `pad_id` is padding.

    Example:
    >>> ids = keras.ops.convert_to_tensor([[5, 6, 7, 0]])
    >>> AttentionMask("lm")(ids).shape
    (1, 1, 4, 4)
    """

    MODES = ("encoder", "lm", "unilm")

    def __init__(self, mode: str = "encoder", pad_id: int = 0, **kwargs):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(f"AttentionMask mode must be one of {self.MODES}, got {mode!r}.")
        self.mode = mode
        self.pad_id = pad_id

    def call(self, token_ids, segment_ids=None):
        mask = backend.padding_mask(token_ids, self.pad_id)
        if self.mode == "lm":
            length = ops.shape(token_ids)[1]
            mask = ops.logical_and(mask, backend.causal_mask(length))
        elif self.mode == "unilm":
            if segment_ids is None:
                raise ValueError("AttentionMask('unilm') needs segment_ids: 0 for the source, 1 for the target.")
            mask = ops.logical_and(mask, backend.unilm_mask(segment_ids))
        if self.mode != "encoder":
            # A left-padded row would see no key at all (NaN on some backends); let it see itself. Real rows are unchanged.
            length = ops.shape(token_ids)[1]
            mask = ops.logical_or(mask, ops.expand_dims(ops.expand_dims(ops.eye(length, dtype="bool"), 0), 0))
        return mask

    def compute_output_spec(self, token_ids, segment_ids=None):
        batch, length = token_ids.shape[0], token_ids.shape[1]
        query = 1 if self.mode == "encoder" else length
        return keras.KerasTensor((batch, 1, query, length), dtype="bool")

    def get_config(self):
        config = super().get_config()
        config.update(mode=self.mode, pad_id=self.pad_id)
        return config
