"""ELECTRA's discriminator (`model='electra'`): BERT's encoder behind a factorised embedding, with bert4keras's
`with_discriminator` head (`Discriminator-Dense` then `Discriminator-Prediction`, one sigmoid per token).

Checkpoints: Google's / HFL's ELECTRA release (`electra/embeddings/...`, `electra/embeddings_project/...`,
`electra/encoder/layer_N/...`, `discriminator_predictions/dense{,_1}/...`; the generator's variables in a full
pre-training checkpoint are ignored) and Hugging Face `ElectraModel` / `ElectraForPreTraining`.
"""

from __future__ import annotations

import keras

from bert4x.backend import get_activation
from bert4x.models.base import register_model, src
from bert4x.models.bert import BERT, GOOGLE_TABLE, _google_layer_table, _hf_layer_table


@register_model("electra")
class ELECTRA(BERT):
    """ELECTRA's discriminator. `with_discriminator=True` gives per-token probabilities `[batch, len, 1]` of having
    been replaced (a string: that final activation, e.g. 'linear' for logits); otherwise the sequence output.

    Args:
        with_discriminator: False, True (sigmoid) or the final activation's name.
        **kwargs: BERT's arguments (`embedding_size` for the small models' factorised embedding).

    Example:
    >>> from bert4x.models import build_transformer_model
    >>> model = build_transformer_model({"vocab_size": 50, "embedding_size": 4, "hidden_size": 8,
    ...     "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16}, model="electra",
    ...     with_discriminator=True)
    >>> model.output.shape
    (None, None, 1)
    """

    model_types = ("electra",)
    hf_prefix = "electra."
    ignored_config_keys = BERT.ignored_config_keys | {"summary_type", "summary_use_proj", "summary_activation",
                                                      "summary_last_dropout"}
    # A full pre-training checkpoint also holds the generator, which the discriminator does not use.
    ignored_checkpoint_variables = {"google": (r"^generator/", r"^generator_predictions/")}

    def __init__(self, with_discriminator: bool | str = False, **kwargs):
        for option in ("with_pool", "with_nsp", "with_mlm"):
            if kwargs.get(option):
                raise ValueError(f"ELECTRA's discriminator has no {option} head; use with_discriminator.")
        super().__init__(**kwargs)
        self.with_discriminator = with_discriminator

    @classmethod
    def applications(cls):
        return ("encoder",)  # as in bert4keras: the discriminator is no language model

    def apply_final_layers(self, x):
        if not self.with_discriminator:
            return x
        x = keras.layers.Dense(self.hidden_size, activation=get_activation(self.hidden_act),
                               kernel_initializer=self.initializer(), name="Discriminator-Dense")(x)
        activation = "sigmoid" if self.with_discriminator is True else self.with_discriminator
        return keras.layers.Dense(1, activation=activation, kernel_initializer=self.initializer(),
                                  name="Discriminator-Prediction")(x)

    def variable_mapping(self, fmt):
        if fmt == "google":
            table = {k: src(*(n.replace("bert/", "electra/") for n in v.names), transpose=v.transpose,
                            vocab=v.vocab) if not isinstance(v, str) else v.replace("bert/", "electra/")
                     for k, v in GOOGLE_TABLE.items() if k.startswith("Embedding-")}
            table.update({
                "Embedding-Mapping/kernel": "electra/embeddings_project/kernel",
                "Embedding-Mapping/bias": "electra/embeddings_project/bias",
                "Discriminator-Dense/kernel": "discriminator_predictions/dense/kernel",
                "Discriminator-Dense/bias": "discriminator_predictions/dense/bias",
                "Discriminator-Prediction/kernel": "discriminator_predictions/dense_1/kernel",
                "Discriminator-Prediction/bias": "discriminator_predictions/dense_1/bias",
            })
            for i in range(self.num_hidden_layers):
                for k, v in _google_layer_table(i, f"Transformer-{i}-MultiHeadSelfAttention").items():
                    table[k] = src(*(n.replace("bert/", "electra/") for n in v.names)) if not isinstance(v, str) \
                        else v.replace("bert/", "electra/")
            return table
        if fmt == "huggingface":
            table = {
                "Embedding-Token/embeddings": src("electra.embeddings.word_embeddings.weight", vocab=True),
                "Embedding-Segment/embeddings": "electra.embeddings.token_type_embeddings.weight",
                "Embedding-Position/embeddings": "electra.embeddings.position_embeddings.weight",
                "Embedding-Norm/gamma": "electra.embeddings.LayerNorm.weight",
                "Embedding-Norm/beta": "electra.embeddings.LayerNorm.bias",
                "Embedding-Mapping/kernel": src("electra.embeddings_project.weight", transpose=True),
                "Embedding-Mapping/bias": "electra.embeddings_project.bias",
                "Discriminator-Dense/kernel": src("discriminator_predictions.dense.weight", transpose=True),
                "Discriminator-Dense/bias": "discriminator_predictions.dense.bias",
                "Discriminator-Prediction/kernel": src("discriminator_predictions.dense_prediction.weight",
                                                       transpose=True),
                "Discriminator-Prediction/bias": "discriminator_predictions.dense_prediction.bias",
            }
            for i in range(self.num_hidden_layers):
                for k, v in _hf_layer_table(i, f"Transformer-{i}-MultiHeadSelfAttention").items():
                    table[k] = src(*(n.replace("bert.", "electra.", 1) for n in v.names), transpose=v.transpose) \
                        if not isinstance(v, str) else v.replace("bert.", "electra.", 1)
            return table
        raise ValueError(f"Unknown checkpoint format {fmt!r}.")

    def tied_variables(self, fmt):
        return {}

    def export_config(self, fmt):
        name, config = super().export_config(fmt)
        config["embedding_size"] = self.embedding_size
        if fmt == "google":
            return name, config
        config.update(model_type="electra", architectures=["ElectraForPreTraining"])
        return name, config
