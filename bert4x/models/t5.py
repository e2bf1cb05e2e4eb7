"""T5.1.1 and mT5: the encoder-decoder of Google's T5.1.1 / mT5 checkpoints (`model='t5.1.1'` / `model='mt5.1.1'`).

The architecture (T5.1.1; mT5 is the same with a 250k vocabulary):

- pre-norm blocks with RMS LayerNorm (`x / sqrt(mean(x²) + eps) * g`, no bias, no mean subtraction);
- a relative position bias from 32 buckets (max distance 128), bidirectional in the encoder and causal in the
  decoder, learned once per stack (in its first layer) and added in every layer; cross-attention has none;
- no scaling of q·k, no biases anywhere;
- gated-GELU feed-forward `wo(gelu(wi_0 x) * wi_1 x)` (GELU with the tanh approximation, as Google trained it);
- an LM head *untied* from the embedding, with no d_model^-0.5 rescaling.

T5 v1.0 (ReLU feed-forward, LM head tied to the embedding and rescaled) is `model='t5'` / `'t5.1.0'` (`T5_1_0`), and
every name has bert4keras's `_encoder` / `_decoder` variants, whose `.model` is that stack alone.

`build_transformer_model(config, checkpoint, model='mt5.1.1', return_keras_model=False)` returns a `T5` whose
`.encoder` maps `encoder_token_ids -> context` (padding positions zeroed), `.decoder` maps
`[context, decoder_token_ids] -> probabilities` (`with_lm='linear'`: logits) and `.model` maps
`[encoder_token_ids, decoder_token_ids]` to the same, for teacher-forced `fit`. The decoder starts from id 0 (pad)
and `</s>` = 1 ends; `decoder_token_ids` are the targets shifted right behind that 0.

Configs: a Hugging Face `config.json` (`d_model`, `d_kv`, `d_ff`, `num_layers`, `num_decoder_layers`, `num_heads`,
`feed_forward_proj='gated-gelu'`, `tie_word_embeddings=false`, ...) or the bert4keras-style JSON that bert4keras users
wrote from Google's `operative_config.gin` (`hidden_size`, `intermediate_size`, `num_attention_heads`,
`attention_head_size`, `num_hidden_layers`, `hidden_act: ["gelu", "linear"]`). Note that bert4x reads "gelu" as the
exact (erf) GELU, as bert4keras did; write `"gelu_tanh"` there (or use `feed_forward_proj`) to match Google's weights
exactly. The gin file itself is not parsed.

Checkpoints: Google's TF checkpoints (`shared/embedding`, `encoder/block_000/layer_000/SelfAttention/q`, ...,
`decoder/logits/kernel`; Adafactor `*_slot_*` variables are ignored) and Hugging Face `MT5ForConditionalGeneration` /
`T5ForConditionalGeneration` (`shared.weight`, `encoder.block.0.layer.0.SelfAttention.q.weight`, ..., `lm_head.weight`).

The trimmed Chinese vocabulary (`vocab/mt5_cn_trimmed/` in the shared data): `sentencepiece_cn.model` has 32596
pieces and `sentencepiece_cn_keep_tokens.json` lists 32598 mT5 ids. Entry j of the list is the mT5 id of trimmed
piece j for j < 32596 (pad 0, `</s>` 1 and unk 2 keep their ids; the 100 sentinels `▁<extra_id_99..0>` are mT5 ids
250000..250099). The two extra entries, 250100 and 250101, are not tokens at all: mT5 has 250000 sentencepiece pieces
plus 100 sentinels = 250100 ids, and its embedding is padded to 250112 rows, so those are two padding rows that no
tokenizer ever produces. `load_keep_tokens(keep_tokens_path, sp_model_path)` therefore keeps the first 32596 ids, so
that the model's vocabulary is exactly the tokenizer's (no unreachable outputs for generation to emit); pass
`keep_unused=True` for the full 32598-id list, e.g. to load a model fine-tuned by bert4keras with that list::

    keep = load_keep_tokens(".../sentencepiece_cn_keep_tokens.json", ".../sentencepiece_cn.model")
    t5 = build_transformer_model("config.json", "model.ckpt-1000000", model="mt5.1.1", keep_tokens=keep,
                                 return_keras_model=False)
    tokenizer = SpTokenizer(".../sentencepiece_cn.model")   # its ids index the trimmed embedding directly

Generation: `bert4x.generation.generate(t5, encoder_prompts, max_len=..., end_id=1, num_beams=..., ...)` (the T5 object
or its keras model) runs greedy, beam or sampling search with the shared fast generator: the encoder runs once per
batch, cross-attention keys/values are computed once, and the decoder keeps a self-attention cache (the `Transformer`
decoding interface: `decode_prepare`, `decode_start`, `decode_step`). Underneath,
`t5.generation_state(encoder_token_ids, max_length)` runs the encoder and prepares the caches and
`t5.decode_chunk(token_ids, index, state)` runs the decoder on new tokens only, returning `(logits, state)`.
"""

from __future__ import annotations

import json
import logging
import os

import keras
import numpy as np
from keras import ops

from bert4x import backend
from bert4x.layers import AttentionMask, Dropout, Embedding, FeedForward, MultiHeadAttention
from bert4x.layers.t5 import ContextMask, MaskPadding, RelativePositionBias
from bert4x.models.base import Transformer, _id_lists, register_model, src
from bert4x.training import Model

logger = logging.getLogger("bert4x")

# mT5's ids: 250000 sentencepiece pieces + 100 sentinels (<extra_id_99> = 250000 ... <extra_id_0> = 250099). Its
# embedding and LM head have 250112 rows; the last 12 are padding.
MT5_NUM_IDS = 250100


def load_keep_tokens(keep_tokens_path: str, sp_model_path: str | None = None, keep_unused: bool = False) -> list[int]:
    """Reads a bert4keras `keep_tokens` JSON list (the mT5 ids of a trimmed sentencepiece model's pieces).

    With `sp_model_path`, checks that the list covers every piece and drops the trailing ids that no piece has (the
    trimmed Chinese mT5 list ends with mT5's padding rows 250100 and 250101), unless `keep_unused=True`.

    Example:
    >>> import json, os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "keep_tokens.json")
    >>> with open(path, "w") as f:
    ...     json.dump([0, 1, 2, 259, 250100], f)
    >>> load_keep_tokens(path)
    [0, 1, 2, 259, 250100]
    """
    if not os.path.exists(keep_tokens_path):
        raise FileNotFoundError(f"keep_tokens file not found: {keep_tokens_path}")
    with open(keep_tokens_path, encoding="utf-8") as f:
        keep = json.load(f)
    if not isinstance(keep, list) or not all(isinstance(i, int) and i >= 0 for i in keep):
        raise ValueError(f"{keep_tokens_path} must hold a JSON list of non-negative token ids.")
    if len(set(keep)) != len(keep):
        raise ValueError(f"{keep_tokens_path} lists some ids twice; every kept id must be distinct.")
    if sp_model_path is None:
        return keep
    import sentencepiece as spm

    if not os.path.exists(sp_model_path):
        raise FileNotFoundError(f"sentencepiece model not found: {sp_model_path}")
    pieces = spm.SentencePieceProcessor(model_file=str(sp_model_path)).get_piece_size()
    if len(keep) < pieces:
        raise ValueError(
            f"{keep_tokens_path} lists {len(keep)} ids but {sp_model_path} has {pieces} pieces: they are not a pair."
        )
    extra = keep[pieces:]
    if extra and min(extra) < MT5_NUM_IDS:
        raise ValueError(
            f"{keep_tokens_path} has {len(extra)} ids beyond the {pieces} pieces of {sp_model_path}, and some of them "
            f"({[i for i in extra if i < MT5_NUM_IDS][:5]}) are real mT5 tokens: the list and the model do not match."
        )
    if extra and not keep_unused:
        logger.info(
            "load_keep_tokens: dropping %d trailing ids %s: mT5 embedding padding rows that no piece of %s maps to.",
            len(extra), extra, sp_model_path,
        )
        return keep[:pieces]
    return keep


# ----------------------------------------------------------------------------------------------- mapping tables
# Keras weight paths of one block; the checkpoint tables below map every one of them.
def _attention(stack: str, i: int, kind: str) -> str:
    return f"{stack}-Transformer-{i}-MultiHead{kind}Attention"


def _feed_forward(stack: str, i: int) -> str:
    return f"{stack}-Transformer-{i}-FeedForward"


def _google_block(stack: str, i: int) -> dict:
    """Google names: `<stack>/block_<iii>/layer_<jjj>/...`; kernels are stored `[in, out]` as in Keras."""
    p = f"{stack.lower()}/block_{i:03d}/"
    ff_layer = "layer_001" if stack == "Encoder" else "layer_002"
    table = {
        f"{_attention(stack, i, 'Self')}/qkv/kernel": src(*(p + f"layer_000/SelfAttention/{n}" for n in "qkv")),
        f"{_attention(stack, i, 'Self')}/output/kernel": p + "layer_000/SelfAttention/o",
        f"{_attention(stack, i, 'Self')}-Norm/scale": p + "layer_000/rms_norm/scale",
        f"{_feed_forward(stack, i)}/inner/kernel": p + f"{ff_layer}/DenseReluDense/wi_0/kernel",
        f"{_feed_forward(stack, i)}/gate/kernel": p + f"{ff_layer}/DenseReluDense/wi_1/kernel",
        f"{_feed_forward(stack, i)}/output/kernel": p + f"{ff_layer}/DenseReluDense/wo/kernel",
        f"{_feed_forward(stack, i)}-Norm/scale": p + f"{ff_layer}/rms_norm/scale",
    }
    if stack == "Decoder":
        table.update({
            f"{_attention(stack, i, 'Cross')}/q/kernel": p + "layer_001/EncDecAttention/q",
            f"{_attention(stack, i, 'Cross')}/kv/kernel": src(p + "layer_001/EncDecAttention/k",
                                                             p + "layer_001/EncDecAttention/v"),
            f"{_attention(stack, i, 'Cross')}/output/kernel": p + "layer_001/EncDecAttention/o",
            f"{_attention(stack, i, 'Cross')}-Norm/scale": p + "layer_001/rms_norm/scale",
        })
    return table


def _hf_block(stack: str, i: int) -> dict:
    """Hugging Face names: `<stack>.block.<i>.layer.<j>....weight`; Linear weights are `[out, in]`."""
    p = f"{stack.lower()}.block.{i}."
    ff_layer = "layer.1" if stack == "Encoder" else "layer.2"

    def linear(*names):
        return src(*(p + n + ".weight" for n in names), transpose=True)

    table = {
        f"{_attention(stack, i, 'Self')}/qkv/kernel": linear(*(f"layer.0.SelfAttention.{n}" for n in "qkv")),
        f"{_attention(stack, i, 'Self')}/output/kernel": linear("layer.0.SelfAttention.o"),
        f"{_attention(stack, i, 'Self')}-Norm/scale": p + "layer.0.layer_norm.weight",
        f"{_feed_forward(stack, i)}/inner/kernel": linear(f"{ff_layer}.DenseReluDense.wi_0"),
        f"{_feed_forward(stack, i)}/gate/kernel": linear(f"{ff_layer}.DenseReluDense.wi_1"),
        f"{_feed_forward(stack, i)}/output/kernel": linear(f"{ff_layer}.DenseReluDense.wo"),
        f"{_feed_forward(stack, i)}-Norm/scale": p + f"{ff_layer}.layer_norm.weight",
    }
    if stack == "Decoder":
        table.update({
            f"{_attention(stack, i, 'Cross')}/q/kernel": linear("layer.1.EncDecAttention.q"),
            f"{_attention(stack, i, 'Cross')}/kv/kernel": linear(
                "layer.1.EncDecAttention.k", "layer.1.EncDecAttention.v"
            ),
            f"{_attention(stack, i, 'Cross')}/output/kernel": linear("layer.1.EncDecAttention.o"),
            f"{_attention(stack, i, 'Cross')}-Norm/scale": p + "layer.1.layer_norm.weight",
        })
    return table


GOOGLE_TABLE = {
    "Embedding-Token/embeddings": src("shared/embedding", vocab=True),
    # Stored [heads, buckets]; Keras keeps [buckets, heads].
    "Encoder-Embedding-Relative-Position/embeddings": src(
        "encoder/block_000/layer_000/SelfAttention/relative_attention_bias", transpose=True),
    "Decoder-Embedding-Relative-Position/embeddings": src(
        "decoder/block_000/layer_000/SelfAttention/relative_attention_bias", transpose=True),
    "Encoder-Output-Norm/scale": "encoder/rms_norm/scale",
    "Decoder-Output-Norm/scale": "decoder/rms_norm/scale",
    # [d_model, vocab]: the vocabulary is the last axis.
    "Decoder-Output-LM/kernel": src("decoder/logits/kernel", vocab=True, vocab_axis=-1),
}

HF_TABLE = {
    "Embedding-Token/embeddings": src("shared.weight", vocab=True),
    "Encoder-Embedding-Relative-Position/embeddings":
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
    "Decoder-Embedding-Relative-Position/embeddings":
        "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
    "Encoder-Output-Norm/scale": "encoder.final_layer_norm.weight",
    "Decoder-Output-Norm/scale": "decoder.final_layer_norm.weight",
    "Decoder-Output-LM/kernel": src("lm_head.weight", transpose=True, vocab=True, vocab_axis=-1),
}


class _TiedLMHead:
    """T5 v1.0's LM head as one callable (`layers['Decoder-Output-LM'](x)`): the rescaling layer, then the token
    embedding used as the output projection. Not a Keras layer: it owns no weights, the two layers it calls do."""

    def __init__(self, scale, embedding):
        self.scale, self.embedding, self.name = scale, embedding, "Decoder-Output-LM"

    def __call__(self, x):
        return self.embedding(self.scale(x), mode="dense")


def _resolve_feed_forward(feed_forward_proj: str | None, hidden_act) -> str:
    """The gate activation of the gated feed-forward, from HF `feed_forward_proj` or bert4keras `hidden_act`."""
    v1_0 = "T5 v1.0 (a non-gated feed-forward, with an LM head tied to the embedding) is model='t5.1.0'"
    if feed_forward_proj is not None:
        kind, _, act = str(feed_forward_proj).partition("-")
        if kind != "gated" or not act:
            raise ValueError(f"feed_forward_proj={feed_forward_proj!r}: {v1_0}; T5.1.1/mT5 use 'gated-gelu'.")
        # Hugging Face's 'gated-gelu' is the tanh approximation (gelu_new), as Google trained T5.1.1/mT5.
        resolved = "gelu_tanh" if act == "gelu" else backend.canonical_activation(act)
        if hidden_act is not None and _resolve_feed_forward(None, hidden_act) != resolved:
            raise ValueError(f"feed_forward_proj={feed_forward_proj!r} contradicts hidden_act={hidden_act!r}.")
        return resolved
    if hidden_act is None:
        return "gelu_tanh"
    if isinstance(hidden_act, (list, tuple)) and len(hidden_act) == 2:
        if backend.canonical_activation(hidden_act[1]) != "linear":
            raise ValueError(f"hidden_act={list(hidden_act)}: the second (gate) activation must be 'linear'.")
        return backend.canonical_activation(hidden_act[0])
    raise ValueError(
        f"hidden_act={hidden_act!r}: T5.1.1/mT5 need a gated feed-forward, written [\"gelu\", \"linear\"] in "
        f"bert4keras configs; {v1_0}."
    )


class T5(Transformer):
    """The T5.1.1 encoder-decoder (mT5 uses the same code); see the module docstring.

    Example:
    >>> from bert4x.models import build_transformer_model
    >>> t5 = build_transformer_model({"vocab_size": 40, "d_model": 8, "d_kv": 4, "d_ff": 16, "num_layers": 1,
    ...     "num_heads": 2}, model="mt5.1.1", with_lm="linear", return_keras_model=False)
    >>> [tuple(t.shape) for t in t5.model.outputs], [i.name for i in t5.decoder.inputs]
    ([(None, None, 40)], ['Input-Context', 'Decoder-Input-Token'])
    """

    config_aliases = {
        "vocab_size": ("vocab_size",),
        "hidden_size": ("d_model", "hidden_size"),
        "num_hidden_layers": ("num_layers", "num_hidden_layers"),
        "num_decoder_layers": ("num_decoder_layers",),
        "num_attention_heads": ("num_heads", "num_attention_heads"),
        "attention_head_size": ("d_kv", "attention_head_size"),
        "intermediate_size": ("d_ff", "intermediate_size"),
        "feed_forward_proj": ("feed_forward_proj",),
        "hidden_act": ("hidden_act",),
        "dropout_rate": ("dropout_rate", "hidden_dropout_prob"),
        "attention_dropout_rate": ("attention_dropout_rate", "attention_probs_dropout_prob"),
        "layer_norm_eps": ("layer_norm_epsilon", "layer_norm_eps"),
        "relative_attention_num_buckets": ("relative_attention_num_buckets",),
        "relative_attention_max_distance": ("relative_attention_max_distance",),
        "tie_word_embeddings": ("tie_word_embeddings",),
        "initializer_range": ("initializer_range",),
    }
    required_config = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    model_types = ("t5", "mt5")
    # initializer_factor only scales HF's random init; dense_act_fn / is_gated_act are derived from feed_forward_proj.
    ignored_config_keys = frozenset(
        {"initializer_factor", "dense_act_fn", "is_gated_act", "n_positions", "output_past"}
    )
    # Old Hugging Face T5 checkpoints carry an unused cross-attention position table (transformers ignores it too).
    ignored_checkpoint_variables = {
        "huggingface": (r"^decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$",),
    }
    hf_model_type = "t5"
    hf_architecture = "T5ForConditionalGeneration"

    def __init__(
        self,
        num_decoder_layers: int | None = None,
        feed_forward_proj: str | None = None,
        hidden_act=None,
        relative_attention_num_buckets: int = 32,
        relative_attention_max_distance: int = 128,
        tie_word_embeddings: bool = False,
        with_lm: bool | str = True,
        layer_norm_eps: float = 1e-6,
        dropout_rate: float = 0.0,
        attention_dropout_rate: float | None = None,
        **kwargs,
    ):
        activation, self.gated, self.tied = self._resolve_version(feed_forward_proj, hidden_act, tie_word_embeddings)
        # Hugging Face's T5 applies its one dropout_rate to attention probabilities too.
        attention_dropout_rate = dropout_rate if attention_dropout_rate is None else attention_dropout_rate
        super().__init__(hidden_act=activation, layer_norm_eps=layer_norm_eps, dropout_rate=dropout_rate,
                         attention_dropout_rate=attention_dropout_rate, **kwargs)
        self.num_decoder_layers = num_decoder_layers or self.num_hidden_layers
        self.relative_attention_num_buckets = relative_attention_num_buckets
        self.relative_attention_max_distance = relative_attention_max_distance
        self.with_lm = with_lm
        self.layers: dict[str, keras.layers.Layer] = {}
        self.encoder: keras.Model | None = None
        self.decoder: keras.Model | None = None

    def _resolve_version(self, feed_forward_proj, hidden_act, tie_word_embeddings) -> tuple[str, bool, bool]:
        """(feed-forward activation, gated, LM head tied) of this T5 version; T5.1.1/mT5: gated and untied."""
        if tie_word_embeddings:
            raise ValueError(
                "tie_word_embeddings=True: bert4x's T5.1.1/mT5 has an LM head untied from the embedding "
                "(decoder/logits/kernel, lm_head.weight); tied T5 v1.0 is model='t5.1.0'. transformers >= 5 writes "
                "tie_word_embeddings=true into every mT5 config it saves: if the checkpoint has its own "
                "lm_head.weight, set tie_word_embeddings to false in the config (or pass tie_word_embeddings=False)."
            )
        return _resolve_feed_forward(feed_forward_proj, hidden_act), True, False

    def lm_logits(self, x):
        """The LM head on decoder hidden states: the untied kernel, or (T5 v1.0) the tied, rescaled embedding."""
        return self.layers["Decoder-Output-LM"](x)

    @classmethod
    def validate_config(cls, config, config_path):
        # Hugging Face's T5Config defaults are T5 v1.0's: a relu feed-forward and a tied head.
        if config.get("model_type") == "t5":
            for key, default in (("feed_forward_proj", "relu"), ("tie_word_embeddings", True)):
                if key not in config:
                    raise ValueError(
                        f"Config {config_path} (model_type 't5') does not set {key}, so it means {default!r}, i.e. "
                        "T5 v1.0, which is model='t5.1.0'; T5.1.1 configs set feed_forward_proj='gated-gelu' "
                        "and tie_word_embeddings=false."
                    )
        if config.get("is_gated_act") is False:
            raise ValueError(f"Config {config_path} has is_gated_act=false: T5.1.1/mT5 use a gated feed-forward.")

    # ----------------------------------------------------------------------------------------------- building
    def _layer(self, cls, name: str, **kwargs):
        """The layer called `name`, made on first use: the encoder, decoder and full model share every layer."""
        if name not in self.layers:
            self.layers[name] = cls(name=name, **kwargs)
        return self.layers[name]

    def _norm(self, name: str):
        return self._layer(keras.layers.RMSNormalization, name, epsilon=self.layer_norm_eps)

    def _dropout(self, name: str):
        return self._layer(Dropout, name, rate=self.dropout_rate)

    def _attention_layer(self, name: str, cross: bool = False):
        return self._layer(
            MultiHeadAttention, name, heads=self.num_attention_heads, head_size=self.attention_head_size,
            out_dim=self.hidden_size, use_bias=False, scaled=False, attention_dropout=self.attention_dropout_rate,
            cross_attention=cross, kernel_initializer=self.initializer(),
        )

    def _feed_forward_layer(self, name: str):
        return self._layer(
            FeedForward, name, units=self.intermediate_size, activation=self.hidden_act, gated=self.gated,
            use_bias=False, dropout_rate=self.dropout_rate, kernel_initializer=self.initializer(),
        )

    def _position_bias_layer(self, name: str, bidirectional: bool):
        return self._layer(
            RelativePositionBias, name, heads=self.num_attention_heads, num_buckets=self.relative_attention_num_buckets,
            max_distance=self.relative_attention_max_distance, bidirectional=bidirectional,
            embeddings_initializer=self.initializer(),
        )

    def _residual(self, name: str, x, sublayer):
        """Pre-norm residual block: `x + dropout(sublayer(norm(x)))`."""
        y = sublayer(self._norm(f"{name}-Norm")(x))
        y = self._dropout(f"{name}-Dropout")(y)
        return self._layer(keras.layers.Add, f"{name}-Add")([x, y])

    # Encoder: the template's hooks.
    def get_inputs(self):
        return [keras.Input((self.sequence_length,), dtype="int32", name="Encoder-Input-Token")]

    def apply_embeddings(self, inputs):
        token_ids = inputs[0]
        x = self._layer(Embedding, "Embedding-Token", input_dim=self.vocab_size, output_dim=self.hidden_size,
                        embeddings_initializer=self.initializer())(token_ids)
        self._encoder_mask = self._layer(AttentionMask, "Encoder-Attention-Mask", mode="encoder")(token_ids)
        self._encoder_bias = self._position_bias_layer("Encoder-Embedding-Relative-Position", True)(x)
        return self._dropout("Encoder-Embedding-Dropout")(x)

    def apply_main_layers(self, x, index):
        attention = self._attention_layer(_attention("Encoder", index, "Self"))
        x = self._residual(
            attention.name, x,
            lambda y, layer=attention: layer(y, attention_mask=self._encoder_mask, attention_bias=self._encoder_bias),
        )
        return self._residual(_feed_forward("Encoder", index), x,
                              self._feed_forward_layer(_feed_forward("Encoder", index)))

    def apply_final_layers(self, x):
        x = self._norm("Encoder-Output-Norm")(x)
        return self._dropout("Encoder-Output-Dropout")(x)

    # Decoder.
    def apply_decoder(self, context, token_ids):
        x = self.layers["Embedding-Token"](token_ids)
        # Causal only: the decoder's first token is id 0 (= pad), so padding cannot be read from the ids.
        self_mask = self._layer(AttentionMask, "Decoder-Attention-Mask", mode="lm", pad_id=-1)(token_ids)
        context_mask = self._layer(ContextMask, "Decoder-Context-Mask")(context)
        bias = self._position_bias_layer("Decoder-Embedding-Relative-Position", False)(x)
        x = self._dropout("Decoder-Embedding-Dropout")(x)
        for index in range(self.num_decoder_layers):
            self_attention = self._attention_layer(_attention("Decoder", index, "Self"))
            cross_attention = self._attention_layer(_attention("Decoder", index, "Cross"), cross=True)
            x = self._residual(self_attention.name, x,
                               lambda y, layer=self_attention: layer(y, attention_mask=self_mask, attention_bias=bias))
            x = self._residual(cross_attention.name, x,
                               lambda y, layer=cross_attention: layer(y, context, attention_mask=context_mask))
            x = self._residual(_feed_forward("Decoder", index), x,
                               self._feed_forward_layer(_feed_forward("Decoder", index)))
        x = self._norm("Decoder-Output-Norm")(x)
        x = self._dropout("Decoder-Output-Dropout")(x)
        if not self.with_lm:
            return x
        if self.tied:  # T5 v1.0: the embedding's transpose, on hidden states scaled by d_model ** -0.5
            scale = self._layer(keras.layers.Rescaling, "Decoder-Output-LM-Scale", scale=self.hidden_size ** -0.5)
            self.layers.setdefault("Decoder-Output-LM", _TiedLMHead(scale, self.layers["Embedding-Token"]))
            x = self.layers["Embedding-Token"](scale(x), mode="dense")
        else:
            x = self._layer(keras.layers.Dense, "Decoder-Output-LM", units=self.vocab_size, use_bias=False,
                            kernel_initializer=self.initializer())(x)
        activation = "softmax" if self.with_lm is True else self.with_lm
        return self._layer(keras.layers.Activation, "Decoder-Output-LM-Activation", activation=activation,
                           dtype=_output_dtype())(x)

    def build(self) -> keras.Model:
        self.layers = {}
        encoder_ids = self.get_inputs()[0]
        x = self.apply_embeddings([encoder_ids])
        for index in range(self.num_hidden_layers):
            x = self.apply_main_layers(x, index)
        # Padding rows of the context are zeros: that is how a decoder given only the context finds them.
        context = self._layer(MaskPadding, "Encoder-Output-Masked")(self.apply_final_layers(x), encoder_ids)
        self.encoder = keras.Model(encoder_ids, context, name=f"{self.name}_encoder" if self.name else "encoder")
        context_in = keras.Input((self.sequence_length, self.hidden_size), name="Input-Context")
        decoder_ids = keras.Input((None,), dtype="int32", name="Decoder-Input-Token")
        self.decoder = keras.Model([context_in, decoder_ids], self.apply_decoder(context_in, decoder_ids),
                                   name=f"{self.name}_decoder" if self.name else "decoder")
        self.model = Model([encoder_ids, decoder_ids], self.apply_decoder(context, decoder_ids), name=self.name)
        self.model.transformer = self  # lets `Generator(keras_model)` reach the decoding methods
        return self.model

    # ----------------------------------------------------------------------------------------------- cached decoding
    def generation_state(self, encoder_token_ids, max_length: int) -> dict:
        """Runs the encoder once and prepares the caches for `decode_chunk` (up to `max_length` decoder positions).

        Returns a dict of tensors: `context_mask` `[batch, 1, 1, enc_len]`, `cross` (one precomputed `[batch, 2,
        enc_len, heads, head_size]` key/value per decoder layer) and `self` (zeroed self-attention caches of
        `max_length` positions).
        """
        if self.encoder is None:
            raise RuntimeError("Build the model first.")
        token_ids = ops.convert_to_tensor(encoder_token_ids, dtype="int32")
        context = self.encoder(token_ids, training=False)
        batch = ops.shape(token_ids)[0]
        cross = []
        for index in range(self.num_decoder_layers):
            attention = self.layers[_attention("Decoder", index, "Cross")]
            kv = attention.kv_dense(context)  # [batch, enc_len, 2 * heads * head_size], k then v
            shape = ops.shape(kv)
            kv = ops.reshape(kv, (shape[0], shape[1], 2, self.num_attention_heads, self.attention_head_size))
            cross.append(ops.transpose(kv, (0, 2, 1, 3, 4)))
        dtype = self.layers[_attention("Decoder", 0, "Self")].compute_dtype
        cache_shape = (batch, 2, max_length, self.num_attention_heads, self.attention_head_size)
        return {
            "context_mask": backend.padding_mask(token_ids, 0),
            "cross": cross,
            "self": [ops.zeros(cache_shape, dtype=dtype) for _ in range(self.num_decoder_layers)],
        }

    def decode_chunk(self, token_ids, index, state: dict):
        """Decoder logits `[batch, t, vocab]` (float32) of `token_ids` `[batch, t]` at positions `index..index+t-1`.

        Keys and values of earlier positions come from `state['self']`, which is returned updated; the encoder is not
        run again. Pure tensor code, so it can be jit-compiled by the generator.
        """
        token_ids = ops.convert_to_tensor(token_ids, dtype="int32")
        max_length = ops.shape(state["self"][0])[2]
        query_positions = index + ops.arange(ops.shape(token_ids)[1], dtype="int32")
        key_positions = ops.arange(max_length, dtype="int32")
        bias = self.layers["Decoder-Embedding-Relative-Position"].compute_bias(query_positions, key_positions)
        causal = ops.less_equal(ops.expand_dims(key_positions, 0), ops.expand_dims(query_positions, 1))
        causal = ops.expand_dims(ops.expand_dims(causal, 0), 0)
        x = self.layers["Embedding-Token"](token_ids)
        caches = []
        for i in range(self.num_decoder_layers):
            name = _attention("Decoder", i, "Self")
            y, cache = self.layers[name](self.layers[f"{name}-Norm"](x), attention_mask=causal, attention_bias=bias,
                                         cache=state["self"][i], cache_update_index=index)
            caches.append(cache)
            x = x + y
            name = _attention("Decoder", i, "Cross")
            y, _ = self.layers[name](self.layers[f"{name}-Norm"](x), attention_mask=state["context_mask"],
                                     cache=state["cross"][i])
            x = x + y
            name = _feed_forward("Decoder", i)
            x = x + self.layers[name](self.layers[f"{name}-Norm"](x))
        x = self.layers["Decoder-Output-Norm"](x)
        logits = self.layers["Decoder-Output-LM"](x)
        return ops.cast(logits, "float32"), dict(state, self=caches)

    # The `Transformer` decoding interface (bert4x.generation): prompts are encoder inputs, right-padded with 0 (the
    # encoder masks padding); the decoder starts from id 0 and the index-th generated token sits at decoder
    # position index + 1.
    decoder_start_id = 0

    def decoding_unsupported(self):
        if self.model is None:
            return f"{type(self).__name__} is not built yet."
        if self.with_lm is False:
            return "the model has no LM head; build it with with_lm=True or 'linear'."
        return None

    def decode_prepare(self, prompts, segment_ids, pad_to_multiple, max_len):
        if segment_ids is not None:
            raise ValueError("generate: T5/mT5 prompts are encoder inputs and take no segment_ids.")
        prompts = _id_lists(prompts, "prompts")
        if not prompts:
            raise ValueError("generate: prompts is empty; pass at least one prompt.")
        for n, p in enumerate(prompts):
            bad = [i for i in p if not 0 < i < self.vocab_size]
            if not p or bad:
                raise ValueError(
                    f"generate: encoder prompts[{n}] must be non-empty ids in [1, {self.vocab_size}) (vocab_size; 0 "
                    f"is padding); got {len(p)} ids, bad ones: {bad[:5]}."
                )
        longest = max(len(p) for p in prompts)
        length = -(-longest // pad_to_multiple) * pad_to_multiple
        token_ids = np.zeros((len(prompts), length), dtype=np.int32)
        for n, p in enumerate(prompts):
            token_ids[n, :len(p)] = p
        return {"token_ids": token_ids}

    def decode_start(self, prompt, max_len):
        # Slots for the start token and every generated token (the search steps after the last one too).
        state = self.generation_state(prompt["token_ids"], max_len + 1)
        start = ops.full((prompt["token_ids"].shape[0], 1), self.decoder_start_id, "int32")
        logits, state = self.decode_chunk(start, 0, state)
        return logits[:, 0], state

    def decode_step(self, token_ids, cache, index):
        logits, cache = self.decode_chunk(ops.expand_dims(ops.cast(token_ids, "int32"), 1), index + 1, cache)
        return logits[:, 0], cache

    # ----------------------------------------------------------------------------------------------- checkpoints
    def variable_mapping(self, fmt):
        if fmt == "google":
            table, block = dict(GOOGLE_TABLE), _google_block
        elif fmt == "huggingface":
            table, block = dict(HF_TABLE), _hf_block
        else:
            raise ValueError(f"Unknown checkpoint format {fmt!r}.")
        for i in range(self.num_hidden_layers):
            table.update(block("Encoder", i))
        for i in range(self.num_decoder_layers):
            table.update(block("Decoder", i))
        return table

    def tied_variables(self, fmt):
        if fmt == "huggingface":  # per-stack copies of the shared embedding that some HF checkpoints store
            return {"encoder.embed_tokens.weight": "shared.weight", "decoder.embed_tokens.weight": "shared.weight"}
        return {}

    def export_config(self, fmt):
        if fmt == "google":  # the bert4keras-style JSON
            return "config.json", {
                "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size,
                "num_hidden_layers": self.num_hidden_layers,
                "num_decoder_layers": self.num_decoder_layers,
                "num_attention_heads": self.num_attention_heads,
                "attention_head_size": self.attention_head_size,
                "intermediate_size": self.intermediate_size,
                "hidden_act": [self.hidden_act, "linear"],
                "dropout_rate": self.dropout_rate,
                "attention_dropout_rate": self.attention_dropout_rate,
                "layer_norm_eps": self.layer_norm_eps,
                "relative_attention_num_buckets": self.relative_attention_num_buckets,
                "relative_attention_max_distance": self.relative_attention_max_distance,
                "initializer_range": self.initializer_range,
            }
        hf_act = {"gelu_tanh": "gelu", "silu": "silu", "relu": "relu"}.get(self.hidden_act)
        if hf_act is None:
            raise ValueError(
                f"The gated feed-forward activation {self.hidden_act!r} has no Hugging Face feed_forward_proj "
                "spelling ('gated-gelu' means the tanh GELU); save in the 'google' format instead."
            )
        return "config.json", {
            "model_type": self.hf_model_type,
            "architectures": [self.hf_architecture],
            "vocab_size": self.vocab_size,
            "d_model": self.hidden_size,
            "d_kv": self.attention_head_size,
            "d_ff": self.intermediate_size,
            "num_layers": self.num_hidden_layers,
            "num_decoder_layers": self.num_decoder_layers,
            "num_heads": self.num_attention_heads,
            "relative_attention_num_buckets": self.relative_attention_num_buckets,
            "relative_attention_max_distance": self.relative_attention_max_distance,
            "dropout_rate": self.dropout_rate,
            "layer_norm_epsilon": self.layer_norm_eps,
            "feed_forward_proj": f"gated-{hf_act}",
            "tie_word_embeddings": False,
            "is_encoder_decoder": True,
            "pad_token_id": 0,
            "eos_token_id": 1,
            "decoder_start_token_id": 0,
        }


@register_model("t5.1.1")
class T5_1_1(T5):
    """Google's English T5.1.1 (`model='t5.1.1'`)."""


@register_model("mt5.1.1")
class MT5(T5):
    """Google's multilingual mT5 (`model='mt5.1.1'`): T5.1.1 with a 250112-row vocabulary."""

    hf_model_type = "mt5"
    hf_architecture = "MT5ForConditionalGeneration"


def _renamed(source, *pairs):
    names = source.names if not isinstance(source, str) else (source,)
    for old, new in pairs:
        names = tuple(n.replace(old, new) for n in names)
    if isinstance(source, str):
        return names[0]
    return src(*names, transpose=source.transpose, vocab=source.vocab, vocab_axis=source.vocab_axis)


@register_model("t5", "t5.1.0")
class T5_1_0(T5):
    """Google's original T5 (v1.0, `model='t5'` or `'t5.1.0'`): a ReLU feed-forward (`wi`, `wo`), and an LM head tied
    to the embedding, applied to decoder outputs scaled by `d_model ** -0.5`. Google names use `layer_norm` /
    `final_layer_norm` where T5.1.1 has `rms_norm`.

    Example:
    >>> from bert4x.models import build_transformer_model
    >>> t5 = build_transformer_model({"vocab_size": 40, "d_model": 8, "d_kv": 4, "d_ff": 16, "num_layers": 1,
    ...     "num_heads": 2}, model="t5.1.0", with_lm="linear", return_keras_model=False)
    >>> any("Decoder-Output-LM/" in w.path for w in t5.model.weights)
    False
    """

    ignored_config_keys = T5.ignored_config_keys | {"scale_decoder_outputs"}

    def __init__(self, tie_word_embeddings: bool = True, **kwargs):
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def _resolve_version(self, feed_forward_proj, hidden_act, tie_word_embeddings):
        if not tie_word_embeddings:
            raise ValueError("tie_word_embeddings=False: T5 v1.0 ties its LM head to the embedding; an untied head "
                             "is T5.1.1 (model='t5.1.1').")
        gated = "T5 v1.0 has a non-gated feed-forward; a gated one is T5.1.1 / mT5 (model='t5.1.1' or 'mt5.1.1')"
        if feed_forward_proj is not None:
            if str(feed_forward_proj).startswith("gated"):
                raise ValueError(f"feed_forward_proj={feed_forward_proj!r}: {gated}.")
            activation = backend.canonical_activation(feed_forward_proj)
            if hidden_act is not None and backend.canonical_activation(hidden_act) != activation:
                raise ValueError(f"feed_forward_proj={feed_forward_proj!r} contradicts hidden_act={hidden_act!r}.")
            return activation, False, True
        if isinstance(hidden_act, (list, tuple)):
            raise ValueError(f"hidden_act={list(hidden_act)}: {gated}.")
        return backend.canonical_activation(hidden_act or "relu"), False, True

    @classmethod
    def validate_config(cls, config, config_path):
        if config.get("is_gated_act") is True:
            raise ValueError(f"Config {config_path} has is_gated_act=true: that is T5.1.1 (model='t5.1.1').")
        if config.get("scale_decoder_outputs") is False:
            raise ValueError(f"Config {config_path} has scale_decoder_outputs=false; T5 v1.0 scales by d_model**-0.5.")

    def variable_mapping(self, fmt):
        table = super().variable_mapping(fmt)
        table = {k: v for k, v in table.items() if "/gate/" not in k and not k.startswith("Decoder-Output-LM/")}
        if fmt == "google":
            pairs = (("encoder/rms_norm/", "encoder/final_layer_norm/"),
                     ("decoder/rms_norm/", "decoder/final_layer_norm/"), ("rms_norm/", "layer_norm/"),
                     ("/wi_0/", "/wi/"))
        else:
            pairs = ((".wi_0.", ".wi."),)
        return {k: _renamed(v, *pairs) for k, v in table.items()}

    def tied_variables(self, fmt):
        if fmt == "huggingface":
            return dict(super().tied_variables(fmt), **{"lm_head.weight": "shared.weight"})
        return {}

    def export_config(self, fmt):
        name, config = super().export_config(fmt) if fmt == "google" else (None, None)
        if fmt == "google":
            config["hidden_act"] = self.hidden_act
            return name, config
        return "config.json", {
            "model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "vocab_size": self.vocab_size,
            "d_model": self.hidden_size, "d_kv": self.attention_head_size, "d_ff": self.intermediate_size,
            "num_layers": self.num_hidden_layers, "num_decoder_layers": self.num_decoder_layers,
            "num_heads": self.num_attention_heads,
            "relative_attention_num_buckets": self.relative_attention_num_buckets,
            "relative_attention_max_distance": self.relative_attention_max_distance,
            "dropout_rate": self.dropout_rate, "layer_norm_epsilon": self.layer_norm_eps,
            "feed_forward_proj": self.hidden_act, "tie_word_embeddings": True, "is_encoder_decoder": True,
            "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
        }


def _stack_variant(base: type, part: str) -> type:
    """bert4keras's `<name>_encoder` / `<name>_decoder`: the same T5 whose `.model` is one stack. The encoder maps
    `Encoder-Input-Token` to the context; the decoder maps `[Input-Context, Decoder-Input-Token]` to the LM output."""

    def build(self):
        base.build(self)
        self.model = self.encoder if part == "encoder" else self.decoder
        return self.model

    doc = f"{base.__name__}'s {part} alone (bert4keras's `_{part}` model names); see `{base.__name__}`."
    return type(f"{base.__name__}_{part.capitalize()}", (base,), {"build": build, "__doc__": doc,
                                                                 "__module__": __name__})


for _names, _base in ((("t5", "t5.1.0"), T5_1_0), (("t5.1.1",), T5_1_1), (("mt5.1.1",), MT5)):
    for _part in ("encoder", "decoder"):
        _cls = _stack_variant(_base, _part)
        globals()[_cls.__name__] = _cls
        register_model(*(f"{n}_{_part}" for n in _names))(_cls)


def _output_dtype():
    # Probabilities/logits leave the model in float32 even under mixed precision.
    return "float32" if keras.config.dtype_policy().compute_dtype != "float32" else None
