"""Config reading and checks: `read_config` for JSON config files, and the type/range checks of every canonical
model argument, `keep_tokens` and the attention options, each error naming the key and the limit."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

import numpy as np

# Keys of Hugging Face / Google configs that carry no architecture information (or that a model validates itself).
COMMON_IGNORED_CONFIG_KEYS = {
    "_name_or_path", "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
    "gradient_checkpointing", "use_cache", "classifier_dropout", "id2label", "label2id", "num_labels",
    "problem_type", "output_attentions", "output_hidden_states", "return_dict", "is_decoder",
    "add_cross_attention", "tie_word_embeddings", "chunk_size_feed_forward", "finetuning_task", "tokenizer_class",
    "prefix", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "initializer_range", "directionality", "pooler_fc_size", "pooler_num_attention_heads",
    "pooler_num_fc_layers", "pooler_size_per_head", "pooler_type", "torchscript", "pruned_heads",
    "use_bfloat16", "is_encoder_decoder", "task_specific_params", "_attn_implementation_autoset",
}


# What each canonical argument must be when given (None means "the model's default" and is always allowed).
_POSITIVE_INT = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "max_position", "attention_head_size", "num_decoder_layers", "relative_attention_num_buckets",
                 "relative_attention_max_distance", "embedding_size", "sequence_length")
_NON_NEGATIVE_INT = ("segment_vocab_size",)
_PROBABILITY = ("dropout_rate", "attention_dropout_rate")
_POSITIVE_FLOAT = ("layer_norm_eps",)
_NON_NEGATIVE_FLOAT = ("initializer_range",)
_STRING = ("hidden_act", "feed_forward_proj", "name", "attention_type", "application")


def check_config_value(key: str, value: Any, config_path: str = "<config>", canonical: str | None = None) -> None:
    """Raises `TypeError` (wrong type) or `ValueError` (out of range) for a config value, naming `key`.

    Args:
        key: the config key (or argument) the value came from, named in the message.
        value: the value.
        config_path: where the config came from, named in the message.
        canonical: the canonical argument name that decides the rule (defaults to `key`).
    """
    rule_of = canonical or key
    if value is None:
        return
    where = f"Config {config_path}: {key}={value!r}"
    is_int = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    is_number = is_int or (isinstance(value, (float, np.floating)))
    if rule_of in _POSITIVE_INT or rule_of in _NON_NEGATIVE_INT:
        if not is_int:
            raise TypeError(f"{where} must be an integer, got {type(value).__name__}.")
        low = 1 if rule_of in _POSITIVE_INT else 0
        if value < low:
            raise ValueError(f"{where} must be an integer >= {low}.")
    elif rule_of in _PROBABILITY + _POSITIVE_FLOAT + _NON_NEGATIVE_FLOAT:
        if not is_number:
            raise TypeError(f"{where} must be a number, got {type(value).__name__}.")
        if not np.isfinite(value):
            raise ValueError(f"{where} must be finite.")
        if rule_of in _PROBABILITY and not 0 <= value < 1:
            raise ValueError(f"{where} must be a probability in [0, 1).")
        if rule_of in _POSITIVE_FLOAT and not np.float32(value) > 0:
            raise ValueError(f"{where} must be > 0 (and not round to 0 in float32).")
        if rule_of in _NON_NEGATIVE_FLOAT and value < 0:
            raise ValueError(f"{where} must be >= 0.")
    elif rule_of == "hidden_act" and isinstance(value, (list, tuple)):
        # bert4keras's configs may list one activation per feed-forward projection (['silu', 'linear'])
        if not value or not all(isinstance(v, str) for v in value):
            raise TypeError(f"{where} must be a string or a list of strings.")
    elif rule_of in _STRING and not isinstance(value, str) and not (rule_of == "hidden_act" and callable(value)):
        raise TypeError(f"{where} must be a string, got {type(value).__name__}.")


def check_keep_tokens(keep_tokens: Any, vocab_size: int) -> list[int]:
    """Validates `keep_tokens` (a non-empty 1-D sequence of unique integer ids in `[0, vocab_size)`) as a list.

    Args:
        keep_tokens: the ids of the checkpoint's vocabulary rows to keep, in the new order.
        vocab_size: the checkpoint's vocabulary size.

    Raises:
        TypeError: not a sequence, or an element that is not an integer (floats, strings and bools included).
        ValueError: empty, not 1-D, repeated ids, or ids outside `[0, vocab_size)`.
    """
    if isinstance(keep_tokens, (str, bytes, dict)) or not isinstance(keep_tokens, Iterable):
        raise TypeError(f"keep_tokens must be a 1-D sequence of integer ids, got {type(keep_tokens).__name__}.")
    items = list(keep_tokens.tolist() if isinstance(keep_tokens, np.ndarray) else keep_tokens)
    if isinstance(keep_tokens, np.ndarray) and keep_tokens.ndim != 1:
        raise ValueError(f"keep_tokens must be 1-D, got an array of shape {keep_tokens.shape}.")
    if not items:
        raise ValueError("keep_tokens is empty; it must list at least one id of the checkpoint vocabulary.")
    for index, item in enumerate(items):
        if isinstance(item, (list, tuple, np.ndarray)):
            raise ValueError(f"keep_tokens must be 1-D; element {index} is a {type(item).__name__}.")
        if isinstance(item, (bool, np.bool_)) or not isinstance(item, (int, np.integer)):
            raise TypeError(f"keep_tokens must hold integer ids; element {index} is {item!r} ({type(item).__name__}).")
    ids = [int(i) for i in items]
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(
            f"keep_tokens has {len(bad)} ids outside the checkpoint vocabulary [0, {vocab_size}): {bad[:10]}"
        )
    if len(set(ids)) != len(ids):
        seen, repeated = set(), []
        for i in ids:
            if i in seen and i not in repeated:
                repeated.append(i)
            seen.add(i)
        raise ValueError(f"keep_tokens repeats ids {repeated[:10]}; each kept row must be listed once.")
    return ids


def read_config(config_path: str) -> dict:
    """Reads a JSON config file; FileNotFoundError / ValueError name the file."""
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"Config file not found: {config_path}")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"Config file {config_path} is not valid JSON: {e}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"Config file {config_path} is not valid UTF-8 (byte {e.start}: {e.reason}).") from None
    if not isinstance(config, dict):
        raise ValueError(f"Config file {config_path} must hold a JSON object, got {type(config).__name__}.")
    return config


def _check_attention_options(attention_type: str, options: dict | None) -> tuple[str, dict]:
    from bert4x.layers.attention import ATTENTION_TYPES

    if attention_type not in ATTENTION_TYPES:
        raise ValueError(f"attention_type must be one of {ATTENTION_TYPES}, got {attention_type!r}.")
    allowed = {"softmax": (), "linear": (), "performer": ("performer_features", "performer_seed"),
               "keynorm": ("keynorm_scale", "keynorm_learnable_scale")}[attention_type]
    options = dict(options or {})
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"attention_options {unknown} do not apply to attention_type={attention_type!r}; allowed: {list(allowed)}."
        )
    return attention_type, options
