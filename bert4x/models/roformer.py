"""RoFormer (v1 and v2): BERT bodies with rotary position embeddings (RoPE) in every self-attention.

- `model='roformer'`: BERT with no absolute position table; RoPE (interleaved pairs, θ_i = 10000^(-2i/d) over the head
  size) is applied to q and k in every layer, so any sequence length works. Google checkpoints use BERT's variable
  names; Hugging Face `RoFormerModel` checkpoints use the 'roformer.' prefix.
- `model='roformer_v2'`: no biases anywhere, a norm with no weights (x / sqrt(mean(x²) + eps), bert4keras's
  `LayerNormalization(zero_mean=False, scale=False, offset=False)`), norms after each residual as in BERT, and the
  feed-forward `FeedForward(activation=hidden_act)`: a GLU when `hidden_act` is a pair such as `["silu", "linear"]`.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
from keras import ops

from bert4x import backend
from bert4x.layers import AttentionMask, Dropout, Embedding, EmbeddingSum, FeedForward, MultiHeadAttention
from bert4x.models.base import Source, register_model, src
from bert4x.models.bert import BERT, GOOGLE_TABLE, _google_layer_table, _output_dtype, _producer

__all__ = ["RotaryEmbedding", "UnscaledRMSNorm", "RoFormer", "RoFormerV2"]

# A table entry for the fixed sinusoid table that Hugging Face stores in RoFormer checkpoints: it is no weight of
# ours (RoPE is computed), and listing it makes the strict loader accept the variable instead of calling it unexpected.
_HF_SINUSOID = "roformer.encoder.embed_positions.weight"


@keras.saving.register_keras_serializable(package="bert4x")
class RotaryEmbedding(keras.layers.Layer):
    """RoPE angles for the positions 0..n-1 of a `[batch, n, ...]` input: returns `(cos, sin)`, each
    `[1, n, head_size // 2]` in float32, ready for MultiHeadAttention's `rotary=`.

    Example:
    >>> cos, sin = RotaryEmbedding(8)(keras.ops.zeros((2, 5, 16)))
    >>> tuple(cos.shape)
    (1, 5, 4)
    """

    def __init__(self, head_size: int, base: float = 10000.0, **kwargs):
        super().__init__(**kwargs)
        if head_size % 2:
            raise ValueError(f"RotaryEmbedding: head_size must be even, got {head_size}.")
        self.head_size = head_size
        self.base = base

    def call(self, inputs):
        positions = ops.expand_dims(ops.arange(ops.shape(inputs)[1]), 0)
        return backend.rotary_cos_sin(positions, self.head_size, self.base)

    def compute_mask(self, inputs, mask=None):
        return None  # angles per position, not per token: the hidden states keep their own mask

    def compute_output_spec(self, inputs):
        spec = keras.KerasTensor((1, inputs.shape[1], self.head_size // 2), dtype="float32")
        return spec, keras.KerasTensor(spec.shape, dtype="float32")

    def get_config(self):
        config = super().get_config()
        config.update(head_size=self.head_size, base=self.base)
        return config


@keras.saving.register_keras_serializable(package="bert4x")
class UnscaledRMSNorm(keras.layers.Layer):
    """`x / sqrt(mean(x², last axis) + epsilon)` with no scale and no offset (RoFormerV2's norm), in float32.

    Example:
    >>> tuple(UnscaledRMSNorm()(keras.ops.ones((2, 3, 4))).shape)
    (2, 3, 4)
    """

    def __init__(self, epsilon: float = 1e-12, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon
        self.supports_masking = True

    def call(self, inputs):
        x = ops.cast(inputs, "float32")
        x = x * ops.rsqrt(ops.mean(ops.square(x), axis=-1, keepdims=True) + self.epsilon)
        return ops.cast(x, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(epsilon=self.epsilon)
        return config


def _renamed(table: dict, old: str, new: str) -> dict:
    """The table with checkpoint names starting with `old` renamed to start with `new`."""

    def rename(name: str) -> str:
        return new + name[len(old):] if name.startswith(old) else name

    out = {}
    for path, source in table.items():
        source = source if isinstance(source, Source) else src(source)
        out[path] = dataclasses.replace(source, names=tuple(rename(n) for n in source.names))
    return out


def hf_sinusoid_table(num_positions: int, dim: int) -> np.ndarray:
    """The fixed `[num_positions, dim]` table Hugging Face keeps in RoFormer checkpoints: sin in the first half of
    the columns, cos in the second, at angles pos·10000^(-2j/dim)."""
    angles = np.arange(num_positions)[:, None] * np.power(10000.0, -np.arange(0, dim, 2) / dim)[None]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)


@register_model("roformer")
class RoFormer(BERT):
    """RoFormer v1: BERT with rotary positions in every self-attention and no absolute position table.

    Takes BERT's config keys; Hugging Face RoFormer configs add `embedding_size` (must equal `hidden_size`: the
    factorised embedding is not implemented) and `rotary_value` (must be false). Any sequence length works.

    Example:
    >>> from bert4x.models import build_transformer_model
    >>> model = build_transformer_model({"vocab_size": 50, "hidden_size": 8, "num_hidden_layers": 1,
    ...     "num_attention_heads": 2, "intermediate_size": 16}, model="roformer", application="lm")
    >>> model.output.shape  # 'lm' and 'unilm' come with the MLM head: the next-token distribution
    (None, None, 50)
    """

    config_aliases = {
        **BERT.config_aliases,
        "embedding_size": ("embedding_size",),
        "rotary_value": ("rotary_value",),
    }
    model_types = ("roformer",)
    hf_prefix = "roformer."
    handles_attention_key_size = True  # RoPE then turns the queries and keys over attention_key_size

    def __init__(self, embedding_size: int | None = None, rotary_value: bool = False, **kwargs):
        super().__init__(**kwargs)
        if embedding_size is not None and embedding_size != self.hidden_size:
            raise ValueError(
                f"{type(self).__name__}: embedding_size={embedding_size} differs from hidden_size={self.hidden_size}; "
                "the factorised embedding (embeddings_project) is not implemented in bert4x."
            )
        if rotary_value:
            raise ValueError(f"{type(self).__name__}: rotary_value=True (RoPE on the values too) is not implemented.")
        if self.attention_key_size % 2:
            raise ValueError(f"RoPE needs an even head size of the queries and keys, got {self.attention_key_size}"
                             + (" (attention_key_size)." if self.attention_key_size != self.attention_head_size
                                else "."))

    # ----------------------------------------------------------------- hooks
    def apply_position_embedding(self, x):
        # No table: positions enter through RoPE in every attention (the angles are computed once, here).
        self.rotary = RotaryEmbedding(self.attention_key_size, name="Embedding-Rotary-Position")(x)
        return x

    def attention_kwargs(self):
        return {"rotary": self.rotary}

    # ----------------------------------------------------------------- checkpoints
    def variable_mapping(self, fmt):
        table = super().variable_mapping(fmt)
        del table["Embedding-Position/embeddings"]
        if fmt == "huggingface":
            table = _renamed(table, "bert.", "roformer.")
            table["(fixed RoPE sinusoid, not a weight)"] = src(_HF_SINUSOID)
        return table

    def tied_variables(self, fmt):
        if fmt == "huggingface":
            return {
                "cls.predictions.decoder.weight": "roformer.embeddings.word_embeddings.weight",
                "cls.predictions.decoder.bias": "cls.predictions.bias",
            }
        return {}

    def checkpoint_tensors(self, fmt):
        tensors = super().checkpoint_tensors(fmt)
        if fmt == "huggingface":  # so that transformers finds every buffer it expects
            tensors[_HF_SINUSOID] = hf_sinusoid_table(self.max_position, self.attention_head_size)
        return tensors

    def export_config(self, fmt):
        name, config = super().export_config(fmt)
        if fmt == "huggingface":
            config.update(
                model_type="roformer", embedding_size=self.hidden_size, rotary_value=False,
                architectures=["RoFormerForMaskedLM"],
            )
        return name, config

    # ----------------------------------------------------------------- decoding (bert4x.models.cached_decoding)
    def decode_attention_arguments(self, positions, query_slots, slots):
        rotary = _producer(self.rotary)  # the angles of each row's own positions
        return {"rotary": backend.rotary_cos_sin(positions, rotary.head_size, rotary.base)}


@register_model("roformer_v2")
class RoFormerV2(RoFormer):
    """RoFormerV2: RoFormer with no biases, weightless RMS norms (post-residual, as in BERT), no pooler/NSP, and the
    MLM head reduced to the tied embedding projection. `hidden_act=["silu", "linear"]` (a pair) makes the
    feed-forward a GLU `output(silu(inner(x)) * gate(x))`, as bert4keras's list activations do.

    Checkpoints: Google format with BERT's names minus every bias/LayerNorm variable. The GLU gate kernel, which has
    no name in bert4keras's table, is stored as `.../intermediate/dense_1/kernel`.

    Example:
    >>> from bert4x.models import build_transformer_model
    >>> model = build_transformer_model({"vocab_size": 50, "hidden_size": 8, "num_hidden_layers": 1,
    ...     "num_attention_heads": 2, "intermediate_size": 16, "hidden_act": ["silu", "linear"]},
    ...     model="roformer_v2", with_mlm="linear")
    >>> model.output.shape
    (None, None, 50)
    """

    supports_padding_removal = False  # its own main layers
    handles_attention_key_size = True

    model_types = ("roformer_v2",)

    def __init__(self, hidden_act="relu", **kwargs):
        if kwargs.get("with_pool") or kwargs.get("with_nsp"):
            raise ValueError("RoFormerV2 has no pooler or NSP head (with_pool / with_nsp).")
        if isinstance(hidden_act, (list, tuple)):
            if len(hidden_act) != 2 or backend.canonical_activation(hidden_act[1]) != "linear":
                raise ValueError(
                    f"RoFormerV2: a list hidden_act means a GLU [activation, 'linear']; got {hidden_act!r}."
                )
            self.ffn_activation, self.ffn_gated = backend.canonical_activation(hidden_act[0]), True
        else:
            self.ffn_activation, self.ffn_gated = backend.canonical_activation(hidden_act), False
        super().__init__(hidden_act=hidden_act, **kwargs)

    # ----------------------------------------------------------------- hooks
    def apply_embeddings(self, inputs):
        token_ids = inputs[0]
        segment_ids = inputs[1] if len(inputs) > 1 else None
        self.token_embedding = Embedding(
            self.vocab_size, self.hidden_size, embeddings_initializer=self.initializer(), mask_zero=True,
            name="Embedding-Token",
        )
        x = self.token_embedding(token_ids)
        if segment_ids is not None:
            # bert4x's Embedding, as in BERT: a 2-row table is read as a one-hot sum, whose gradient is a reduction
            # rather than a scatter-add that every token serialises on.
            self.segment_embedding = Embedding(
                self.segment_vocab_size, self.hidden_size, embeddings_initializer=self.initializer(),
                name="Embedding-Segment",
            )
            x = EmbeddingSum(name="Embedding-Token-Segment")([x, self.segment_embedding(segment_ids)])  # keeps the mask
        x = Dropout(self.dropout_rate, name="Embedding-Dropout")(x)
        self.embedding_norm = UnscaledRMSNorm(name="Embedding-Norm")
        x = self.embedding_norm(x)
        x = self.apply_position_embedding(x)
        self.attention_mask = AttentionMask(self.application, name="Attention-Mask")(token_ids, segment_ids)
        return x

    def apply_main_layers(self, x, index):
        attention = f"Transformer-{index}-MultiHeadSelfAttention"
        feed_forward = f"Transformer-{index}-FeedForward"
        y = MultiHeadAttention(
            self.num_attention_heads, self.attention_head_size, use_bias=False, key_size=self.attention_key_size,
            attention_dropout=self.attention_dropout_rate, kernel_initializer=self.initializer(), name=attention,
        )(x, attention_mask=self.attention_mask, **self.attention_kwargs())
        block = [_producer(y)]  # this block's layers, in the order decode_step applies them
        y = Dropout(self.dropout_rate, name=f"{attention}-Dropout")(y)
        x = keras.layers.Add(name=f"{attention}-Add")([x, y])
        x = UnscaledRMSNorm(name=f"{attention}-Norm")(x)
        block.append(_producer(x))
        y = FeedForward(
            self.intermediate_size, activation=self.ffn_activation, gated=self.ffn_gated, use_bias=False,
            kernel_initializer=self.initializer(), name=feed_forward,
        )(x)
        block.append(_producer(y))
        y = Dropout(self.dropout_rate, name=f"{feed_forward}-Dropout")(y)
        x = keras.layers.Add(name=f"{feed_forward}-Add")([x, y])
        x = UnscaledRMSNorm(name=f"{feed_forward}-Norm")(x)
        self.keep_decode_block(index, *block, _producer(x))
        return x

    def apply_final_layers(self, x):
        if not self.with_mlm:
            return x
        x = Dropout(self.dropout_rate, name="MLM-Dropout")(x)
        x = self.token_embedding(x, mode="dense")
        activation = "softmax" if self.with_mlm is True else self.with_mlm
        return keras.layers.Activation(activation, dtype=_output_dtype(), name="MLM-Activation")(x)

    # ----------------------------------------------------------------- checkpoints
    def variable_mapping(self, fmt):
        if fmt != "google":
            raise ValueError(
                f"RoFormerV2 checkpoints exist in Google (bert4keras) format only; got format {fmt!r}."
            )
        table = {
            "Embedding-Token/embeddings": GOOGLE_TABLE["Embedding-Token/embeddings"],
            "Embedding-Segment/embeddings": GOOGLE_TABLE["Embedding-Segment/embeddings"],
        }
        for i in range(self.num_hidden_layers):
            layer = _google_layer_table(i, f"Transformer-{i}-MultiHeadSelfAttention", self.qkv_widths())
            table.update({path: s for path, s in layer.items() if path.endswith("/kernel")})
            if self.ffn_gated:
                gate = f"bert/encoder/layer_{i}/intermediate/dense_1/kernel"
                table[f"Transformer-{i}-FeedForward/gate/kernel"] = gate
        return table

    def export_config(self, fmt):
        if fmt != "google":
            raise ValueError(f"RoFormerV2 exports Google (bert4keras) format only; got format {fmt!r}.")
        return super().export_config(fmt)

    # ----------------------------------------------------------------- decoding (bert4x.models.cached_decoding)
    def decode_head_layers(self):
        return [], []  # the head is the tied projection alone
