"""Task layers of the seed articles: span and sequence-labelling heads, conditional LayerNorm, AM-Softmax's cosine
layer and P-tuning's embedding. Each is a serializable `keras.layers.Layer` using `keras.ops` only.

- `GlobalPointer`, `EfficientGlobalPointer`: span logits `[batch, heads, len, len]` for (nested) NER; train them
  with `bert4x.losses.global_pointer_crossentropy`, decode with `bert4x.snippets.decode_global_pointer`.
- `ConditionalRandomField`: a linear-chain CRF with `sparse_loss` / `sparse_accuracy` and its `trans` matrix;
  decode with `bert4x.snippets.ViterbiDecoder(crf.trans)`.
- `ConditionalLayerNormalization`: LayerNorm whose gamma/beta are shifted by dense projections of a condition.
- `NormalizedDense`: cosine logits for `bert4x.losses.am_softmax_crossentropy`.
- `PromptEmbedding`: an `Embedding` in which only the rows of `prompt_ids` receive gradients (P-tuning).
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import ops

from bert4x import backend
from bert4x.layers.embeddings import Embedding, tied_projection

__all__ = [
    "GlobalPointer",
    "EfficientGlobalPointer",
    "ConditionalRandomField",
    "ConditionalLayerNormalization",
    "NormalizedDense",
    "PromptEmbedding",
]

_PACKAGE = "bert4x"


def _rope(x, positions):
    """Rotary positions on `[batch, len, heads, d]` (interleaved pairs, as RoFormer), via `bert4x.backend`."""
    angles = backend.sinusoidal_angles(positions, x.shape[-1])  # [len, d/2]
    cos = ops.expand_dims(ops.expand_dims(ops.cos(angles), 0), 2)
    sin = ops.expand_dims(ops.expand_dims(ops.sin(angles), 0), 2)
    return backend.apply_rotary(x, cos, sin)


def _span_masks(logits, mask, tril_mask: bool):
    """Sets logits `[batch, heads, n, n]` of padded starts/ends and (with `tril_mask`) of start > end to MASK_VALUE."""
    n = ops.shape(logits)[-1]
    keep = None
    if mask is not None:
        mask = ops.cast(mask, "bool")
        keep = ops.logical_and(mask[:, None, :, None], mask[:, None, None, :])
    if tril_mask:
        upper = ops.greater_equal(ops.arange(n)[None, :], ops.arange(n)[:, None])
        upper = ops.expand_dims(ops.expand_dims(upper, 0), 0)
        keep = upper if keep is None else ops.logical_and(keep, upper)
    return logits if keep is None else ops.where(keep, logits, backend.MASK_VALUE)


class _SpanHead(keras.layers.Layer):
    """Shared options and config of the GlobalPointer heads."""

    def __init__(
        self,
        heads: int,
        head_size: int,
        RoPE: bool = True,  # noqa: N803 (bert4keras's argument name)
        use_bias: bool = True,
        tril_mask: bool = True,
        kernel_initializer="lecun_normal",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if heads <= 0 or head_size <= 0:
            raise ValueError(f"{type(self).__name__}: heads and head_size must be positive, got {heads}, {head_size}.")
        if RoPE and head_size % 2:
            raise ValueError(f"{type(self).__name__}: RoPE needs an even head_size, got {head_size}.")
        self.heads = heads
        self.head_size = head_size
        self.RoPE = RoPE
        self.use_bias = use_bias
        self.tril_mask = tril_mask
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.supports_masking = True

    def _dense(self, units: int, name: str) -> keras.layers.Dense:
        return keras.layers.Dense(
            units, use_bias=self.use_bias, kernel_initializer=self.kernel_initializer, dtype=self.dtype_policy,
            name=name,
        )

    def compute_mask(self, inputs, mask=None):
        return None  # the padding mask is applied to the logits; nothing propagates to the loss

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.heads, input_shape[1], input_shape[1])

    def compute_output_spec(self, inputs, mask=None):
        return keras.KerasTensor(self.compute_output_shape(inputs.shape), dtype="float32")

    def get_config(self):
        config = super().get_config()
        config.update(
            heads=self.heads,
            head_size=self.head_size,
            RoPE=self.RoPE,
            use_bias=self.use_bias,
            tril_mask=self.tril_mask,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
        )
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class GlobalPointer(_SpanHead):
    """GlobalPointer: for each entity type a, `s_a(i, j) = q_{i,a} . k_{j,a} / sqrt(d)` over all spans i <= j.

    `q` and `k` come from one Dense of `heads * 2 * head_size` units (per type: q then k), RoPE is applied to both.
    Spans with a padded start or end, and (with `tril_mask`) spans with i > j, get `MASK_VALUE`.
    Call with `mask` (`[batch, len]`, 1/True = token) or rely on Keras masking. Output: float32 `[batch, heads, n, n]`.

    Example:
    >>> gp = GlobalPointer(heads=3, head_size=8)
    >>> gp(keras.ops.ones((2, 5, 16)), mask=keras.ops.ones((2, 5))).shape
    (2, 3, 5, 5)
    """

    def __init__(self, heads: int, head_size: int, RoPE: bool = True, **kwargs):  # noqa: N803
        super().__init__(heads, head_size, RoPE=RoPE, **kwargs)
        self.dense = self._dense(heads * head_size * 2, "dense")

    def build(self, input_shape):
        self.dense.build(input_shape)

    def call(self, inputs, mask=None):
        x = self.dense(inputs)
        shape = ops.shape(x)
        x = ops.cast(ops.reshape(x, (shape[0], shape[1], self.heads, 2 * self.head_size)), "float32")
        q, k = x[..., : self.head_size], x[..., self.head_size :]
        if self.RoPE:
            positions = ops.arange(shape[1])
            q, k = _rope(q, positions), _rope(k, positions)
        logits = ops.einsum("bmhd,bnhd->bhmn", q, k) / (self.head_size**0.5)
        return _span_masks(logits, mask, self.tril_mask)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class EfficientGlobalPointer(_SpanHead):
    """Efficient GlobalPointer: one q/k projection shared by all types plus a per-type start and end term.

    `p = Dense(2 * head_size)(h)`, `q = p[..., 0::2]`, `k = p[..., 1::2]` (RoPE applied), and
    `s_a(i, j) = q_i . k_j / sqrt(d) + (b_{i, 2a+1} + b_{j, 2a}) / 2` with `b = Dense(2 * heads)(p)`:
    odd columns are the start (row) terms and even columns the end (column) terms, as in bert4keras.

    Example:
    >>> EfficientGlobalPointer(heads=3, head_size=8)(keras.ops.ones((2, 5, 16))).shape
    (2, 3, 5, 5)
    """

    def __init__(self, heads: int, head_size: int, RoPE: bool = True, **kwargs):  # noqa: N803
        super().__init__(heads, head_size, RoPE=RoPE, **kwargs)
        self.p_dense = self._dense(head_size * 2, "p_dense")
        self.q_dense = self._dense(heads * 2, "q_dense")

    def build(self, input_shape):
        self.p_dense.build(input_shape)
        self.q_dense.build(tuple(input_shape[:-1]) + (self.head_size * 2,))

    def call(self, inputs, mask=None):
        p = self.p_dense(inputs)
        p32 = ops.cast(p, "float32")
        q, k = p32[..., 0::2], p32[..., 1::2]
        if self.RoPE:
            positions = ops.arange(ops.shape(p)[1])
            q = _rope(ops.expand_dims(q, 2), positions)[:, :, 0]
            k = _rope(ops.expand_dims(k, 2), positions)[:, :, 0]
        logits = ops.einsum("bmd,bnd->bmn", q, k) / (self.head_size**0.5)
        bias = ops.transpose(ops.cast(self.q_dense(p), "float32"), (0, 2, 1)) / 2  # [batch, 2 * heads, n]
        logits = logits[:, None] + bias[:, 0::2, None, :] + bias[:, 1::2, :, None]
        return _span_masks(logits, mask, self.tril_mask)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ConditionalRandomField(keras.layers.Layer):
    """Linear-chain CRF on emission scores `E[t, y]` with a learned transition matrix `T[y, y']`.

    The layer returns its input (float32), with padded positions set to `MASK_VALUE` so that the losses, which see
    only `(y_true, y_pred)`, can recover the padding (give `mask` `[batch, len]` or rely on Keras masking). Padding
    may be on either side but valid positions must be contiguous.

    - `sparse_loss(y_true, y_pred)`: `log Z - score(gold)` per sequence,
      `score = sum_t E[t, y_t] + sum_t T[y_t, y_t+1]`, Z by the forward algorithm. `y_true`: int labels
      `[batch, len]` (or `[batch, len, 1]`).
    - `dense_loss`: the same with one-hot labels. `sparse_accuracy` / `dense_accuracy`: per-token argmax accuracy.
    - `trans`: `T` as a tensor (`lr_multiplier * stored weight`: bert4keras's reparameterisation that multiplies the
      transitions' effective learning rate by about `lr_multiplier` under Adam).

    A `bert4x.models.Model` compiled with these bound-method losses and metrics records them by layer and method
    name, so `keras.saving.load_model` (with the default `compile=True`) restores it compiled, ready to train on.

    Example:
    >>> crf = ConditionalRandomField(lr_multiplier=10)
    >>> emissions = crf(keras.ops.zeros((2, 4, 3)))
    >>> crf.sparse_loss(keras.ops.zeros((2, 4), "int32"), emissions).shape
    (2,)
    """

    def __init__(self, lr_multiplier: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if lr_multiplier <= 0:
            raise ValueError(f"ConditionalRandomField: lr_multiplier must be positive, got {lr_multiplier}.")
        self.lr_multiplier = lr_multiplier
        self.supports_masking = True

    def build(self, input_shape):
        num_labels = input_shape[-1]
        if num_labels is None:
            raise ValueError("ConditionalRandomField needs a known number of labels (last input axis).")
        self._trans = self.add_weight(name="trans", shape=(num_labels, num_labels), initializer="glorot_uniform")
        if self.lr_multiplier != 1:
            self._trans.assign(self._trans / self.lr_multiplier)

    @property
    def trans(self):
        """The transition matrix `T[from, to]` (float32 tensor); `ops.convert_to_numpy(crf.trans)` for Viterbi."""
        return ops.cast(self._trans, "float32") * self.lr_multiplier

    def call(self, inputs, mask=None):
        inputs = ops.cast(inputs, "float32")
        if mask is None:
            return inputs
        return ops.where(ops.expand_dims(ops.cast(mask, "bool"), -1), inputs, backend.MASK_VALUE)

    def compute_mask(self, inputs, mask=None):
        return None

    def compute_output_spec(self, inputs, mask=None):
        return keras.KerasTensor(inputs.shape, dtype="float32")

    # ---------------------------------------------------------------- losses and metrics
    @staticmethod
    def _mask(y_pred):
        return ops.all(ops.greater(y_pred, backend.MASK_VALUE / 2), axis=-1)

    @staticmethod
    def _sparse_labels(y_true, y_pred):
        y_true = ops.cast(y_true, "int32")
        if len(y_true.shape) == len(y_pred.shape):
            y_true = ops.squeeze(y_true, -1)
        return y_true

    def path_score(self, y_true, y_pred, mask=None):
        """Score of the label path `y_true` (int `[batch, len]`): emissions plus transitions between valid steps."""
        y_pred = ops.cast(y_pred, "float32")
        mask = self._mask(y_pred) if mask is None else ops.cast(mask, "bool")
        maskf = ops.cast(mask, "float32")
        one_hot = ops.one_hot(y_true, ops.shape(y_pred)[-1], dtype="float32")
        emission = ops.sum(ops.sum(y_pred * one_hot, axis=-1) * maskf, axis=-1)
        pair_mask = maskf[:, :-1] * maskf[:, 1:]
        transition = ops.einsum("bti,ij,btj->bt", one_hot[:, :-1], self.trans, one_hot[:, 1:])
        return emission + ops.sum(transition * pair_mask, axis=-1)

    def log_norm(self, y_pred, mask=None):
        """`log Z` over all label paths by the forward algorithm; padded steps leave the state unchanged."""
        y_pred = ops.cast(y_pred, "float32")
        mask = self._mask(y_pred) if mask is None else ops.cast(mask, "bool")
        trans = ops.expand_dims(self.trans, 0)
        alpha = ops.where(mask[:, :1], y_pred[:, 0], 0.0)
        started = mask[:, 0]

        def step(alpha, started, emission, valid):
            moved = ops.logsumexp(ops.expand_dims(alpha, 2) + trans, axis=1) + emission
            new = ops.where(ops.expand_dims(started, 1), moved, emission)  # the first valid step has no transition
            alpha = ops.where(ops.expand_dims(valid, 1), new, alpha)
            return alpha, ops.logical_or(started, valid)

        length = ops.shape(y_pred)[1]
        if keras.backend.backend() == "tensorflow":
            # tf.while_loop is differentiable under XLA (jit_compile) only with maximum_iterations, which scan lacks.
            def body(t, alpha, started):
                return (t + 1, *step(alpha, started, y_pred[:, t], mask[:, t]))

            _, alpha, started = ops.while_loop(
                lambda t, *_: t < length, body, (1, alpha, started), maximum_iterations=length - 1
            )
        else:  # jax's while_loop has no reverse-mode gradient; its scan has
            emissions = ops.transpose(y_pred[:, 1:], (1, 0, 2))
            valid = ops.transpose(mask[:, 1:], (1, 0))
            (alpha, started), _ = ops.scan(lambda c, x: (step(*c, *x), None), (alpha, started), (emissions, valid))
        return ops.where(started, ops.logsumexp(alpha, axis=-1), 0.0)

    def sparse_loss(self, y_true, y_pred):
        """Negative log-likelihood `log Z - score(y_true)` per sequence `[batch]`; `y_true` holds label ids."""
        y_true = self._sparse_labels(y_true, y_pred)
        mask = self._mask(ops.cast(y_pred, "float32"))
        return self.log_norm(y_pred, mask) - self.path_score(y_true, y_pred, mask)

    def dense_loss(self, y_true, y_pred):
        """`sparse_loss` with one-hot `y_true` `[batch, len, num_labels]`."""
        return self.sparse_loss(ops.argmax(y_true, axis=-1), y_pred)

    def sparse_accuracy(self, y_true, y_pred):
        """Per-token accuracy of the emissions' argmax over unpadded positions (a scalar, as in bert4keras)."""
        y_true = self._sparse_labels(y_true, y_pred)
        mask = ops.cast(self._mask(ops.cast(y_pred, "float32")), "float32")
        correct = ops.cast(ops.equal(ops.cast(ops.argmax(y_pred, axis=-1), "int32"), y_true), "float32")
        return ops.sum(correct * mask) / ops.maximum(ops.sum(mask), 1.0)

    def dense_accuracy(self, y_true, y_pred):
        return self.sparse_accuracy(ops.argmax(y_true, axis=-1), y_pred)

    def get_config(self):
        config = super().get_config()
        config.update(lr_multiplier=self.lr_multiplier)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ConditionalLayerNormalization(keras.layers.Layer):
    """LayerNorm whose gamma and beta are shifted by projections of a condition: bert4keras's `layer_norm_cond`.

    `y = (x - mean) / sqrt(var + eps) * (gamma + Dg c') + (beta + Db c')` with `c' = hidden(c)` when `hidden_units`
    is set (else `c' = c`). `Dg`, `Db` start at zero, so the layer starts as the plain LayerNorm it replaces (and
    loads the same `gamma`/`beta` weights). Call with `[x, condition]`; a `[batch, c]` condition is broadcast over
    the sequence.

    Example:
    >>> ln = ConditionalLayerNormalization(hidden_units=4)
    >>> ln([keras.ops.ones((2, 5, 8)), keras.ops.ones((2, 3))]).shape
    (2, 5, 8)
    """

    def __init__(
        self,
        epsilon: float = 1e-12,
        center: bool = True,
        scale: bool = True,
        hidden_units: int | None = None,
        hidden_activation: str = "linear",
        hidden_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.epsilon = epsilon
        self.center = center
        self.scale = scale
        self.hidden_units = hidden_units
        self.hidden_activation = backend.canonical_activation(hidden_activation)
        self.hidden_initializer = keras.initializers.get(hidden_initializer)

    def build(self, input_shape):
        if not (isinstance(input_shape, (list, tuple)) and len(input_shape) == 2
                and isinstance(input_shape[0], (list, tuple))):
            raise ValueError(f"{self.name}: call ConditionalLayerNormalization on [x, condition], got {input_shape}.")
        x_shape, cond_shape = input_shape
        dim = x_shape[-1]
        dense = dict(use_bias=False, dtype=self.dtype_policy)
        if self.center:
            self.beta = self.add_weight(name="beta", shape=(dim,), initializer="zeros")
            self.beta_dense = keras.layers.Dense(dim, kernel_initializer="zeros", name="beta_dense", **dense)
        if self.scale:
            self.gamma = self.add_weight(name="gamma", shape=(dim,), initializer="ones")
            self.gamma_dense = keras.layers.Dense(dim, kernel_initializer="zeros", name="gamma_dense", **dense)
        cond_width = cond_shape[-1]
        if self.hidden_units:
            self.hidden_dense = keras.layers.Dense(
                self.hidden_units, activation=backend.get_activation(self.hidden_activation),
                kernel_initializer=self.hidden_initializer, name="hidden_dense", **dense,
            )
            self.hidden_dense.build(tuple(cond_shape))
            cond_width = self.hidden_units
        for layer in (getattr(self, "beta_dense", None), getattr(self, "gamma_dense", None)):
            if layer is not None:
                layer.build(tuple(cond_shape[:-1]) + (cond_width,))

    def call(self, inputs):
        x, cond = inputs
        if self.hidden_units:
            cond = self.hidden_dense(cond)
        for _ in range(len(x.shape) - len(cond.shape)):
            cond = ops.expand_dims(cond, 1)
        x32 = ops.cast(x, "float32")
        mean = ops.mean(x32, axis=-1, keepdims=True)
        variance = ops.mean(ops.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * ops.rsqrt(variance + self.epsilon)
        if self.scale:
            y = y * (ops.cast(self.gamma, "float32") + ops.cast(self.gamma_dense(cond), "float32"))
        if self.center:
            y = y + ops.cast(self.beta, "float32") + ops.cast(self.beta_dense(cond), "float32")
        return ops.cast(y, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        config = super().get_config()
        config.update(
            epsilon=self.epsilon,
            center=self.center,
            scale=self.scale,
            hidden_units=self.hidden_units,
            hidden_activation=self.hidden_activation,
            hidden_initializer=keras.initializers.serialize(self.hidden_initializer),
        )
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class NormalizedDense(keras.layers.Layer):
    """Cosine logits `cos(x, w_j) = x . w_j / (|x| |w_j|)` (no bias): the class layer of AM-Softmax.

    Example:
    >>> NormalizedDense(3)(keras.ops.ones((2, 4))).shape
    (2, 3)
    """

    def __init__(self, units: int, kernel_initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape):
        self.kernel = self.add_weight(name="kernel", shape=(input_shape[-1], self.units),
                                      initializer=self.kernel_initializer)

    def call(self, inputs):
        x = ops.cast(inputs, "float32")
        x = x / ops.sqrt(ops.sum(ops.square(x), axis=-1, keepdims=True) + 1e-12)
        w = ops.cast(self.kernel, "float32")
        w = w / ops.sqrt(ops.sum(ops.square(w), axis=0, keepdims=True) + 1e-12)
        return ops.matmul(x, w)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def compute_output_spec(self, inputs):
        return keras.KerasTensor(self.compute_output_shape(inputs.shape), dtype="float32")

    def get_config(self):
        config = super().get_config()
        config.update(units=self.units, kernel_initializer=keras.initializers.serialize(self.kernel_initializer))
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class PromptEmbedding(Embedding):
    """An `Embedding` in which only the rows `prompt_ids` get gradients (P-tuning's trainable pattern tokens).

    Other rows are wrapped in `stop_gradient` in both modes (lookup and the tied `mode="dense"` output projection).
    Their gradient is zero, so plain Adam leaves them unchanged; AdamW's weight decay would still shrink them:
    exclude the layer from weight decay (`optimizer.exclude_from_weight_decay(var_names=["embeddings"])`).

    Example:
    >>> emb = PromptEmbedding(10, 4, prompt_ids=[1, 2])
    >>> emb(keras.ops.ones((2, 3), "int32")).shape
    (2, 3, 4)
    """

    def __init__(self, input_dim: int, output_dim: int, prompt_ids: Sequence[int] = (), **kwargs):
        super().__init__(input_dim, output_dim, **kwargs)
        self.prompt_ids = sorted({int(i) for i in prompt_ids})
        bad = [i for i in self.prompt_ids if not 0 <= i < input_dim]
        if bad:
            raise ValueError(f"PromptEmbedding: prompt_ids {bad} are outside the vocabulary [0, {input_dim}).")

    def _masked_table(self):
        table = ops.convert_to_tensor(self.embeddings)
        is_prompt = ops.zeros((self.input_dim,), "bool")
        if self.prompt_ids:
            is_prompt = ops.any(
                ops.equal(ops.arange(self.input_dim)[:, None], ops.array(self.prompt_ids)[None]), axis=1
            )
        return ops.where(is_prompt[:, None], table, ops.stop_gradient(table))

    def call(self, inputs, mode: str = "embedding"):
        table = ops.cast(self._masked_table(), self.compute_dtype)
        if mode == "dense":
            return tied_projection(inputs, table)
        if mode != "embedding":
            raise ValueError(f"PromptEmbedding mode must be 'embedding' or 'dense', got {mode!r}.")
        return ops.take(table, ops.cast(inputs, "int32"), axis=0)

    def get_config(self):
        config = super().get_config()
        config.update(prompt_ids=list(self.prompt_ids))
        return config
