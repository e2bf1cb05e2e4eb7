"""BERT (and its aliases RoBERTa-wwm and WoBERT): a post-LayerNorm Transformer encoder with learned positions."""

from __future__ import annotations

import dataclasses

import keras

from bert4x.layers import (
    AttentionMask,
    BiasAdd,
    Dropout,
    Embedding,
    EmbeddingSum,
    FeedForward,
    FirstToken,
    LayerNormalization,
    MultiHeadAttention,
    PositionEmbedding,
    RemovePadding,
    Unpadded,
)
from bert4x.layers.heads import ConditionalLayerNormalization
from bert4x.layers.hierarchical_position import HierarchicalPositionEmbedding
from bert4x.models.base import Transformer, register_model, src
from bert4x.models.cached_decoding import CachedDecoding, post_norm_block

# Google's BERT variable names, per layer and for the heads.
_GOOGLE_LAYER = "bert/encoder/layer_{i}/"
_HF_LAYER = "bert.encoder.layer.{i}."


def _qkv_widths(source, widths: tuple[int, int, int] | None):
    """A fused q|k|v entry whose parts are checked (and split on saving) at `widths` (attention_key_size)."""
    return source if widths is None else dataclasses.replace(source, widths=tuple(widths))


def _google_layer_table(i: int, attention: str, widths: tuple[int, int, int] | None = None) -> dict:
    p = _GOOGLE_LAYER.format(i=i)
    return {
        f"{attention}/qkv/kernel": _qkv_widths(
            src(*(p + f"attention/self/{n}/kernel" for n in ("query", "key", "value"))), widths),
        f"{attention}/qkv/bias": _qkv_widths(
            src(*(p + f"attention/self/{n}/bias" for n in ("query", "key", "value"))), widths),
        f"{attention}/output/kernel": p + "attention/output/dense/kernel",
        f"{attention}/output/bias": p + "attention/output/dense/bias",
        f"{attention}-Norm/gamma": p + "attention/output/LayerNorm/gamma",
        f"{attention}-Norm/beta": p + "attention/output/LayerNorm/beta",
        f"Transformer-{i}-FeedForward/inner/kernel": p + "intermediate/dense/kernel",
        f"Transformer-{i}-FeedForward/inner/bias": p + "intermediate/dense/bias",
        f"Transformer-{i}-FeedForward/output/kernel": p + "output/dense/kernel",
        f"Transformer-{i}-FeedForward/output/bias": p + "output/dense/bias",
        f"Transformer-{i}-FeedForward-Norm/gamma": p + "output/LayerNorm/gamma",
        f"Transformer-{i}-FeedForward-Norm/beta": p + "output/LayerNorm/beta",
    }


def _hf_layer_table(i: int, attention: str, widths: tuple[int, int, int] | None = None) -> dict:
    p = _HF_LAYER.format(i=i)
    qkv = ("query", "key", "value")
    return {
        f"{attention}/qkv/kernel": _qkv_widths(
            src(*(p + f"attention.self.{n}.weight" for n in qkv), transpose=True), widths),
        f"{attention}/qkv/bias": _qkv_widths(src(*(p + f"attention.self.{n}.bias" for n in qkv)), widths),
        f"{attention}/output/kernel": src(p + "attention.output.dense.weight", transpose=True),
        f"{attention}/output/bias": p + "attention.output.dense.bias",
        f"{attention}-Norm/gamma": p + "attention.output.LayerNorm.weight",
        f"{attention}-Norm/beta": p + "attention.output.LayerNorm.bias",
        f"Transformer-{i}-FeedForward/inner/kernel": src(p + "intermediate.dense.weight", transpose=True),
        f"Transformer-{i}-FeedForward/inner/bias": p + "intermediate.dense.bias",
        f"Transformer-{i}-FeedForward/output/kernel": src(p + "output.dense.weight", transpose=True),
        f"Transformer-{i}-FeedForward/output/bias": p + "output.dense.bias",
        f"Transformer-{i}-FeedForward-Norm/gamma": p + "output.LayerNorm.weight",
        f"Transformer-{i}-FeedForward-Norm/beta": p + "output.LayerNorm.bias",
    }


GOOGLE_TABLE = {
    "Embedding-Token/embeddings": src("bert/embeddings/word_embeddings", vocab=True),
    "Embedding-Segment/embeddings": "bert/embeddings/token_type_embeddings",
    "Embedding-Position/embeddings": "bert/embeddings/position_embeddings",
    "Embedding-Norm/gamma": "bert/embeddings/LayerNorm/gamma",
    "Embedding-Norm/beta": "bert/embeddings/LayerNorm/beta",
    # The factorised embedding's projection (embedding_size != hidden_size), named as in Google's ALBERT.
    "Embedding-Mapping/kernel": "bert/encoder/embedding_hidden_mapping_in/kernel",
    "Embedding-Mapping/bias": "bert/encoder/embedding_hidden_mapping_in/bias",
    "Pooler-Dense/kernel": "bert/pooler/dense/kernel",
    "Pooler-Dense/bias": "bert/pooler/dense/bias",
    "NSP-Proba/kernel": src("cls/seq_relationship/output_weights", transpose=True),
    "NSP-Proba/bias": "cls/seq_relationship/output_bias",
    "MLM-Dense/kernel": "cls/predictions/transform/dense/kernel",
    "MLM-Dense/bias": "cls/predictions/transform/dense/bias",
    "MLM-Norm/gamma": "cls/predictions/transform/LayerNorm/gamma",
    "MLM-Norm/beta": "cls/predictions/transform/LayerNorm/beta",
    "MLM-Bias/bias": src("cls/predictions/output_bias", vocab=True),
}

HF_TABLE = {
    "Embedding-Token/embeddings": src("bert.embeddings.word_embeddings.weight", vocab=True),
    "Embedding-Segment/embeddings": "bert.embeddings.token_type_embeddings.weight",
    "Embedding-Position/embeddings": "bert.embeddings.position_embeddings.weight",
    "Embedding-Norm/gamma": "bert.embeddings.LayerNorm.weight",
    "Embedding-Norm/beta": "bert.embeddings.LayerNorm.bias",
    "Pooler-Dense/kernel": src("bert.pooler.dense.weight", transpose=True),
    "Pooler-Dense/bias": "bert.pooler.dense.bias",
    "NSP-Proba/kernel": src("cls.seq_relationship.weight", transpose=True),
    "NSP-Proba/bias": "cls.seq_relationship.bias",
    "MLM-Dense/kernel": src("cls.predictions.transform.dense.weight", transpose=True),
    "MLM-Dense/bias": "cls.predictions.transform.dense.bias",
    "MLM-Norm/gamma": "cls.predictions.transform.LayerNorm.weight",
    "MLM-Norm/beta": "cls.predictions.transform.LayerNorm.bias",
    "MLM-Bias/bias": src("cls.predictions.bias", vocab=True),
}


def _head_activation(option, default: str):
    """bert4keras's head options: True -> the default activation, a string -> that activation."""
    return default if option is True else option


@register_model("bert", "roberta")
class BERT(CachedDecoding, Transformer):
    """BERT as Google released it (and Chinese RoBERTa-wwm, which uses BERT's architecture and names).

    Inputs are `[token_ids, segment_ids]` (id 0 is padding). Outputs follow bert4keras: the sequence output with no
    head, otherwise `[pooled or nsp, mlm]` (or the single head). `with_mlm=True` gives probabilities and
    `with_mlm='linear'` logits. When every output reads only [CLS] (`with_pool`/`with_nsp` without `with_mlm`), the
    last layer is computed at [CLS] alone (same outputs and gradients, less work; its sequence output is then
    `[batch, 1, hidden]`); `prune_last_layer=False` keeps it at every position.

    `remove_padding` skips padding tokens (id 0) in every position-wise computation (projections, feed-forward,
    LayerNorm, dropout), leaving only attention in the padded layout. The default (None) turns it on where it
    changes no output and the backend allows data-dependent shapes: outputs read [CLS] only, on tensorflow without a
    GPU (where Keras does not compile with XLA) or on torch. `True` turns it on for any outputs (the sequence output
    is then zero at padding, instead of values computed from padding tokens). jax compiles with static shapes, so
    there `True` adds a last input, `Input-Packing`: per batch, `bert4x.snippets.packing_positions(token_ids)`, which
    picks how many tokens the step computes (jax compiles one step per such capacity, 32 at most by default); in
    training on NVIDIA GPUs attention then runs in kernels that read the rows without padding
    (`flash_varlen_self_attention`). A row of padding only has no token to compute: its outputs are those of zero
    hidden states. Where padding stays under the default (jax), such a model's attention kernels skip the padded
    queries instead.

    Example:
    >>> from bert4x.models import build_transformer_model
    >>> model = build_transformer_model({"vocab_size": 50, "hidden_size": 8, "num_hidden_layers": 2,
    ...     "num_attention_heads": 2, "intermediate_size": 16}, with_mlm="linear")
    >>> model.output.shape
    (None, None, 50)
    """

    config_aliases = {
        "vocab_size": ("vocab_size",),
        "hidden_size": ("hidden_size",),
        "num_hidden_layers": ("num_hidden_layers",),
        "num_attention_heads": ("num_attention_heads",),
        "intermediate_size": ("intermediate_size",),
        "hidden_act": ("hidden_act",),
        "dropout_rate": ("hidden_dropout_prob", "dropout_rate"),
        "attention_dropout_rate": ("attention_probs_dropout_prob", "attention_dropout_rate"),
        "max_position": ("max_position_embeddings", "max_position"),
        "segment_vocab_size": ("type_vocab_size", "segment_vocab_size"),
        "layer_norm_eps": ("layer_norm_eps",),
        "initializer_range": ("initializer_range",),
        "embedding_size": ("embedding_size",),
        "attention_key_size": ("attention_key_size",),
    }
    required_config = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    model_types = ("bert",)
    ignored_config_keys = frozenset({"position_embedding_type"})
    hf_prefix = "bert."
    # Subclasses whose main layers do not take `Unpadded` hidden states (remove_padding) set this to False.
    supports_padding_removal = True
    # Whether a subclass that overrides apply_embeddings still honours embedding_size / hierarchical_position /
    # custom_position_ids / shared_segment_embeddings (through BERT's helpers).
    handles_embedding_options = False
    # Set on every class whose own apply_main_layers / variable_mapping / attention_kwargs pass `attention_key_size`
    # on (to MultiHeadAttention's key_size and the q|k|v widths of the tables); other classes refuse the option.
    handles_attention_key_size = True

    def __init__(
        self,
        max_position: int = 512,
        segment_vocab_size: int = 2,
        with_pool: bool | str = False,
        with_nsp: bool | str = False,
        with_mlm: bool | str = False,
        prune_last_layer: bool = True,
        remove_padding: bool | None = None,
        layer_norm_cond=None,
        layer_norm_cond_hidden_size: int | None = None,
        layer_norm_cond_hidden_act: str | None = None,
        additional_input_layers=None,
        embedding_size: int | None = None,
        hierarchical_position: bool | float | None = None,
        custom_position_ids: bool = False,
        shared_segment_embeddings: bool = False,
        attention_key_size: int | None = None,
        residual_attention_scores: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self._set_residual_attention_scores(residual_attention_scores, remove_padding)
        self._set_embedding_options(embedding_size, hierarchical_position, custom_position_ids,
                                    shared_segment_embeddings, attention_key_size, segment_vocab_size)
        # bert4keras's conditional LayerNorm: every LayerNorm becomes ConditionalLayerNormalization([x, condition]).
        # layer_norm_cond: an int (a new 'Input-LayerNorm-Condition' input of that width) or a Keras tensor (an Input,
        # or a tensor computed from the Inputs listed in additional_input_layers).
        self.layer_norm_cond = layer_norm_cond
        self.layer_norm_cond_hidden_size = layer_norm_cond_hidden_size
        self.layer_norm_cond_hidden_act = layer_norm_cond_hidden_act or "linear"
        self.additional_input_layers = additional_input_layers
        self.condition = None
        self.max_position = max_position
        self.segment_vocab_size = segment_vocab_size
        self.with_pool = with_pool or bool(with_nsp)
        self.with_nsp = with_nsp
        # As in bert4keras, 'lm' and 'unilm' output the MLM head (the next-token distribution) unless told otherwise.
        self.with_mlm = with_mlm or (self.application in ("lm", "unilm"))
        self.prune_last_layer = prune_last_layer
        self.remove_padding = self._resolve_remove_padding(remove_padding)
        # Where padding stays (jax: static shapes), a model reading [CLS] only still lets attention skip the padded
        # queries, whose outputs nothing reads (remove_padding=False keeps them).
        self.skip_padded_queries = remove_padding is None and not self.remove_padding and self.reads_first_token_only

    def _set_embedding_options(self, embedding_size, hierarchical_position, custom_position_ids,
                               shared_segment_embeddings, attention_key_size, segment_vocab_size):
        """bert4keras's embedding options; combinations bert4x does not implement raise with the reason."""
        if embedding_size is not None and (not isinstance(embedding_size, int) or embedding_size <= 0):
            raise ValueError(f"embedding_size must be a positive integer, got {embedding_size!r}.")
        # embedding_size != hidden_size: ALBERT's factorised embedding, projected by 'Embedding-Mapping'.
        self.embedding_size = embedding_size or self.hidden_size
        self.hierarchical_position = hierarchical_position
        self.custom_position_ids = bool(custom_position_ids)
        self.shared_segment_embeddings = bool(shared_segment_embeddings)
        self._set_attention_key_size(attention_key_size)
        if not isinstance(segment_vocab_size, int) or segment_vocab_size < 0:
            raise ValueError(f"segment_vocab_size must be a non-negative integer, got {segment_vocab_size!r}.")
        if self.shared_segment_embeddings and segment_vocab_size == 0:
            raise ValueError("shared_segment_embeddings=True needs segment ids, but segment_vocab_size=0.")
        # Subclasses with their own embeddings or positions (RoFormer's rotary ones) do not read these options.
        cls = type(self)
        if (hierarchical_position or self.custom_position_ids) and \
                cls.apply_position_embedding is not BERT.apply_position_embedding:
            raise ValueError(f"{cls.__name__} has no learned position table: hierarchical_position and "
                             "custom_position_ids do not apply to it.")
        own_embeddings = cls.apply_embeddings is not BERT.apply_embeddings and not self.handles_embedding_options
        if own_embeddings and (self.shared_segment_embeddings or self.embedding_size != self.hidden_size
                               or hierarchical_position or self.custom_position_ids):
            raise ValueError(f"{cls.__name__} builds its own embeddings: shared_segment_embeddings, embedding_size, "
                             "hierarchical_position and custom_position_ids are not implemented for it.")

    def _set_attention_key_size(self, attention_key_size) -> None:
        """bert4keras's `attention_key_size`: the per-head width of queries and keys (values keep the head size)."""
        if attention_key_size is None:
            # A subclass whose own layers read the option (GAU-α's units) sets it before this __init__ and passes None.
            self.attention_key_size = getattr(self, "attention_key_size", None) or self.attention_head_size
            return
        if isinstance(attention_key_size, bool) or not isinstance(attention_key_size, int) or attention_key_size <= 0:
            raise ValueError(f"attention_key_size must be a positive integer, got {attention_key_size!r}.")
        self.attention_key_size = attention_key_size
        if attention_key_size == self.attention_head_size:
            return
        cls = type(self)
        owners = [next(c for c in cls.__mro__ if method in c.__dict__)
                  for method in ("apply_main_layers", "variable_mapping", "attention_kwargs")]
        if not all(owner.__dict__.get("handles_attention_key_size", False) for owner in owners):
            raise ValueError(
                f"attention_key_size={attention_key_size} (other than the head size {self.attention_head_size}) is "
                f"not implemented for {cls.__name__}: its layers or checkpoint tables keep one head size for "
                "queries, keys and values.")

    def _set_residual_attention_scores(self, option: bool, remove_padding: bool | None) -> None:
        """RealFormer (bert4keras's `residual_attention_scores`): each layer's pre-softmax scores are added to the
        next layer's. Only BERT's own main layers pass the scores on."""
        self.residual_attention_scores = bool(option)
        if not option:
            return
        if type(self).apply_main_layers is not BERT.apply_main_layers:
            raise ValueError(f"residual_attention_scores=True is not implemented for {type(self).__name__}, whose "
                             "layers are not BERT's.")
        if remove_padding:
            raise ValueError("residual_attention_scores=True does not combine with remove_padding=True (the scores "
                             "are kept in the padded layout).")

    def _resolve_remove_padding(self, option: bool | None) -> bool:
        backend_name = keras.backend.backend()
        dynamic_shapes = backend_name == "torch" or (
            backend_name == "tensorflow" and not keras.distribution.list_devices("gpu"))
        if option is None:
            return (self.reads_first_token_only and dynamic_shapes and self.layer_norm_cond is None
                    and self.supports_padding_removal and not self.custom_position_ids
                    and not self.residual_attention_scores)
        if option:
            if self.layer_norm_cond is not None:
                raise ValueError("remove_padding=True does not combine with layer_norm_cond (the condition is "
                                 "per row, the hidden states per token).")
            if not self.supports_padding_removal:
                raise ValueError(f"remove_padding=True is not supported by {type(self).__name__}.")
            if self.custom_position_ids:
                raise ValueError("remove_padding=True does not combine with custom_position_ids (positions come "
                                 "from the padded layout).")
        return bool(option)

    def restore_padding(self, x):
        """Brings hidden states without padding (`Unpadded`) back to `[batch, len, hidden]` (zeros at padding);
        returns other hidden states as they are."""
        return x.restore(name="Restore-Padding") if isinstance(x, Unpadded) else x

    @property
    def reads_first_token_only(self) -> bool:
        """Whether every output reads only [CLS] (pooler / NSP without the MLM head)."""
        return bool(self.with_pool) and not self.with_mlm

    def first_token_only(self, index: int) -> bool:
        """Whether layer `index` computes its output at the first token ([CLS]) alone: the last layer, when every
        output (pooler, NSP) reads only that token and `prune_last_layer` is on. Keys and values still come from the
        whole sequence, so the outputs are those of the full layer, at 1/seq_len of its queries, attention output
        and feed-forward work (BERT-base at 128 tokens: ≈5% of a forward pass)."""
        return self.prune_last_layer and self.reads_first_token_only and index == self.num_hidden_layers - 1

    @classmethod
    def applications(cls):
        return ("encoder", "lm", "unilm")

    @classmethod
    def validate_config(cls, config, config_path):
        relative = [key for key in ("use_relative_position", "max_relative_position") if key in config]
        if relative and "max_relative_position" not in cls.config_aliases and config.get("use_relative_position", True):
            raise ValueError(f"Config {config_path} has {', '.join(relative)}: this looks like a NEZHA config "
                             f"(relative positions); use model='nezha' ({cls.__name__} does not read them).")
        kind = config.get("position_embedding_type", "absolute")
        if kind != "absolute":
            raise ValueError(
                f"Config {config_path} asks for position_embedding_type={kind!r}; bert4x's BERT implements "
                "'absolute' only (use model='roformer' for rotary positions)."
            )

    # ----------------------------------------------------------------- hooks
    def get_inputs(self):
        token = keras.Input((self.sequence_length,), dtype="int32", name="Input-Token")
        inputs = [token]
        if self.segment_vocab_size > 0:
            inputs.append(keras.Input((self.sequence_length,), dtype="int32", name="Input-Segment"))
        if self.custom_position_ids:
            inputs.append(keras.Input((self.sequence_length,), dtype="int32", name="Input-Position"))
        if self.packing_input:  # jax: the positions of the real tokens, chosen per batch on the host
            inputs.append(keras.Input((None,), dtype="int32", name="Input-Packing"))
        return inputs + self.condition_inputs()

    @property
    def packing_input(self) -> bool:
        """Whether the model takes `Input-Packing` (`bert4x.snippets.packing_positions`): padding removed on jax,
        whose static shapes need the number of tokens chosen before the step is compiled."""
        return self.remove_padding and keras.backend.backend() == "jax"

    def condition_inputs(self) -> list:
        """Sets `self.condition` from `layer_norm_cond` and returns the extra model inputs it needs."""
        cond = self.layer_norm_cond
        extra = self.additional_input_layers
        extra = [] if extra is None else list(extra) if isinstance(extra, (list, tuple)) else [extra]
        if cond is None:
            return extra
        if isinstance(cond, int):
            cond = keras.Input((cond,), name="Input-LayerNorm-Condition")
        history = getattr(cond, "_keras_history", None)
        if history is None:
            raise TypeError(f"layer_norm_cond must be an int or a Keras tensor, got {type(cond).__name__}.")
        if isinstance(history.operation, keras.layers.InputLayer) and not any(cond is t for t in extra):
            extra.append(cond)
        self.condition = cond
        return extra

    def apply_layer_norm(self, x, name: str):
        """LayerNorm named `name`, conditional on `self.condition` when `layer_norm_cond` is set."""
        if self.condition is None:
            return LayerNormalization(epsilon=self.layer_norm_eps, name=name)(x)
        return ConditionalLayerNormalization(
            epsilon=self.layer_norm_eps, hidden_units=self.layer_norm_cond_hidden_size,
            hidden_activation=self.layer_norm_cond_hidden_act, hidden_initializer=self.initializer(), name=name,
        )([x, self.condition])

    def split_inputs(self, inputs) -> tuple:
        """(token_ids, segment_ids or None, position_ids or None, packing or None) from `get_inputs()`' list."""
        rest = list(inputs[1:])
        segment_ids = rest.pop(0) if self.segment_vocab_size > 0 else None
        position_ids = rest.pop(0) if self.custom_position_ids else None
        packing = rest.pop(0) if self.packing_input else None
        return inputs[0], segment_ids, position_ids, packing

    def apply_token_segment_embeddings(self, token_ids, segment_ids):
        """Token (+ segment) embeddings of width `embedding_size`; sets `self.token_embedding`."""
        self.token_embedding = Embedding(
            self.vocab_size, self.embedding_size, embeddings_initializer=self.initializer(), mask_zero=True,
            name="Embedding-Token",
        )
        x = self.token_embedding(token_ids)  # carries the padding mask (id 0) that the layers after it propagate
        if segment_ids is not None:
            if self.shared_segment_embeddings:  # segment ids index the token table (bert4keras's option)
                self.segment_embedding = self.token_embedding
            else:
                self.segment_embedding = Embedding(  # bert4x's: its backward pass avoids a slow scatter-add
                    self.segment_vocab_size, self.embedding_size, embeddings_initializer=self.initializer(),
                    name="Embedding-Segment",
                )
            # keeps the token embedding's padding mask
            x = EmbeddingSum(name="Embedding-Token-Segment")([x, self.segment_embedding(segment_ids)])
        return x

    def apply_embedding_mapping(self, x):
        """Projects factorised embeddings (`embedding_size`) to `hidden_size` ('Embedding-Mapping')."""
        if self.embedding_size == self.hidden_size:
            return x
        return keras.layers.Dense(self.hidden_size, kernel_initializer=self.initializer(), name="Embedding-Mapping")(x)

    def apply_embeddings(self, inputs):
        token_ids, segment_ids, position_ids, packing = self.split_inputs(inputs)
        x = self.apply_token_segment_embeddings(token_ids, segment_ids)
        x = self.apply_position_embedding(x, position_ids) if position_ids is not None else \
            self.apply_position_embedding(x)
        x = self.apply_layer_norm(x, "Embedding-Norm")
        self.embedding_norm = _producer(x)
        x = Dropout(self.dropout_rate, name="Embedding-Dropout")(x)
        x = self.apply_embedding_mapping(x)
        self.attention_mask = AttentionMask(
            {"encoder": "encoder", "lm": "lm", "unilm": "unilm"}[self.application], name="Attention-Mask"
        )(token_ids, segment_ids)
        if self.remove_padding:  # the hidden states then flow through the layers as `Unpadded` data
            x = Unpadded(*RemovePadding(name="Remove-Padding")(x, token_ids, packing=packing))
        return x

    def apply_position_embedding(self, x, position_ids=None):
        if self.hierarchical_position or self.custom_position_ids:
            self.position_embedding = HierarchicalPositionEmbedding(
                self.max_position, self.embedding_size, hierarchical=self.hierarchical_position,
                custom_position_ids=self.custom_position_ids, embeddings_initializer=self.initializer(),
                name="Embedding-Position",
            )
            return self.position_embedding(x) if position_ids is None else self.position_embedding(x, position_ids)
        self.position_embedding = PositionEmbedding(
            self.max_position, self.embedding_size, embeddings_initializer=self.initializer(), name="Embedding-Position"
        )
        return self.position_embedding(x)

    def attention_kwargs(self) -> dict:
        """Extra call arguments of every self-attention (RoFormer adds rotary positions here)."""
        return {}

    def apply_main_layers(self, x, index):
        """One layer. `x` is `[batch, len, hidden]`, or `Unpadded` hidden states (remove_padding), returned as such."""
        attention = f"Transformer-{index}-MultiHeadSelfAttention"
        feed_forward = f"Transformer-{index}-FeedForward"
        sequence, extra = None, self.attention_kwargs()
        if self.first_token_only(index):
            x = self.restore_padding(x)
            sequence, x = x, FirstToken(keepdims=True, name=f"Transformer-{index}-FirstToken")(x)
        unpadded = x if isinstance(x, Unpadded) else None
        if unpadded is not None:
            x, extra["padding_index"] = unpadded.tokens, unpadded.index
        elif self.skip_padded_queries and sequence is None:
            extra["skip_padded_queries"] = True
        if self.residual_attention_scores:  # RealFormer: this layer's scores go on to the next
            extra.update(return_scores=True, residual_scores=self.attention_scores if index > 0 else None)
        y = MultiHeadAttention(
            self.num_attention_heads, self.attention_head_size, attention_dropout=self.attention_dropout_rate,
            kernel_initializer=self.initializer(), key_size=self.attention_key_size, name=attention,
            **self.attention_variant_kwargs(),
        )(x, key_value=sequence, attention_mask=self.attention_mask, **extra)
        if self.residual_attention_scores:
            y, self.attention_scores = y
        block = [_producer(y)]  # this block's layers, in the order decode_step applies them
        y = Dropout(self.dropout_rate, name=f"{attention}-Dropout")(y)
        x = keras.layers.Add(name=f"{attention}-Add")([x, y])
        x = self.apply_layer_norm(x, f"{attention}-Norm")
        block.append(_producer(x))
        y = FeedForward(
            self.intermediate_size, activation=self.hidden_act, kernel_initializer=self.initializer(), name=feed_forward
        )(x)
        block.append(_producer(y))
        y = Dropout(self.dropout_rate, name=f"{feed_forward}-Dropout")(y)
        x = keras.layers.Add(name=f"{feed_forward}-Add")([x, y])
        x = self.apply_layer_norm(x, f"{feed_forward}-Norm")
        self.keep_decode_block(index, *block, _producer(x))
        return unpadded.with_tokens(x) if unpadded is not None else x

    def apply_final_layers(self, x):
        x = self.restore_padding(x)
        outputs = []
        if self.with_pool:
            pooled = FirstToken(name="Pooler")(x)
            pooled = keras.layers.Dense(
                self.hidden_size, activation=_head_activation(self.with_pool, "tanh"),
                kernel_initializer=self.initializer(), name="Pooler-Dense",
            )(pooled)
            if self.with_nsp:
                pooled = keras.layers.Dense(
                    2, activation=_head_activation(self.with_nsp, "softmax"), kernel_initializer=self.initializer(),
                    dtype=_output_dtype(), name="NSP-Proba",
                )(pooled)
            outputs.append(pooled)
        if self.with_mlm:
            y = keras.layers.Dense(
                self.embedding_size, activation=_keras_activation(self.hidden_act),
                kernel_initializer=self.initializer(), name="MLM-Dense",
            )(x)
            self.mlm_dense = _producer(y)
            y = self.apply_layer_norm(y, "MLM-Norm")
            self.mlm_norm = _producer(y)
            y = self.token_embedding(y, mode="dense")
            y = BiasAdd(name="MLM-Bias")(y)
            self.mlm_bias = _producer(y)
            y = keras.layers.Activation(
                _head_activation(self.with_mlm, "softmax"), dtype=_output_dtype(), name="MLM-Activation"
            )(y)
            outputs.append(y)
        if not outputs:
            return x
        return outputs[0] if len(outputs) == 1 else outputs

    # ----------------------------------------------------------------- checkpoints
    def variable_mapping(self, fmt):
        if fmt == "google":
            table, layer = dict(GOOGLE_TABLE), _google_layer_table
        elif fmt == "huggingface":
            table, layer = dict(HF_TABLE), _hf_layer_table
        else:
            raise ValueError(f"Unknown checkpoint format {fmt!r}.")
        for i in range(self.num_hidden_layers):
            table.update(layer(i, f"Transformer-{i}-MultiHeadSelfAttention", self.qkv_widths()))
        return table

    def qkv_widths(self) -> tuple[int, int, int]:
        """The widths of the query, key and value kernels in the fused `qkv` projection."""
        keys = self.num_attention_heads * self.attention_key_size
        return keys, keys, self.num_attention_heads * self.attention_head_size

    def tied_variables(self, fmt):
        if fmt == "huggingface":
            return {
                "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
                "cls.predictions.decoder.bias": "cls.predictions.bias",
            }
        return {}

    def export_config(self, fmt):
        config = {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "intermediate_size": self.intermediate_size,
            "hidden_act": self.hidden_act,
            "hidden_dropout_prob": self.dropout_rate,
            "attention_probs_dropout_prob": self.attention_dropout_rate,
            "max_position_embeddings": self.max_position,
            "type_vocab_size": self.segment_vocab_size,
            "initializer_range": self.initializer_range,
        }
        if self.embedding_size != self.hidden_size:
            config["embedding_size"] = self.embedding_size
        if self.attention_key_size != self.attention_head_size:
            config["attention_key_size"] = self.attention_key_size  # transformers' BertModel has no such option
        if fmt == "google":
            return "bert_config.json", config
        config.update(model_type="bert", layer_norm_eps=self.layer_norm_eps, architectures=["BertForPreTraining"])
        return "config.json", config

    # ----------------------------------------------------------------- decoding (bert4x.models.cached_decoding)
    # The prompt is segment 0 (a UniLM source, attended bidirectionally as in the model) and generated tokens are
    # segment 1 for 'unilm', 0 for 'lm'. The cached steps reuse the model's own layer objects, recorded while it was
    # built; what is BERT's here is the order of a layer's parts and the MLM head around the tied projection.
    def keep_decode_block(self, index: int, attention, attention_norm, feed_forward, feed_forward_norm) -> None:
        """Records the layers of main layer `index` for `decode_step` (post-norm: attention, norm, FFN, norm)."""
        if index == 0:
            self.decode_layers = []
        self.decode_layers.append((attention, attention_norm, feed_forward, feed_forward_norm))

    def decode_blocks(self) -> list:
        return [post_norm_block(*layers) for layers in getattr(self, "decode_layers", ())]

    def decode_head_layers(self) -> tuple[list, list]:
        """The MLM head's dense and norm before the tied projection, its bias after."""
        return [self.mlm_dense, self.mlm_norm], [self.mlm_bias]


@register_model("wobert")
class WoBERT(BERT):
    """WoBERT: BERT's architecture with a word-level (jieba) vocabulary; pair it with
    `Tokenizer(vocab, pre_tokenize=lambda s: jieba.cut(s, HMM=False))`."""


def _output_dtype():
    # Heads that produce probabilities return float32 even under mixed precision.
    policy = keras.config.dtype_policy()
    return "float32" if policy.compute_dtype != "float32" else None


def _keras_activation(name):
    from bert4x.backend import get_activation

    return get_activation(name)


def _producer(tensor):
    """The layer that produced a symbolic Keras tensor: how the decoding section finds the layer objects of the graph
    this class built (a tuple, as RotaryEmbedding's outputs, is read from its first tensor)."""
    if isinstance(tensor, (tuple, list)):
        tensor = tensor[0]
    return tensor._keras_history.operation

