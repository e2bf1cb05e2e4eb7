"""Model registry: `build_transformer_model(model=name)` builds any registered `Transformer`."""

from bert4x.models.albert import ALBERT, ALBERTUnshared  # noqa: F401
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
from bert4x.models.electra import ELECTRA  # noqa: F401
from bert4x.models.gau_alpha import GAU_alpha  # noqa: F401
from bert4x.models.gpt import GPT, GPT2, GPT2ML  # noqa: F401
from bert4x.models.nezha import NEZHA  # noqa: F401
from bert4x.models.roformer import RoFormer, RoFormerV2  # noqa: F401
from bert4x.models.t5 import MT5, T5, T5_1_1, load_keep_tokens  # noqa: F401
from bert4x.training import Model  # noqa: F401
