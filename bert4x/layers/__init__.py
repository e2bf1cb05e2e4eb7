"""bert4x layers. `from bert4x.layers import X` works for every layer, as `from bert4keras.layers import X` did.

One concern per module: `embeddings` (token and position embeddings, the tied output projection), `attention`
(MultiHeadAttention, AttentionMask), `attention_variants`, `feed_forward`, `gated_attention_unit` (GAU-α's
GatedAttentionUnit), `normalization`, `dropout`, `padding`
(RemovePadding, RestorePadding), `pooling` (FirstToken), `t5`, `heads` (task layers) and `loss` (the `Loss` base
of loss layers). How attention, LayerNorm and dropout run is in `bert4x.kernels`.
"""

from bert4x.layers.attention import *  # noqa: F401,F403
from bert4x.layers.attention_variants import OrthogonalRandomFeatures  # noqa: F401
from bert4x.layers.dropout import *  # noqa: F401,F403
from bert4x.layers.embeddings import *  # noqa: F401,F403
from bert4x.layers.feed_forward import *  # noqa: F401,F403
from bert4x.layers.gated_attention_unit import *  # noqa: F401,F403
from bert4x.layers.heads import *  # noqa: F401,F403
from bert4x.layers.hierarchical_position import *  # noqa: F401,F403
from bert4x.layers.loss import *  # noqa: F401,F403
from bert4x.layers.normalization import *  # noqa: F401,F403
from bert4x.layers.padding import *  # noqa: F401,F403
from bert4x.layers.pooling import *  # noqa: F401,F403
from bert4x.layers.relative_position import *  # noqa: F401,F403
from bert4x.layers.t5 import *  # noqa: F401,F403
