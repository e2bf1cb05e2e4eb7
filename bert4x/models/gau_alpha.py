"""GAU-α (`model='gau_alpha'`): ZhuiyiTechnology's GAU-α, RoFormerV2 with each layer a gated attention unit.

The embeddings, norms and MLM head are RoFormerV2's: token (+ segment) embeddings, a weightless RMS norm
`x / sqrt(mean(x²) + eps)`, no position table (RoPE over the `attention_key_size` query/key width in every layer),
and the MLM head reduced to the tied embedding projection. Each layer is `norm(x + dropout(GAU(x)))` with
`GatedAttentionUnit(units=intermediate_size, key_size=attention_key_size, activation=hidden_act, use_bias=False,
normalization='softmax_plus')`; there is no separate feed-forward.

Checkpoints: the release's Google format, `bert/embeddings/word_embeddings`, `bert/embeddings/token_type_embeddings`
and per layer `GAU_alpha/encoder/layer_N/gau/{i_dense/kernel, o_dense/kernel, q_scaleoffset/gamma,
k_scaleoffset/gamma}`.
"""

from __future__ import annotations

import keras

from bert4x.layers import Dropout
from bert4x.layers.gated_attention_unit import NORMALIZATIONS, GatedAttentionUnit
from bert4x.models.base import register_model, src
from bert4x.models.roformer import RoFormerV2, RotaryEmbedding, UnscaledRMSNorm

__all__ = ["GAU_alpha"]

# The release's variable names (Google format), per layer: bert4x weight -> checkpoint variable.
_EMBEDDINGS = {
    "Embedding-Token/embeddings": src("bert/embeddings/word_embeddings", vocab=True),
    "Embedding-Segment/embeddings": "bert/embeddings/token_type_embeddings",
}
_LAYER = {
    "i_dense/kernel": "gau/i_dense/kernel",
    "o_dense/kernel": "gau/o_dense/kernel",
    "q_gamma": "gau/q_scaleoffset/gamma",
    "k_gamma": "gau/k_scaleoffset/gamma",
}


@register_model("gau_alpha")
class GAU_alpha(RoFormerV2):  # noqa: N801 - bert4keras's class name
    """GAU-α: RoFormerV2's embeddings and head around layers of gated attention units with RoPE.

    Args:
        attention_key_size: width of the shared query/key base of each unit and of its RoPE (128 in the release).
        normalization: the units' score normalisation; the release's is 'softmax_plus'.
        attention_scale: divide the scores by `sqrt(attention_key_size)` (the release does).
        softmax_plus_min_length: 'softmax_plus' scales the scores by `log(max(n, this)) / log(512)`, n the number of
            keys a query sees. 16 is bert4keras 0.11.5's (the default, as bert4keras computes GAU-α today); 1 is the
            scale at the release (bert4keras 0.11.3) and in the PyTorch ports. They differ for queries that see fewer
            than 16 keys.
        use_bias: must be False (the release has no biases).
        num_attention_heads: read for config compatibility; a unit has a single head.
        **kwargs: RoFormerV2's arguments (`intermediate_size` is the units' u/v width, `hidden_act` their
            activation, 'swish' in the release).

    Example:
    >>> from bert4x.models import build_transformer_model
    >>> model = build_transformer_model({"vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 1,
    ...     "intermediate_size": 32, "attention_key_size": 8, "hidden_act": "swish"}, model="gau_alpha",
    ...     with_mlm="linear")
    >>> model.output.shape
    (None, None, 50)
    """

    config_aliases = {
        **RoFormerV2.config_aliases,
        "attention_key_size": ("attention_key_size",),
        "normalization": ("normalization",),
        "attention_scale": ("attention_scale",),
        "softmax_plus_min_length": ("softmax_plus_min_length",),
        "use_bias": ("use_bias",),
    }
    required_config = ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size")
    model_types = ("gau_alpha",)

    def __init__(self, attention_key_size: int = 128, normalization: str = "softmax_plus",
                 attention_scale: bool = True, softmax_plus_min_length: int = 16, use_bias: bool = False,
                 num_attention_heads: int = 1, hidden_act="swish", **kwargs):
        if isinstance(attention_key_size, bool) or not isinstance(attention_key_size, int) \
                or attention_key_size <= 0 or attention_key_size % 2:
            raise ValueError(f"GAU_alpha: attention_key_size must be a positive even integer (RoPE rotates pairs), "
                             f"got {attention_key_size!r}.")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"GAU_alpha: normalization must be one of {NORMALIZATIONS}, got {normalization!r}.")
        if use_bias:
            raise ValueError("GAU_alpha: use_bias=True is not implemented; GAU-α's units have no biases (the release "
                             "stores none).")
        if isinstance(hidden_act, (list, tuple)):
            raise ValueError(f"GAU_alpha: hidden_act must be one activation (the units' projection), got "
                             f"{hidden_act!r}.")
        self.attention_key_size = attention_key_size
        self.normalization = normalization
        self.attention_scale = bool(attention_scale)
        self.softmax_plus_min_length = softmax_plus_min_length
        super().__init__(num_attention_heads=num_attention_heads, hidden_act=hidden_act, **kwargs)

    # ----------------------------------------------------------------- hooks
    def apply_position_embedding(self, x):
        # RoPE over the query/key width of the units, computed once here.
        self.rotary = RotaryEmbedding(self.attention_key_size, name="Embedding-Rotary-Position")(x)
        return x

    def apply_main_layers(self, x, index):
        name = f"Transformer-{index}-GatedAttentionUnit"
        y = GatedAttentionUnit(
            self.intermediate_size, self.attention_key_size, activation=self.hidden_act, use_bias=False,
            normalization=self.normalization, attention_scale=self.attention_scale,
            attention_dropout=self.attention_dropout_rate, softmax_plus_min_length=self.softmax_plus_min_length,
            kernel_initializer=self.initializer(), name=name,
        )(x, attention_mask=self.attention_mask, rotary=self.rotary)
        y = Dropout(self.dropout_rate, name=f"{name}-Dropout")(y)
        x = keras.layers.Add(name=f"{name}-Add")([x, y])
        return UnscaledRMSNorm(name=f"{name}-Norm")(x)

    # ----------------------------------------------------------------- checkpoints
    def variable_mapping(self, fmt):
        if fmt != "google":
            raise ValueError(f"GAU-α checkpoints exist in Google (bert4keras) format only; got format {fmt!r}.")
        table = dict(_EMBEDDINGS)
        for i in range(self.num_hidden_layers):
            for weight, variable in _LAYER.items():
                table[f"Transformer-{i}-GatedAttentionUnit/{weight}"] = f"GAU_alpha/encoder/layer_{i}/{variable}"
        return table

    def export_config(self, fmt):
        name, config = super().export_config(fmt)
        config.update(attention_key_size=self.attention_key_size, normalization=self.normalization,
                      attention_scale=self.attention_scale, softmax_plus_min_length=self.softmax_plus_min_length)
        return name, config

    # ----------------------------------------------------------------- decoding (bert4x.generation)
    def decoding_unsupported(self):
        if self.model is None:
            return f"{type(self).__name__} is not built yet."
        return ("GAU-α has no cached decoding in bert4x: its gated attention units have no KV-cache step "
                "(decode_start/decode_step); generate with the uncached model (predict on the growing sequence).")
