"""The search itself, on the device: `_Search` (one hashable search setting) and `_Searcher`, which runs greedy
decoding, sampling and the three beam-search rules over a model's `decode_start` / `decode_step` as `keras.ops`
loops, with the constraints (minimum length, repetition penalty, banned n-grams, prefix trees). The rules are
described in `bert4x.generation`'s docstring; `Generator` (generator.py) validates options and compiles `run`."""

from __future__ import annotations

import dataclasses

import keras
from keras import ops

_NEG_INF = float("-inf")


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
