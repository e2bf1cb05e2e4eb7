"""The `Transformer` template, the model registry, config reading and strict checkpoint loading/saving.

A model is a `Transformer` subclass that overrides hooks:

- `get_inputs()`                 -> the Keras inputs
- `apply_embeddings(inputs)`     -> hidden states entering the first layer
- `apply_main_layers(x, index)`  -> one Transformer layer
- `apply_final_layers(x)`        -> the outputs (heads)
- `variable_mapping(fmt)`        -> a table {Keras weight path: checkpoint source} for one checkpoint format

Checkpoint loading is generic: it walks the table, so a new model adds a table, not a code path.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from typing import Any

import keras
import numpy as np

from bert4x import backend
from bert4x.checkpoints import open_checkpoint, write_google_checkpoint, write_safetensors
from bert4x.training import Model

logger = logging.getLogger("bert4x")

MODELS: dict[str, type[Transformer]] = {}


def register_model(*names: str) -> Callable[[type], type]:
    """Class decorator: makes a `Transformer` subclass buildable as `build_transformer_model(model=name)`."""

    def decorate(cls):
        for name in names:
            MODELS[name] = cls
        return cls

    return decorate


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one Keras weight comes from in a checkpoint.

    names: checkpoint variables, concatenated along the last axis when there are several (fused q|k|v kernels).
    transpose: each variable is stored `[out, in]` (PyTorch Linear) and is transposed to Keras' `[in, out]`.
    vocab: one axis indexes the vocabulary, so `keep_tokens` / `compound_tokens` apply to it.
    vocab_axis: which axis that is, in Keras layout (0 for embeddings; -1 for an untied LM head's `[dim, vocab]`
        kernel).
    """

    names: tuple[str, ...]
    transpose: bool = False
    vocab: bool = False
    vocab_axis: int = 0
    # optional: a bert4x-only weight (attention variants, conditional LayerNorm) that keeps its initial value when
    # the checkpoint lacks it (an original checkpoint) and is read back when present (one bert4x saved).
    optional: bool = False
    # widths: the last-axis width of each of `names` when they differ (q|k|v with attention_key_size): checked per part.
    widths: tuple[int, ...] | None = None


def src(*names: str, transpose: bool = False, vocab: bool = False, vocab_axis: int = 0) -> Source:
    return Source(tuple(names), transpose, vocab, vocab_axis)


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: lists every offending variable."""


@dataclasses.dataclass
class LoadReport:
    """What a checkpoint load did: `loaded` Keras weights, and what was `missing`, `mismatched`, `unexpected`,
    `ignored`."""

    checkpoint: str
    loaded: list[str]
    missing: list[str]
    mismatched: list[str]
    unexpected: list[str]
    ignored: list[str]
    initialized: list[str] = dataclasses.field(default_factory=list)  # optional weights absent from the checkpoint
    # weights of layers the user added (condition embeddings, extra inputs' layers): not from the checkpoint
    user: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.mismatched or self.unexpected)

    def describe(self) -> str:
        lines = [f"checkpoint {self.checkpoint}: loaded {len(self.loaded)} weights"]
        for title, items in (
            ("model weights with no source in the checkpoint", self.missing),
            ("shape mismatches", self.mismatched),
            ("checkpoint variables that match no model weight", self.unexpected),
        ):
            if items:
                lines.append(f"{len(items)} {title}:")
                lines.extend(f"  - {item}" for item in items)
        if self.user:
            lines.append(f"{len(self.user)} weights of layers added by the user, not from the checkpoint "
                         "(they keep their initial values):")
            lines.extend(f"  - {item}" for item in self.user)
        return "\n".join(lines)



@keras.saving.register_keras_serializable(package="bert4x")
class _ModelInitializer(backend.TruncatedNormal):
    """A `TruncatedNormal` that, called with no shape, returns a fresh copy of itself: `transformer.initializer`
    works both as bert4keras's initializer attribute and as the factory the model's layers call."""

    def __call__(self, shape=None, dtype=None):
        if shape is None:
            return backend.TruncatedNormal(**self.get_config())
        return super().__call__(shape, dtype)

# Variables that training leaves in checkpoints and that no model weight corresponds to.
_IGNORED_PATTERNS = {
    "google": [r"(^|/)adam_[mv]$", r"^global_step$", r"(^|/)(bad_steps|good_steps|loss_scale)$", r"/Momentum$",
               r"_slot_\w+$"],  # Adafactor slots of T5/mT5 checkpoints: '<name>_slot_vc', '_slot_vr', '_slot_v'
    "huggingface": [r"(^|\.)position_ids$"],
}

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


class Transformer:
    """The template every bert4x model subclasses.

    Subclasses set the class attributes below and override the hooks. Constructor arguments are the canonical
    (bert4keras) names; `from_config` translates Google/Hugging Face config keys into them.
    """

    # Canonical argument -> the config keys that may carry it (Google and Hugging Face spellings).
    config_aliases: dict[str, tuple[str, ...]] = {}
    # Canonical arguments that a config must provide.
    required_config: tuple[str, ...] = ()
    # Hugging Face `model_type` values this class accepts.
    model_types: tuple[str, ...] = ()
    # Config keys this model reads no architecture from.
    ignored_config_keys: frozenset[str] = frozenset()
    # Prefix of the body's variables in Hugging Face task checkpoints (e.g. 'bert.').
    hf_prefix: str = ""
    # Per format, regexes of checkpoint variables that this model knowingly does not use (beyond optimizer slots).
    ignored_checkpoint_variables: dict[str, tuple[str, ...]] = {}

    def __new__(cls, *args, **kwargs):
        # The constructor arguments, kept so that a saved model can be rebuilt with its decoding methods
        # (`rebuild_record`); None when they are not plain JSON data (e.g. a Keras tensor as `layer_norm_cond`).
        self = super().__new__(cls)
        self.constructor_arguments = _json_data({"args": list(args), "kwargs": kwargs})
        return self

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        num_hidden_layers: int,
        num_attention_heads: int,
        intermediate_size: int,
        hidden_act: str = "gelu",
        dropout_rate: float = 0.0,
        attention_dropout_rate: float = 0.0,
        sequence_length: int | None = None,
        keep_tokens: Iterable[int] | None = None,
        compound_tokens: Iterable[Iterable[int]] | None = None,
        application: str = "encoder",
        layer_norm_eps: float = 1e-12,
        initializer_range: float = 0.02,
        name: str | None = None,
        attention_head_size: int | None = None,
        attention_type: str = "softmax",
        attention_options: dict | None = None,
    ):
        if application not in self.applications():
            raise ValueError(
                f"application={application!r} is not supported by {type(self).__name__}; "
                f"choose one of {self.applications()}."
            )
        for arg, value in (("vocab_size", vocab_size), ("hidden_size", hidden_size),
                           ("num_hidden_layers", num_hidden_layers), ("num_attention_heads", num_attention_heads),
                           ("intermediate_size", intermediate_size)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{arg} must be a positive integer, got {value!r}.")
        if attention_head_size is None and hidden_size % num_attention_heads:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be divisible by num_attention_heads ({num_attention_heads})."
            )
        for arg, value in (("dropout_rate", dropout_rate), ("attention_dropout_rate", attention_dropout_rate),
                           ("layer_norm_eps", layer_norm_eps), ("initializer_range", initializer_range)):
            check_config_value(arg, value, "<arguments>")
        self.checkpoint_vocab_size = vocab_size
        self.keep_tokens = None if keep_tokens is None else check_keep_tokens(keep_tokens, vocab_size)
        self.compound_tokens = None if compound_tokens is None else [[int(i) for i in c] for c in compound_tokens]
        if self.keep_tokens is not None:
            vocab_size = len(self.keep_tokens)
        if self.compound_tokens is not None:
            for c in self.compound_tokens:
                if not c or not all(0 <= i < vocab_size for i in c):
                    raise ValueError(
                        f"compound_tokens entry {c} must be a non-empty list of ids in [0, {vocab_size})."
                    )
            vocab_size += len(self.compound_tokens)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        # T5-style models set the head size explicitly (mT5-small: 6 heads of 64 in a 512 model).
        self.attention_head_size = attention_head_size or hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.dropout_rate = dropout_rate
        self.attention_dropout_rate = attention_dropout_rate
        self.sequence_length = sequence_length
        self.application = application
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.name = name
        self.model: keras.Model | None = None
        self.attention_type, self.attention_options = _check_attention_options(attention_type, attention_options)

    # ----------------------------------------------------------------- construction from configs
    @classmethod
    def applications(cls) -> tuple[str, ...]:
        return ("encoder",)

    @classmethod
    def from_config(cls, config: dict, config_path: str = "<config>", **kwargs) -> Transformer:
        """Builds the template from a Google or Hugging Face config dict, with `kwargs` overriding it."""
        model_type = config.get("model_type")
        if model_type is not None and cls.model_types and model_type not in cls.model_types:
            raise ValueError(
                f"Config {config_path} is for model_type={model_type!r}, but {cls.__name__} reads "
                f"{list(cls.model_types)}; pass the matching `model=` to build_transformer_model."
            )
        cls.validate_config(config, config_path)
        args: dict[str, Any] = {}
        known = set(cls.ignored_config_keys) | COMMON_IGNORED_CONFIG_KEYS
        for canonical, keys in cls.config_aliases.items():
            known.update(keys)
            for key in keys:
                if key in config:
                    args[canonical] = config[key]
                    break
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(
                f"Config {config_path} has keys that {cls.__name__} does not understand: {unknown}. "
                "Building anyway could give a silently different model; remove them or use the matching model."
            )
        args.update(kwargs)
        missing = [k for k in cls.required_config if k not in args]
        if missing:
            raise ValueError(f"Config {config_path} lacks required keys for {cls.__name__}: {missing}.")
        sources = {canonical: key for canonical, keys in cls.config_aliases.items() for key in reversed(keys)
                   if key in config}
        sources.update({name: name for name in kwargs})
        for canonical, value in args.items():
            check_config_value(sources.get(canonical, canonical), value, config_path, canonical)
        try:
            return cls(**args)
        except TypeError as e:
            raise TypeError(f"build_transformer_model: {e}") from e

    @classmethod
    def validate_config(cls, config: dict, config_path: str) -> None:
        """Hook: raise if the config asks for something this model does not implement."""

    # ----------------------------------------------------------------- hooks
    def get_inputs(self) -> list:
        raise NotImplementedError

    def apply_embeddings(self, inputs: list):
        raise NotImplementedError

    def apply_main_layers(self, x, index: int):
        raise NotImplementedError

    def apply_final_layers(self, x):
        raise NotImplementedError

    def variable_mapping(self, fmt: str) -> dict[str, Source | str]:
        """{Keras weight path: checkpoint source} for format 'google' or 'huggingface', covering every optional head."""
        raise NotImplementedError

    def tied_variables(self, fmt: str) -> dict[str, str]:
        """{checkpoint name: name it must equal}: copies that checkpoints store for tied weights."""
        return {}

    def export_config(self, fmt: str) -> tuple[str, dict]:
        """(file name, config dict) written next to a saved checkpoint so that it loads back."""
        raise NotImplementedError

    # ----------------------------------------------------------------- building
    @property
    def initializer(self) -> _ModelInitializer:
        """The initializer of the model's weights (truncated normal, stddev `initializer_range`), as bert4keras's
        `bert.initializer`: pass it to your own layers (`Dense(..., kernel_initializer=bert.initializer)`). Calling
        it with no arguments returns a fresh copy (what the model's own layers get)."""
        return _ModelInitializer(stddev=self.initializer_range)

    def user_layers(self) -> set[int]:
        """Ids of the layers in the model that the user made, not the Transformer: those upstream of the tensors
        the user passed in (`layer_norm_cond`, `additional_input_layers`). Their weights are not looked for in
        checkpoints."""
        tensors = []
        for attribute in ("layer_norm_cond", "condition", "additional_input_layers"):
            value = getattr(self, attribute, None)
            tensors.extend(value if isinstance(value, (list, tuple)) else [value])
        found: set[int] = set()
        queue = [t for t in tensors if getattr(t, "_keras_history", None) is not None]
        while queue:
            history = queue.pop()._keras_history
            layer = history.operation
            if id(layer) in found:
                continue
            found.add(id(layer))
            if history.node_index < len(layer._inbound_nodes):
                queue.extend(layer._inbound_nodes[history.node_index].input_tensors)
        return found

    def build(self) -> Model:
        inputs = self.get_inputs()
        x = self.apply_embeddings(inputs)
        for index in range(self.num_hidden_layers):
            x = self.apply_main_layers(x, index)
        outputs = self.apply_final_layers(x)
        self.model = Model(inputs, outputs, name=self.name)
        self.model.transformer = self  # lets `Generator(keras_model)` reach the decoding methods below
        return self.model

    def rebuild_record(self) -> dict | None:
        """How to build this model again: its registered name, constructor arguments and dtype policy, as JSON data
        (`bert4x.models.Model` saves it in its config, so that a loaded `.keras` model keeps `.transformer`); None
        for an unregistered class or arguments that are not JSON data."""
        names = [name for name, cls in MODELS.items() if cls is type(self)]
        if not names or self.constructor_arguments is None or self.model is None:
            return None
        return {"model": names[0], **self.constructor_arguments, "dtype_policy": self.model.dtype_policy.name}

    # ----------------------------------------------------------------- checkpoints
    def attention_variant_kwargs(self) -> dict:
        """MultiHeadAttention arguments of the chosen `attention_type` ({} for standard softmax attention)."""
        if self.attention_type == "softmax":
            return {}
        return {"attention_type": self.attention_type, **self.attention_options}

    # Keras weight paths that exist only in bert4x models (attention variants, conditional LayerNorm).
    extension_weight_patterns = (r"/performer_projection$", r"/keynorm_scale$", r"-Norm/(beta|gamma|hidden)_dense/")

    def _resolve_table(self, fmt: str) -> dict[str, Source]:
        table = self.variable_mapping(fmt)
        table = {path: (s if isinstance(s, Source) else src(s)) for path, s in table.items()}
        # bert4x-only weights go to checkpoints as 'bert4x/<path>' and load back when present.
        for w in self.model.weights if self.model is not None else ():
            if w.path not in table and any(re.search(p, w.path) for p in self.extension_weight_patterns):
                table[w.path] = Source(("bert4x/" + w.path,), optional=True)
        return table

    def _checkpoint_name(self, reader, name: str, fmt: str) -> str | None:
        """Finds `name` in the checkpoint, allowing the Hugging Face body prefix and old LayerNorm names."""
        candidates = [name]
        if fmt == "huggingface":
            bare = name[len(self.hf_prefix):] if self.hf_prefix and name.startswith(self.hf_prefix) else None
            if bare is not None:
                candidates.append(bare)
            for c in list(candidates):
                if ".LayerNorm." in c:
                    candidates.append(c.replace(".weight", ".gamma").replace(".bias", ".beta"))
        for c in candidates:
            if c in reader:
                return c
        return None

    def _ignore_patterns(self, fmt: str) -> list[re.Pattern]:
        patterns = _IGNORED_PATTERNS.get(fmt, []) + list(self.ignored_checkpoint_variables.get(fmt, ()))
        return [re.compile(p) for p in patterns]

    def _vocab_rows(self, value: np.ndarray) -> np.ndarray:
        if self.keep_tokens is not None:
            value = value[self.keep_tokens]
        if self.compound_tokens is not None:
            value = np.concatenate([value, np.stack([value[c].mean(axis=0) for c in self.compound_tokens])], axis=0)
        return value

    def _read_source(self, reader, source: Source, fmt: str, apply_vocab: bool = True):
        """Reads one table entry in Keras layout: `(value, checkpoint names, problem)`; `problem` is None when fine."""
        names = [self._checkpoint_name(reader, n, fmt) for n in source.names]
        absent = [n for n, found in zip(source.names, names) if found is None]
        if absent:
            return None, [], ", ".join(absent)
        parts = [reader.get(n) for n in names]
        if source.transpose:
            parts = [np.transpose(p) for p in parts]
        for name, part, width in zip(names, parts, source.widths or ()):
            if part.shape[-1:] != (width,):
                layout = " (transposed)" if source.transpose else ""
                return part, names, f"{name}{layout} {part.shape}, the model's part is {part.shape[:-1] + (width,)}"
        value = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)
        if source.vocab and apply_vocab:
            axis = source.vocab_axis
            if value.shape[axis] != self.checkpoint_vocab_size:
                return value, names, (
                    f"{names[0]}: checkpoint vocabulary has {value.shape[axis]} rows, "
                    f"config says vocab_size={self.checkpoint_vocab_size}"
                )
            value = np.moveaxis(self._vocab_rows(np.moveaxis(value, axis, 0)), 0, axis)
        return value, names, None

    @staticmethod
    def _write_source(source: Source, value: np.ndarray) -> dict[str, np.ndarray]:
        """Inverse of `_read_source`: one Keras-layout value -> {checkpoint name: tensor}."""
        parts = np.split(value, np.cumsum(source.widths)[:-1] if source.widths else len(source.names), axis=-1) \
            if len(source.names) > 1 else [value]
        return {
            name: np.ascontiguousarray(np.transpose(part) if source.transpose else part)
            for name, part in zip(source.names, parts)
        }

    def load_weights_from_checkpoint(self, checkpoint_path: str, strict: bool = True) -> LoadReport:
        """Loads a Google TF or Hugging Face checkpoint into the built model.

        Strict by default: any model weight with no source, any shape mismatch, and any checkpoint variable that
        should have mapped but did not raise one `CheckpointError` naming every offender. Optimizer slots and
        step counters are ignored. With `strict=False` the load is partial and the returned report (also logged as
        a warning) says what was skipped.
        """
        if self.model is None:
            raise RuntimeError("Build the model before loading weights.")
        reader = open_checkpoint(checkpoint_path)
        fmt = reader.format
        table = self._resolve_table(fmt)
        user_layers = self.user_layers()
        user = [w.path for layer in self.model.layers if id(layer) in user_layers for w in layer.weights]
        weights = {w.path: w for w in self.model.weights if w.path not in set(user)}
        loaded, missing, mismatched, used, initialized = [], [], [], set(), []
        assignments = []
        for path, variable in weights.items():
            source = table.get(path)
            if source is None:
                missing.append(f"{path} (no entry in {type(self).__name__}'s {fmt} table)")
                continue
            value, names, problem = self._read_source(reader, source, fmt)
            if problem and source.optional and value is None:
                initialized.append(path)
                continue
            if problem:
                (missing if value is None and not names else mismatched).append(f"{path} <- {problem}")
                continue
            used.update(names)
            if tuple(value.shape) != tuple(variable.shape):
                mismatched.append(f"{path} {tuple(variable.shape)} <- {', '.join(names)} {tuple(value.shape)}")
                continue
            assignments.append((variable, value))
            loaded.append(path)
        # Copies of tied weights must really be copies, or the model would be silently different.
        for copy, original in self.tied_variables(fmt).items():
            copy_name = self._checkpoint_name(reader, copy, fmt)
            original_name = self._checkpoint_name(reader, original, fmt)
            if copy_name is None:
                continue
            used.add(copy_name)
            if original_name is not None and not np.array_equal(reader.get(copy_name), reader.get(original_name)):
                mismatched.append(
                    f"{copy_name} differs from {original_name}: this checkpoint unties weights that "
                    f"{type(self).__name__} ties"
                )
        ignore = self._ignore_patterns(fmt)
        head_names = {self._checkpoint_name(reader, n, fmt) for s in table.values() for n in s.names}
        unexpected, ignored = [], []
        for key in reader:
            if key in used:
                continue
            if any(p.search(key) for p in ignore):
                ignored.append(key)
            elif key in head_names:
                ignored.append(key)  # a known variable of a head this model was not built with
            else:
                unexpected.append(f"{key} {tuple(reader.shape(key))}")
        report = LoadReport(checkpoint_path, loaded, missing, mismatched, unexpected, ignored, initialized, user)
        if user:
            logger.info("%d weights of layers added by the user are not from %s and keep their initial values: %s",
                        len(user), checkpoint_path, user)
        if initialized:
            logger.info("%d bert4x-only weights are not in %s and keep their initial values: %s",
                        len(initialized), checkpoint_path, initialized)
        if not report.ok:
            from bert4x.models.families import family_hint

            hint = family_hint(reader.keys(), [n for n, c in MODELS.items() if c is type(self)])
            hint = f"{hint}\n" if hint else ""
            if not loaded and strict:
                raise CheckpointError(
                    f"{hint}{checkpoint_path} does not look like a {type(self).__name__} checkpoint in {fmt} format: "
                    f"no model weight found its source.\n{report.describe()}"
                )
            if strict:
                raise CheckpointError(
                    f"{hint}Strict load failed; pass strict=False to load partially.\n{report.describe()}"
                )
            logger.warning("Partial load (strict=False):\n%s", report.describe())
        for variable, value in assignments:
            variable.assign(value.astype(keras.backend.standardize_dtype(variable.dtype)))
        return report

    def checkpoint_tensors(self, fmt: str) -> dict[str, np.ndarray]:
        """The model's weights under their checkpoint names in format `fmt` (inverse of loading)."""
        if self.model is None:
            raise RuntimeError("Build the model before saving weights.")
        table = self._resolve_table(fmt)
        tensors = {}
        for w in self.model.weights:
            source = table.get(w.path)
            if source is None:
                raise CheckpointError(f"{w.path} has no entry in {type(self).__name__}'s {fmt} table.")
            tensors.update(self._write_source(source, np.asarray(keras.ops.convert_to_numpy(w.value), np.float32)))
        for copy, original in self.tied_variables(fmt).items():
            if original in tensors:
                tensors[copy] = tensors[original]
        return tensors

    def convert_checkpoint(self, source_path: str, target_format: str) -> dict[str, np.ndarray]:
        """Translates a checkpoint into `target_format` names without building a model, entry by entry of the two
        tables. Every checkpoint variable must map (optimizer slots are dropped), or a `CheckpointError` lists the rest.
        """
        reader = open_checkpoint(source_path)
        src_table, dst_table = self._resolve_table(reader.format), self._resolve_table(target_format)
        tensors, used = {}, set()
        for path, source in src_table.items():
            # Fused parts split at the source's own widths: a faithful renaming (the caller checks it against a config).
            value, names, problem = self._read_source(reader, dataclasses.replace(source, widths=None), reader.format,
                                                      apply_vocab=False)
            if value is None:
                continue  # a head this checkpoint does not have
            if problem:
                raise CheckpointError(f"{path}: {problem}")
            used.update(names)
            widths = tuple(reader.shape(n)[0 if source.transpose else -1] for n in names) if len(names) > 1 else None
            tensors.update(self._write_source(dataclasses.replace(dst_table[path], widths=widths), value))
        for copy in self.tied_variables(reader.format):
            name = self._checkpoint_name(reader, copy, reader.format)
            if name is not None:
                used.add(name)
        ignore = self._ignore_patterns(reader.format)
        left = [k for k in reader if k not in used and not any(p.search(k) for p in ignore)]
        if left:
            raise CheckpointError(
                f"{len(left)} variables of {source_path} match no {type(self).__name__} weight: {left[:20]}"
            )
        for copy, original in self.tied_variables(target_format).items():
            if original in tensors:
                tensors[copy] = tensors[original]
        return tensors

    def save_weights_as_checkpoint(self, path: str, format: str = "google") -> str:
        """Saves the weights as a Google TF checkpoint (`path` is the prefix, e.g. '.../bert_model.ckpt') or as a
        Hugging Face folder (`path` is a folder: model.safetensors + config.json). A config file is written beside."""
        if format == "google":
            prefix = write_google_checkpoint(self.checkpoint_tensors("google"), path)
            folder = os.path.dirname(os.path.abspath(prefix))
        elif format == "huggingface":
            os.makedirs(path, exist_ok=True)
            write_safetensors(self.checkpoint_tensors("huggingface"), os.path.join(path, "model.safetensors"))
            prefix, folder = path, path
        else:
            raise ValueError(f"format must be 'google' or 'huggingface', got {format!r}.")
        config_name, config = self.export_config(format)
        with open(os.path.join(folder, config_name), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
        return prefix

    # ----------------------------------------------------------------- decoding (used by bert4x.generation)
    # A family that can generate overrides these five methods; `bert4x.generation.Generator` then runs greedy, beam
    # and sampling search on it in one compiled loop. Cache tensors keep the batch on their first axis, so that beam
    # search can reorder them with a gather.
    def decoding_unsupported(self) -> str | None:
        """None when the built model can decode with `bert4x.generation`, else the reason it cannot."""
        return f"{type(self).__name__} does not implement cached decoding (decode_prepare/decode_start/decode_step)."

    def decode_variables(self) -> list:
        """The Keras variables that `decode_start` and `decode_step` read."""
        return list(self.model.variables) if self.model is not None else []

    def decode_prepare(self, prompts: list[list[int]], segment_ids: list[list[int]] | None, pad_to_multiple: int,
                       max_len: int) -> dict[str, np.ndarray]:
        """Host side: validates a batch of prompts and pads them into arrays for `decode_start`.

        Args:
            prompts: token ids, one list per row.
            segment_ids: segment ids of the same lengths, or None.
            pad_to_multiple: the padded length is a multiple of this, so that nearby lengths share a compilation.
            max_len: the most tokens that will be generated after each prompt.
        """
        raise NotImplementedError(self.decoding_unsupported())

    def decode_start(self, prompt: dict, max_len: int) -> tuple[Any, dict]:
        """Runs the prompts: returns float32 logits `[batch, vocab]` of the first new token and a cache (a dict of
        tensors, batch first) with room for `max_len` new tokens.

        Args:
            prompt: what `decode_prepare` returned.
            max_len: the most tokens that will be generated.
        """
        raise NotImplementedError(self.decoding_unsupported())

    def decode_step(self, token_ids, cache: dict, index) -> tuple[Any, dict]:
        """Feeds one generated token per row; returns the float32 logits `[batch, vocab]` of the next token and the
        updated cache.

        Args:
            token_ids: int32 `[batch]`, the `index`-th generated token of each row.
            cache: the cache from `decode_start` or the previous step.
            index: a 0-based scalar int tensor.
        """
        raise NotImplementedError(self.decoding_unsupported())


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


# ---------------------------------------------------------------------- decoding helpers

def left_pad_prompts(prompts, segment_ids, pad_to_multiple: int, max_len: int, *, pad_id: int, vocab_size: int,
                     segment_vocab_size: int, max_positions: int | None) -> dict[str, np.ndarray]:
    """Validates prompts for decoding and left-pads them: `token_ids`, `segment_ids` (int32) and `mask` (bool), each
    `[batch, length]` with `length` a multiple of `pad_to_multiple`.

    Args:
        prompts: token ids, one non-empty list per row, each id in `[0, vocab_size)`.
        segment_ids: segment ids of the same lengths in `[0, segment_vocab_size)`, or None (all 0).
        pad_to_multiple: the padded length is rounded up to a multiple of this.
        max_len: tokens to be generated; `longest prompt + max_len` must fit `max_positions`.
        pad_id: the id written at padding positions.
        vocab_size: size of the token vocabulary.
        segment_vocab_size: number of segment ids.
        max_positions: learned positions of the model, or None if unbounded.
    """
    prompts = _id_lists(prompts, "prompts")
    if not prompts:
        raise ValueError("generate: prompts is empty; pass at least one prompt.")
    for n, p in enumerate(prompts):
        if not p:
            raise ValueError(f"generate: prompts[{n}] is empty; start it with at least one token (e.g. [CLS]).")
        bad = [i for i in p if not 0 <= i < vocab_size]
        if bad:
            raise ValueError(f"generate: prompts[{n}] has token ids outside [0, {vocab_size}) (vocab_size): {bad[:5]}.")
    if segment_ids is not None:
        segment_ids = _id_lists(segment_ids, "segment_ids")
        if len(segment_ids) != len(prompts):
            raise ValueError(f"generate: {len(prompts)} prompts but {len(segment_ids)} segment_ids lists.")
        for n, (p, s) in enumerate(zip(prompts, segment_ids)):
            if len(p) != len(s):
                raise ValueError(f"generate: prompts[{n}] has {len(p)} ids but segment_ids[{n}] has {len(s)}.")
            bad = [i for i in s if not 0 <= i < segment_vocab_size]
            if bad:
                raise ValueError(f"generate: segment_ids[{n}] has ids outside [0, {segment_vocab_size}) "
                                 f"(type_vocab_size): {bad[:5]}.")
    longest = max(len(p) for p in prompts)
    if max_positions is not None and longest + max_len > max_positions:
        raise ValueError(
            f"generate: a prompt of {longest} tokens plus max_len={max_len} exceeds the model's {max_positions} "
            "learned positions (max_position_embeddings)."
        )
    length = -(-longest // pad_to_multiple) * pad_to_multiple
    token_ids = np.full((len(prompts), length), pad_id, dtype=np.int32)
    segments = np.zeros((len(prompts), length), dtype=np.int32)
    mask = np.zeros((len(prompts), length), dtype=bool)
    for n, p in enumerate(prompts):
        token_ids[n, length - len(p):] = p
        mask[n, length - len(p):] = True
        if segment_ids is not None:
            segments[n, length - len(p):] = segment_ids[n]
    return {"token_ids": token_ids, "segment_ids": segments, "mask": mask}


def _id_lists(rows, name: str) -> list[list[int]]:
    """`rows` as lists of Python ints; TypeError naming `name` for anything that is not a sequence of integers."""
    if isinstance(rows, (str, bytes)) or not hasattr(rows, "__len__"):
        raise TypeError(f"generate: {name} must be a list of lists of token ids, got {type(rows).__name__}.")
    out = []
    for n, row in enumerate(rows):
        if isinstance(row, (str, bytes)) or not hasattr(row, "__iter__"):
            raise TypeError(f"generate: {name}[{n}] must be a list of integer ids, got {type(row).__name__}.")
        ids = []
        for i in row:
            if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
                raise TypeError(f"generate: {name}[{n}] holds {i!r} ({type(i).__name__}); ids must be integers.")
            ids.append(int(i))
        out.append(ids)
    return out
