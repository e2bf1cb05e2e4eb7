"""NEZHA (`model='nezha'`): BERT with functional relative positions instead of the absolute position table.

Every self-attention adds `q_i . a[i, j]` to its scores (before the 1/sqrt(d) scale) and `sum_j p_ij a[i, j]` to its
output, where `a` is `RelativePositionEmbedding`'s fixed sinusoid of the clipped distance `j - i` (one table,
`Embedding-Relative-Position`, shared by every head and layer; it has no weights). The cached decoding of
`application='lm'` / `'unilm'` (`bert4x.generation.Generator`) adds the same terms between each new token and the
cached keys and values.

Checkpoints: Huawei's release (BERT's Google names, `bert/...`, without `bert/embeddings/position_embeddings`) and
Hugging Face `NezhaModel` / `NezhaForPreTraining` folders (`nezha.embeddings...`, `nezha.encoder.layer.N...`).
"""

from __future__ import annotations

import dataclasses

from keras import ops

from bert4x.layers.relative_position import RelativePositionEmbedding
from bert4x.models.base import register_model
from bert4x.models.bert import BERT


def _renamed(table: dict, old: str, new: str) -> dict:
    """The table with checkpoint-name prefix `old` replaced by `new` (Source entries keep their options)."""
    out = {}
    for key, value in table.items():
        if isinstance(value, str):
            out[key] = new + value[len(old):] if value.startswith(old) else value
        else:
            names = tuple(new + n[len(old):] if n.startswith(old) else n for n in value.names)
            out[key] = dataclasses.replace(value, names=names)
    return out


@register_model("nezha")
class NEZHA(BERT):
    """NEZHA: BERT's layers and heads, with sinusoidal relative positions (clipped at `max_relative_position`) on
    keys and values in every attention, and no absolute position embedding.

    Args:
        max_relative_position: relative distances are clipped to `[-max_relative_position, max_relative_position]`
            (64 in Huawei's release).
        **kwargs: BERT's arguments.

    Example:
    >>> from bert4x.models import build_transformer_model
    >>> model = build_transformer_model({"vocab_size": 50, "hidden_size": 8, "num_hidden_layers": 2,
    ...     "num_attention_heads": 2, "intermediate_size": 16}, model="nezha")
    >>> "Embedding-Position" in [layer.name for layer in model.layers]
    False
    """

    config_aliases = dict(BERT.config_aliases, max_relative_position=("max_relative_position",))
    model_types = ("nezha",)
    ignored_config_keys = BERT.ignored_config_keys | {"use_relative_position", "use_cache", "classifier_dropout"}
    hf_prefix = "nezha."
    # Hugging Face folders written by older transformers versions also store each layer's copy of the fixed
    # sinusoid table (a buffer, not a weight); bert4x computes it.
    ignored_checkpoint_variables = {"huggingface": (r"\.relative_positions_encoding\.positions_encoding$",)}
    # The relative terms are `[q_len, k_len]` in the padded layout; attention without padding does not take them.
    supports_padding_removal = False
    handles_embedding_options = True  # apply_embeddings is BERT's, plus the relative table

    def __init__(self, max_relative_position: int = 64, **kwargs):
        if not isinstance(max_relative_position, int) or max_relative_position < 0:
            raise ValueError(f"max_relative_position must be a non-negative integer, got {max_relative_position!r}.")
        self.max_relative_position = max_relative_position
        super().__init__(**kwargs)

    @classmethod
    def validate_config(cls, config, config_path):
        super().validate_config(config, config_path)
        if config.get("use_relative_position") is False:
            raise ValueError(f"Config {config_path} sets use_relative_position=false; NEZHA's positions are its "
                             "relative ones (use model='bert' for an absolute position table).")

    def apply_position_embedding(self, x, position_ids=None):
        return x  # positions enter through the attention's relative terms only

    def apply_embeddings(self, inputs):
        x = super().apply_embeddings(inputs)
        self.relative_position_layer = RelativePositionEmbedding(
            self.attention_head_size, self.max_relative_position, name="Embedding-Relative-Position")
        self.relative_positions = self.relative_position_layer(x)
        return x

    def attention_kwargs(self) -> dict:
        return {"relative_keys": self.relative_positions, "relative_values": self.relative_positions}

    def variable_mapping(self, fmt):
        table = super().variable_mapping(fmt)
        del table["Embedding-Position/embeddings"]
        if fmt == "huggingface":
            table = _renamed(table, "bert.", "nezha.")
        return table

    def tied_variables(self, fmt):
        if fmt == "huggingface":
            return {"cls.predictions.decoder.weight": "nezha.embeddings.word_embeddings.weight",
                    "cls.predictions.decoder.bias": "cls.predictions.bias"}
        return {}

    def export_config(self, fmt):
        name, config = super().export_config(fmt)
        config.update(max_relative_position=self.max_relative_position, use_relative_position=True)
        if fmt == "huggingface":
            config.update(model_type="nezha", architectures=["NezhaForPreTraining"])
        return name, config

    # ----------------------------------------------------------------- decoding (bert4x.models.cached_decoding)
    def decode_attention_arguments(self, positions, query_slots, slots):
        # A row's prompt fills consecutive cache slots (left padding only shifts them all), so the distance between
        # two of its tokens is the distance between their slots: one table serves every row. Padding slots are
        # masked, so the terms they get do not matter.
        table = self.relative_position_layer.between(query_slots, ops.arange(slots, dtype="int32"))
        return {"relative_keys": table, "relative_values": table}
