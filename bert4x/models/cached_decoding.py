"""Model-owned cached decoding for the decoder-only models: the `lm` / `unilm` applications of the BERT family (BERT,
RoBERTa, WoBERT, RoFormer, RoFormerV2, NEZHA, ALBERT) and the causal LMs (GPT, GPT-2, GPT2-ML).

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

What a model family provides (`CachedDecoding`'s hooks):

- `decode_blocks()`: one callable per layer, `block(x, attention_mask, cache, slot, **attention_arguments) ->
  (x, cache)`, built from the model's own layers (`post_norm_block`, `pre_norm_block`);
- `decode_head_layers()`: the layers of the LM head before and after the projection tied to the token embedding;
- `decode_attention_arguments(positions, query_slots, slots)`: extra arguments of every self-attention at the
  new tokens (RoFormer's rotary angles, NEZHA's relative positions);
- `decode_max_positions()`: how many positions the model has learned (None: unbounded).
"""

from __future__ import annotations

import numpy as np
from keras import ops

from bert4x.layers import MultiHeadAttention
from bert4x.models.base import left_pad_prompts


def post_norm_block(attention, attention_norm, feed_forward, feed_forward_norm):
    """BERT/GPT order: Att -> Add -> LN -> FFN -> Add -> LN."""

    def block(x, attention_mask, cache, slot, **attention_arguments):
        y, cache = attention(x, attention_mask=attention_mask, cache=cache, cache_update_index=slot,
                             **attention_arguments)
        x = attention_norm(x + y)
        return feed_forward_norm(x + feed_forward(x)), cache

    return block


def pre_norm_block(attention_norm, attention, feed_forward_norm, feed_forward):
    """GPT-2 order: LN -> Att -> Add -> LN -> FFN -> Add."""

    def block(x, attention_mask, cache, slot, **attention_arguments):
        y, cache = attention(attention_norm(x), attention_mask=attention_mask, cache=cache, cache_update_index=slot,
                             **attention_arguments)
        x = x + y
        return x + feed_forward(feed_forward_norm(x)), cache

    return block


class CachedDecoding:
    """Cached decoding for `Transformer` subclasses whose keras model maps `[token_ids(, segment_ids)]` to
    next-token outputs through `Embedding-Token` (tied to the LM head), optional `Embedding-Segment`,
    `Embedding-Position`, `Embedding-Norm` and `Embedding-Mapping`, then per-layer blocks.

    Attributes the model sets: `application` ('lm' / 'unilm'; other values are not decodable), and it may override
    `decode_hides_pad_keys` (whether token id `decode_pad_id` is hidden as a key, as the model's own mask does).
    """

    decode_hides_pad_keys = True
    decode_pad_id = 0

    # ------------------------------------------------------------------ hooks
    def decode_blocks(self) -> list:
        """One callable per layer, in order: `block(x, attention_mask, cache, slot, **attention_arguments)`."""
        raise NotImplementedError(f"{type(self).__name__} does not define decode_blocks().")

    def decode_head_layers(self) -> tuple[list, list]:
        """(layers applied before the projection tied to the token embedding, layers applied after it)."""
        return [], []

    def decode_attention_arguments(self, positions, query_slots, slots) -> dict:
        """Extra arguments of every self-attention for the queries being fed (none by default).

        Args:
            positions: int `[batch, q_len]`: each row's own positions of the queries.
            query_slots: int `[q_len]`: the cache slots of the queries (the same for every row).
            slots: how many cache slots the keys span.
        """
        return {}

    def decode_max_positions(self) -> int | None:
        """How many positions the model has learned (prompt + generated tokens); None if unbounded."""
        layer = self._decode_layer("Embedding-Position")
        if layer is None:
            return None
        return int(getattr(layer, "max_positions", layer.input_dim))

    def decode_cache_shape(self) -> tuple[int, int, str]:
        """(heads, head_size, dtype) of each layer's key/value cache."""
        attention = next(layer for layer in self.model.layers if isinstance(layer, MultiHeadAttention))
        return attention.heads, attention.head_size, attention.compute_dtype

    def _decode_layer(self, name: str):
        try:
            return self.model.get_layer(name)
        except ValueError:
            return None

    # ------------------------------------------------------------------ contract
    def decoding_unsupported(self) -> str | None:
        """None when the model can decode with the cache, else the reason it cannot."""
        if self.model is None:
            return f"{type(self).__name__} is not built yet."
        if self.application not in ("lm", "unilm"):
            return (f"the model was built with application={self.application!r}; build it with application='lm' "
                    "or 'unilm' to generate.")
        with_mlm = getattr(self, "with_mlm", True)
        if not with_mlm:
            return "the model has no MLM head; build it with with_mlm=True or 'linear' (the default for 'lm'/'unilm')."
        if with_mlm not in (True, "softmax", "linear"):
            return f"the MLM head activation is {with_mlm!r}; generation needs 'softmax' (True) or 'linear'."
        if getattr(self, "condition", None) is not None:
            return "layer_norm_cond: the conditional LayerNorm needs a condition input, which decoding does not feed."
        if getattr(self, "custom_position_ids", False):
            return "custom_position_ids: the generator cannot know the positions of new tokens."
        if getattr(self, "residual_attention_scores", False):
            return ("residual_attention_scores: the cached step does not carry each layer's scores to the next; "
                    "generate with the uncached model instead.")
        if getattr(self, "attention_key_size", None) not in (None, getattr(self, "attention_head_size", None)):
            return ("attention_key_size differs from the head size: the cache stacks keys and values in one tensor "
                    "of one head size; generate with the uncached model instead.")
        if self._decode_layer("Embedding-Token") is None:
            return "the model has no Embedding-Token layer."
        if len(self.decode_blocks()) != self.num_hidden_layers:
            return (f"{type(self).__name__}'s main layers did not record their layers for decoding, so its cached "
                    "step would not be the model's.")
        return None

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
            raise ValueError(f"{type(self).__name__} cannot decode: {reason}")
        prompt = left_pad_prompts(
            prompts, segment_ids, pad_to_multiple, max_len, pad_id=self.decode_pad_id, vocab_size=self.vocab_size,
            segment_vocab_size=max(getattr(self, "segment_vocab_size", 0), 1), max_positions=None,
        )
        limit, longest = self.decode_max_positions(), int(prompt["mask"].sum(axis=1).max())
        if limit is not None and longest + max_len > limit:
            raise ValueError(f"generate: a prompt of {longest} tokens plus max_len={max_len} exceeds the model's "
                             f"{limit} positions: it has {limit} learned positions (max_position_embeddings).")
        return prompt

    # ------------------------------------------------------------------ device side
    def _decode_embed(self, token_ids, segment_ids, positions):
        token = self._decode_layer("Embedding-Token")
        x = token(token_ids)
        if getattr(self, "segment_vocab_size", 0) > 0:
            if getattr(self, "shared_segment_embeddings", False):
                x = x + token(segment_ids)
            else:
                x = x + self._decode_layer("Embedding-Segment")(segment_ids)
        position = self._decode_layer("Embedding-Position")
        if position is not None:
            rows = position.rows(positions) if hasattr(position, "rows") else ops.take(
                position.embeddings, positions, axis=0)
            x = x + ops.cast(rows, x.dtype)
        for name in ("Embedding-Norm", "Embedding-Mapping"):
            layer = self._decode_layer(name)
            if layer is not None:
                x = layer(x)
        return x

    def _decode_logits(self, x):
        before, after = self.decode_head_layers()
        for layer in before:
            x = layer(x)
        x = self._decode_layer("Embedding-Token")(x, mode="dense")  # the tied projection
        for layer in after:
            x = layer(x)
        return ops.cast(x, "float32")

    def _run_blocks(self, x, attention_mask, caches, slot, attention_arguments):
        new = {}
        for i, block in enumerate(self.decode_blocks()):
            x, new[f"layer_{i}"] = block(x, attention_mask, caches[f"layer_{i}"], slot, **attention_arguments)
        return x, new

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
        # As in the model, pad-id tokens are hidden as keys (even inside a prompt) where its mask hides them.
        real = ops.logical_and(mask, ops.not_equal(token_ids, self.decode_pad_id)) if self.decode_hides_pad_keys \
            else mask
        keys_valid = ops.concatenate([real, ops.zeros((batch, max_len), "bool")], axis=1)
        query = ops.expand_dims(ops.arange(length), 1)
        key = ops.expand_dims(ops.arange(slots), 0)
        if self.application == "lm":
            allowed = ops.expand_dims(ops.less_equal(key, query), 0)  # [1, length, slots]
        else:  # UniLM: i sees j iff cumsum(segment)[j] <= cumsum(segment)[i]
            c = ops.cumsum(segment_ids * ops.cast(mask, "int32"), axis=1)
            c_keys = ops.concatenate([c, ops.full((batch, max_len), 2**30, "int32")], axis=1)
            allowed = ops.less_equal(ops.expand_dims(c_keys, 1), ops.expand_dims(c, 2))
        allowed = ops.logical_and(allowed, ops.expand_dims(keys_valid, 1))
        # Padding queries see themselves only (their outputs are never read), so no row is fully masked.
        allowed = ops.logical_or(allowed, ops.expand_dims(ops.equal(query, key), 0))
        heads, head_size, dtype = self.decode_cache_shape()
        empty = ops.zeros((batch, 2, slots, heads, head_size), dtype)
        caches = {f"layer_{i}": empty for i in range(self.num_hidden_layers)}
        extra = self.decode_attention_arguments(positions, ops.arange(length, dtype="int32"), slots)
        x, caches = self._run_blocks(x, ops.expand_dims(allowed, 1), caches, 0, extra)
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
        segment = 1 if self.application == "unilm" else 0
        x = self._decode_embed(token_ids, ops.full(ops.shape(token_ids), segment, "int32"), positions)
        batch = ops.shape(token_ids)[0]
        # The new token sees every earlier visible key and itself; it stays visible later unless the model's mask
        # hides its id.
        sees = ops.slice_update(cache["keys_valid"], [0, slot], ops.ones((batch, 1), "bool"))
        new_key = ops.not_equal(token_ids, self.decode_pad_id) if self.decode_hides_pad_keys else ops.ones(
            (batch, 1), "bool")
        keys_valid = ops.slice_update(cache["keys_valid"], [0, slot], new_key)
        layers = {k: v for k, v in cache.items() if k.startswith("layer_")}
        slots = ops.shape(cache["keys_valid"])[1]
        extra = self.decode_attention_arguments(positions, ops.reshape(ops.cast(slot, "int32"), (1,)), slots)
        x, layers = self._run_blocks(x, ops.expand_dims(ops.expand_dims(sees, 1), 1), layers, slot, extra)
        new_cache = dict(cache, keys_valid=keys_valid, position=cache["position"] + 1, **layers)
        return self._decode_logits(x)[:, 0], new_cache
