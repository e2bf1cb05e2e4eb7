"""The model registry: `register_model` names a `Transformer` subclass, `build_transformer_model` builds one from a
config (and loads its checkpoint), and `rebuild_transformer` builds one again from the JSON record a saved model
keeps."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import keras
import numpy as np

from bert4x.models.config_checks import read_config

if TYPE_CHECKING:
    from bert4x.models.base import Transformer

MODELS: dict[str, type[Transformer]] = {}


def register_model(*names: str) -> Callable[[type], type]:
    """Class decorator: makes a `Transformer` subclass buildable as `build_transformer_model(model=name)`."""

    def decorate(cls):
        for name in names:
            MODELS[name] = cls
        return cls

    return decorate


def build_transformer_model(
    config_path: str | dict | None = None,
    checkpoint_path: str | None = None,
    model: str = "bert",
    application: str = "encoder",
    return_keras_model: bool = True,
    strict: bool = True,
    **kwargs,
) -> keras.Model | Transformer:
    """Builds a model from a config (Google `bert_config.json`, Hugging Face `config.json`, or a dict) and, when
    `checkpoint_path` is given, loads its weights strictly.

    Returns the `keras.Model`, or with `return_keras_model=False` the `Transformer` (its `.model` is the Keras model;
    it also saves checkpoints). kwargs override config entries and set options such as `with_pool`, `with_nsp`,
    `with_mlm`, `prune_last_layer`, `remove_padding`, `keep_tokens`, `sequence_length`, `dropout_rate` and `name`.

    Example:
    >>> bert = build_transformer_model({"vocab_size": 100, "hidden_size": 8, "num_hidden_layers": 1,
    ...     "num_attention_heads": 2, "intermediate_size": 16}, with_pool=True)
    >>> bert.output.shape
    (None, 8)
    """
    # Importing the package registers every model.
    import bert4x.models  # noqa: F401

    key = model.lower() if isinstance(model, str) else model
    if key not in MODELS:
        raise ValueError(f"Unknown model {model!r}; registered models: {sorted(MODELS)}.")
    cls = MODELS[key]
    if isinstance(config_path, dict):
        config, source = dict(config_path), "<dict>"
    elif config_path is None:
        config, source = {}, "<kwargs>"
    else:
        config, source = read_config(config_path), config_path
    transformer = cls.from_config(config, source, application=application, **kwargs)
    transformer.build()
    if checkpoint_path is not None:
        transformer.load_weights_from_checkpoint(checkpoint_path, strict=strict)
    if return_keras_model:
        return transformer.model
    return transformer

def rebuild_transformer(record: dict) -> Transformer:
    """Builds the `Transformer` that `Transformer.rebuild_record` describes (fresh weights), under the dtype policy it
    was built with.

    Args:
        record: what `rebuild_record` returned.
    """
    import bert4x.models  # noqa: F401 (registers every model)

    if not isinstance(record, dict) or not {"model", "args", "kwargs", "dtype_policy"} <= set(record):
        raise ValueError(f"rebuild_transformer: record must be what Transformer.rebuild_record returns, got "
                         f"{record!r}.")
    if record["model"] not in MODELS:
        raise ValueError(f"rebuild_transformer: model {record['model']!r} is not registered (import the module that "
                         f"registers it); registered: {sorted(MODELS)}.")
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(record["dtype_policy"])
    try:
        transformer = MODELS[record["model"]](*record["args"], **record["kwargs"])
        transformer.build()
    finally:
        keras.config.set_dtype_policy(policy)
    return transformer


def _json_data(value):
    """`value` as plain JSON data (numpy scalars and arrays, tuples as lists), or None if it holds anything else."""
    if isinstance(value, (np.ndarray, np.generic)):
        value = value.tolist()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_json_data(v) for v in value]
        return None if any(i is None and v is not None for i, v in zip(items, value)) else items
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        items = {k: _json_data(v) for k, v in value.items()}
        return None if any(items[k] is None and value[k] is not None for k in value) else items
    return None
