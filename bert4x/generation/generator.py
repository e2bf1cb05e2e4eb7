"""`Generator` and `generate`: the public side of generation. They check that a model implements the decoding
interface, validate the search options into a `_Search`, compile the search once per setting and backend, and turn
its output into token lists."""

from __future__ import annotations

import contextlib
import math
import numbers
import weakref
from collections.abc import Callable, Sequence

import keras
import numpy as np
from keras import ops

from bert4x.generation.search import _Search, _Searcher
from bert4x.snippets.decoding import PrefixTree

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
