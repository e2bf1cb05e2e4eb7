"""The GPT family, always causal language models with an LM head tied to the token embedding:

- `gpt`: OpenAI's post-LayerNorm GPT (CDial-GPT, NEZHA-GEN): token (+ segment) + position embeddings with no
  LayerNorm, then BERT's layers (Att -> Add -> LN -> FFN -> Add -> LN).
- `gpt2`: GPT-2 (CPM-LM): pre-LayerNorm layers (LN -> Att -> Add -> LN -> FFN -> Add) and a final `Output-Norm`.
- `gpt2_ml`: GPT2-ML (Grover's code): embeddings then `Embedding-Norm`; each layer is Att -> Add, then
  LN (`FeedForward-Norm-0`) -> FFN, added to the un-normalised stream, then LN (`FeedForward-Norm-1`).

Checkpoints: bert4keras-converted TF checkpoints of GPT / GPT-2 (`gpt/embeddings/...`, `gpt/transformer/layer_N/...`,
`gpt/output/LayerNorm/...`), GPT2-ML's own (`newslm/embeddings/...`, `newslm/layerNN/...`), and Hugging Face
`OpenAIGPTLMHeadModel` (CDial-GPT's format) / `GPT2LMHeadModel` folders. GPT2-ML has no Hugging Face format.

Decoding: BERT's `decode_prepare` / `decode_start` / `decode_step` (`bert4x.models.cached_decoding`) with a key/value
cache; GPT-2 and GPT2-ML give their own layer order (`decode_blocks`).
"""

from __future__ import annotations

import keras

from bert4x.layers import AttentionMask, Dropout, FeedForward, MultiHeadAttention
from bert4x.models.base import register_model, src
from bert4x.models.bert import BERT, GOOGLE_TABLE, _google_layer_table
from bert4x.models.cached_decoding import pre_norm_block

_GPT_IGNORED = frozenset({"summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels",
                          "summary_first_dropout", "embd_pdrop", "n_ctx", "predict_special_tokens",
                          "reorder_and_upcast_attn", "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
                          "output_past"})


def _rename(source, old: str, new: str):
    if isinstance(source, str):
        return source.replace(old, new)
    return src(*(n.replace(old, new) for n in source.names), transpose=source.transpose, vocab=source.vocab)


def _conv1d_layer(p: str, attention: str, feed_forward: str, norms: tuple[str, str]) -> dict:
    """Hugging Face GPT / GPT-2 layer `p` (Conv1D weights are stored `[in, out]`, as Keras keeps them)."""
    return {
        f"{attention}/qkv/kernel": p + "attn.c_attn.weight",
        f"{attention}/qkv/bias": p + "attn.c_attn.bias",
        f"{attention}/output/kernel": p + "attn.c_proj.weight",
        f"{attention}/output/bias": p + "attn.c_proj.bias",
        f"{attention}-Norm/gamma": p + f"{norms[0]}.weight",
        f"{attention}-Norm/beta": p + f"{norms[0]}.bias",
        f"{feed_forward}/inner/kernel": p + "mlp.c_fc.weight",
        f"{feed_forward}/inner/bias": p + "mlp.c_fc.bias",
        f"{feed_forward}/output/kernel": p + "mlp.c_proj.weight",
        f"{feed_forward}/output/bias": p + "mlp.c_proj.bias",
        f"{feed_forward}-Norm/gamma": p + f"{norms[1]}.weight",
        f"{feed_forward}-Norm/beta": p + f"{norms[1]}.bias",
    }


@register_model("gpt")
class GPT(BERT):
    """OpenAI GPT: a causal LM with BERT's post-LayerNorm layers and no embedding LayerNorm.

    Inputs: `[token_ids]`, plus `segment_ids` when `segment_vocab_size > 0` (with `shared_segment_embeddings=True`,
    as CDial-GPT, segment ids are token ids of the shared table). Output: next-token probabilities
    (`final_activation='linear'`: logits) from the LM head tied to the token embedding. Padding is not masked:
    pad on the right (causal attention never reads it).

    Args:
        final_activation: activation of the LM head ('softmax' or 'linear').
        **kwargs: BERT's arguments (no pooler / NSP / MLM heads).

    Example:
    >>> from bert4x.models import build_transformer_model
    >>> model = build_transformer_model({"vocab_size": 50, "n_embd": 8, "n_layer": 1, "n_head": 2,
    ...     "n_positions": 16, "model_type": "openai-gpt"}, model="gpt")
    >>> model.output.shape
    (None, None, 50)
    """

    config_aliases = dict(BERT.config_aliases, **{
        "hidden_size": ("n_embd", "hidden_size"),
        "num_hidden_layers": ("n_layer", "num_hidden_layers"),
        "num_attention_heads": ("n_head", "num_attention_heads"),
        "intermediate_size": ("n_inner", "intermediate_size"),
        "hidden_act": ("afn", "activation_function", "hidden_act"),
        "dropout_rate": ("resid_pdrop", "hidden_dropout_prob", "dropout_rate"),
        "attention_dropout_rate": ("attn_pdrop", "attention_probs_dropout_prob", "attention_dropout_rate"),
        "max_position": ("n_positions", "max_position_embeddings", "max_position"),
        "layer_norm_eps": ("layer_norm_epsilon", "layer_norm_eps"),
    })
    required_config = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
    model_types = ("openai-gpt",)
    ignored_config_keys = BERT.ignored_config_keys | _GPT_IGNORED
    hf_prefix = "transformer."
    decode_hides_pad_keys = False  # the model's mask is causal only
    handles_embedding_options = True
    supports_padding_removal = False

    def __init__(self, final_activation: str = "softmax", intermediate_size: int | None = None,
                 segment_vocab_size: int = 0, layer_norm_eps: float = 1e-5, hidden_act: str = "gelu",
                 application: str = "lm", **kwargs):
        for option in ("with_pool", "with_nsp", "with_mlm"):
            if kwargs.get(option):
                raise ValueError(f"{type(self).__name__} is a language model with its LM head; it has no {option}.")
        if application not in ("encoder", "lm"):
            raise ValueError(f"{type(self).__name__} is a causal language model: application={application!r} does "
                             "not apply (leave it at the default).")
        hidden = kwargs.get("hidden_size")
        if intermediate_size is None and isinstance(hidden, int):
            intermediate_size = 4 * hidden  # GPT / GPT-2's feed-forward width when the config gives none
        super().__init__(intermediate_size=intermediate_size, segment_vocab_size=segment_vocab_size,
                         layer_norm_eps=layer_norm_eps, hidden_act=hidden_act, application="lm", **kwargs)
        if self.embedding_size != self.hidden_size:
            raise ValueError(f"{type(self).__name__}: embedding_size ({self.embedding_size}) != hidden_size "
                             f"({self.hidden_size}) is not implemented: the tied LM head reads hidden states of the "
                             "embedding's width.")
        self.final_activation = final_activation
        self.with_mlm = True  # the LM head is always there

    @classmethod
    def applications(cls):
        return ("encoder", "lm")

    @classmethod
    def from_config(cls, config, config_path="<config>", **kwargs):
        config = dict(config)
        # 'afn' is OpenAIGPT's key (CDial-GPT's config.json has no model_type), where 'gelu' means the tanh GELU.
        if config.get("afn") == "gelu":
            config["afn"] = "gelu_tanh"
        if config.get("n_special", 0):
            raise ValueError(f"Config {config_path} has n_special={config['n_special']}: special-token rows beyond "
                             "vocab_size are not implemented; fold them into vocab_size.")
        config.pop("n_special", None)
        if config.get("scale_attn_weights") is False or config.get("scale_attn_by_inverse_layer_idx"):
            raise ValueError(f"Config {config_path}: only attention scaled by 1/sqrt(head_size) is implemented.")
        return super().from_config(config, config_path, **kwargs)

    @classmethod
    def validate_config(cls, config, config_path):
        pass

    def apply_embeddings(self, inputs):
        token_ids, segment_ids, position_ids, _ = self.split_inputs(inputs)
        x = self.apply_token_segment_embeddings(token_ids, segment_ids)
        x = self.apply_position_embedding(x, position_ids) if position_ids is not None else \
            self.apply_position_embedding(x)
        x = self.apply_embedding_norm(x)
        x = Dropout(self.dropout_rate, name="Embedding-Dropout")(x)
        x = self.apply_embedding_mapping(x)
        # Causal only: token id 0 is a real token in GPT vocabularies.
        self.attention_mask = AttentionMask("lm", pad_id=-1, name="Attention-Mask")(token_ids)
        return x

    def apply_embedding_norm(self, x):
        return x  # GPT has none

    def apply_final_layers(self, x):
        x = self.apply_output_norm(x)
        x = self.token_embedding(x, mode="dense")
        return keras.layers.Activation(self.final_activation, name="LM-Activation")(x)

    def apply_output_norm(self, x):
        return x

    def decode_head_layers(self):
        norm = self._decode_layer("Output-Norm")  # GPT-2's final LayerNorm; the LM head is the tied projection
        return ([] if norm is None else [norm]), []

    # ----------------------------------------------------------------- checkpoints
    def variable_mapping(self, fmt):
        if fmt == "google":
            table = {k: _rename(v, "bert/", "gpt/") for k, v in GOOGLE_TABLE.items()
                     if k.startswith("Embedding-") and not k.startswith("Embedding-Mapping/")}
            table["Embedding-Mapping/kernel"] = "gpt/transformer/embedding_hidden_mapping_in/kernel"
            table["Embedding-Mapping/bias"] = "gpt/transformer/embedding_hidden_mapping_in/bias"
            for i in range(self.num_hidden_layers):
                for k, v in _google_layer_table(i, f"Transformer-{i}-MultiHeadSelfAttention").items():
                    table[k] = _rename(v, "bert/encoder/", "gpt/transformer/")
            return table
        if fmt == "huggingface":
            table = {
                "Embedding-Token/embeddings": src("transformer.tokens_embed.weight", vocab=True),
                "Embedding-Position/embeddings": "transformer.positions_embed.weight",
            }
            for i in range(self.num_hidden_layers):
                table.update(_conv1d_layer(f"transformer.h.{i}.", f"Transformer-{i}-MultiHeadSelfAttention",
                                           f"Transformer-{i}-FeedForward", ("ln_1", "ln_2")))
            return table
        raise ValueError(f"Unknown checkpoint format {fmt!r}.")

    def tied_variables(self, fmt):
        if fmt == "huggingface":
            return {"lm_head.weight": "transformer.tokens_embed.weight"}
        return {}

    def export_config(self, fmt):
        config = {
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "intermediate_size": self.intermediate_size, "hidden_act": self.hidden_act,
            "hidden_dropout_prob": self.dropout_rate, "attention_probs_dropout_prob": self.attention_dropout_rate,
            "max_position_embeddings": self.max_position, "type_vocab_size": self.segment_vocab_size,
            "layer_norm_eps": self.layer_norm_eps, "initializer_range": self.initializer_range,
        }
        if self.embedding_size != self.hidden_size:
            config["embedding_size"] = self.embedding_size
        if fmt == "google":
            return "config.json", config
        return "config.json", self._hf_config()

    def _hf_config(self) -> dict:
        if self.intermediate_size != 4 * self.hidden_size or self.segment_vocab_size:
            raise ValueError("This GPT has no Hugging Face OpenAIGPT form (its feed-forward is 4 * hidden and its "
                             "segment ids use the token table); save it in the 'google' format.")
        afn = {"gelu_tanh": "gelu", "relu": "relu", "silu": "silu"}.get(self.hidden_act)
        if afn is None:  # transformers' OpenAIGPT spells the tanh GELU 'gelu' and has no exact one
            raise ValueError(f"hidden_act={self.hidden_act!r} has no OpenAIGPT spelling; save in the 'google' format.")
        return {"model_type": "openai-gpt", "architectures": ["OpenAIGPTLMHeadModel"], "vocab_size": self.vocab_size,
                "n_embd": self.hidden_size, "n_layer": self.num_hidden_layers, "n_head": self.num_attention_heads,
                "n_positions": self.max_position, "afn": afn, "resid_pdrop": self.dropout_rate,
                "attn_pdrop": self.attention_dropout_rate, "embd_pdrop": self.dropout_rate,
                "layer_norm_epsilon": self.layer_norm_eps}


@register_model("gpt2")
class GPT2(GPT):
    """GPT-2 (CPM-LM): pre-LayerNorm layers and a final `Output-Norm`; input `[token_ids]` only.

    Example:
    >>> from bert4x.models import build_transformer_model
    >>> model = build_transformer_model({"vocab_size": 50, "n_embd": 8, "n_layer": 1, "n_head": 2,
    ...     "n_positions": 16, "model_type": "gpt2"}, model="gpt2", final_activation="linear")
    >>> [layer.name for layer in model.layers][-3:]
    ['Output-Norm', 'Output-Dropout', 'LM-Activation']
    """

    model_types = ("gpt2",)
    # Old GPT-2 checkpoints carry the causal mask as buffers.
    ignored_checkpoint_variables = {"huggingface": (r"\.attn\.(masked_)?bias$",)}

    def __init__(self, **kwargs):
        if kwargs.get("segment_vocab_size"):
            raise ValueError(f"{type(self).__name__} takes token ids only: segment_vocab_size must be 0.")
        super().__init__(**kwargs)

    def apply_main_layers(self, x, index):
        attention, feed_forward = f"Transformer-{index}-MultiHeadSelfAttention", f"Transformer-{index}-FeedForward"
        y = self.apply_layer_norm(x, f"{attention}-Norm")
        y = MultiHeadAttention(self.num_attention_heads, self.attention_head_size,
                               attention_dropout=self.attention_dropout_rate, kernel_initializer=self.initializer(),
                               name=attention, **self.attention_variant_kwargs())(y, attention_mask=self.attention_mask)
        y = Dropout(self.dropout_rate, name=f"{attention}-Dropout")(y)
        x = keras.layers.Add(name=f"{attention}-Add")([x, y])
        y = self.apply_layer_norm(x, f"{feed_forward}-Norm")
        y = FeedForward(self.intermediate_size, activation=self.hidden_act, kernel_initializer=self.initializer(),
                        name=feed_forward)(y)
        y = Dropout(self.dropout_rate, name=f"{feed_forward}-Dropout")(y)
        return keras.layers.Add(name=f"{feed_forward}-Add")([x, y])

    def apply_output_norm(self, x):
        x = self.apply_layer_norm(x, "Output-Norm")
        return Dropout(self.dropout_rate, name="Output-Dropout")(x)

    def decode_blocks(self):
        m = self.model
        return [pre_norm_block(m.get_layer(f"Transformer-{i}-MultiHeadSelfAttention-Norm"),
                               m.get_layer(f"Transformer-{i}-MultiHeadSelfAttention"),
                               m.get_layer(f"Transformer-{i}-FeedForward-Norm"),
                               m.get_layer(f"Transformer-{i}-FeedForward"))
                for i in range(self.num_hidden_layers)]

    def variable_mapping(self, fmt):
        if fmt == "google":
            table = super().variable_mapping(fmt)
            # bert4keras's GPT-2 names: each layer's pre-norms are 'attention/input/LayerNorm' and 'input/LayerNorm'.
            table = {k: _rename(v, "output/LayerNorm", "input/LayerNorm") for k, v in table.items()}
            table["Output-Norm/gamma"] = "gpt/output/LayerNorm/gamma"
            table["Output-Norm/beta"] = "gpt/output/LayerNorm/beta"
            return table
        if fmt == "huggingface":
            table = {
                "Embedding-Token/embeddings": src("transformer.wte.weight", vocab=True),
                "Embedding-Position/embeddings": "transformer.wpe.weight",
                "Output-Norm/gamma": "transformer.ln_f.weight",
                "Output-Norm/beta": "transformer.ln_f.bias",
            }
            for i in range(self.num_hidden_layers):
                table.update(_conv1d_layer(f"transformer.h.{i}.", f"Transformer-{i}-MultiHeadSelfAttention",
                                           f"Transformer-{i}-FeedForward", ("ln_1", "ln_2")))
            return table
        raise ValueError(f"Unknown checkpoint format {fmt!r}.")

    def tied_variables(self, fmt):
        if fmt == "huggingface":
            return {"lm_head.weight": "transformer.wte.weight"}
        return {}

    def _hf_config(self):
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": self.vocab_size,
                "n_embd": self.hidden_size, "n_layer": self.num_hidden_layers, "n_head": self.num_attention_heads,
                "n_positions": self.max_position, "n_inner": self.intermediate_size,
                "activation_function": {"gelu_tanh": "gelu_new", "gelu_erf": "gelu"}.get(self.hidden_act,
                                                                                         self.hidden_act),
                "resid_pdrop": self.dropout_rate, "attn_pdrop": self.attention_dropout_rate,
                "embd_pdrop": self.dropout_rate, "layer_norm_epsilon": self.layer_norm_eps}


@register_model("gpt2_ml")
class GPT2ML(GPT):
    """GPT2-ML (Grover's architecture): `Embedding-Norm` after the embeddings; in each layer Att -> Add, then
    `FeedForward-Norm-0` -> FFN -> Add (to the un-normalised stream) -> `FeedForward-Norm-1`. Input `[token_ids]`.

    Example:
    >>> from bert4x.models import build_transformer_model
    >>> model = build_transformer_model({"vocab_size": 50, "hidden_size": 8, "num_hidden_layers": 1,
    ...     "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 16}, model="gpt2_ml")
    >>> model.output.shape
    (None, None, 50)
    """

    model_types = ()

    def __init__(self, **kwargs):
        if kwargs.get("segment_vocab_size"):
            raise ValueError("gpt2_ml takes token ids only: segment_vocab_size must be 0.")
        super().__init__(**kwargs)

    def apply_embedding_norm(self, x):
        return self.apply_layer_norm(x, "Embedding-Norm")

    def apply_main_layers(self, x, index):
        attention, feed_forward = f"Transformer-{index}-MultiHeadSelfAttention", f"Transformer-{index}-FeedForward"
        y = MultiHeadAttention(self.num_attention_heads, self.attention_head_size,
                               attention_dropout=self.attention_dropout_rate, kernel_initializer=self.initializer(),
                               name=attention, **self.attention_variant_kwargs())(x, attention_mask=self.attention_mask)
        y = Dropout(self.dropout_rate, name=f"{attention}-Dropout")(y)
        x = keras.layers.Add(name=f"{attention}-Add")([x, y])
        y = self.apply_layer_norm(x, f"{feed_forward}-Norm-0")
        y = FeedForward(self.intermediate_size, activation=self.hidden_act, kernel_initializer=self.initializer(),
                        name=feed_forward)(y)
        y = Dropout(self.dropout_rate, name=f"{feed_forward}-Dropout")(y)
        x = keras.layers.Add(name=f"{feed_forward}-Add")([x, y])
        return self.apply_layer_norm(x, f"{feed_forward}-Norm-1")

    def decode_blocks(self):
        m = self.model

        def block_for(i):
            attention = m.get_layer(f"Transformer-{i}-MultiHeadSelfAttention")
            norm0 = m.get_layer(f"Transformer-{i}-FeedForward-Norm-0")
            feed_forward = m.get_layer(f"Transformer-{i}-FeedForward")
            norm1 = m.get_layer(f"Transformer-{i}-FeedForward-Norm-1")

            def block(x, attention_mask, cache, slot, **attention_arguments):
                y, cache = attention(x, attention_mask=attention_mask, cache=cache, cache_update_index=slot,
                                     **attention_arguments)
                x = x + y
                return norm1(x + feed_forward(norm0(x))), cache

            return block

        return [block_for(i) for i in range(self.num_hidden_layers)]

    def variable_mapping(self, fmt):
        if fmt != "google":
            raise ValueError(f"GPT2-ML is released as a TF checkpoint only: no {fmt!r} mapping.")
        table = {
            "Embedding-Token/embeddings": src("newslm/embeddings/word_embed", vocab=True),
            "Embedding-Position/embeddings": "newslm/embeddings/pos_embed",
            "Embedding-Norm/gamma": "newslm/embeddings/LayerNorm_embed_norm/gamma",
            "Embedding-Norm/beta": "newslm/embeddings/LayerNorm_embed_norm/beta",
        }
        for i in range(self.num_hidden_layers):
            p, attention, ff = f"newslm/layer{i:02d}/", f"Transformer-{i}-MultiHeadSelfAttention", \
                f"Transformer-{i}-FeedForward"
            qkv = ("query_layer", "key_layer", "value_layer")
            table.update({
                f"{attention}/qkv/kernel": src(*(p + f"{n}/kernel" for n in qkv)),
                f"{attention}/qkv/bias": src(*(p + f"{n}/bias" for n in qkv)),
                f"{attention}/output/kernel": p + "context_projection_layer/kernel",
                f"{attention}/output/bias": p + "context_projection_layer/bias",
                f"{ff}-Norm-0/gamma": p + "LayerNorm_mlp_ln0/gamma",
                f"{ff}-Norm-0/beta": p + "LayerNorm_mlp_ln0/beta",
                f"{ff}/inner/kernel": p + "intermediate/kernel",
                f"{ff}/inner/bias": p + "intermediate/bias",
                f"{ff}/output/kernel": p + "output/kernel",
                f"{ff}/output/bias": p + "output/bias",
                f"{ff}-Norm-1/gamma": p + "LayerNorm_mlp_ln1/gamma",
                f"{ff}-Norm-1/beta": p + "LayerNorm_mlp_ln1/beta",
            })
        return table

    def tied_variables(self, fmt):
        return {}

    def _hf_config(self):
        raise ValueError("GPT2-ML has no Hugging Face format; save it in the 'google' format.")
