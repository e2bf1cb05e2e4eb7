"""ALBERT (`model='albert'`): BERT with a factorised embedding and one Transformer layer shared by every depth;
`model='albert_unshared'` loads the same checkpoint into independent layers (each starts from the shared weights).

Layer names follow bert4keras: the shared layer is `Transformer-MultiHeadSelfAttention`, `...-Norm`,
`Transformer-FeedForward`, `...-Norm` (no index); the factorised embedding's projection is `Embedding-Mapping`.

Checkpoints: Google's ALBERT release (`bert/embeddings/...`, `bert/encoder/embedding_hidden_mapping_in/...`,
`bert/encoder/transformer/group_0/inner_group_0/{attention_1,LayerNorm,ffn_1,LayerNorm_1}/...`, `cls/...`) and
Hugging Face `AlbertModel` / `AlbertForPreTraining` (`albert.encoder.albert_layer_groups.0.albert_layers.0...`).
"""

from __future__ import annotations

import keras
import numpy as np

from bert4x.layers import Dropout, FeedForward, LayerNormalization, MultiHeadAttention
from bert4x.layers.heads import ConditionalLayerNormalization
from bert4x.models.base import CheckpointError, register_model, src
from bert4x.models.bert import BERT, GOOGLE_TABLE
from bert4x.models.cached_decoding import post_norm_block

_GOOGLE_SHARED = "bert/encoder/transformer/group_0/inner_group_0/"
_HF_SHARED = "albert.encoder.albert_layer_groups.0.albert_layers.0."


def _google_shared(attention: str, feed_forward: str) -> dict:
    p = _GOOGLE_SHARED
    qkv = ("query", "key", "value")
    return {
        f"{attention}/qkv/kernel": src(*(p + f"attention_1/self/{n}/kernel" for n in qkv)),
        f"{attention}/qkv/bias": src(*(p + f"attention_1/self/{n}/bias" for n in qkv)),
        f"{attention}/output/kernel": p + "attention_1/output/dense/kernel",
        f"{attention}/output/bias": p + "attention_1/output/dense/bias",
        f"{attention}-Norm/gamma": p + "LayerNorm/gamma",
        f"{attention}-Norm/beta": p + "LayerNorm/beta",
        f"{feed_forward}/inner/kernel": p + "ffn_1/intermediate/dense/kernel",
        f"{feed_forward}/inner/bias": p + "ffn_1/intermediate/dense/bias",
        f"{feed_forward}/output/kernel": p + "ffn_1/intermediate/output/dense/kernel",
        f"{feed_forward}/output/bias": p + "ffn_1/intermediate/output/dense/bias",
        f"{feed_forward}-Norm/gamma": p + "LayerNorm_1/gamma",
        f"{feed_forward}-Norm/beta": p + "LayerNorm_1/beta",
    }


def _hf_shared(attention: str, feed_forward: str) -> dict:
    p = _HF_SHARED
    qkv = ("query", "key", "value")
    return {
        f"{attention}/qkv/kernel": src(*(p + f"attention.{n}.weight" for n in qkv), transpose=True),
        f"{attention}/qkv/bias": src(*(p + f"attention.{n}.bias" for n in qkv)),
        f"{attention}/output/kernel": src(p + "attention.dense.weight", transpose=True),
        f"{attention}/output/bias": p + "attention.dense.bias",
        f"{attention}-Norm/gamma": p + "attention.LayerNorm.weight",
        f"{attention}-Norm/beta": p + "attention.LayerNorm.bias",
        f"{feed_forward}/inner/kernel": src(p + "ffn.weight", transpose=True),
        f"{feed_forward}/inner/bias": p + "ffn.bias",
        f"{feed_forward}/output/kernel": src(p + "ffn_output.weight", transpose=True),
        f"{feed_forward}/output/bias": p + "ffn_output.bias",
        f"{feed_forward}-Norm/gamma": p + "full_layer_layer_norm.weight",
        f"{feed_forward}-Norm/beta": p + "full_layer_layer_norm.bias",
    }


HF_TABLE = {
    "Embedding-Token/embeddings": src("albert.embeddings.word_embeddings.weight", vocab=True),
    "Embedding-Segment/embeddings": "albert.embeddings.token_type_embeddings.weight",
    "Embedding-Position/embeddings": "albert.embeddings.position_embeddings.weight",
    "Embedding-Norm/gamma": "albert.embeddings.LayerNorm.weight",
    "Embedding-Norm/beta": "albert.embeddings.LayerNorm.bias",
    "Embedding-Mapping/kernel": src("albert.encoder.embedding_hidden_mapping_in.weight", transpose=True),
    "Embedding-Mapping/bias": "albert.encoder.embedding_hidden_mapping_in.bias",
    "Pooler-Dense/kernel": src("albert.pooler.weight", transpose=True),
    "Pooler-Dense/bias": "albert.pooler.bias",
    "NSP-Proba/kernel": src("sop_classifier.classifier.weight", transpose=True),
    "NSP-Proba/bias": "sop_classifier.classifier.bias",
    "MLM-Dense/kernel": src("predictions.dense.weight", transpose=True),
    "MLM-Dense/bias": "predictions.dense.bias",
    "MLM-Norm/gamma": "predictions.LayerNorm.weight",
    "MLM-Norm/beta": "predictions.LayerNorm.bias",
    "MLM-Bias/bias": src("predictions.bias", vocab=True),
}

# Keys of Google's albert_config.json that describe options other than the released architecture.
_ALBERT_FIXED = {"num_hidden_groups": 1, "inner_group_num": 1, "net_structure_type": 0, "gap_size": 0,
                 "num_memory_blocks": 0, "down_scale_factor": 1, "ln_type": "postln"}


class _AlbertBase(BERT):
    """What ALBERT and ALBERT-unshared share: config keys, the embedding tables and the Hugging Face heads."""

    model_types = ("albert",)
    hf_prefix = "albert."
    ignored_config_keys = BERT.ignored_config_keys | frozenset(_ALBERT_FIXED) | {"layers_to_keep",
                                                                                "classifier_dropout_prob"}

    @classmethod
    def validate_config(cls, config, config_path):
        super().validate_config(config, config_path)
        for key, value in _ALBERT_FIXED.items():
            if key in config and config[key] != value:
                raise ValueError(
                    f"Config {config_path} sets {key}={config[key]!r}; bert4x's ALBERT implements the released "
                    f"architecture ({key}={value!r}) only."
                )
        if config.get("layers_to_keep"):
            raise ValueError(f"Config {config_path} sets layers_to_keep; bert4x's ALBERT keeps every layer.")

    def tied_variables(self, fmt):
        if fmt == "huggingface":
            return {"predictions.decoder.weight": "albert.embeddings.word_embeddings.weight",
                    "predictions.decoder.bias": "predictions.bias"}
        return {}

    def export_config(self, fmt):
        name, config = super().export_config(fmt)
        config["embedding_size"] = self.embedding_size
        if fmt == "google":
            return "albert_config.json", config
        config.update(model_type="albert", architectures=["AlbertForPreTraining"], num_hidden_groups=1,
                      inner_group_num=1)
        return name, config

    def _shared_table(self, fmt):
        """(the embedding/head table, the function naming the shared layer's variables) of format `fmt`."""
        if fmt == "google":
            return dict(GOOGLE_TABLE), _google_shared
        if fmt == "huggingface":
            return dict(HF_TABLE), _hf_shared
        raise ValueError(f"Unknown checkpoint format {fmt!r}.")


@register_model("albert")
class ALBERT(_AlbertBase):
    """ALBERT: a factorised embedding (`embedding_size`, projected by `Embedding-Mapping`) and one post-LayerNorm
    Transformer layer applied `num_hidden_layers` times.

    Example:
    >>> from bert4x.models import build_transformer_model
    >>> model = build_transformer_model({"vocab_size": 50, "embedding_size": 4, "hidden_size": 8,
    ...     "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 16}, model="albert")
    >>> sorted({w.path.split("/")[0] for w in model.weights if w.path.startswith("Transformer")})
    ['Transformer-FeedForward', 'Transformer-FeedForward-Norm', 'Transformer-MultiHeadSelfAttention', \
'Transformer-MultiHeadSelfAttention-Norm']
    """

    supports_padding_removal = False  # the shared layer is called on padded sequences only

    def first_token_only(self, index):
        return False  # one shared layer: no layer computes at [CLS] alone

    def _shared_layers(self):
        if getattr(self, "_shared", None) is None:
            attention, feed_forward = "Transformer-MultiHeadSelfAttention", "Transformer-FeedForward"
            self._shared = {
                "attention": MultiHeadAttention(
                    self.num_attention_heads, self.attention_head_size, attention_dropout=self.attention_dropout_rate,
                    kernel_initializer=self.initializer(), name=attention, **self.attention_variant_kwargs()),
                "attention_dropout": Dropout(self.dropout_rate, name=f"{attention}-Dropout"),
                "feed_forward": FeedForward(self.intermediate_size, activation=self.hidden_act,
                                            kernel_initializer=self.initializer(), name=feed_forward),
                "feed_forward_dropout": Dropout(self.dropout_rate, name=f"{feed_forward}-Dropout"),
            }
        return self._shared

    def build(self):
        self._shared, self._norms = None, {}
        return super().build()

    def _norm(self, x, name):
        # A shared LayerNorm: made on first use by BERT's apply_layer_norm, then called again.
        if name not in self._norms:
            if self.condition is None:
                self._norms[name] = LayerNormalization(epsilon=self.layer_norm_eps, name=name)
            else:
                self._norms[name] = ConditionalLayerNormalization(
                    epsilon=self.layer_norm_eps, hidden_units=self.layer_norm_cond_hidden_size,
                    hidden_activation=self.layer_norm_cond_hidden_act, hidden_initializer=self.initializer(),
                    name=name)
        layer = self._norms[name]
        return layer(x) if self.condition is None else layer([x, self.condition])

    def apply_main_layers(self, x, index):
        shared = self._shared_layers()
        y = shared["attention"](x, attention_mask=self.attention_mask, **self.attention_kwargs())
        y = shared["attention_dropout"](y)
        x = self._norm(keras.layers.Add(name=f"Transformer-{index}-MultiHeadSelfAttention-Add")([x, y]),
                       "Transformer-MultiHeadSelfAttention-Norm")
        y = shared["feed_forward_dropout"](shared["feed_forward"](x))
        x = keras.layers.Add(name=f"Transformer-{index}-FeedForward-Add")([x, y])
        return self._norm(x, "Transformer-FeedForward-Norm")

    def variable_mapping(self, fmt):
        table, shared = self._shared_table(fmt)
        table.update(shared("Transformer-MultiHeadSelfAttention", "Transformer-FeedForward"))
        return table

    # ----------------------------------------------------------------- cached decoding hooks
    def decode_blocks(self):
        m = self.model
        block = (m.get_layer("Transformer-MultiHeadSelfAttention"),
                 m.get_layer("Transformer-MultiHeadSelfAttention-Norm"), m.get_layer("Transformer-FeedForward"),
                 m.get_layer("Transformer-FeedForward-Norm"))
        return [post_norm_block(*block)] * self.num_hidden_layers


@register_model("albert_unshared")
class ALBERTUnshared(_AlbertBase):
    """ALBERT's checkpoint in independent layers (`Transformer-{i}-...`, as BERT's), each loaded from the shared
    weights. Saving back needs the layers still equal (a fine-tuned model whose layers diverged has no ALBERT form).
    """

    def variable_mapping(self, fmt):
        table, shared = self._shared_table(fmt)
        for i in range(self.num_hidden_layers):
            table.update(shared(f"Transformer-{i}-MultiHeadSelfAttention", f"Transformer-{i}-FeedForward"))
        return table

    def checkpoint_tensors(self, fmt):
        tensors = super().checkpoint_tensors(fmt)
        # Every layer writes the same checkpoint names: they must agree, or the last would silently win.
        table = self._resolve_table(fmt)
        by_name: dict[str, list] = {}
        for w in self.model.weights:
            for name, value in self._write_source(table[w.path], np.asarray(w.numpy(), np.float32)).items():
                by_name.setdefault(name, []).append((w.path, value))
        for name, entries in by_name.items():
            if any(not np.array_equal(entries[0][1], v) for _, v in entries[1:]):
                raise CheckpointError(
                    f"albert_unshared: {entries[0][0]} and {', '.join(p for p, _ in entries[1:])} all save to {name} "
                    "but no longer hold the same values; ALBERT's checkpoint format has one shared layer."
                )
        return tensors
