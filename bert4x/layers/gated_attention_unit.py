"""The gated attention unit (GAU) of Hua et al. 2022, "Transformer Quality in Linear Time", as bert4keras's
`GatedAttentionUnit` layer computes it (GAU-α's main block).

One dense projection of x, through the activation, gives three parts: the gate u and the values v (`units` wide
each) and a shared query/key base z (`key_size` wide). Queries and keys are per-dimension scales (and offsets) of z,
`q = z * gamma_q + beta_q`, `k = z * gamma_k + beta_k`, optionally rotated by RoPE. A single head attends:
`A = normalise(q k^T / sqrt(key_size))`, and the output is `o_dense(u * (A v))`. The normalisation is 'squared_relu'
(the paper's `relu^2 / n`), 'softmax_plus' (a softmax whose scores are scaled by `log(n) / log(512)`, n the number of
visible keys) or 'softmax'; the scores run through `bert4x.kernels.attention`.
"""

from __future__ import annotations

import keras
from keras import ops

from bert4x import backend, kernels
from bert4x.layers._common import PACKAGE, initializer
from bert4x.layers.dropout import Dropout

__all__ = ["GatedAttentionUnit"]

NORMALIZATIONS = ("squared_relu", "softmax_plus", "softmax")


@keras.saving.register_keras_serializable(package=PACKAGE)
class GatedAttentionUnit(keras.layers.Layer):
    """A gated attention unit: gated single-head attention with shared query/key projections.

    Weights: `i_dense` (kernel `[dim, 2 * units + key_size]`, columns in the order u | v | z), `o_dense` (kernel
    `[units, dim]`), `q_gamma` / `k_gamma` (`[key_size]`, ones at first) and, with biases, `q_beta` / `k_beta` and the
    two dense biases. The output has the input's width and carries its Keras mask.

    Args:
        units: width of the gate u and the values v (the expanded dimension e of the paper).
        key_size: width of the shared query/key base z (s of the paper; 128 in GAU-α).
        activation: activation of the whole projection u | v | z (bert4keras's default 'swish', i.e. SiLU).
        use_bias: whether the projections have biases and q/k offsets (GAU-α has none).
        normalization: 'squared_relu' (bert4keras's default), 'softmax_plus' (GAU-α's) or 'softmax'.
        attention_scale: divide the scores by `sqrt(key_size)` before normalising them.
        attention_dropout: dropout rate on the normalised scores.
        softmax_plus_min_length: 'softmax_plus' scales by `log(max(n, this)) / log(512)`; bert4keras 0.11.5 uses 16,
            and 1 gives the scale of bert4keras at GAU-α's release (and of its PyTorch ports).
        kernel_initializer: initializer of the dense kernels (truncated normal, stddev 0.02, when None).
        **kwargs: `keras.layers.Layer` arguments.

    Call arguments:
        inputs: `[batch, len, dim]`.
        attention_mask: booleans broadcastable to `[batch, 1, len, len]` (True = may attend); without it the Keras
            mask of `inputs`, if any, hides padding keys.
        rotary: `(cos, sin)`, each `[batch or 1, len, key_size // 2]` (`RotaryEmbedding(key_size)`): RoPE on q and k.
        training: whether dropout applies.

    Example:
    >>> gau = GatedAttentionUnit(units=16, key_size=4, normalization="softmax_plus", use_bias=False)
    >>> gau(keras.ops.ones((2, 5, 8))).shape
    (2, 5, 8)
    """

    def __init__(
        self,
        units: int,
        key_size: int,
        activation: str = "swish",
        use_bias: bool = True,
        normalization: str = "squared_relu",
        attention_scale: bool = True,
        attention_dropout: float = 0.0,
        softmax_plus_min_length: int = 16,
        kernel_initializer=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        for name, value in (("units", units), ("key_size", key_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GatedAttentionUnit: {name} must be a positive integer, got {value!r}.")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"GatedAttentionUnit: normalization must be one of {NORMALIZATIONS}, got "
                             f"{normalization!r}.")
        if isinstance(softmax_plus_min_length, bool) or not isinstance(softmax_plus_min_length, int) \
                or softmax_plus_min_length < 1:
            raise ValueError("GatedAttentionUnit: softmax_plus_min_length must be an integer >= 1, got "
                             f"{softmax_plus_min_length!r}.")
        if not 0 <= attention_dropout < 1:
            raise ValueError(f"GatedAttentionUnit: attention_dropout must be in [0, 1), got {attention_dropout!r}.")
        self.units = units
        self.key_size = key_size
        self.activation = backend.canonical_activation(activation)
        self.use_bias = bool(use_bias)
        self.normalization = normalization
        self.attention_scale = bool(attention_scale)
        self.attention_dropout = attention_dropout
        self.softmax_plus_min_length = softmax_plus_min_length
        self.kernel_initializer = initializer(kernel_initializer)
        dense = dict(use_bias=self.use_bias, kernel_initializer=self.kernel_initializer, dtype=self.dtype_policy)
        self.i_dense = keras.layers.Dense(2 * units + key_size, activation=backend.get_activation(activation),
                                          name="i_dense", **dense)
        self.o_dense = None  # its width is the input's: made in build()
        self.dropout = Dropout(attention_dropout, dtype=self.dtype_policy)
        self.supports_masking = True

    def build(self, input_shape):
        self.i_dense.build(input_shape)
        self.o_dense = keras.layers.Dense(
            input_shape[-1], use_bias=self.use_bias, kernel_initializer=self.kernel_initializer,
            dtype=self.dtype_policy, name="o_dense",
        )
        self.o_dense.build(tuple(input_shape[:-1]) + (self.units,))
        # bert4keras's ScaleOffset on z, once for queries and once for keys.
        for part in ("q", "k"):
            setattr(self, f"{part}_gamma", self.add_weight(name=f"{part}_gamma", shape=(self.key_size,),
                                                           initializer="ones"))
            if self.use_bias:
                setattr(self, f"{part}_beta", self.add_weight(name=f"{part}_beta", shape=(self.key_size,),
                                                              initializer="zeros"))

    def _queries_keys(self, z):
        q = z * ops.cast(self.q_gamma, z.dtype)
        k = z * ops.cast(self.k_gamma, z.dtype)
        if self.use_bias:
            q, k = q + ops.cast(self.q_beta, z.dtype), k + ops.cast(self.k_beta, z.dtype)
        return q, k

    def call(self, inputs, attention_mask=None, rotary=None, training=None, mask=None):
        x = self.i_dense(inputs)
        u, v, z = x[..., :self.units], x[..., self.units:2 * self.units], x[..., 2 * self.units:]
        q, k = self._queries_keys(z)
        if rotary is not None:
            q, k = (backend.apply_rotary(t, *rotary) for t in (q, k))
        if attention_mask is None and mask is not None:
            attention_mask = ops.expand_dims(ops.expand_dims(ops.cast(mask, "bool"), 1), 1)
        scale = backend.attention_scale(self.key_size) if self.attention_scale else 1.0
        # One head of q/k `key_size` wide and v `units` wide: the seam runs unequal head sizes (XLA) itself.
        variant = {} if self.normalization == "softmax" else {
            "variant": self.normalization, "softmax_plus_min_length": self.softmax_plus_min_length}
        out = kernels.attention(
            q[:, :, None], k[:, :, None], v[:, :, None], mask=attention_mask, scale=scale, dropout=self.dropout,
            training=bool(training), **variant,
        )[:, :, 0]
        return self.o_dense(u * out)

    def kernel_spec(self, inputs, attention_mask=None, rotary=None, training=False, mask=None,
                    sequence_length: int | None = None, batch_size: int | None = None) -> kernels.AttentionSpec:
        """The `bert4x.kernels.AttentionSpec` that `call` hands to `bert4x.kernels.attention` for these arguments
        (only shapes are read): what `bert4x.kernels.explain` reports.

        Args:
            inputs, attention_mask, rotary, training, mask: as in `call`.
            sequence_length: the length assumed where the shapes leave it unknown.
            batch_size: the batch size assumed where the shapes leave it unknown.
        """
        batch, length = inputs.shape[0], inputs.shape[1]
        batch = batch if isinstance(batch, int) else batch_size
        length = length if isinstance(length, int) else sequence_length
        shape = (batch, length, 1, self.key_size)
        if attention_mask is not None:
            mask_shape = tuple(attention_mask.shape)
        else:
            mask_shape = None if mask is None else (batch, 1, 1, length)
        return kernels.make_spec(shape, shape, self.compute_dtype, mask_shape=mask_shape,
                                 dropout_rate=self.attention_dropout, training=training, variant=self.normalization,
                                 value_head_size=self.units)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            units=self.units,
            key_size=self.key_size,
            activation=self.activation,
            use_bias=self.use_bias,
            normalization=self.normalization,
            attention_scale=self.attention_scale,
            attention_dropout=self.attention_dropout,
            softmax_plus_min_length=self.softmax_plus_min_length,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
        )
        return config
