"""The `Transformer` template every bert4x model subclasses: constructor checks, construction from configs, the hooks,
`build`, strict checkpoint loading/saving through the model's tables, and the cached-decoding contract.

A model is a `Transformer` subclass that overrides hooks:

- `get_inputs()`                 -> the Keras inputs
- `apply_embeddings(inputs)`     -> hidden states entering the first layer
- `apply_main_layers(x, index)`  -> one Transformer layer
- `apply_final_layers(x)`        -> the outputs (heads)
- `variable_mapping(fmt)`        -> a table {Keras weight path: checkpoint source} for one checkpoint format

Checkpoint loading is generic: it walks the table, so a new model adds a table, not a code path.

Beside it: `registry` (`register_model`, `build_transformer_model`), `checkpoint_tables` (`Source`, `src`,
`LoadReport`, `CheckpointError`), `config_checks` (`read_config` and the argument checks) and `prompts` (the host-side
prompt checks of decoding). Their names stay importable from here (hence the F401 waivers below): the families and
older code import them so.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Iterable
from typing import Any

import keras
import numpy as np

from bert4x import backend
from bert4x.checkpoints import open_checkpoint, write_google_checkpoint, write_safetensors
from bert4x.models.checkpoint_tables import _IGNORED_PATTERNS, CheckpointError, LoadReport, Source, src
from bert4x.models.config_checks import (  # noqa: F401
    COMMON_IGNORED_CONFIG_KEYS,
    _check_attention_options,
    check_config_value,
    check_keep_tokens,
    read_config,
)
from bert4x.models.prompts import _id_lists, left_pad_prompts  # noqa: F401
from bert4x.models.registry import (  # noqa: F401
    MODELS,
    _json_data,
    build_transformer_model,
    rebuild_transformer,
    register_model,
)
from bert4x.training import Model

logger = logging.getLogger("bert4x")


@keras.saving.register_keras_serializable(package="bert4x")
class _ModelInitializer(backend.TruncatedNormal):
    """A `TruncatedNormal` that, called with no shape, returns a fresh copy of itself: `transformer.initializer`
    works both as bert4keras's initializer attribute and as the factory the model's layers call."""

    def __call__(self, shape=None, dtype=None):
        if shape is None:
            return backend.TruncatedNormal(**self.get_config())
        return super().__call__(shape, dtype)


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
