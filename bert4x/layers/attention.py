"""Multi-head attention (what is computed: projections, rotary positions, caches) and the attention masks of an
application. How the attention itself runs is `bert4x.kernels.attention`'s choice."""

from __future__ import annotations

import keras
from keras import ops

from bert4x import backend, kernels
from bert4x.kernels import layout, variants
from bert4x.layers._common import PACKAGE, initializer
from bert4x.layers.attention_variants import OrthogonalRandomFeatures
from bert4x.layers.dropout import Dropout

__all__ = ["MultiHeadAttention", "AttentionMask", "ATTENTION_TYPES"]


@keras.saving.register_keras_serializable(package=PACKAGE)
class MultiHeadAttention(keras.layers.Layer):
    """Multi-head attention with fused projections, masks, additive biases, rotary positions and a KV cache.

    Self-attention (`cross_attention=False`) projects q, k and v with one fused kernel `qkv`; cross-attention projects
    the query with `q` and keys/values from `key_value` with one fused kernel `kv`. Attention itself runs in
    `bert4x.kernels.attention`, which picks an implementation (fused Pallas kernels, cuDNN,
    `keras.ops.dot_product_attention`, XLA, ...) for the inputs; `bert4x.kernels.explain(model)` tells which, and
    `bert4x.config` holds the switches. The output carries the query's Keras mask.

    Args:
        heads: number of heads.
        head_size: size of each head of the values (and of the queries and keys unless `key_size` is given).
        out_dim: width of the output (the query's width when None).
        use_bias: whether the projections have biases.
        scaled: scale the scores by `1 / sqrt(key_size)` (T5 does not).
        attention_dropout: dropout rate on the attention probabilities.
        cross_attention: keys and values come from `key_value` through their own projection `kv`.
        kernel_initializer: initializer of the projections (truncated normal, stddev 0.02, when None).
        attention_type: 'softmax', 'linear', 'performer' or 'keynorm' (`bert4x.layers.attention_variants`).
        performer_features: Performer's number of random features (`d log d` when None).
        performer_seed: seed of Performer's random features.
        keynorm_scale: KeyNorm's score scale (its initial value when learnable).
        keynorm_learnable_scale: learn one KeyNorm scale per head.
        key_size: size of each head of the queries and keys (bert4keras's `attention_key_size`); `head_size` when
            None. The fused projection then holds `heads * key_size` query and key units and `heads * head_size`
            value units.
        **kwargs: `keras.layers.Layer` arguments.

    Call arguments:
        query: `[batch, q_len, dim]`.
        key_value: `[batch, k_len, dim]` for cross-attention. In self-attention, optional: the sequence, with
            `query` its first q_len positions (e.g. `[CLS]` alone). Keys and values come from the whole sequence,
            queries (and rotary angles and mask/bias rows) from those positions only.
        attention_mask: boolean, broadcastable to `[batch, heads, q_len, k_len]`; True = may attend.
        attention_bias: float, broadcastable to `[batch, heads, q_len, k_len]` (e.g. T5's relative position bias).
        rotary: `(cos, sin)`, each `[batch or 1, q_len, key_size // 2]`: RoPE applied to q and the new k.
        cache: `[batch, 2, cache_len, heads, head_size]` keys/values. With `cache_update_index` the new k/v are
            written at that index and attention runs over the whole cache; without it the cache is used as is
            (precomputed cross-attention keys/values). The layer then returns `(output, cache)`. Not with a
            `key_size` other than `head_size` (keys and values are stacked in one tensor).
        padding_index: `(positions, slots)` from `RemovePadding`: `query` then holds only the non-padding tokens,
            `[tokens, dim]`. The projections run on those rows; attention (mask, bias, rotary) runs in the padded
            `[batch, len]` layout, with zero keys/values at padding (the mask hides them); returns `[tokens, out]`.
        skip_padded_queries: a promise that outputs at padded query positions (past each row's last visible key)
            are never read; the attention kernels then skip them (zeros there). Self-attention over a key-padding
            mask on jax GPUs in training; elsewhere ignored.
        relative_keys: `[q_len, k_len, key_size]`: relative positions on keys, `q_i . a_K[i, j]` added to the
            scores before scaling (NEZHA).
        relative_values: `[q_len, k_len, head_size]`: relative positions on values, `sum_j p_ij a_V[i, j]` added to
            the output (NEZHA).
        residual_scores: `[batch, heads, q_len, k_len]`: the previous layer's scores, added to these (RealFormer).
        return_scores: also return this layer's pre-softmax scores: `(output, scores)` (or
            `(output, cache, scores)` with a cache).

    Example:
    >>> mha = MultiHeadAttention(heads=2, head_size=4)
    >>> mha(keras.ops.ones((1, 3, 8))).shape
    (1, 3, 8)
    >>> narrow_keys = MultiHeadAttention(heads=2, head_size=4, key_size=2)  # q/k 2x2 wide, v 2x4
    >>> narrow_keys(keras.ops.ones((1, 3, 8))).shape
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
        key_size: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if key_size is not None and (isinstance(key_size, bool) or not isinstance(key_size, int) or key_size <= 0):
            raise ValueError(f"key_size must be a positive integer (or None for head_size), got {key_size!r}.")
        _check_attention_type(attention_type, attention_dropout)
        self.attention_type = attention_type
        self.performer_features = performer_features
        self.performer_seed = performer_seed
        self.keynorm_scale = keynorm_scale
        self.keynorm_learnable_scale = keynorm_learnable_scale
        self.heads = heads
        self.head_size = head_size
        self.key_size = key_size or head_size
        self.out_dim = out_dim
        self.use_bias = use_bias
        self.scaled = scaled
        self.attention_dropout = attention_dropout
        self.cross_attention = cross_attention
        self.kernel_initializer = initializer(kernel_initializer)
        key_inner, value_inner = heads * self.key_size, heads * head_size
        dense = dict(use_bias=use_bias, kernel_initializer=self.kernel_initializer, dtype=self.dtype_policy)
        if cross_attention:
            self.q_dense = keras.layers.Dense(key_inner, name="q", **dense)
            self.kv_dense = keras.layers.Dense(key_inner + value_inner, name="kv", **dense)
        else:
            self.qkv_dense = keras.layers.Dense(2 * key_inner + value_inner, name="qkv", **dense)
        self.dropout = Dropout(attention_dropout, dtype=self.dtype_policy)
        self.output_dense = None  # needs the input width unless out_dim is given: made in build()
        self.supports_masking = True

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
            features = self.performer_features or variants.default_performer_features(self.key_size)
            self.performer_projection = self.add_weight(
                name="performer_projection", shape=(features, self.key_size),
                initializer=OrthogonalRandomFeatures(self.performer_seed), trainable=False,
            )
        elif self.attention_type == "keynorm" and self.keynorm_learnable_scale:
            self.keynorm_scale_weight = self.add_weight(
                name="keynorm_scale", shape=(self.heads, 1),
                initializer=keras.initializers.Constant(self.keynorm_scale),
            )

    def _split_heads(self, x, parts: int):
        """`[..., parts * heads * head_size]` -> `[..., parts, heads, head_size]` (one head size for all parts)."""
        shape = ops.shape(x)
        return ops.reshape(x, tuple(shape[:-1]) + (parts, self.heads, self.head_size))

    def _split_projection(self, x, parts: str):
        """The heads of a fused projection `x` whose last axis holds `parts` ('qkv', 'q' or 'kv') one after another:
        q and k `[..., heads, key_size]`, v `[..., heads, head_size]`."""
        shape, out, start = ops.shape(x), [], 0
        for part in parts:
            size = self.head_size if part == "v" else self.key_size
            width = self.heads * size
            out.append(ops.reshape(x[..., start:start + width], tuple(shape[:-1]) + (self.heads, size)))
            start += width
        return out

    @property
    def equal_head_sizes(self) -> bool:
        """Whether queries, keys and values share one head size (`key_size == head_size`)."""
        return self.key_size == self.head_size

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
        relative_keys=None,
        relative_values=None,
        residual_scores=None,
        return_scores=False,
        training=None,
    ):
        self._check_call(key_value, cache, padding_index)
        skip_padded_queries = self._skips_padded_queries(skip_padded_queries, key_value, cache)
        precomputed_kv = cache is not None and cache_update_index is None
        packed_qkv = None
        query_rotary = rotary
        if self.cross_attention:
            (q,) = self._split_projection(self.q_dense(query), "q")
            if precomputed_kv:
                k, v = cache[:, 0], cache[:, 1]
            else:
                k, v = self._split_projection(self.kv_dense(query if key_value is None else key_value), "kv")
        elif key_value is None:
            if self.equal_head_sizes:
                qkv = self._split_heads(self.qkv_dense(query), 3)  # [batch, len, 3, ...] or, unpadded, [n, 3, ...]
                q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
                if rotary is None and cache is None:  # the fused kernels read q, k, v in place
                    packed_qkv = qkv
            else:  # q/k and v heads of different sizes: no packed layout
                q, k, v = self._split_projection(self.qkv_dense(query), "qkv")
            if rotary is not None and padding_index is not None:  # rotary angles of each token
                query_rotary = rotary = tuple(layout.gather_tokens(t, padding_index[0], ops.shape(padding_index[1]))
                                              for t in rotary)
        else:
            q, k, v = self._leading_queries_projections(query, key_value)
            leading = ops.shape(q)[1]
            attention_mask, attention_bias, residual_scores = (
                _leading_rows(t, leading) for t in (attention_mask, attention_bias, residual_scores))
            relative_keys, relative_values = (None if t is None else t[:leading] for t in (relative_keys,
                                                                                          relative_values))
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
        out = kernels.attention(
            q, k, v, mask=attention_mask, bias=attention_bias, scale=self._scale(), dropout=self.dropout,
            training=bool(training), relative_keys=relative_keys, relative_values=relative_values,
            residual_scores=residual_scores, return_scores=return_scores, packed_qkv=packed_qkv,
            padding=padding_index, skip_padded_queries=skip_padded_queries, **self._variant_arguments(),
        )
        out, scores = out if return_scores else (out, None)
        shape = ops.shape(out)
        out = self.output_dense(ops.reshape(out, tuple(shape[:-2]) + (self.heads * self.head_size,)))
        results = (out,) + ((cache,) if cache is not None else ()) + ((scores,) if return_scores else ())
        return results if len(results) > 1 else out

    def _check_call(self, key_value, cache, padding_index):
        if padding_index is not None and (self.cross_attention or key_value is not None or cache is not None):
            raise ValueError(f"{self.name}: padding_index (tokens without padding) is for self-attention without "
                             "key_value or cache.")
        if not self.cross_attention and key_value is not None and cache is not None:
            raise ValueError(f"{self.name}: self-attention takes either key_value (queries at its leading "
                             "positions) or a cache, not both.")
        if cache is not None and not self.equal_head_sizes:
            raise ValueError(f"{self.name}: a cache stacks keys and values in one tensor, so it needs key_size "
                             f"({self.key_size}) equal to head_size ({self.head_size}).")

    def _skips_padded_queries(self, skip_padded_queries, key_value, cache) -> bool:
        return bool(skip_padded_queries) and not self.cross_attention and key_value is None and cache is None

    def _scale(self) -> float:
        return backend.attention_scale(self.key_size) if self.scaled else 1.0

    def _variant_arguments(self) -> dict:
        if self.attention_type == "keynorm":
            scale = self.keynorm_scale_weight if self.keynorm_learnable_scale else self.keynorm_scale
            return {"variant": "keynorm", "keynorm_scale": scale}
        if self.attention_type == "performer":
            return {"variant": "performer", "performer_projection": self.performer_projection}
        return {"variant": self.attention_type}

    def kernel_spec(self, query, key_value=None, attention_mask=None, attention_bias=None, rotary=None, cache=None,
                    cache_update_index=None, padding_index=None, skip_padded_queries=False, relative_keys=None,
                    relative_values=None, residual_scores=None, return_scores=False, training=False,
                    sequence_length: int | None = None, batch_size: int | None = None) -> kernels.AttentionSpec:
        """The `bert4x.kernels.AttentionSpec` of a call with these arguments (tensors or symbolic tensors: only their
        shapes are read), as `call` hands it to `bert4x.kernels.attention`. What `bert4x.kernels.explain` reports.

        Args:
            query, key_value, attention_mask, attention_bias, rotary, cache, cache_update_index, padding_index,
                skip_padded_queries, relative_keys, relative_values, residual_scores, return_scores, training:
                as in `call`.
            sequence_length: the length assumed where the shapes leave it unknown.
            batch_size: the batch size assumed where the shapes leave it unknown.
        """
        def known(value, default):
            return value if isinstance(value, int) else default

        if padding_index is not None:
            batch, length = padding_index[1].shape
            q_len = k_len = known(length, sequence_length)
        else:
            batch, q_len = query.shape[0], known(query.shape[1], sequence_length)
            k_len = q_len
            if key_value is not None:
                k_len = known(key_value.shape[1], sequence_length)
            if cache is not None:
                k_len = known(cache.shape[2], sequence_length)
        mask_shape = None if attention_mask is None else tuple(attention_mask.shape)
        if mask_shape is not None and key_value is not None and not self.cross_attention:
            mask_shape = mask_shape[:2] + (min(mask_shape[2] or 1, q_len or 1),) + mask_shape[3:]
        shape = (known(batch, batch_size), q_len, self.heads, self.key_size)
        variant = self._variant_arguments()["variant"]
        packed = (not self.cross_attention and key_value is None and rotary is None and cache is None
                  and variant == "softmax" and self.equal_head_sizes)
        return kernels.make_spec(
            shape, shape[:1] + (k_len,) + shape[2:], self.compute_dtype, mask_shape=mask_shape,
            value_head_size=None if self.equal_head_sizes else self.head_size,
            dropout_rate=self.attention_dropout, training=training,
            layout="tokens" if padding_index is not None else "padded", variant=variant,
            bias=attention_bias is not None, relative_keys=relative_keys is not None,
            relative_values=relative_values is not None, residual_scores=residual_scores is not None,
            return_scores=return_scores, packed_qkv=packed,
            skip_padded_queries=self._skips_padded_queries(skip_padded_queries, key_value, cache),
        )

    def _leading_queries_projections(self, query, key_value):
        """q from `query`, k and v from `key_value`, through the slices of the fused `qkv` kernel (so the sequence's
        own queries are never computed)."""
        dense, inner = self.qkv_dense, self.heads * self.key_size
        if dense.quantization_mode is not None:  # a quantized kernel cannot be sliced: project both, keep the parts
            q = self._split_projection(dense(query), "qkv")[0]
            k, v = self._split_projection(dense(key_value), "qkv")[1:]
            return q, k, v
        kernel = ops.cast(dense.kernel, self.compute_dtype)
        q, kv = ops.matmul(query, kernel[:, :inner]), ops.matmul(key_value, kernel[:, inner:])
        if dense.use_bias:
            bias = ops.cast(dense.bias, self.compute_dtype)
            q, kv = q + bias[:inner], kv + bias[inner:]
        (q,), (k, v) = self._split_projection(q, "q"), self._split_projection(kv, "kv")
        return q, k, v

    def compute_output_spec(self, query, key_value=None, attention_mask=None, attention_bias=None, rotary=None,
                            cache=None, cache_update_index=None, padding_index=None, skip_padded_queries=False,
                            relative_keys=None, relative_values=None, residual_scores=None, return_scores=False,
                            training=None):
        out = keras.KerasTensor(self.compute_output_shape(query.shape), dtype=self.compute_dtype)
        results = [out]
        if cache is not None:
            results.append(keras.KerasTensor(cache.shape, dtype=cache.dtype))
        if return_scores:
            k_len = key_value.shape[1] if key_value is not None else query.shape[1]
            if padding_index is not None:
                batch, q_len = padding_index[1].shape
                k_len = q_len
            else:
                batch, q_len = query.shape[0], query.shape[1]
            results.append(keras.KerasTensor((batch, self.heads, q_len, k_len), dtype=self.compute_dtype))
        return tuple(results) if len(results) > 1 else out

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
            key_size=self.key_size,
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
            "set attention_dropout (attention_dropout_rate / attention_probs_dropout_prob) to 0, "
            f"got {attention_dropout}."
        )


def _leading_rows(mask_or_bias, rows):
    """The first `rows` query rows of a mask or bias broadcastable to `[batch, heads, q_len, k_len]`."""
    if mask_or_bias is None or len(mask_or_bias.shape) < 2:
        return mask_or_bias
    return mask_or_bias[..., :rows, :]


@keras.saving.register_keras_serializable(package=PACKAGE)
class AttentionMask(keras.layers.Layer):
    """Builds the boolean attention mask of an application from token (and segment) ids.

    Modes: 'encoder' (bidirectional; padding keys hidden, `[batch, 1, 1, len]`), 'lm' (causal, `[batch, 1, len, len]`)
    and 'unilm' (UniLM seq2seq: with c = cumsum(segment_ids), i sees j iff c[j] <= c[i]). Token id `pad_id` is padding.

    Args:
        mode: 'encoder', 'lm' or 'unilm'.
        pad_id: the token id of padding.
        **kwargs: `keras.layers.Layer` arguments.

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
            # A left-padded row would see no key at all (NaN on some backends); let it see itself. Real rows are
            # unchanged.
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
