"""The attention variants of the seed articles: the functions (`bert4x.kernels.variants`, re-exported here) and the
initializer of Performer's random features.

`MultiHeadAttention(attention_type=...)` uses them: 'linear' (`linear_attention`), 'performer'
(`performer_attention`, features from `OrthogonalRandomFeatures`) and 'keynorm' (`keynorm_attention`).
"""

from __future__ import annotations

import keras
from keras import ops

from bert4x.kernels.variants import (  # noqa: F401 - re-exported
    default_performer_features,
    elu_feature_map,
    kernel_attention,
    keynorm_attention,
    keynorm_inputs,
    linear_attention,
    orthogonal_gaussian_projection,
    performer_attention,
    performer_feature_map,
)

__all__ = [
    "elu_feature_map",
    "performer_feature_map",
    "kernel_attention",
    "linear_attention",
    "performer_attention",
    "keynorm_attention",
    "keynorm_inputs",
    "orthogonal_gaussian_projection",
    "OrthogonalRandomFeatures",
    "default_performer_features",
]


@keras.saving.register_keras_serializable(package="bert4x")
class OrthogonalRandomFeatures(keras.initializers.Initializer):
    """Initializer drawing `orthogonal_gaussian_projection(shape[0], shape[1], seed)` (Performer's W).

    Args:
        seed: seed of the random rows.

    Example:
    >>> OrthogonalRandomFeatures(seed=1)((8, 4)).shape
    (8, 4)
    """

    def __init__(self, seed: int = 0):
        self.seed = seed

    def __call__(self, shape, dtype=None):
        if len(shape) != 2:
            raise ValueError(f"OrthogonalRandomFeatures needs a 2-D shape [features, head_size], got {shape}.")
        value = orthogonal_gaussian_projection(int(shape[0]), int(shape[1]), self.seed)
        return ops.convert_to_tensor(value, dtype=dtype or "float32")

    def get_config(self):
        return {"seed": self.seed}
