"""Token and position embeddings, and the tied output projection with its bias (the MLM head's logits)."""

from __future__ import annotations

import keras
from keras import ops

from bert4x import backend
from bert4x.layers._common import PACKAGE, initializer

__all__ = ["Embedding", "PositionEmbedding", "EmbeddingSum", "BiasAdd", "tied_projection"]

def tied_projection(hidden, table):
    """`hidden @ table.T` (logits over a `[vocab, dim]` embedding table), written as `(table @ hidden.T).T` so the
    table stays in its stored layout: inside a decoding loop XLA:CPU otherwise copies the transposed table on every
    step.

    Args:
        hidden: `[..., dim]` hidden states.
        table: `[vocab, dim]` embedding table.
    """
    shape = ops.shape(hidden)
    rows = ops.reshape(hidden, (-1, shape[-1]))
    logits = ops.transpose(ops.matmul(table, ops.transpose(rows)))
    return ops.reshape(logits, tuple(shape[:-1]) + (ops.shape(table)[0],))


@keras.saving.register_keras_serializable(package=PACKAGE)
class Embedding(keras.layers.Embedding):
    """A token embedding that can also be called in reverse, as the tied output projection of an LM head.

    `layer(ids)` looks rows up; `layer(hidden, mode="dense")` returns `hidden @ embeddings.T` (logits over the vocab).
    Tables of at most `SMALL_TABLE_ROWS` rows (segment embeddings) are read as a one-hot weighted sum, so that their
    gradient is a reduction rather than a scatter-add (ids outside the table then give zeros).

    With `mask_zero=True` (BERT's token embedding) its output carries the Keras padding mask `ids != 0`, which the
    layers after it propagate; the reverse (`mode="dense"`) call passes its input's mask on.

    Args:
        input_dim: vocabulary size.
        output_dim: embedding width.
        embeddings_initializer: initializer of the table.
        mask_zero: whether id 0 is padding (the output then carries a Keras mask).
        **kwargs: other `keras.layers.Embedding` arguments.

    Example:
    >>> emb = Embedding(10, 4)
    >>> emb(keras.ops.ones((2, 3), "int32")).shape, emb(keras.ops.ones((2, 3, 4)), mode="dense").shape
    ((2, 3, 4), (2, 3, 10))
    """

    # A scatter-add into a few rows that every token hits serialises on GPUs (benchmarks/PROFILE.md). The one-hot sum
    # is exact in float32.
    SMALL_TABLE_ROWS = 16

    def add_weight(self, *args, **kwargs):
        # The table is not autocast: rows are gathered from float32 and then cast (Keras's Embedding.call casts its
        # output). Gathered from an autocast bfloat16 copy, the table's gradient is a bfloat16 scatter-add, in which
        # a token used more than 256 times in a batch stops adding up (4,096 uses of one id summed to 256).
        if kwargs.get("name") == "embeddings":
            kwargs.setdefault("autocast", False)
        return super().add_weight(*args, **kwargs)

    def call(self, inputs, mode: str = "embedding"):
        if mode == "dense":
            return tied_projection(inputs, ops.cast(self.embeddings, self.compute_dtype))
        if mode != "embedding":
            raise ValueError(f"Embedding mode must be 'embedding' or 'dense', got {mode!r}.")
        if self.input_dim <= self.SMALL_TABLE_ROWS:
            table = self.embeddings
            one_hot = ops.one_hot(ops.cast(inputs, "int32"), self.input_dim, dtype=table.dtype)
            rows = ops.sum(ops.expand_dims(one_hot, -1) * table, axis=-2)
            return ops.cast(rows, self.compute_dtype)
        return super().call(inputs)

    def compute_mask(self, inputs, mask=None):
        # Called with the first argument: token ids (embedding mode), or hidden states in the reverse call, whose
        # mask passes through.
        if "int" not in keras.backend.standardize_dtype(inputs.dtype):
            return mask
        return super().compute_mask(inputs, mask)

    def compute_output_shape(self, input_shape, mode: str = "embedding"):
        if mode == "dense":
            return tuple(input_shape[:-1]) + (self.input_dim,)
        return super().compute_output_shape(input_shape)

    def compute_output_spec(self, inputs, mode: str = "embedding"):
        shape = self.compute_output_shape(inputs.shape, mode=mode)
        return keras.KerasTensor(shape, dtype=self.compute_dtype)


@keras.saving.register_keras_serializable(package=PACKAGE)
class PositionEmbedding(keras.layers.Layer):
    """Learned absolute positions: adds `embeddings[:length]` to a `[batch, length, dim]` input.

    Args:
        input_dim: the number of learned positions (max_position_embeddings).
        output_dim: the width of the input.
        embeddings_initializer: initializer of the table (truncated normal, stddev 0.02, when None).
        **kwargs: `keras.layers.Layer` arguments.

    Example:
    >>> PositionEmbedding(512, 8)(keras.ops.zeros((2, 5, 8))).shape
    (2, 5, 8)
    """

    def __init__(self, input_dim: int, output_dim: int, embeddings_initializer=None, **kwargs):
        super().__init__(**kwargs)
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.embeddings_initializer = initializer(embeddings_initializer)
        self.supports_masking = True

    def build(self, input_shape):
        if input_shape[-1] is not None and input_shape[-1] != self.output_dim:
            raise ValueError(f"{self.name}: input width {input_shape[-1]} != output_dim {self.output_dim}.")
        if input_shape[1] is not None and input_shape[1] > self.input_dim:
            raise ValueError(
                f"{self.name}: sequence length {input_shape[1]} exceeds the {self.input_dim} learned positions "
                "(max_position_embeddings); truncate the text (Tokenizer.encode(maxlen=...))."
            )
        self.embeddings = self.add_weight(
            name="embeddings", shape=(self.input_dim, self.output_dim), initializer=self.embeddings_initializer
        )

    def call(self, inputs):
        length = ops.shape(inputs)[1]
        table = ops.cast(self.embeddings[:length], inputs.dtype)
        return _add_positions(inputs, table)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            input_dim=self.input_dim,
            output_dim=self.output_dim,
            embeddings_initializer=keras.initializers.serialize(self.embeddings_initializer),
        )
        return config


@ops.custom_gradient
def _add_positions(inputs, table):
    # The table's gradient is the batch sum of the upstream gradient. Written as a reduction, XLA:GPU lays the whole
    # residual stream out batch-minor to make it cheap, which turns every residual, dropout and LayerNorm kernel into
    # a transpose. As a matmul with a row of ones it sets no layout.
    def grad(*args, upstream=None):
        upstream = backend.upstream_gradient(args, upstream)
        batch = ops.shape(upstream)[0]
        rows = ops.reshape(upstream, (batch, -1))
        return upstream, ops.reshape(ops.matmul(ops.ones((1, batch), upstream.dtype), rows), ops.shape(table))

    return inputs + ops.expand_dims(table, 0), grad


@keras.saving.register_keras_serializable(package=PACKAGE)
class EmbeddingSum(keras.layers.Add):
    """`keras.layers.Add` whose output keeps the Keras mask of its first input (the token embedding).

    Keras's merge layers drop the mask when any input has none; the token embedding carries the padding mask and the
    segment embedding none, so their sum would lose it. Only the first input's mask counts: a segment embedding that
    shares the token table (`shared_segment_embeddings`) would otherwise mask every segment-0 token.

    Args:
        **kwargs: `keras.layers.Layer` arguments.

    Example:
    >>> ids = keras.Input((None,), dtype="int32")
    >>> x = EmbeddingSum()([Embedding(10, 4, mask_zero=True)(ids), Embedding(2, 4)(ids)])
    >>> tuple(x.shape)
    (None, None, 4)
    """

    def compute_mask(self, inputs, mask=None):
        return mask[0] if mask else None


@keras.saving.register_keras_serializable(package=PACKAGE)
class BiasAdd(keras.layers.Layer):
    """Adds a learned bias over the last axis (the MLM output bias, after the tied `Embedding(mode="dense")`).

    Args:
        **kwargs: `keras.layers.Layer` arguments.

    Example:
    >>> BiasAdd()(keras.ops.zeros((2, 5))).shape
    (2, 5)
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def build(self, input_shape):
        self.bias = self.add_weight(name="bias", shape=(input_shape[-1],), initializer="zeros")

    def call(self, inputs):
        return inputs + ops.cast(self.bias, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape
