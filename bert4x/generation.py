"""Fast, batched, KV-cached text generation: greedy, beam search and sampling in one compiled device loop.

The search code is model-agnostic. It talks to a model through a *decoding adapter* (see `DecodingAdapter`):

- `prepare(prompts, segment_ids)` (host): pads a batch of prompts of different lengths into arrays;
- `init_cache(prompt, max_len)` (device): runs the prompts once, returns the logits of the first new token and a
  cache (a dict of tensors whose first axis is the batch, so that beam search can reorder it);
- `step(token_ids, cache, index)` (device): feeds one new token per row (`index` = tokens generated before it) and
  returns the logits of the next one and the updated cache.

`BertDecodingAdapter` serves every BERT-family model built with `application='lm'` or `'unilm'` (bert, roberta,
wobert, roformer, roformer_v2); an encoder-decoder (mT5) plugs in with its own adapter and `register_adapter`.

Compilation (infrastructure, not model code, hence behind a backend switch): on jax the whole generation (prompt pass
plus a `keras.ops.while_loop` over tokens) is one `jax.jit` function, with the model's variables passed in through a
`keras.StatelessScope`; on tensorflow it is one `tf.function(jit_compile=True)` (XLA). Either way there is no host
round trip per token: the loop runs on the device and stops early once every row has ended. On torch the same code
runs eagerly (one Python iteration per token). Compiled functions are cached per search setting and input shape;
prompts are left-padded to a multiple of `pad_to_multiple` so that nearby lengths share one compilation.

Example:
>>> from bert4x.models import build_transformer_model
>>> model = build_transformer_model({"vocab_size": 30, "hidden_size": 8, "num_hidden_layers": 1,
...     "num_attention_heads": 2, "intermediate_size": 16}, application="lm")
>>> outputs = generate(model, [[2, 5, 6], [2, 7]], max_len=4, end_id=3)
>>> len(outputs), all(len(o) <= 4 for o in outputs)
(2, True)
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Callable, Sequence

import keras
import numpy as np
from keras import ops

from bert4x import backend
from bert4x.snippets.decoding import PrefixTree

__all__ = ["DecodingAdapter", "BertDecodingAdapter", "Generator", "generate", "register_adapter"]

_NEG_INF = float("-inf")


# ==================================================================================================== adapters
class DecodingAdapter:
    """What the search code needs from a model. Subclass it for a new model family.

    Cache tensors must have the batch on their first axis (beam search gathers rows). `variables()` lists the Keras
    variables that `init_cache`/`step` read (jax passes their values into the compiled function).
    """

    vocab_size: int

    def variables(self) -> list:
        raise NotImplementedError

    def prepare(self, prompts: Sequence[Sequence[int]], segment_ids=None, pad_to_multiple: int = 8,
                max_len: int = 0) -> dict[str, np.ndarray]:
        """Host side: a batch of prompts (lists of ids) as padded arrays for `init_cache`."""
        raise NotImplementedError

    def init_cache(self, prompt: dict, max_len: int):
        """Runs the prompts; returns `(logits [batch, vocab] float32, cache)` with room for `max_len` new tokens."""
        raise NotImplementedError

    def step(self, token_ids, cache: dict, index):
        """Feeds `token_ids [batch]` (the `index`-th generated token); returns `(logits [batch, vocab], cache)`."""
        raise NotImplementedError


_ADAPTERS: list[tuple[Callable[[object], bool], Callable[[object], DecodingAdapter]]] = []


def register_adapter(accepts: Callable[[object], bool], make: Callable[[object], DecodingAdapter]) -> None:
    """Registers a decoding adapter factory: `make(model)` is used for models where `accepts(model)` is true
    (checked before the built-in BERT-family adapter)."""
    _ADAPTERS.insert(0, (accepts, make))


def adapter_for(model) -> DecodingAdapter:
    """The decoding adapter of a model (a `keras.Model`, a bert4x `Transformer`, or an adapter already)."""
    if isinstance(model, DecodingAdapter):
        return model
    for accepts, make in _ADAPTERS:
        if accepts(model):
            return make(model)
    return BertDecodingAdapter(model)


def _get_layer(model: keras.Model, name: str, required: bool = True):
    try:
        return model.get_layer(name)
    except ValueError:
        if required:
            raise ValueError(
                f"Model {model.name!r} has no layer {name!r}: BertDecodingAdapter reads bert4x BERT-family models "
                "(bert, roberta, wobert, roformer, roformer_v2) built by build_transformer_model."
            ) from None
        return None


class BertDecodingAdapter(DecodingAdapter):
    """Cached decoding for BERT-family models built with `application='lm'` (causal) or `'unilm'` (seq2seq).

    The prompt is segment 0 (UniLM source: attended bidirectionally, exactly as the model does) and generated
    tokens are segment `target_segment` (default 1 for 'unilm', 0 for 'lm'). Prompts are left-padded; each row
    keeps its own positions. The adapter reuses the model's own layers (and weights); at construction it checks
    that its prompt pass reproduces the model's output (`verify=True`).

    Example:
    >>> from bert4x.models import build_transformer_model
    >>> model = build_transformer_model({"vocab_size": 30, "hidden_size": 8, "num_hidden_layers": 1,
    ...     "num_attention_heads": 2, "intermediate_size": 16}, model="roformer", application="unilm")
    >>> BertDecodingAdapter(model).mode
    'unilm'
    """

    def __init__(self, model, target_segment: int | None = None, verify: bool = True):
        if not isinstance(model, keras.Model) and isinstance(getattr(model, "model", None), keras.Model):
            model = model.model  # a bert4x Transformer
        if not isinstance(model, keras.Model):
            raise TypeError(f"BertDecodingAdapter needs a keras.Model or a bert4x Transformer, got {type(model)}.")
        self.model = model
        mask = _get_layer(model, "Attention-Mask")
        if mask.mode not in ("lm", "unilm"):
            raise ValueError(
                f"Generation needs a model built with application='lm' or 'unilm'; {model.name!r} is "
                f"application={mask.mode!r}."
            )
        self.mode, self.pad_id = mask.mode, mask.pad_id
        self.target_segment = (1 if self.mode == "unilm" else 0) if target_segment is None else target_segment
        self.token_embedding = _get_layer(model, "Embedding-Token")
        self.segment_embedding = _get_layer(model, "Embedding-Segment", required=False)
        self.position_embedding = _get_layer(model, "Embedding-Position", required=False)
        self.rotary = _get_layer(model, "Embedding-Rotary-Position", required=False)
        self.embedding_norm = _get_layer(model, "Embedding-Norm")
        if _get_layer(model, "Embedding-Mapping", required=False) is not None:
            raise ValueError("BertDecodingAdapter does not handle factorised embeddings (Embedding-Mapping).")
        self.layers = []
        while True:
            i = len(self.layers)
            attention = _get_layer(model, f"Transformer-{i}-MultiHeadSelfAttention", required=False)
            if attention is None:
                break
            self.layers.append((
                attention,
                _get_layer(model, f"Transformer-{i}-MultiHeadSelfAttention-Norm"),
                _get_layer(model, f"Transformer-{i}-FeedForward"),
                _get_layer(model, f"Transformer-{i}-FeedForward-Norm"),
            ))
        if not self.layers:
            raise ValueError(f"Model {model.name!r} has no Transformer-0-MultiHeadSelfAttention layer.")
        activation = _get_layer(model, "MLM-Activation", required=False)
        if activation is None:
            raise ValueError(
                f"Model {model.name!r} has no MLM head; build it with with_mlm=True (the default for 'lm'/'unilm')."
            )
        name = keras.activations.serialize(activation.activation)
        name = name if isinstance(name, str) else name.get("config", name.get("class_name"))
        if name not in ("softmax", "linear"):
            raise ValueError(f"The MLM head activation is {name!r}; generation needs 'softmax' or 'linear'.")
        self.head_activation = name
        self.mlm_dense = _get_layer(model, "MLM-Dense", required=False)
        self.mlm_norm = _get_layer(model, "MLM-Norm", required=False)
        self.mlm_bias = _get_layer(model, "MLM-Bias", required=False)
        self.heads = self.layers[0][0].heads
        self.head_size = self.layers[0][0].head_size
        self.vocab_size = int(self.token_embedding.input_dim)
        self.max_positions = None if self.position_embedding is None else int(self.position_embedding.input_dim)
        if verify:
            self._verify()

    def variables(self):
        return list(self.model.variables)

    # ------------------------------------------------------------------------------------------------ host side
    def prepare(self, prompts, segment_ids=None, pad_to_multiple=8, max_len=0):
        prompts = [list(map(int, p)) for p in prompts]
        if not prompts:
            raise ValueError("generate: no prompts given.")
        for n, p in enumerate(prompts):
            if not p:
                raise ValueError(f"generate: prompt #{n} is empty; start it with at least one token (e.g. [CLS]).")
            bad = [i for i in p if not 0 <= i < self.vocab_size]
            if bad:
                raise ValueError(f"generate: prompt #{n} has ids outside [0, {self.vocab_size}): {bad[:5]}.")
        if segment_ids is not None:
            segment_ids = [list(map(int, s)) for s in segment_ids]
            for n, (p, s) in enumerate(zip(prompts, segment_ids)):
                if len(p) != len(s):
                    raise ValueError(f"generate: prompt #{n} has {len(p)} ids but {len(s)} segment ids.")
            if len(segment_ids) != len(prompts):
                raise ValueError(f"generate: {len(prompts)} prompts but {len(segment_ids)} segment_ids lists.")
        longest = max(len(p) for p in prompts)
        if self.max_positions is not None and longest + max_len > self.max_positions:
            raise ValueError(
                f"generate: a prompt of {longest} tokens plus max_len={max_len} exceeds the model's "
                f"{self.max_positions} learned positions."
            )
        length = int(math.ceil(longest / pad_to_multiple) * pad_to_multiple)
        token_ids = np.full((len(prompts), length), self.pad_id, dtype=np.int32)
        segments = np.zeros((len(prompts), length), dtype=np.int32)
        mask = np.zeros((len(prompts), length), dtype=bool)
        for n, p in enumerate(prompts):
            token_ids[n, length - len(p):] = p
            mask[n, length - len(p):] = True
            if segment_ids is not None:
                segments[n, length - len(p):] = segment_ids[n]
        return {"token_ids": token_ids, "segment_ids": segments, "mask": mask}

    # ------------------------------------------------------------------------------------------------ device side
    def _embed(self, token_ids, segment_ids, positions):
        x = self.token_embedding(token_ids)
        if self.segment_embedding is not None:
            x = x + self.segment_embedding(segment_ids)
        if self.position_embedding is not None:
            table = ops.take(self.position_embedding.embeddings, positions, axis=0)
            x = x + ops.cast(table, x.dtype)
        return self.embedding_norm(x)

    def _rotary(self, positions):
        if self.rotary is None:
            return {}
        return {"rotary": backend.rotary_cos_sin(positions, self.rotary.head_size, self.rotary.base)}

    def _layers(self, x, attention_mask, rotary, caches, slot):
        new_caches = []
        for (attention, attention_norm, feed_forward, feed_forward_norm), cache in zip(self.layers, caches):
            y, cache = attention(x, attention_mask=attention_mask, cache=cache, cache_update_index=slot, **rotary)
            x = attention_norm(x + y)
            x = feed_forward_norm(x + feed_forward(x))
            new_caches.append(cache)
        return x, new_caches

    def _logits(self, x):
        if self.mlm_dense is not None:
            x = self.mlm_dense(x)
        if self.mlm_norm is not None:
            x = self.mlm_norm(x)
        x = self.token_embedding(x, mode="dense")  # the tied projection
        if self.mlm_bias is not None:
            x = self.mlm_bias(x)
        return ops.cast(x, "float32")

    def init_cache(self, prompt, max_len):
        token_ids = ops.convert_to_tensor(prompt["token_ids"], "int32")
        segment_ids = ops.convert_to_tensor(prompt["segment_ids"], "int32")
        mask = ops.convert_to_tensor(prompt["mask"], "bool")
        batch, length = prompt["token_ids"].shape
        slots = length + max_len
        positions = ops.maximum(ops.cumsum(ops.cast(mask, "int32"), axis=1) - 1, 0)
        x = self._embed(token_ids, segment_ids, positions)
        # As in the model, pad-id tokens are hidden as keys (even inside a prompt).
        real = ops.logical_and(mask, ops.not_equal(token_ids, self.pad_id))
        keys_valid = ops.concatenate([real, ops.zeros((batch, max_len), "bool")], axis=1)
        query = ops.expand_dims(ops.arange(length), 1)
        key = ops.expand_dims(ops.arange(slots), 0)
        if self.mode == "lm":
            allowed = ops.expand_dims(ops.less_equal(key, query), 0)  # [1, length, slots]
        else:  # UniLM: i sees j iff cumsum(segment)[j] <= cumsum(segment)[i]
            c = ops.cumsum(segment_ids * ops.cast(mask, "int32"), axis=1)
            c_keys = ops.concatenate([c, ops.full((batch, max_len), 2**30, "int32")], axis=1)
            allowed = ops.less_equal(ops.expand_dims(c_keys, 1), ops.expand_dims(c, 2))
        allowed = ops.logical_and(allowed, ops.expand_dims(keys_valid, 1))
        # Padding queries see themselves only (their outputs are never used), so no row is fully masked.
        allowed = ops.logical_or(allowed, ops.expand_dims(ops.equal(query, key), 0))
        attention_mask = ops.expand_dims(allowed, 1)
        dtype = self.layers[0][0].compute_dtype
        empty = ops.zeros((batch, 2, slots, self.heads, self.head_size), dtype)
        x, caches = self._layers(x, attention_mask, self._rotary(positions), [empty] * len(self.layers), 0)
        logits = self._logits(x[:, -1:])[:, 0]
        cache = {
            "layers": caches,
            "keys_valid": keys_valid,
            "position": positions[:, -1] + 1,
            "start": ops.full((batch,), length, "int32"),
        }
        return logits, cache

    def step(self, token_ids, cache, index):
        slot = cache["start"][0] + index
        token_ids = ops.expand_dims(ops.cast(token_ids, "int32"), 1)
        positions = ops.expand_dims(cache["position"], 1)
        segment_ids = ops.full(ops.shape(token_ids), self.target_segment, "int32")
        x = self._embed(token_ids, segment_ids, positions)
        batch = ops.shape(token_ids)[0]
        # The new token sees every earlier visible key and itself; it stays visible later unless it is a pad id.
        sees = ops.slice_update(cache["keys_valid"], [0, slot], ops.ones((batch, 1), "bool"))
        keys_valid = ops.slice_update(cache["keys_valid"], [0, slot], ops.not_equal(token_ids, self.pad_id))
        attention_mask = ops.expand_dims(ops.expand_dims(sees, 1), 1)
        x, caches = self._layers(x, attention_mask, self._rotary(positions), cache["layers"], slot)
        new_cache = dict(cache, layers=caches, keys_valid=keys_valid, position=cache["position"] + 1)
        return self._logits(x)[:, 0], new_cache

    def _verify(self):
        """The prompt pass must reproduce the model's own output (catches a model this adapter misreads)."""
        ids = [2 + i % max(self.vocab_size - 2, 1) for i in range(5)]
        segments = [0, 0, 0, 1, 1] if self.mode == "unilm" else [0] * 5
        prompt = self.prepare([ids], [segments], pad_to_multiple=1)
        logits, _ = self.init_cache(prompt, 1)
        inputs = [prompt["token_ids"]]
        if len(self.model.inputs) > 1:
            inputs.append(prompt["segment_ids"])
        outputs = self.model(inputs, training=False)
        if isinstance(outputs, (list, tuple)):  # e.g. [pooled, mlm]: the MLM output is the 3-D one
            outputs = next(o for o in outputs if len(o.shape) == 3)
        expected = np.asarray(ops.convert_to_numpy(outputs), dtype=np.float64)[0, -1]
        ours = np.asarray(ops.convert_to_numpy(logits), dtype=np.float64)[0]
        if self.head_activation == "softmax":  # compare log-probabilities where they are not negligible
            ours = ours - ours.max() - np.log(np.exp(ours - ours.max()).sum())
            keep = expected > 1e-8
            expected, ours = np.log(expected[keep]), ours[keep]
        if self.layers[0][0].compute_dtype != "float32":
            tolerance = 0.2
        elif backend.float32_matmul_relative_error() > 1e-5:  # TF32 matmuls (GPU default): ~1e-3 relative error
            tolerance = 5e-2
        else:
            tolerance = 1e-3
        error = float(np.max(np.abs(expected - ours)))
        if error > tolerance:
            raise ValueError(
                f"BertDecodingAdapter does not reproduce model {self.model.name!r} (max error {error:.3g}): its "
                "structure differs from the BERT family this adapter knows."
            )


# ==================================================================================================== search
@dataclasses.dataclass(frozen=True)
class _Search:
    strategy: str  # 'greedy' | 'sample' | 'beam'
    max_len: int
    min_len: int
    end_id: int | None
    num_beams: int
    top_k: int | None
    top_p: float | None
    temperature: float
    repetition_penalty: float
    no_repeat_ngram_size: int
    always_keep_end: bool
    tree_fanout: int | None  # None: no prefix tree


def _onehot_mask(token_ids, vocab: int):
    return ops.equal(ops.expand_dims(token_ids, 1), ops.expand_dims(ops.arange(vocab, dtype="int32"), 0))


def _scatter_mask(rows_tokens, values, shape):
    """[rows, vocab] bool, True at (row, token) for each True in `values` ([rows, n] with tokens [rows, n])."""
    rows = ops.broadcast_to(ops.expand_dims(ops.arange(shape[0], dtype="int32"), 1), ops.shape(rows_tokens))
    indices = ops.reshape(ops.stack([rows, ops.cast(rows_tokens, "int32")], axis=-1), (-1, 2))
    counts = ops.scatter(indices, ops.reshape(ops.cast(values, "int32"), (-1,)), shape)
    return ops.greater(counts, 0)


def _tree_children(tree, node, fanout: int):
    """The children edges of each row's node: (tokens [rows, fanout], children [rows, fanout], valid, leaf)."""
    start = ops.take(tree["node_start"], node)
    count = ops.take(tree["node_count"], node)
    offsets = ops.expand_dims(ops.arange(fanout, dtype="int32"), 0)
    valid = ops.less(offsets, ops.expand_dims(count, 1))
    edges = ops.minimum(ops.expand_dims(start, 1) + offsets, ops.shape(tree["edge_tokens"])[0] - 1)
    return ops.take(tree["edge_tokens"], edges), ops.take(tree["edge_children"], edges), valid, ops.equal(count, 0)


def _next_node(tree, node, token_ids, fanout: int):
    tokens, children, valid, _ = _tree_children(tree, node, fanout)
    match = ops.logical_and(valid, ops.equal(tokens, ops.expand_dims(token_ids, 1)))
    return ops.sum(ops.where(match, children, 0), axis=1)


def _banned_ngrams(tokens, t, n: int, vocab: int):
    """[rows, vocab]: tokens that would repeat an n-gram already in `tokens[:, :t]`."""
    rows, max_len = tokens.shape
    windows = max_len - n + 1
    if windows <= 0:
        return ops.zeros((rows, vocab), "bool")
    match = ops.ones((rows, windows), "bool")
    if n > 1:  # windows whose first n-1 tokens equal the last n-1 generated tokens
        last = ops.take(tokens, ops.maximum(t - (n - 1) + ops.arange(n - 1, dtype="int32"), 0), axis=1)
        for k in range(n - 1):
            match = ops.logical_and(match, ops.equal(tokens[:, k:k + windows], last[:, k:k + 1]))
    complete = ops.less(ops.arange(windows, dtype="int32") + (n - 1), t)  # the window's next token exists
    match = ops.logical_and(match, ops.expand_dims(complete, 0))
    return _scatter_mask(tokens[:, n - 1:n - 1 + windows], match, (rows, vocab))


def _categorical(logits, seed, t):
    """One sample per row from softmax(logits), stateless in (seed, t)."""
    name = keras.backend.backend()
    if name == "jax":
        import jax

        key = jax.random.fold_in(jax.random.PRNGKey(seed), t)
        return jax.random.categorical(key, logits, axis=-1).astype("int32")
    if name == "tensorflow":
        import tensorflow as tf

        seeds = tf.stack([tf.cast(seed, tf.int32), tf.cast(t, tf.int32)])
        return tf.cast(tf.random.stateless_categorical(logits, 1, seed=seeds)[:, 0], tf.int32)
    if name == "torch":
        import torch

        generator = torch.Generator(device=logits.device).manual_seed(int(seed) * 1_000_003 + int(t))
        return torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=generator)[:, 0].int()
    raise NotImplementedError(f"Sampling is not implemented on the {name} backend.")


class _Searcher:
    """The search loops over a decoding adapter for one `_Search` setting."""

    def __init__(self, adapter: DecodingAdapter, search: _Search):
        self.adapter, self.s = adapter, search
        self.vocab = adapter.vocab_size

    # ------------------------------------------------------------------------------------------------ logits
    def _constraints(self, t, node, tree):
        """[rows, vocab] bool of allowed tokens (min_len and prefix tree), or None."""
        s, allowed = self.s, None
        if s.tree_fanout is not None:
            tokens, _, valid, leaf = _tree_children(tree, node, s.tree_fanout)
            allowed = _scatter_mask(tokens, valid, (ops.shape(node)[0], self.vocab))
            if s.end_id is not None:  # at a leaf, only ending is possible
                allowed = ops.logical_or(allowed, ops.logical_and(ops.expand_dims(leaf, 1),
                                                                  _onehot_mask(ops.full_like(node, s.end_id),
                                                                               self.vocab)))
        if s.end_id is not None and s.min_len > 1:
            too_short = ops.less(t + 1, s.min_len)
            not_end = ops.logical_not(_onehot_mask(ops.full_like(node, s.end_id), self.vocab))
            short_mask = ops.logical_or(not_end, ops.logical_not(too_short))
            allowed = short_mask if allowed is None else ops.logical_and(allowed, short_mask)
        return allowed

    def _adjust(self, logits, t, tokens, seen):
        """Repetition penalty, no-repeat n-grams and temperature on float32 logits."""
        s = self.s
        if s.repetition_penalty != 1.0:
            penalised = ops.where(logits > 0, logits / s.repetition_penalty, logits * s.repetition_penalty)
            logits = ops.where(seen, penalised, logits)
        if s.no_repeat_ngram_size > 0:
            logits = ops.where(_banned_ngrams(tokens, t, s.no_repeat_ngram_size, self.vocab), _NEG_INF, logits)
        if s.temperature != 1.0:
            logits = logits / s.temperature
        return logits

    def _filter(self, logits):
        """Top-k / top-p for sampling (and `always_keep_end`)."""
        s, original = self.s, logits
        if s.top_k is not None and s.top_k < self.vocab:
            kth = ops.top_k(logits, s.top_k)[0][:, -1:]
            logits = ops.where(logits < kth, _NEG_INF, logits)
        if s.top_p is not None and s.top_p < 1.0:
            ordered = ops.top_k(logits, self.vocab)[0]
            probs = ops.softmax(ordered, axis=-1)
            before = ops.cumsum(probs, axis=-1) - probs
            kept = ops.sum(ops.cast(before < s.top_p, "int32"), axis=-1, keepdims=True)
            threshold = ops.take_along_axis(ordered, ops.maximum(kept - 1, 0), axis=-1)
            logits = ops.where(logits < threshold, _NEG_INF, logits)
        if s.always_keep_end and s.end_id is not None:
            is_end = _onehot_mask(ops.full((ops.shape(logits)[0],), s.end_id, "int32"), self.vocab)
            logits = ops.where(is_end, original, logits)
        return logits

    def _state_extras(self, rows):
        s = self.s
        seen = ops.zeros((rows, self.vocab), "bool") if s.repetition_penalty != 1.0 else ops.zeros((rows, 1), "bool")
        return ops.zeros((rows,), "int32"), seen

    def _update_seen(self, seen, token_ids):
        if self.s.repetition_penalty == 1.0:
            return seen
        return ops.logical_or(seen, _onehot_mask(token_ids, self.vocab))

    # ------------------------------------------------------------------------------------------------ loops
    def run(self, prompt, tree, seed):
        return self._beam(prompt, tree) if self.s.strategy == "beam" else self._sample(prompt, tree, seed)

    def _sample(self, prompt, tree, seed):
        s = self.s
        logits, cache = self.adapter.init_cache(prompt, s.max_len)
        rows = prompt["token_ids"].shape[0]
        node, seen = self._state_extras(rows)
        tokens = ops.zeros((rows, s.max_len), "int32")
        finished = ops.zeros((rows,), "bool")
        t = ops.convert_to_tensor(0, "int32")

        def cond(t, tokens, finished, node, seen, logits, cache):
            return ops.logical_and(ops.less(t, s.max_len), ops.logical_not(ops.all(finished)))

        def body(t, tokens, finished, node, seen, logits, cache):
            scores = self._adjust(logits, t, tokens, seen)
            allowed = self._constraints(t, node, tree)
            if allowed is not None:
                scores = ops.where(allowed, scores, _NEG_INF)
            if s.strategy == "greedy" or s.top_k == 1:
                chosen = ops.cast(ops.argmax(scores, axis=-1), "int32")
            else:
                scores = ops.where(ops.expand_dims(finished, 1), 0.0, self._filter(scores))
                chosen = _categorical(scores, seed, t)
            chosen = ops.where(finished, 0, chosen)
            tokens = ops.slice_update(tokens, [0, t], ops.expand_dims(chosen, 1))
            if s.tree_fanout is not None:
                node = _next_node(tree, node, chosen, s.tree_fanout)
            seen = self._update_seen(seen, chosen)
            if s.end_id is not None:
                finished = ops.logical_or(finished, ops.equal(chosen, s.end_id))
            logits, cache = self.adapter.step(chosen, cache, t)
            return t + 1, tokens, finished, node, seen, logits, cache

        t, tokens, finished, *_ = ops.while_loop(cond, body, (t, tokens, finished, node, seen, logits, cache))
        return tokens, ops.zeros((rows,), "float32")

    def _beam(self, prompt, tree):
        s, beams, vocab = self.s, self.s.num_beams, self.vocab
        logits, cache = self.adapter.init_cache(prompt, s.max_len)
        batch = prompt["token_ids"].shape[0]
        rows = batch * beams

        def repeat(x):
            return ops.repeat(x, beams, axis=0)

        logits = repeat(logits)
        cache = keras.tree.map_structure(repeat, cache)
        node, seen = self._state_extras(rows)
        alive_tokens = ops.zeros((batch, beams, s.max_len), "int32")
        first = ops.concatenate([ops.zeros((batch, 1)), ops.full((batch, beams - 1), _NEG_INF)], axis=1)
        alive_scores = ops.cast(first, "float32")
        best_tokens = ops.zeros((batch, s.max_len), "int32")
        best_scores = ops.full((batch,), _NEG_INF, "float32")
        t = ops.convert_to_tensor(0, "int32")

        def cond(t, alive_tokens, alive_scores, best_tokens, best_scores, node, seen, logits, cache):
            # Scores only fall as tokens are added: a row is done once its best finished output beats every beam.
            done = ops.greater_equal(best_scores, ops.max(alive_scores, axis=1))
            return ops.logical_and(ops.less(t, s.max_len), ops.logical_not(ops.all(done)))

        def body(t, alive_tokens, alive_scores, best_tokens, best_scores, node, seen, logits, cache):
            flat_tokens = ops.reshape(alive_tokens, (rows, s.max_len))
            logp = ops.log_softmax(self._adjust(logits, t, flat_tokens, seen), axis=-1)
            allowed = self._constraints(t, node, tree)
            if allowed is not None:
                logp = ops.where(allowed, logp, _NEG_INF)
            candidates = ops.reshape(ops.expand_dims(ops.reshape(alive_scores, (rows,)), 1) + logp,
                                     (batch, beams, vocab))
            # Finishing candidates: the end token of every beam, or every token at the last step.
            last = ops.equal(t, s.max_len - 1)
            finishing = ops.logical_or(last, ops.zeros((1, 1, vocab), "bool"))
            if s.end_id is not None:
                finishing = ops.logical_or(finishing, ops.reshape(_onehot_mask(
                    ops.full((1,), s.end_id, "int32"), vocab), (1, 1, vocab)))
            finished = ops.reshape(ops.where(finishing, candidates, _NEG_INF), (batch, beams * vocab))
            flat = ops.cast(ops.argmax(finished, axis=1), "int32")
            score = ops.take_along_axis(finished, ops.expand_dims(flat, 1), axis=1)[:, 0]
            beam, token = flat // vocab, flat % vocab
            sequence = ops.take_along_axis(alive_tokens, beam[:, None, None] * ops.ones((1, 1, s.max_len), "int32"),
                                           axis=1)[:, 0]
            sequence = sequence + ops.expand_dims(token, 1) * ops.cast(
                ops.equal(ops.arange(s.max_len, dtype="int32"), t), "int32")[None]
            better = ops.greater(score, best_scores)
            best_scores = ops.where(better, score, best_scores)
            best_tokens = ops.where(ops.expand_dims(better, 1), sequence, best_tokens)
            # Alive: the best `beams` candidates that do not finish.
            alive = ops.reshape(ops.where(finishing, _NEG_INF, candidates), (batch, beams * vocab))
            alive_scores, flat = ops.top_k(alive, beams)
            flat = ops.cast(flat, "int32")
            beam, token = flat // vocab, flat % vocab
            alive_tokens = ops.take_along_axis(alive_tokens, ops.expand_dims(beam, 2) * ops.ones(
                (1, 1, s.max_len), "int32"), axis=1)
            alive_tokens = alive_tokens + ops.expand_dims(token, 2) * ops.cast(
                ops.equal(ops.arange(s.max_len, dtype="int32"), t), "int32")[None, None]
            order = ops.reshape(beam + ops.expand_dims(ops.arange(batch, dtype="int32") * beams, 1), (rows,))
            gather = lambda x: ops.take(x, order, axis=0)  # noqa: E731
            cache = keras.tree.map_structure(gather, cache)
            chosen = ops.reshape(token, (rows,))
            node, seen = gather(node), gather(seen)
            if s.tree_fanout is not None:
                node = _next_node(tree, node, chosen, s.tree_fanout)
            seen = self._update_seen(seen, chosen)
            logits, cache = self.adapter.step(chosen, cache, t)
            return t + 1, alive_tokens, alive_scores, best_tokens, best_scores, node, seen, logits, cache

        state = (t, alive_tokens, alive_scores, best_tokens, best_scores, node, seen, logits, cache)
        _, _, _, best_tokens, best_scores, *_ = ops.while_loop(cond, body, state)
        return best_tokens, best_scores


# ==================================================================================================== public API
def _compile(fn: Callable, variables: list, jit: bool) -> Callable:
    """One compiled function per backend: jax.jit (variables passed through a StatelessScope), tf.function with XLA,
    eager elsewhere."""
    name = keras.backend.backend()
    if not jit or name not in ("jax", "tensorflow"):
        return fn
    if name == "jax":
        import jax

        def pure(values, *args):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return fn(*args)

        jitted = jax.jit(pure)
        return lambda *args: jitted([v.value for v in variables], *args)
    import tensorflow as tf

    return tf.function(fn, jit_compile=True)


class Generator:
    """Batched, cached generation for one model; keeps its compiled functions between calls.

    `model`: a keras model built with application 'lm'/'unilm', a bert4x Transformer, or a `DecodingAdapter`.

    Example:
    >>> from bert4x.models import build_transformer_model
    >>> model = build_transformer_model({"vocab_size": 30, "hidden_size": 8, "num_hidden_layers": 1,
    ...     "num_attention_heads": 2, "intermediate_size": 16}, application="unilm")
    >>> generator = Generator(model)
    >>> greedy = generator.generate([[2, 5, 6, 3]], max_len=5, end_id=3)
    >>> greedy == generator.generate([[2, 5, 6, 3]], max_len=5, end_id=3, do_sample=True, top_k=1)
    True
    """

    def __init__(self, model, pad_to_multiple: int = 8, jit: bool = True):
        self.adapter = adapter_for(model)
        self.pad_to_multiple = pad_to_multiple
        self.jit = jit
        self._compiled: dict[_Search, Callable] = {}

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        segment_ids: Sequence[Sequence[int]] | None = None,
        *,
        max_len: int = 32,
        min_len: int = 1,
        end_id: int | None = None,
        num_beams: int = 1,
        do_sample: bool = False,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float = 1.0,
        repetition_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
        prefix_tree: PrefixTree | None = None,
        always_keep_end: bool = False,
        seed: int = 0,
        return_scores: bool = False,
    ):
        """Generates a continuation for each prompt (lists of token ids; the prompt is not repeated in the output).

        Strategy: greedy by default; `num_beams > 1` is beam search (returns the best finished hypothesis by sum of
        log-probabilities, exact with a wide enough beam); `do_sample=True` samples (with `top_k`, `top_p`,
        `temperature`; `seed` makes it reproducible; `top_k=1` equals greedy).

        Each output ends with `end_id` if it ended, and holds at most `max_len` tokens (end included). `min_len`
        bans `end_id` until the output would be `min_len` tokens long (end included, as bert4keras's `minlen`).
        `repetition_penalty` (> 1) divides positive / multiplies negative logits of tokens already generated;
        `no_repeat_ngram_size=n` forbids repeating an n-gram of the generated tokens. `prefix_tree` makes every
        output a path of the tree. `always_keep_end` keeps `end_id` among the top-k/top-p candidates. With
        `return_scores`, beam search also returns each output's score (sum of log-probabilities).
        """
        if not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be a positive integer, got {max_len!r}.")
        if num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {num_beams}.")
        if num_beams > 1 and do_sample:
            raise ValueError("Beam search with sampling is not implemented: use num_beams > 1 or do_sample=True.")
        if not do_sample and (top_k is not None or top_p is not None or always_keep_end):
            raise ValueError("top_k / top_p / always_keep_end apply to sampling: pass do_sample=True.")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}.")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        if repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}.")
        if end_id is not None and not 0 <= end_id < self.adapter.vocab_size:
            raise ValueError(f"end_id={end_id} is outside the vocabulary [0, {self.adapter.vocab_size}).")
        tree_arrays = {}
        if prefix_tree is not None and end_id is None:
            raise ValueError("prefix_tree needs end_id: outputs end where a tree path ends.")
        if prefix_tree is not None:
            if not isinstance(prefix_tree, PrefixTree):
                raise TypeError(f"prefix_tree must be a bert4x.snippets.PrefixTree, got {type(prefix_tree)}.")
            tree_arrays = prefix_tree.arrays()
            fanout = int(tree_arrays.pop("max_fanout"))
            if int(tree_arrays["edge_tokens"].max()) >= self.adapter.vocab_size:
                raise ValueError("prefix_tree holds token ids outside the model's vocabulary.")
        strategy = "beam" if num_beams > 1 else ("sample" if do_sample else "greedy")
        search = _Search(
            strategy, max_len, min_len, end_id, num_beams, top_k, top_p, float(temperature),
            float(repetition_penalty), int(no_repeat_ngram_size), bool(always_keep_end),
            fanout if prefix_tree is not None else None,
        )
        prompt = self.adapter.prepare(prompts, segment_ids, self.pad_to_multiple, max_len)
        if search not in self._compiled:
            self._compiled[search] = _compile(_Searcher(self.adapter, search).run, self.adapter.variables(), self.jit)
        tokens, scores = self._compiled[search](prompt, tree_arrays, np.asarray(seed, dtype=np.int32))
        tokens = np.asarray(ops.convert_to_numpy(tokens))
        outputs = []
        for row in tokens:
            row = row.tolist()
            if end_id is not None and end_id in row:
                row = row[: row.index(end_id) + 1]
            outputs.append(row)
        if return_scores:
            return outputs, np.asarray(ops.convert_to_numpy(scores)).tolist()
        return outputs


_GENERATORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def generate(model, prompts: Sequence[Sequence[int]], segment_ids=None, **kwargs):
    """`Generator(model).generate(prompts, segment_ids, **kwargs)`, reusing one Generator per model."""
    try:
        generator = _GENERATORS.get(model)
    except TypeError:
        generator = None
    if generator is None:
        generator = Generator(model)
        try:
            _GENERATORS[model] = generator
        except TypeError:
            pass
    return generator.generate(prompts, segment_ids, **kwargs)
