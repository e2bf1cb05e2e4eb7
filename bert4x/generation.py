"""Fast, batched, KV-cached text generation: greedy, beam search and sampling in one compiled device loop.

This module holds search only. A model takes part through the decoding interface of its `Transformer`
(`bert4x.models.base.Transformer`): `decoding_unsupported()`, `decode_variables()`, `decode_prepare(prompts,
segment_ids, pad_to_multiple, max_len)` on the host, and `decode_start(prompt, max_len)` / `decode_step(token_ids,
cache, index)` on the device, returning float32 logits `[batch, vocab]` and a cache whose tensors keep the batch on
their first axis (beam search reorders it). BERT, RoBERTa, WoBERT, RoFormer, RoFormerV2, ALBERT and
ALBERT-unshared built with `application='lm'` or `'unilm'`, the causal GPT, GPT-2 and GPT2-ML, and T5 (v1.0, v1.1)
and mT5 implement it; a new family gets this generator by implementing it too.

Beam search has three rules (`num_beams > 1`):

- default, bert4keras's: every step keeps the `num_beams` best hypotheses by total log-probability; when the best of
  them ends with `end_id`, it is the output; otherwise finished hypotheses leave the beam, which narrows to the
  unfinished ones. At `max_len` the best hypothesis is returned.
- `length_penalty=x`, transformers' rule: finished hypotheses are kept in a pool of `num_beams`, scored
  `sum of log-probabilities / length ** x`, and the search stops as `early_stopping` says (False: when the best live
  hypothesis, scored at its current length, cannot beat the worst of a full pool; True: once the pool is full;
  'never': with the bound at `max_len` when x > 0).
- `exact=True`: finished hypotheses are kept aside and the search stops only when no live hypothesis can beat the
  best of them; with a beam as wide as the number of prefixes it is the exhaustive-search optimum. On weakly trained
  models this often returns the bare end token.

Compilation: on jax the whole generation (prompt pass plus a `keras.ops.while_loop` over tokens) is one `jax.jit`
function, with the model's variables passed in through a `keras.StatelessScope`; on tensorflow it is one
`tf.function(jit_compile=True)` (XLA). Either way there is no host round trip per token: the loop runs on the device
and stops early once every row has ended. On torch the same code runs eagerly. Compiled functions are cached per
search setting and input shape; prompts are padded to a multiple of `pad_to_multiple` so that nearby lengths share a
compilation.

Example:
>>> from bert4x.models import build_transformer_model
>>> model = build_transformer_model({"vocab_size": 30, "hidden_size": 8, "num_hidden_layers": 1,
...     "num_attention_heads": 2, "intermediate_size": 16}, application="lm")
>>> outputs = generate(model, [[2, 5, 6], [2, 7]], max_len=4, end_id=3)
>>> len(outputs), all(len(o) <= 4 for o in outputs)
(2, True)
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import weakref
from collections.abc import Callable, Sequence

import keras
import numpy as np
from keras import ops

from bert4x.snippets.decoding import PrefixTree

__all__ = ["Generator", "generate"]

_NEG_INF = float("-inf")
_INTERFACE = ("decoding_unsupported", "decode_variables", "decode_prepare", "decode_start", "decode_step")


def decoding_model(model):
    """The object that implements the decoding interface: a bert4x `Transformer` (or any object with the five
    methods and `vocab_size`), or the one behind a keras model that `build_transformer_model` returned."""
    target = getattr(model, "transformer", None) if isinstance(model, keras.Model) else model
    if target is None:
        raise TypeError(
            f"Generator: the keras model {model.name!r} has no `.transformer`, so it has no decoding methods: pass "
            "the model that build_transformer_model returned, or that model saved and loaded as .keras (it is "
            "rebuilt with its Transformer). A new keras.Model wrapped around its layers loses them: rebuild the "
            "model with build_transformer_model and load the weights into it (load_weights / set_weights)."
        )
    missing = [name for name in _INTERFACE if not callable(getattr(target, name, None))]
    if missing or not isinstance(getattr(target, "vocab_size", None), numbers.Integral):
        raise TypeError(
            f"Generator: model must be a bert4x model or implement {', '.join(_INTERFACE)} and vocab_size; "
            f"{type(target).__name__} lacks {missing or ['vocab_size']}."
        )
    reason = target.decoding_unsupported()
    if reason:
        raise ValueError(f"Generator: {type(target).__name__} cannot generate: {reason}")
    return target


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
    beam_rule: str = "bert4keras"  # 'bert4keras' | 'pool' (length_penalty) | 'exact'
    length_penalty: float = 0.0
    early_stopping: bool | str = False


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
    """The search loops over a model's decoding interface for one `_Search` setting."""

    def __init__(self, model, search: _Search):
        self.model, self.s = model, search
        self.vocab = int(model.vocab_size)

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
        if self.s.strategy != "beam":
            return self._sample(prompt, tree, seed)
        rules = {"bert4keras": self._beam_bert4keras, "pool": self._beam_pool, "exact": self._beam_exact}
        return rules[self.s.beam_rule](prompt, tree)

    def _sample(self, prompt, tree, seed):
        s = self.s
        logits, cache = self.model.decode_start(prompt, s.max_len)
        rows = logits.shape[0]  # static: the batch of the prompts
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
            logits, cache = self.model.decode_step(chosen, cache, t)
            return t + 1, tokens, finished, node, seen, logits, cache

        t, tokens, finished, *_ = ops.while_loop(cond, body, (t, tokens, finished, node, seen, logits, cache))
        return tokens, ops.zeros((rows,), "float32")

    def _beam_exact(self, prompt, tree):
        s, beams, vocab = self.s, self.s.num_beams, self.vocab
        logits, cache = self.model.decode_start(prompt, s.max_len)
        batch = logits.shape[0]  # static: the batch of the prompts
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
            logits, cache = self.model.decode_step(chosen, cache, t)
            return t + 1, alive_tokens, alive_scores, best_tokens, best_scores, node, seen, logits, cache

        state = (t, alive_tokens, alive_scores, best_tokens, best_scores, node, seen, logits, cache)
        _, _, _, best_tokens, best_scores, *_ = ops.while_loop(cond, body, state)
        return best_tokens, best_scores

    # Shared by the bert4keras and pool rules.
    def _beam_start(self, prompt):
        s, beams = self.s, self.s.num_beams
        logits, cache = self.model.decode_start(prompt, s.max_len)
        batch = logits.shape[0]  # static: the batch of the prompts

        def repeat(x):
            return ops.repeat(x, beams, axis=0)

        first = ops.concatenate([ops.zeros((batch, 1)), ops.full((batch, beams - 1), _NEG_INF)], axis=1)
        return batch, repeat(logits), keras.tree.map_structure(repeat, cache), ops.cast(first, "float32")

    def _beam_logp(self, t, tokens, seen, logits, node, tree):
        """[rows, vocab] log-probabilities of the next token, with the constraints applied."""
        logp = ops.log_softmax(self._adjust(logits, t, tokens, seen), axis=-1)
        allowed = self._constraints(t, node, tree)
        return logp if allowed is None else ops.where(allowed, logp, _NEG_INF)

    def _extend(self, tokens, beam, token, t):
        """The hypotheses `tokens[b, beam[b, j]]` with `token[b, j]` written at position t: `[batch, n, max_len]`."""
        length = self.s.max_len
        picked = ops.take_along_axis(tokens, ops.expand_dims(beam, 2) * ops.ones((1, 1, length), "int32"), axis=1)
        at_t = ops.cast(ops.equal(ops.arange(length, dtype="int32"), t), "int32")[None, None]
        return picked + ops.expand_dims(token, 2) * at_t

    def _beam_bert4keras(self, prompt, tree):
        s, beams, vocab = self.s, self.s.num_beams, self.vocab
        batch, logits, cache, alive_scores = self._beam_start(prompt)
        rows = batch * beams
        node, seen = self._state_extras(rows)
        alive_tokens = ops.zeros((batch, beams, s.max_len), "int32")
        width = ops.full((batch,), beams, "int32")  # the live width of each row's beam
        done = ops.zeros((batch,), "bool")
        out_tokens = ops.zeros((batch, s.max_len), "int32")
        out_scores = ops.full((batch,), _NEG_INF, "float32")
        slots = ops.expand_dims(ops.arange(beams, dtype="int32"), 0)
        t = ops.convert_to_tensor(0, "int32")

        def cond(t, alive_tokens, alive_scores, width, done, out_tokens, out_scores, node, seen, logits, cache):
            return ops.logical_and(ops.less(t, s.max_len), ops.logical_not(ops.all(done)))

        def body(t, alive_tokens, alive_scores, width, done, out_tokens, out_scores, node, seen, logits, cache):
            flat_tokens = ops.reshape(alive_tokens, (rows, s.max_len))
            logp = self._beam_logp(t, flat_tokens, seen, logits, node, tree)
            candidates = ops.reshape(ops.reshape(alive_scores, (rows, 1)) + logp, (batch, beams * vocab))
            scores, flat = ops.top_k(candidates, beams)
            flat = ops.cast(flat, "int32")
            # Only the first `width` candidates of a row are in its beam (it narrows as hypotheses finish).
            valid = ops.logical_and(ops.less(slots, ops.expand_dims(width, 1)), ops.isfinite(scores))
            scores = ops.where(valid, scores, _NEG_INF)
            beam, token = flat // vocab, flat % vocab
            sequences = self._extend(alive_tokens, beam, token, t)
            if s.end_id is not None:
                finished = ops.logical_and(valid, ops.equal(token, s.end_id))
            else:
                finished = ops.zeros_like(valid)
            best = ops.cast(ops.argmax(scores, axis=1), "int32")
            best_finished = ops.take_along_axis(finished, ops.expand_dims(best, 1), axis=1)[:, 0]
            stop = ops.logical_and(ops.logical_or(best_finished, ops.equal(t, s.max_len - 1)), ops.logical_not(done))
            best_sequence = ops.take_along_axis(sequences, best[:, None, None] * ops.ones((1, 1, s.max_len), "int32"),
                                                axis=1)[:, 0]
            out_tokens = ops.where(ops.expand_dims(stop, 1), best_sequence, out_tokens)
            out_scores = ops.where(stop, ops.max(scores, axis=1), out_scores)
            done = ops.logical_or(done, stop)
            # Finished hypotheses leave the beam: its width becomes the number of unfinished ones.
            unfinished = ops.sum(ops.cast(ops.logical_and(valid, ops.logical_not(finished)), "int32"), axis=1)
            width = ops.where(ops.any(finished, axis=1), unfinished, width)
            alive_scores = ops.where(finished, _NEG_INF, scores)
            chosen, cache, node, seen = self._reorder(beam, token, cache, node, seen, tree, batch)
            logits, cache = self.model.decode_step(chosen, cache, t)
            return t + 1, sequences, alive_scores, width, done, out_tokens, out_scores, node, seen, logits, cache

        state = (t, alive_tokens, alive_scores, width, done, out_tokens, out_scores, node, seen, logits, cache)
        out = ops.while_loop(cond, body, state)
        return out[5], out[6]

    def _beam_pool(self, prompt, tree):
        s, beams, vocab = self.s, self.s.num_beams, self.vocab
        batch, logits, cache, run_scores = self._beam_start(prompt)
        rows = batch * beams
        keep = min(2 * beams, beams * vocab)  # candidates per step, as transformers: enough to refill the beam
        node, seen = self._state_extras(rows)
        run_tokens = ops.zeros((batch, beams, s.max_len), "int32")
        pool_tokens = ops.zeros((batch, beams, s.max_len), "int32")
        pool_scores = ops.full((batch, beams), _NEG_INF, "float32")
        open_ = ops.ones((batch,), "bool")  # the pool may still improve
        ranks = ops.expand_dims(ops.arange(keep, dtype="int32"), 0)
        penalty = float(s.length_penalty)
        t = ops.convert_to_tensor(0, "int32")

        def row_done(open_, pool_scores):
            full = ops.all(ops.isfinite(pool_scores), axis=1)
            if s.early_stopping is True:
                return ops.logical_or(ops.logical_not(open_), full)
            return ops.logical_not(open_)

        def cond(t, run_tokens, run_scores, pool_tokens, pool_scores, open_, node, seen, logits, cache):
            return ops.logical_and(ops.less(t, s.max_len), ops.logical_not(ops.all(row_done(open_, pool_scores))))

        def body(t, run_tokens, run_scores, pool_tokens, pool_scores, open_, node, seen, logits, cache):
            flat_tokens = ops.reshape(run_tokens, (rows, s.max_len))
            logp = self._beam_logp(t, flat_tokens, seen, logits, node, tree)
            candidates = ops.reshape(ops.reshape(run_scores, (rows, 1)) + logp, (batch, beams * vocab))
            scores, flat = ops.top_k(candidates, keep)
            flat = ops.cast(flat, "int32")
            beam, token = flat // vocab, flat % vocab
            sequences = self._extend(run_tokens, beam, token, t)
            finishing = ops.logical_or(ops.equal(t, s.max_len - 1), ops.zeros_like(token, "bool"))
            if s.end_id is not None:
                finishing = ops.logical_or(finishing, ops.equal(token, s.end_id))
            finishing = ops.logical_and(finishing, ops.isfinite(scores))
            # Only the first `beams` candidates may enter the pool, and none once the row is done.
            length = ops.cast(t + 1, "float32")
            enters = ops.logical_and(ops.logical_and(finishing, ops.less(ranks, beams)),
                                     ops.expand_dims(ops.logical_not(row_done(open_, pool_scores)), 1))
            normalised = scores / ops.power(length, penalty)
            merged_scores = ops.concatenate([pool_scores, ops.where(enters, normalised, _NEG_INF)], axis=1)
            merged_tokens = ops.concatenate([pool_tokens, sequences], axis=1)
            pool_scores, order = ops.top_k(merged_scores, beams)
            order = ops.cast(order, "int32")
            pool_tokens = ops.take_along_axis(merged_tokens, order[:, :, None] * ops.ones((1, 1, s.max_len), "int32"),
                                              axis=1)
            running = ops.where(finishing, _NEG_INF, scores)
            run_scores, order = ops.top_k(running, beams)
            order = ops.cast(order, "int32")
            run_tokens = ops.take_along_axis(sequences, order[:, :, None] * ops.ones((1, 1, s.max_len), "int32"),
                                             axis=1)
            beam = ops.take_along_axis(beam, order, axis=1)
            token = ops.take_along_axis(token, order, axis=1)
            # transformers' stopping heuristic: can the best live hypothesis still beat the worst of a full pool?
            if s.early_stopping == "never" and penalty > 0:
                bound_length = float(s.max_len)
            else:
                bound_length = length
            best_possible = run_scores[:, 0] / ops.power(bound_length, penalty)
            full = ops.all(ops.isfinite(pool_scores), axis=1)
            improvable = ops.where(full, ops.greater(best_possible, ops.min(pool_scores, axis=1)),
                                   ops.greater(best_possible, -1e9))
            open_ = ops.logical_and(open_, improvable)
            chosen, cache, node, seen = self._reorder(beam, token, cache, node, seen, tree, batch)
            logits, cache = self.model.decode_step(chosen, cache, t)
            return t + 1, run_tokens, run_scores, pool_tokens, pool_scores, open_, node, seen, logits, cache

        state = (t, run_tokens, run_scores, pool_tokens, pool_scores, open_, node, seen, logits, cache)
        out = ops.while_loop(cond, body, state)
        return out[3][:, 0], out[4][:, 0]

    def _reorder(self, beam, token, cache, node, seen, tree, batch):
        """Reorders the per-row state by `beam` `[batch, beams]`; returns the fed tokens `[rows]` and the state."""
        beams = self.s.num_beams
        order = ops.reshape(beam + ops.expand_dims(ops.arange(batch, dtype="int32") * beams, 1), (batch * beams,))

        def gather(x):
            return ops.take(x, order, axis=0)

        cache = keras.tree.map_structure(gather, cache)
        chosen = ops.reshape(token, (batch * beams,))
        node, seen = gather(node), gather(seen)
        if self.s.tree_fanout is not None:
            node = _next_node(tree, node, chosen, self.s.tree_fanout)
        return chosen, cache, node, self._update_seen(seen, chosen)


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

    # No autograph: the search is written in keras.ops control flow, and autograph's cache of converted code (keyed
    # by code objects, whose ids are reused) could hand one model's traced method to another.
    return tf.function(fn, jit_compile=True, autograph=False)


def _check_int(name: str, value, low: int | None = None, high: int | None = None, none: bool = False):
    if value is None and none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__}).")
    value = int(value)
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}.")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}.")
    return value


def _check_real(name: str, value, positive: bool = True, none: bool = False):
    if value is None and none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__}).")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}.")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}.")
    return value


class Generator:
    """Batched, cached generation for one model; keeps its compiled functions between calls.

    Args:
        model: a keras model returned by `build_transformer_model` for a family that decodes (BERT family and
            ALBERT with application 'lm'/'unilm', GPT/GPT-2/GPT2-ML, T5/mT5) or loaded from its `.keras` file, its
            `Transformer`, or any object with the decoding interface.
        pad_to_multiple: prompts are padded to a multiple of this length, so that nearby lengths share a compiled
            function.
        jit: compile the search (jax, tensorflow); False runs it eagerly.

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
        self.model = decoding_model(model)
        self.vocab_size = int(self.model.vocab_size)
        self.pad_to_multiple = _check_int("pad_to_multiple", pad_to_multiple, low=1)
        self.jit = bool(jit)
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
        length_penalty: float | None = None,
        early_stopping: bool | str = False,
        exact: bool = False,
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
        """Generates a continuation for each prompt (the prompt is not repeated in the output).

        Greedy by default; `num_beams > 1` is beam search, `do_sample=True` sampling (`top_k=1` equals greedy).
        Each output ends with `end_id` if it ended, and holds at most `max_len` tokens (end included).

        Args:
            prompts: token ids, one non-empty list per row.
            segment_ids: segment ids of the prompts (BERT family), or None.
            max_len: most tokens generated per row.
            min_len: `end_id` is banned until the output would be `min_len` tokens long (end included).
            end_id: the token that ends an output; None runs every row to `max_len`.
            num_beams: beam width; 1 is greedy or sampling.
            length_penalty: beam search with transformers' rule: finished hypotheses kept in a pool, scored
                `log-probability / length ** length_penalty`. None: bert4keras's rule (the output is the best
                hypothesis of the beam once it ends).
            early_stopping: with `length_penalty`, when the search stops: False, True or 'never', as transformers.
            exact: beam search that keeps every finished hypothesis and returns the best-scoring one (exhaustive
                with a wide enough beam).
            do_sample: sample instead of taking the most likely token.
            top_k: sample among the `top_k` most likely tokens.
            top_p: sample among the most likely tokens whose probabilities first reach `top_p`.
            temperature: logits are divided by it (finite, > 0).
            repetition_penalty: > 1 divides positive / multiplies negative logits of tokens already generated.
            no_repeat_ngram_size: n > 0 forbids repeating an n-gram of the generated tokens.
            prefix_tree: every output is a path of this `PrefixTree` (needs `end_id`).
            always_keep_end: keeps `end_id` among the top-k/top-p candidates.
            seed: makes sampling reproducible.
            return_scores: also return each output's score (beam search: the sum of log-probabilities, divided by
                `length ** length_penalty` under that rule).

        Returns:
            A list of token-id lists, and with `return_scores` a list of floats too.
        """
        search, tree_arrays, seed = self._settings(
            max_len=max_len, min_len=min_len, end_id=end_id, num_beams=num_beams, length_penalty=length_penalty,
            early_stopping=early_stopping, exact=exact, do_sample=do_sample, top_k=top_k, top_p=top_p,
            temperature=temperature, repetition_penalty=repetition_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size, prefix_tree=prefix_tree, always_keep_end=always_keep_end,
            seed=seed,
        )
        prompt = self.model.decode_prepare(prompts, segment_ids, self.pad_to_multiple, max_len)
        if search not in self._compiled:
            self._compiled[search] = _compile(_Searcher(self.model, search).run, self.model.decode_variables(),
                                              self.jit)
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

    def _settings(
        self,
        *,
        max_len: int = 32,
        min_len: int = 1,
        end_id: int | None = None,
        num_beams: int = 1,
        length_penalty: float | None = None,
        early_stopping: bool | str = False,
        exact: bool = False,
        do_sample: bool = False,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float = 1.0,
        repetition_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
        prefix_tree: PrefixTree | None = None,
        always_keep_end: bool = False,
        seed: int = 0,
    ) -> tuple[_Search, dict, int]:
        """Validates the search options of `generate`; returns the `_Search`, the prefix-tree arrays and the seed."""
        max_len = _check_int("max_len", max_len, low=1)
        min_len = _check_int("min_len", min_len, low=1)
        if min_len > max_len:
            raise ValueError(f"min_len ({min_len}) must be <= max_len ({max_len}).")
        num_beams = _check_int("num_beams", num_beams, low=1)
        end_id = _check_int("end_id", end_id, low=0, none=True)
        if end_id is not None and end_id >= self.vocab_size:
            raise ValueError(f"end_id={end_id} is outside the vocabulary [0, {self.vocab_size}).")
        temperature = _check_real("temperature", temperature)
        repetition_penalty = _check_real("repetition_penalty", repetition_penalty)
        no_repeat_ngram_size = _check_int("no_repeat_ngram_size", no_repeat_ngram_size, low=0)
        top_k = _check_int("top_k", top_k, low=1, none=True)
        top_p = _check_real("top_p", top_p, none=True)
        if top_p is not None and top_p > 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
        length_penalty = _check_real("length_penalty", length_penalty, positive=False, none=True)
        seed = _check_int("seed", seed)
        if early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}.")
        if num_beams > 1 and do_sample:
            raise ValueError("Beam search with sampling is not implemented: use num_beams > 1 or do_sample=True.")
        if num_beams == 1 and (length_penalty is not None or exact or early_stopping is not False):
            raise ValueError("length_penalty / early_stopping / exact apply to beam search: pass num_beams > 1.")
        if exact and length_penalty is not None:
            raise ValueError("exact=True and length_penalty are two different beam rules: pass one of them.")
        if early_stopping is not False and length_penalty is None:
            raise ValueError("early_stopping applies to the length_penalty rule: pass length_penalty too.")
        if not do_sample and (top_k is not None or top_p is not None or always_keep_end):
            raise ValueError("top_k / top_p / always_keep_end apply to sampling: pass do_sample=True.")
        tree_arrays, fanout = {}, None
        if prefix_tree is not None:
            if not isinstance(prefix_tree, PrefixTree):
                raise TypeError(f"prefix_tree must be a bert4x.snippets.PrefixTree, got {type(prefix_tree)}.")
            if end_id is None:
                raise ValueError("prefix_tree needs end_id: outputs end where a tree path ends.")
            tree_arrays = prefix_tree.arrays()
            fanout = int(tree_arrays.pop("max_fanout"))
            outside = sorted({int(i) for i in tree_arrays["edge_tokens"] if i >= self.vocab_size})
            if outside:
                raise ValueError(
                    f"prefix_tree holds token ids outside the model's vocabulary [0, {self.vocab_size}): {outside[:5]}."
                )
        strategy = "beam" if num_beams > 1 else ("sample" if do_sample else "greedy")
        rule = "exact" if exact else ("pool" if length_penalty is not None else "bert4keras")
        search = _Search(
            strategy, max_len, min_len, end_id, num_beams, top_k, top_p, temperature, repetition_penalty,
            no_repeat_ngram_size, bool(always_keep_end), fanout, rule, length_penalty or 0.0, early_stopping,
        )
        return search, tree_arrays, seed

    def search_function(self, **options) -> Callable:
        """The search of `generate(..., **options)` as one uncompiled, traceable function, for graph exports.

        `fn(prompt) -> (tokens, scores)`: `prompt` is what the model's `decode_prepare` returns (arrays or tensors of
        that structure and dtypes, possibly symbolic); `tokens` is int32 `[batch, max_len]`, 0 after a row's end;
        `scores` float32 `[batch]` (what `return_scores` gives). The caller compiles it (e.g. in a
        `tf.function(jit_compile=True)`); `generate` runs the same search.

        Args:
            **options: the search options of `generate` (`max_len`, `end_id`, `num_beams`, ...).
        """
        search, tree_arrays, seed = self._settings(**options)
        run = _Searcher(self.model, search).run

        def fn(prompt):
            return run(prompt, tree_arrays, ops.convert_to_tensor(seed, "int32"))

        return fn


_GENERATORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def generate(model, prompts: Sequence[Sequence[int]], segment_ids=None, **kwargs):
    """`Generator(model).generate(prompts, segment_ids, **kwargs)`, reusing one Generator per model.

    Args:
        model: what `Generator` takes.
        prompts: token ids, one non-empty list per row.
        segment_ids: segment ids of the prompts, or None.
        **kwargs: the search options of `Generator.generate`.
    """
    try:
        generator = _GENERATORS.get(model)
    except TypeError:
        generator = None
    if generator is None:
        generator = Generator(model)
        with contextlib.suppress(TypeError):  # not weak-referenceable: no reuse
            _GENERATORS[model] = generator
    return generator.generate(prompts, segment_ids, **kwargs)
