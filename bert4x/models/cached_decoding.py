"""Model-owned cached decoding for decoder-only models: causal LMs (GPT, GPT-2, GPT2-ML) and the `lm` / `unilm`
applications of encoder families (ALBERT).

The contract the generator calls (`bert4x.generation`):

- `decoding_unsupported()` -> None, or the reason this model cannot decode;
- `decode_variables()` -> the Keras variables the decoding functions read;
- `decode_prepare(prompts, segment_ids, pad_to_multiple, max_len)` (host) -> numpy arrays: prompts left-padded to a
  multiple of `pad_to_multiple`, with `mask` marking the real tokens;
- `decode_start(prompt, max_len)` -> (logits `[batch, vocab]` float32, cache): runs the prompts once and keeps a
  key/value cache of `prompt_len + max_len` slots per layer;
- `decode_step(token_ids [batch], cache, index)` -> (logits, cache): feeds the `index`-th generated token.

The cache is a flat dict of batch-first tensors (beam search reorders rows). Each row keeps its own positions, so
left padding changes nothing. The functions are keras.ops only, so a generator can compile the whole loop.

A model using this mixin provides `decode_blocks()`: one callable per layer,
`block(x, attention_mask, cache, slot) -> (x, cache)`, built from the model's own layers (see `post_norm_block`).
"""

from __future__ import annotations

import math

import numpy as np
from keras import ops


def post_norm_block(attention, attention_norm, feed_forward, feed_forward_norm):
    """BERT/GPT order: Att -> Add -> LN -> FFN -> Add -> LN."""

    def block(x, attention_mask, cache, slot):
        y, cache = attention(x, attention_mask=attention_mask, cache=cache, cache_update_index=slot)
        x = attention_norm(x + y)
        return feed_forward_norm(x + feed_forward(x)), cache

    return block


def pre_norm_block(attention_norm, attention, feed_forward_norm, feed_forward):
    """GPT-2 order: LN -> Att -> Add -> LN -> FFN -> Add."""

    def block(x, attention_mask, cache, slot):
        y, cache = attention(attention_norm(x), attention_mask=attention_mask, cache=cache, cache_update_index=slot)
        x = x + y
        return x + feed_forward(feed_forward_norm(x)), cache

    return block


class CachedDecoding:
    """Mixin for `Transformer` subclasses whose keras model maps `[token_ids(, segment_ids)]` to next-token outputs.

    Attributes the model sets: `application` ('lm' / 'unilm'; other values are not decodable), and it may override
    `decode_hides_pad_keys` (whether token id 0 is hidden as a key, as the model's own mask does).
    """

    decode_hides_pad_keys = True
    decode_pad_id = 0

    # ------------------------------------------------------------------ hooks
    def decode_blocks(self) -> list:
        raise NotImplementedError

    def decode_mode(self) -> str:
        return self.application

    def _layer(self, name: str):
        try:
            return self.model.get_layer(name)
        except ValueError:
            return None

    def decoding_unsupported(self) -> str | None:
        """None when the model can decode with the cache, else the reason it cannot."""
        if self.model is None:
            return "the model is not built"
        if self.decode_mode() not in ("lm", "unilm"):
            return (f"{type(self).__name__} was built with application={self.application!r}; decoding needs "
                    "application='lm' or 'unilm'")
        if getattr(self, "condition", None) is not None:
            return "conditional LayerNorm (layer_norm_cond) needs the condition at every step; not implemented"
        if getattr(self, "custom_position_ids", False):
            return "custom_position_ids: the generator cannot know the positions of new tokens"
        if self._layer("Embedding-Token") is None:
            return "the model has no Embedding-Token layer"
        if getattr(self, "with_mlm", True) is False:
            return "the model has no LM head (build it with with_mlm=True)"
        return None

    def decode_variables(self) -> list:
        """The Keras variables the decoding functions read (jax passes their values into the compiled loop)."""
        return list(self.model.variables)

    @property
    def decode_max_positions(self) -> int | None:
        layer = self._layer("Embedding-Position")
        if layer is None:
            return None
        return int(getattr(layer, "max_positions", layer.input_dim))

    # ------------------------------------------------------------------ host side
    def decode_prepare(self, prompts: list[list[int]], segment_ids: list[list[int]] | None = None,
                       pad_to_multiple: int = 8, max_len: int = 0) -> dict[str, np.ndarray]:
        """Host side: the prompts as left-padded int32 arrays `token_ids`, `segment_ids` and a bool `mask`.

        Args:
            prompts: token ids per row (different lengths allowed, each non-empty).
            segment_ids: per-row segment ids of the prompts (UniLM: 0 for the source), or None for zeros.
            pad_to_multiple: the padded length is a multiple of this (nearby lengths share one compilation).
            max_len: how many tokens will be generated (checked against the model's positions).
        """
        reason = self.decoding_unsupported()
        if reason:
            raise ValueError(f"{type(self).__name__} cannot decode: {reason}.")
        prompts = [[int(i) for i in p] for p in prompts]
        if not prompts:
            raise ValueError("decode_prepare: no prompts given.")
        vocab = self.vocab_size
        for n, p in enumerate(prompts):
            if not p:
                raise ValueError(f"decode_prepare: prompt #{n} is empty; start it with at least one token.")
            bad = [i for i in p if not 0 <= i < vocab]
            if bad:
                raise ValueError(f"decode_prepare: prompt #{n} has ids outside [0, {vocab}): {bad[:5]}.")
        if segment_ids is not None:
            segment_ids = [[int(i) for i in s] for s in segment_ids]
            if len(segment_ids) != len(prompts):
                raise ValueError(f"decode_prepare: {len(prompts)} prompts but {len(segment_ids)} segment_ids lists.")
            for n, (p, s) in enumerate(zip(prompts, segment_ids)):
                if len(p) != len(s):
                    raise ValueError(f"decode_prepare: prompt #{n} has {len(p)} ids but {len(s)} segment ids.")
        longest = max(len(p) for p in prompts)
        limit = self.decode_max_positions
        if limit is not None and longest + max_len > limit:
            raise ValueError(f"decode_prepare: a prompt of {longest} tokens plus max_len={max_len} exceeds the "
                             f"model's {limit} positions.")
        length = int(math.ceil(longest / max(int(pad_to_multiple), 1)) * max(int(pad_to_multiple), 1))
        token_ids = np.full((len(prompts), length), self.decode_pad_id, np.int32)
        segments = np.zeros((len(prompts), length), np.int32)
        mask = np.zeros((len(prompts), length), bool)
        for n, p in enumerate(prompts):
            token_ids[n, length - len(p):] = p
            mask[n, length - len(p):] = True
            if segment_ids is not None:
                segments[n, length - len(p):] = segment_ids[n]
        return {"token_ids": token_ids, "segment_ids": segments, "mask": mask}

    # ------------------------------------------------------------------ device side
    def _decode_embed(self, token_ids, segment_ids, positions):
        token = self._layer("Embedding-Token")
        x = token(token_ids)
        if getattr(self, "segment_vocab_size", 0) > 0:
            if getattr(self, "shared_segment_embeddings", False):
                x = x + token(segment_ids)
            else:
                x = x + self._layer("Embedding-Segment")(segment_ids)
        position = self._layer("Embedding-Position")
        if position is not None:
            rows = position.rows(positions) if hasattr(position, "rows") else ops.take(
                position.embeddings, positions, axis=0)
            x = x + ops.cast(rows, x.dtype)
        for name in ("Embedding-Norm", "Embedding-Mapping"):
            layer = self._layer(name)
            if layer is not None:
                x = layer(x)
        return x

    def _decode_logits(self, x):
        for name in ("Output-Norm", "MLM-Dense", "MLM-Norm"):
            layer = self._layer(name)
            if layer is not None:
                x = layer(x)
        x = self._layer("Embedding-Token")(x, mode="dense")
        bias = self._layer("MLM-Bias")
        if bias is not None:
            x = bias(x)
        return ops.cast(x, "float32")

    def _run_blocks(self, x, attention_mask, caches, slot):
        new = {}
        for i, block in enumerate(self.decode_blocks()):
            x, new[f"layer_{i}"] = block(x, attention_mask, caches[f"layer_{i}"], slot)
        return x, new

    def _attention_shape(self):
        attention = self._layer("Transformer-0-MultiHeadSelfAttention") or self._layer(
            "Transformer-MultiHeadSelfAttention")
        return attention.heads, attention.head_size, attention.compute_dtype

    def decode_start(self, prompt: dict, max_len: int):
        """Runs the prompts once: (logits of the first new token `[batch, vocab]` float32, cache).

        Args:
            prompt: `decode_prepare`'s arrays.
            max_len: how many tokens the cache must hold beyond the prompt.
        """
        token_ids = ops.convert_to_tensor(prompt["token_ids"], "int32")
        segment_ids = ops.convert_to_tensor(prompt["segment_ids"], "int32")
        mask = ops.convert_to_tensor(prompt["mask"], "bool")
        batch, length = prompt["token_ids"].shape
        slots = length + max_len
        positions = ops.maximum(ops.cumsum(ops.cast(mask, "int32"), axis=1) - 1, 0)
        x = self._decode_embed(token_ids, segment_ids, positions)
        real = ops.logical_and(mask, ops.not_equal(token_ids, self.decode_pad_id)) if self.decode_hides_pad_keys \
            else mask
        keys_valid = ops.concatenate([real, ops.zeros((batch, max_len), "bool")], axis=1)
        query = ops.expand_dims(ops.arange(length), 1)
        key = ops.expand_dims(ops.arange(slots), 0)
        if self.decode_mode() == "lm":
            allowed = ops.expand_dims(ops.less_equal(key, query), 0)
        else:  # UniLM: i sees j iff cumsum(segment)[j] <= cumsum(segment)[i]
            c = ops.cumsum(segment_ids * ops.cast(mask, "int32"), axis=1)
            c_keys = ops.concatenate([c, ops.full((batch, max_len), 2**30, "int32")], axis=1)
            allowed = ops.less_equal(ops.expand_dims(c_keys, 1), ops.expand_dims(c, 2))
        allowed = ops.logical_and(allowed, ops.expand_dims(keys_valid, 1))
        # Padding queries see themselves only (their outputs are never read), so no row is fully masked.
        allowed = ops.logical_or(allowed, ops.expand_dims(ops.equal(query, key), 0))
        heads, head_size, dtype = self._attention_shape()
        empty = ops.zeros((batch, 2, slots, heads, head_size), dtype)
        caches = {f"layer_{i}": empty for i in range(self.num_hidden_layers)}
        x, caches = self._run_blocks(x, ops.expand_dims(allowed, 1), caches, 0)
        logits = self._decode_logits(x[:, -1:])[:, 0]
        cache = dict(caches, keys_valid=keys_valid, position=positions[:, -1] + 1,
                     start=ops.full((batch,), length, "int32"))
        return logits, cache

    def decode_step(self, token_ids, cache: dict, index):
        """Feeds the `index`-th generated token of every row: (logits of the next one, updated cache).

        Args:
            token_ids: int32 `[batch]`.
            cache: the cache of `decode_start` or of the previous step.
            index: how many tokens were generated before this one (a scalar, may be a traced tensor).
        """
        slot = cache["start"][0] + index
        token_ids = ops.expand_dims(ops.cast(token_ids, "int32"), 1)
        positions = ops.expand_dims(cache["position"], 1)
        segment = 1 if self.decode_mode() == "unilm" else 0
        x = self._decode_embed(token_ids, ops.full(ops.shape(token_ids), segment, "int32"), positions)
        batch = ops.shape(token_ids)[0]
        sees = ops.slice_update(cache["keys_valid"], [0, slot], ops.ones((batch, 1), "bool"))
        new_key = ops.not_equal(token_ids, self.decode_pad_id) if self.decode_hides_pad_keys else ops.ones(
            (batch, 1), "bool")
        keys_valid = ops.slice_update(cache["keys_valid"], [0, slot], new_key)
        layers = {k: v for k, v in cache.items() if k.startswith("layer_")}
        x, layers = self._run_blocks(x, ops.expand_dims(ops.expand_dims(sees, 1), 1), layers, slot)
        new_cache = dict(cache, keys_valid=keys_valid, position=cache["position"] + 1, **layers)
        return self._decode_logits(x)[:, 0], new_cache
