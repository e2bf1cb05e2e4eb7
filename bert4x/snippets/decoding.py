"""bert4keras's decoders: `AutoRegressiveDecoder` (beam search, random sampling) and `PrefixTree` constraints.

These decoders call a user `predict` once per token on numpy arrays (the bert4keras workflow, any model). For models
built with `application='lm'` / `'unilm'`, `bert4x.generation` is the fast, batched, KV-cached path; both give the
same tokens on the same model.

`beam_search` follows bert4keras by default: the output is the best hypothesis of the beam once it ends, and finished
hypotheses leave the beam, which narrows. `length_penalty=` gives transformers' rule (a pool of finished hypotheses
scored by length-normalised log-probability) and `exact=True` keeps every finished hypothesis and returns the
best-scoring one (the exhaustive-search optimum with a wide enough beam).

Differences from bert4keras, on purpose:
- `minlen` bans `end_id` until the output (start and end tokens included) is `minlen` long, instead of letting an
  early end token through and then discarding it.
- `prefix_tree=` restricts every output to a path of a `PrefixTree`.
- arguments are checked: a bad `temperature`, `topk`, `topp`, `maxlen`/`minlen` or prefix-tree id raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import keras
import numpy as np

__all__ = ["AutoRegressiveDecoder", "PrefixTree", "softmax", "log_softmax"]


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numpy softmax (stable)."""
    x = x - x.max(axis=axis, keepdims=True)
    x = np.exp(x)
    return x / x.sum(axis=axis, keepdims=True)


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numpy log-softmax (stable)."""
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


class PrefixTree:
    """A trie of token-id sequences: the allowed outputs of a constrained decoder ("Seq2Seq + prefix tree").

    With `end_id`, it is appended to every sequence, so a decoder can end exactly where a sequence ends (and a
    sequence that is a prefix of another stays reachable). At a node with no children, decoders allow only their
    `end_id`.

    Args:
        sequences: the allowed outputs, each a non-empty sequence of non-negative token ids.
        end_id: the token appended to every sequence, or None.

    Example:
    >>> tree = PrefixTree([[5, 6], [5, 7, 8]], end_id=2)
    >>> tree.allowed([]), tree.allowed([5]), tree.allowed([5, 7]), tree.allowed([9])
    ([5], [6, 7], [8], [])
    >>> [5, 6, 2] in tree, [5, 6] in tree, len(tree)
    (True, False, 2)
    """

    def __init__(self, sequences: Iterable[Sequence[int]], end_id: int | None = None):
        self.end_id = end_id
        self.children: list[dict[int, int]] = [{}]  # node 0 is the root
        self.terminal: list[bool] = [False]
        count = 0
        for number, sequence in enumerate(sequences):
            ids = [int(i) for i in sequence]
            if not ids:
                raise ValueError(f"PrefixTree: sequence #{number} is empty.")
            if any(i < 0 for i in ids):
                raise ValueError(f"PrefixTree: sequence #{number} has a negative token id: {ids}.")
            if end_id is not None:
                ids.append(int(end_id))
            node = 0
            for token in ids:
                if token not in self.children[node]:
                    self.children.append({})
                    self.terminal.append(False)
                    self.children[node][token] = len(self.children) - 1
                node = self.children[node][token]
            if not self.terminal[node]:
                self.terminal[node] = True
                count += 1
        if count == 0:
            raise ValueError("PrefixTree needs at least one sequence.")
        self.num_sequences = count
        self.max_token = max(token for children in self.children for token in children)

    def __len__(self) -> int:
        return self.num_sequences

    def node(self, prefix: Sequence[int]) -> int | None:
        """The node reached by following `prefix` from the root, or None if it leaves the tree."""
        node = 0
        for token in prefix:
            node = self.children[node].get(int(token))
            if node is None:
                return None
        return node

    def allowed(self, prefix: Sequence[int]) -> list[int]:
        """Tokens that may follow `prefix` (sorted); [] if `prefix` is not in the tree."""
        node = self.node(prefix)
        return [] if node is None else sorted(self.children[node])

    def __contains__(self, sequence: Sequence[int]) -> bool:
        node = self.node(sequence)
        return node is not None and self.terminal[node]

    def sequences(self) -> list[list[int]]:
        """Every stored sequence (with `end_id` appended if the tree has one), depth-first in token order."""
        out, stack = [], [(0, [])]
        while stack:
            node, path = stack.pop()
            if self.terminal[node]:
                out.append(path)
            for token in sorted(self.children[node], reverse=True):
                stack.append((self.children[node][token], path + [token]))
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        """Device-friendly form: the edges of node n are `edge_tokens/edge_children[node_start[n]:][:node_count[n]]`
        (sorted by token); `max_fanout` is the largest `node_count`."""
        starts, counts, tokens, kids = [], [], [], []
        for children in self.children:
            starts.append(len(tokens))
            counts.append(len(children))
            for token in sorted(children):
                tokens.append(token)
                kids.append(children[token])
        return {
            "node_start": np.asarray(starts, dtype=np.int32),
            "node_count": np.asarray(counts, dtype=np.int32),
            "edge_tokens": np.asarray(tokens or [0], dtype=np.int32),
            "edge_children": np.asarray(kids or [0], dtype=np.int32),
            "max_fanout": np.asarray(max(counts), dtype=np.int32),
        }


class _LastToken(keras.layers.Layer):
    def call(self, inputs):
        return inputs[:, -1]

    def compute_output_shape(self, input_shape):
        return (input_shape[0],) + tuple(input_shape[2:])


class AutoRegressiveDecoder:
    """Base class of autoregressive decoders with bert4keras's surface: subclass it, write
    `predict(self, inputs, output_ids, states)` returning the next-token probabilities (or logits) of every row of
    `output_ids`, decorate it with `@AutoRegressiveDecoder.wraps(default_rtype=...)`, and call `beam_search` or
    `random_sample`.

    Args:
        start_id: first output token (None: outputs start empty, as for UniLM).
        end_id: the token that ends an output (None: outputs run to `maxlen`).
        maxlen: most tokens generated (the start token not counted).
        minlen: shortest output length, start and end tokens included; `end_id` is banned before it.
        prefix_tree: default `PrefixTree` constraint for both strategies.

    Example:
    >>> class Bigram(AutoRegressiveDecoder):  # token 0 ends; row 2 is the distribution of the first token
    ...     @AutoRegressiveDecoder.wraps(default_rtype="probas")
    ...     def predict(self, inputs, output_ids, states):
    ...         table = np.array([[0.3, 0.3, 0.4], [0.5, 0.5, 0.0], [0.45, 0.55, 0.0]])
    ...         last = output_ids[:, -1] if output_ids.shape[1] else np.full(len(output_ids), 2)
    ...         return table[last]
    >>> decoder = Bigram(start_id=None, end_id=0, maxlen=3)
    >>> decoder.beam_search([np.zeros(1)], topk=2).tolist()  # [0] leaves the beam when [1] leads it
    [1, 0]
    >>> decoder.beam_search([np.zeros(1)], topk=2, exact=True).tolist()  # p = 0.45 beats [1, 0]'s 0.275
    [0]
    >>> decoder.random_sample([np.zeros(1)], n=1, topk=1)[0].tolist()  # topk=1 is greedy
    [1, 0]
    """

    def __init__(
        self,
        start_id: int | None,
        end_id: int | None,
        maxlen: int,
        minlen: int = 1,
        prefix_tree: PrefixTree | None = None,
    ):
        maxlen = _check_int("maxlen", maxlen, 1)
        minlen = _check_int("minlen", minlen or 1, 1)
        if minlen > maxlen + (start_id is not None):
            raise ValueError(f"minlen ({minlen}) must be <= maxlen ({maxlen}) (plus 1 for the start token).")
        if prefix_tree is not None and not isinstance(prefix_tree, PrefixTree):
            raise TypeError(f"prefix_tree must be a PrefixTree, got {type(prefix_tree).__name__}.")
        self.start_id = _check_int("start_id", start_id, 0, none=True)
        self.end_id = _check_int("end_id", end_id, 0, none=True)
        self.maxlen = maxlen
        self.minlen = minlen
        self.prefix_tree = prefix_tree
        if start_id is None:
            self.first_output_ids = np.empty((1, 0), dtype=int)
        else:
            self.first_output_ids = np.array([[start_id]])
        self.models: dict = {}

    @staticmethod
    def wraps(default_rtype: str = "probas", use_states: bool = False) -> Callable:
        """Decorates a user `predict(self, inputs, output_ids, states)`.

        Args:
            default_rtype: what the user function returns, 'probas' (probabilities) or 'logits' (scores before
                softmax).
            use_states: the user function returns `(prediction, states)`; otherwise just the prediction.

        The decorated method takes `(inputs, output_ids, states, temperature=1, rtype=default_rtype)` and returns
        `(probabilities or log-probabilities, states)`: rtype 'probas' or 'logits' (log-probabilities).
        """
        if default_rtype not in ("probas", "logits"):
            raise ValueError(f"default_rtype must be 'probas' or 'logits', got {default_rtype!r}.")

        def decorator(predict):
            def new_predict(self, inputs, output_ids, states, temperature=1, rtype=default_rtype):
                if rtype not in ("probas", "logits"):
                    raise ValueError(f"rtype must be 'probas' or 'logits', got {rtype!r}.")
                temperature = _check_temperature(temperature)
                prediction = predict(self, inputs, output_ids, states)
                if not use_states:
                    prediction = (prediction, None)
                scores = np.asarray(prediction[0], dtype=np.float64)
                if default_rtype == "logits":
                    logp = log_softmax(scores / temperature)
                else:
                    logp = np.log(scores + 1e-12)
                    if temperature != 1:  # probas ** (1 / T), renormalised
                        logp = log_softmax(logp / temperature)
                if rtype == "probas":
                    return np.exp(logp), prediction[1]
                return logp, prediction[1]

            new_predict.__wrapped__ = predict
            return new_predict

        return decorator

    def predict(self, inputs, output_ids, states=None):
        """Override: next-token probabilities (or logits) `[len(output_ids), vocab]`; decorate with `wraps`."""
        raise NotImplementedError("Subclasses write predict(self, inputs, output_ids, states), decorated with wraps().")

    def last_token(self, model: keras.Model) -> keras.Model:
        """A model with `model`'s inputs whose outputs are `model`'s outputs at the last position (cached)."""
        if model not in self.models:
            outputs = [_LastToken()(o) for o in model.outputs]
            self.models[model] = keras.Model(model.inputs, outputs)
        return self.models[model]

    # ------------------------------------------------------------------------------------------------ constraints
    def _constrain(self, logp: np.ndarray, output_ids: np.ndarray, min_ends: int, tree: PrefixTree | None):
        """Sets the log-probability of every forbidden next token to -inf (minlen and prefix tree)."""
        logp = logp.copy()
        if tree is not None and tree.max_token >= logp.shape[1]:
            raise ValueError(
                f"prefix_tree holds token id {tree.max_token}, outside the model's vocabulary [0, {logp.shape[1]})."
            )
        if tree is not None:
            skip = 0 if self.start_id is None else 1
            for row, ids in enumerate(output_ids):
                allowed = tree.allowed(ids[skip:])
                if not allowed and tree.node(ids[skip:]) is not None and self.end_id is not None:
                    allowed = [self.end_id]  # a leaf without an end token: only ending is possible
                banned = np.ones(logp.shape[1], dtype=bool)
                banned[allowed] = False
                logp[row, banned] = -np.inf
        if self.end_id is not None and output_ids.shape[1] + 1 < self.minlen:
            logp[:, self.end_id] = -np.inf
        return logp

    def _finishing(self, output_ids: np.ndarray, step: int, vocab: int, min_ends: int) -> np.ndarray:
        """[rows, vocab] bool: appending this token finishes the hypothesis."""
        finishing = np.zeros((len(output_ids), vocab), dtype=bool)
        if step == self.maxlen - 1:
            finishing[:] = True
        elif self.end_id is not None:
            ends = (output_ids == self.end_id).sum(axis=1)
            finishing[:, self.end_id] = ends + 1 >= min_ends
        return finishing

    # ------------------------------------------------------------------------------------------------ strategies
    def beam_search(self, inputs, topk: int, states=None, temperature: float = 1, min_ends: int = 1,
                    prefix_tree: PrefixTree | None = None, length_penalty: float | None = None,
                    early_stopping: bool | str = False, exact: bool = False) -> np.ndarray:
        """The output of a beam search of width `topk` (start and end tokens included).

        Scores are sums of log-probabilities. Three rules:

        - default (bert4keras): each step keeps the `topk` best hypotheses; when the best of them has ended, it is
          the output; otherwise the ended ones leave the beam, whose width becomes the number left. At `maxlen`
          the best hypothesis is the output.
        - `length_penalty=x` (transformers): the first `topk` of the `2 * topk` best candidates that end enter a
          pool of `topk` finished hypotheses scored `score / length ** x` (length: tokens generated, start token not
          counted); the best `topk` unended candidates continue. `early_stopping` False stops once the best live
          hypothesis, scored at its current length, cannot beat the worst of a full pool; True once the pool is full;
          'never' bounds the live hypothesis at `maxlen` when x > 0. The output is the pool's best.
        - `exact=True`: every finished hypothesis is kept aside and the search stops once the best of them scores at
          least as well as every unfinished one; with a beam as wide as the number of prefixes it is the optimum.

        Args:
            inputs: the model inputs of one example (each is given a batch axis).
            topk: beam width.
            states: passed to `predict`.
            temperature: logits are divided by it (finite, > 0).
            min_ends: an output ends at its `min_ends`-th end token.
            prefix_tree: a `PrefixTree` constraint (default: the constructor's).
            length_penalty: selects transformers' rule with this exponent.
            early_stopping: transformers' stopping rule (False, True or 'never'); needs `length_penalty`.
            exact: selects the exact rule.
        """
        topk = _check_int("topk", topk, 1)
        min_ends = _check_int("min_ends", min_ends, 1)
        temperature = _check_temperature(temperature)
        tree = self.prefix_tree if prefix_tree is None else prefix_tree
        if tree is not None and not isinstance(tree, PrefixTree):
            raise TypeError(f"prefix_tree must be a PrefixTree, got {type(tree).__name__}.")
        if length_penalty is not None:
            if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float, np.floating)) \
                    or not np.isfinite(length_penalty):
                raise ValueError(f"length_penalty must be a finite number, got {length_penalty!r}.")
            if exact:
                raise ValueError("exact=True and length_penalty are two different beam rules: pass one of them.")
        if early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}.")
        if early_stopping is not False and length_penalty is None:
            raise ValueError("early_stopping applies to the length_penalty rule: pass length_penalty too.")
        single = [np.array([i]) for i in inputs]
        if exact:
            return self._beam_exact(single, topk, states, temperature, min_ends, tree)
        if length_penalty is not None:
            return self._beam_pool(single, topk, states, temperature, min_ends, tree, float(length_penalty),
                                   early_stopping)
        return self._beam_bert4keras(single, topk, states, temperature, min_ends, tree)

    def _step_logp(self, single, output_ids, states, temperature, min_ends, tree):
        batch_inputs = [np.repeat(i, len(output_ids), axis=0) for i in single]
        logp, states = self.predict(batch_inputs, output_ids, states, temperature, "logits")
        return self._constrain(np.asarray(logp, dtype=np.float64), output_ids, min_ends, tree), states

    def _ends(self, output_ids: np.ndarray, min_ends: int) -> np.ndarray:
        """[rows] bool: the hypothesis has ended (last token is end_id, and it holds `min_ends` of them)."""
        if self.end_id is None or output_ids.shape[1] == 0:
            return np.zeros(len(output_ids), dtype=bool)
        counts = (output_ids == self.end_id).sum(axis=1)
        return (output_ids[:, -1] == self.end_id) & (counts >= min_ends)

    def _beam_bert4keras(self, single, topk, states, temperature, min_ends, tree):
        output_ids, scores, width = self.first_output_ids, np.zeros(1), topk
        for _ in range(self.maxlen):
            logp, states = self._step_logp(single, output_ids, states, temperature, min_ends, tree)
            candidates = (scores[:, None] + logp).ravel()
            order = np.argsort(-candidates, kind="stable")[:width]
            order = order[np.isfinite(candidates[order])]
            if len(order) == 0:
                raise RuntimeError("beam_search: every token was forbidden by the constraints.")
            rows, tokens = np.divmod(order, logp.shape[1])
            output_ids = np.concatenate([output_ids[rows], tokens[:, None]], axis=1)
            scores = candidates[order]
            ended = self._ends(output_ids, min_ends)
            if ended[0]:  # the best hypothesis of the beam has ended
                return output_ids[0]
            if ended.any():  # the ended ones leave; the beam narrows to the rest
                output_ids, scores, width = output_ids[~ended], scores[~ended], int((~ended).sum())
        return output_ids[0]

    def _beam_pool(self, single, topk, states, temperature, min_ends, tree, penalty, early_stopping):
        output_ids, scores = self.first_output_ids, np.zeros(1)
        pool: list[tuple[float, np.ndarray]] = []  # (normalised score, ids), best first, at most topk
        improvable = True
        for step in range(self.maxlen):
            logp, states = self._step_logp(single, output_ids, states, temperature, min_ends, tree)
            candidates = (scores[:, None] + logp).ravel()
            order = np.argsort(-candidates, kind="stable")[:2 * topk]
            order = order[np.isfinite(candidates[order])]
            if len(order) == 0:
                break
            rows, tokens = np.divmod(order, logp.shape[1])
            extended = np.concatenate([output_ids[rows], tokens[:, None]], axis=1)
            ended = self._ends(extended, min_ends) | (step == self.maxlen - 1)
            accepting = improvable and not (early_stopping is True and len(pool) == topk)
            if accepting:
                for rank in np.flatnonzero(ended[:topk]):
                    pool.append((candidates[order[rank]] / (step + 1) ** penalty, extended[rank]))
                pool = sorted(pool, key=lambda item: -item[0])[:topk]
            live = np.flatnonzero(~ended)[:topk]
            if len(live) == 0:
                break
            output_ids, scores = extended[live], candidates[order[live]]
            bound = self.maxlen if (early_stopping == "never" and penalty > 0) else step + 1
            if len(pool) == topk and scores[0] / bound ** penalty <= pool[-1][0]:
                improvable = False
            if not improvable or (early_stopping is True and len(pool) == topk):
                break
        if not pool:
            raise RuntimeError("beam_search found no finished output: every token was forbidden by the constraints.")
        return pool[0][1]

    def _beam_exact(self, single, topk, states, temperature, min_ends, tree):
        output_ids, scores = self.first_output_ids, np.zeros(1)
        best_ids, best_score = None, -np.inf
        for step in range(self.maxlen):
            logp, states = self._step_logp(single, output_ids, states, temperature, min_ends, tree)
            candidates = scores[:, None] + logp
            finishing = self._finishing(output_ids, step, logp.shape[1], min_ends)
            finished = np.where(finishing, candidates, -np.inf)
            flat = int(finished.argmax())
            if finished.flat[flat] > best_score:
                row, token = divmod(flat, logp.shape[1])
                best_score = finished.flat[flat]
                best_ids = np.concatenate([output_ids[row], [token]])
            alive = np.where(finishing, -np.inf, candidates).ravel()
            order = np.argsort(-alive, kind="stable")[:topk]
            order = order[np.isfinite(alive[order])]
            if len(order) == 0 or best_score >= alive[order[0]]:
                break
            rows, tokens = np.divmod(order, logp.shape[1])
            output_ids = np.concatenate([output_ids[rows], tokens[:, None]], axis=1)
            scores = alive[order]
        if best_ids is None:
            raise RuntimeError("beam_search found no finished output: every token was forbidden by the constraints.")
        return best_ids

    def random_sample(self, inputs, n: int, topk: int | None = None, topp: float | None = None, states=None,
                      temperature: float = 1, min_ends: int = 1, prefix_tree: PrefixTree | None = None,
                      always_keep_end: bool = False) -> list[np.ndarray]:
        """`n` sampled outputs (start and end tokens included), drawn with `np.random`. `topk=1` is greedy decoding.

        Args:
            inputs: the model inputs of one example (each is given a batch axis).
            n: number of outputs.
            topk: sample only among the `topk` most likely tokens.
            topp: sample only among the most likely tokens whose probabilities first reach `topp`.
            states: passed to `predict`.
            temperature: logits are divided by it (finite, > 0).
            min_ends: an output ends at its `min_ends`-th end token.
            prefix_tree: a `PrefixTree` constraint (default: the constructor's).
            always_keep_end: keep `end_id` among the candidates whatever topk/topp say (the "consistent" sampling
                that cannot fail to stop).
        """
        n = _check_int("n", n, 1)
        topk = _check_int("topk", topk, 1, none=True)
        min_ends = _check_int("min_ends", min_ends, 1)
        temperature = _check_temperature(temperature)
        if topp is not None and (isinstance(topp, bool) or not isinstance(topp, (int, float, np.floating))
                                 or not 0 < topp <= 1):
            raise ValueError(f"topp must be a number in (0, 1], got {topp!r}.")
        tree = self.prefix_tree if prefix_tree is None else prefix_tree
        if tree is not None and not isinstance(tree, PrefixTree):
            raise TypeError(f"prefix_tree must be a PrefixTree, got {type(tree).__name__}.")
        single = [np.array([i]) for i in inputs]
        output_ids = self.first_output_ids
        batch_inputs = single
        results = []
        for step in range(self.maxlen):
            logp, states = self.predict(batch_inputs, output_ids, states, temperature, "logits")
            logp = self._constrain(np.asarray(logp, dtype=np.float64), output_ids, min_ends, tree)
            if step == 0:
                logp = np.repeat(logp, n, axis=0)
                output_ids = np.repeat(output_ids, n, axis=0)
            probas = _filter_probas(softmax(logp), topk, topp, self.end_id if always_keep_end else None)
            if topk == 1:
                sample_ids = probas.argmax(axis=1)
            else:
                sample_ids = np.array([np.random.choice(len(p), p=p) for p in probas])
            output_ids = np.concatenate([output_ids, sample_ids[:, None]], axis=1)
            if self.end_id is not None:
                done = (sample_ids == self.end_id) & ((output_ids == self.end_id).sum(axis=1) >= min_ends)
                results.extend(output_ids[done])
                output_ids = output_ids[~done]
                if len(output_ids) == 0:
                    break
            batch_inputs = [np.repeat(i, len(output_ids), axis=0) for i in single]
        results.extend(output_ids)
        return results


def _filter_probas(probas: np.ndarray, topk: int | None, topp: float | None, keep: int | None) -> np.ndarray:
    """Zeroes what top-k / top-p exclude (keeping token `keep` if given) and renormalises each row."""
    original = probas
    probas = probas.copy()
    if topk is not None:
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}.")
        kth = -np.sort(-probas, axis=1)[:, min(topk, probas.shape[1]) - 1: min(topk, probas.shape[1])]
        probas[probas < kth] = 0
    if topp is not None:
        if not 0 < topp <= 1:
            raise ValueError(f"topp must be in (0, 1], got {topp}.")
        order = np.argsort(-probas, axis=1, kind="stable")
        sorted_p = np.take_along_axis(probas, order, axis=1)
        before = np.cumsum(sorted_p, axis=1) - sorted_p  # mass strictly above each token
        drop = np.zeros_like(probas, dtype=bool)
        np.put_along_axis(drop, order, before >= topp, axis=1)
        probas[drop] = 0
    if keep is not None:
        probas[:, keep] = original[:, keep]
    return probas / probas.sum(axis=1, keepdims=True)


def _check_int(name: str, value, low: int, none: bool = False):
    """`value` as an int >= `low`; TypeError / ValueError naming `name` otherwise (None passes when `none`)."""
    if value is None and none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__}).")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}.")
    return int(value)


def _check_temperature(temperature) -> float:
    if isinstance(temperature, (bool, np.bool_)) or not isinstance(temperature, (int, float, np.integer, np.floating)):
        raise TypeError(f"temperature must be a number, got {temperature!r} ({type(temperature).__name__}).")
    if not np.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature}.")
    return float(temperature)
