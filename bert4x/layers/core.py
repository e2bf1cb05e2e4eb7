"""Former home of bert4x's core layers, kept so that `from bert4x.layers.core import X` still works.

The layers now live one concern per module (`bert4x.layers.embeddings`, `attention`, `feed_forward`,
`normalization`, `dropout`, `padding`, `pooling`); import them from `bert4x.layers`.
"""

from bert4x.layers.attention import ATTENTION_TYPES, AttentionMask, MultiHeadAttention  # noqa: F401
from bert4x.layers.dropout import Dropout  # noqa: F401
from bert4x.layers.embeddings import BiasAdd, Embedding, PositionEmbedding, tied_projection  # noqa: F401
from bert4x.layers.feed_forward import FeedForward  # noqa: F401
from bert4x.layers.normalization import LayerNormalization  # noqa: F401
from bert4x.layers.padding import RemovePadding, RestorePadding  # noqa: F401
from bert4x.layers.pooling import FirstToken  # noqa: F401
