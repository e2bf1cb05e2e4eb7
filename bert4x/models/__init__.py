"""Model registry: `build_transformer_model(model=name)` builds any registered `Transformer`."""

from bert4x.models.base import (  # noqa: F401
    MODELS,
    CheckpointError,
    LoadReport,
    Source,
    Transformer,
    build_transformer_model,
    register_model,
    src,
)
from bert4x.models.bert import BERT, WoBERT  # noqa: F401
