"""Beam search rules, each checked against an independent pure-Python reimplementation written from its definition:
bert4keras's (the default), transformers' (`length_penalty`) and the exact search (`exact=True`), in the compiled
`Generator` and in `AutoRegressiveDecoder`, on a bigram table wrapped as a model and on a tiny bert4x UniLM. Also the
argument checks of generation (issue 28) and that a failed call leaves the model intact."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
from helpers import in_subprocess, run_pytest_on_backend
from keras import ops

from bert4x.generation import Generator
from bert4x.models import build_transformer_model
from bert4x.snippets import AutoRegressiveDecoder, PrefixTree

END = 0


# ------------------------------------------------------------------------------------------------ references
def ref_bert4keras(logp, k, max_len, end, min_len=1):
    """bert4keras: keep the k best by total log-probability; if the best has ended, return it; otherwise drop the
    ended ones and continue with k = how many are left; at max_len return the best."""
    beam = [((), 0.0)]
    for step in range(max_len):
        candidates = []
        for seq, score in beam:
            lp = logp(seq)
            for token in range(len(lp)):
                if token == end and step + 1 < min_len:
                    continue
                if lp[token] > -math.inf:
                    candidates.append((seq + (token,), score + lp[token]))
        candidates.sort(key=lambda c: -c[1])
        beam = candidates[:k]
        if beam[0][0][-1] == end:
            return list(beam[0][0])
        unfinished = [c for c in beam if c[0][-1] != end]
        if len(unfinished) < len(beam):
            beam, k = unfinished, len(unfinished)
    return list(beam[0][0])


def ref_transformers(logp, k, max_len, end, length_penalty, early_stopping=False, min_len=1):
    """transformers' beam search: the 2k best candidates; those among the first k that end go to a pool of k
    finished hypotheses scored score / length ** penalty; the k best unended ones continue; stop by the heuristic."""
    beam, pool, can_improve = [((), 0.0)], [], True
    for step in range(max_len):
        candidates = []
        for seq, score in beam:
            lp = logp(seq)
            for token in range(len(lp)):
                if token == end and step + 1 < min_len:
                    continue
                if lp[token] > -math.inf:
                    candidates.append((seq + (token,), score + lp[token]))
        candidates.sort(key=lambda c: -c[1])
        candidates = candidates[:2 * k]
        last = step == max_len - 1
        pool_open = can_improve and not (early_stopping is True and len(pool) == k)
        for rank, (seq, score) in enumerate(candidates):
            if rank < k and (seq[-1] == end or last) and pool_open:
                pool.append((seq, score / (step + 1) ** length_penalty))
        pool = sorted(pool, key=lambda c: -c[1])[:k]
        beam = [c for c in candidates if not (c[0][-1] == end or last)][:k]
        if not beam:
            break
        length = max_len if (early_stopping == "never" and length_penalty > 0) else step + 1
        if len(pool) == k and beam[0][1] / length ** length_penalty <= pool[-1][1]:
            can_improve = False
        if not can_improve or (early_stopping is True and len(pool) == k):
            break
    return list(pool[0][0])


def ref_exact(logp, k, max_len, end, min_len=1):
    """Finished hypotheses are kept aside; stop when the best finished one beats every unfinished one."""
    beam, best = [((), 0.0)], ((), -math.inf)
    for step in range(max_len):
        candidates = []
        for seq, score in beam:
            lp = logp(seq)
            for token in range(len(lp)):
                if token == end and step + 1 < min_len:
                    continue
                if lp[token] > -math.inf:
                    candidates.append((seq + (token,), score + lp[token]))
        for seq, score in candidates:
            if (seq[-1] == end or step == max_len - 1) and score > best[1]:
                best = (seq, score)
        alive = sorted([c for c in candidates if c[0][-1] != end and step < max_len - 1], key=lambda c: -c[1])[:k]
        if not alive or best[1] >= alive[0][1]:
            break
        beam = alive
    return list(best[0])


def reference(rule, logp, k, max_len, end, min_len=1):
    if rule == "exact":
        return ref_exact(logp, k, max_len, end, min_len)
    if rule == "bert4keras":
        return ref_bert4keras(logp, k, max_len, end, min_len)
    return ref_transformers(logp, k, max_len, end, rule[0], rule[1], min_len)


def rule_kwargs(rule):
    if rule == "exact":
        return {"exact": True}
    if rule == "bert4keras":
        return {}
    return {"length_penalty": rule[0], "early_stopping": rule[1]}


RULES = ["bert4keras", "exact", (1.0, False), (0.0, False), (2.0, "never"), (1.0, True)]


# ------------------------------------------------------------------------------------------------ a bigram model
class BigramLM:
    """A model through the decoding interface only: the next-token logits are a row of a fixed table, chosen by the
    last token (the prompt's last token first)."""

    def __init__(self, logits: np.ndarray):
        self.table = np.asarray(logits, "float32")
        self.vocab_size = self.table.shape[1]

    def decoding_unsupported(self):
        return None

    def decode_variables(self):
        return []

    def decode_prepare(self, prompts, segment_ids, pad_to_multiple, max_len):
        if not prompts or not all(prompts):
            raise ValueError("BigramLM: empty prompt.")
        return {"last": np.asarray([p[-1] for p in prompts], "int32")}

    def decode_start(self, prompt, max_len):
        last = ops.convert_to_tensor(prompt["last"], "int32")
        return ops.take(ops.convert_to_tensor(self.table), last, axis=0), {"last": last}

    def decode_step(self, token_ids, cache, index):
        token_ids = ops.cast(token_ids, "int32")
        return ops.take(ops.convert_to_tensor(self.table), token_ids, axis=0), {"last": token_ids}

    def logp(self, first):
        def fn(seq):
            row = self.table[seq[-1] if seq else first].astype(np.float64)
            return row - row.max() - np.log(np.exp(row - row.max()).sum())

        return fn


class TableDecoder(AutoRegressiveDecoder):
    def __init__(self, model: BigramLM, first: int, **kwargs):
        super().__init__(start_id=None, **kwargs)
        self.model, self.first = model, first

    @AutoRegressiveDecoder.wraps(default_rtype="logits")
    def predict(self, inputs, output_ids, states):
        last = output_ids[:, -1] if output_ids.shape[1] else np.full(len(output_ids), self.first)
        return self.model.table[last]


def random_bigram(seed, vocab=7, sharpness=2.0):
    rng = np.random.default_rng(seed)
    return BigramLM(sharpness * rng.normal(size=(vocab, vocab)))


@pytest.mark.parametrize("seed", range(4))
def test_every_rule_equals_its_reference_on_bigram_tables(seed):
    model = random_bigram(seed)
    eager = Generator(model, pad_to_multiple=1, jit=False)
    compiled = Generator(model, pad_to_multiple=1)  # each setting compiles: one seed and width only
    prompts = [[1], [2], [3], [5]]
    for k in (1, 2, 3):
        for rule in RULES:
            for max_len, min_len in ((6, 1), (5, 3)):
                expected = [reference(rule, model.logp(p[-1]), k, max_len, END, min_len) for p in prompts]
                if k > 1:
                    generator = compiled if (seed, k, min_len) == (0, 2, 1) else eager
                    got = generator.generate(prompts, max_len=max_len, min_len=min_len, end_id=END, num_beams=k,
                                             **rule_kwargs(rule))
                    assert got == expected, (seed, k, rule, max_len)
                for p, e in zip(prompts, expected):
                    decoder = TableDecoder(model, p[-1], end_id=END, maxlen=max_len, minlen=min_len)
                    assert decoder.beam_search([np.zeros(1)], topk=k, **rule_kwargs(rule)).tolist() == e, (k, rule)


def weak_table():
    """A weakly trained LM: the end token is the second choice after the prompt (p=.35) and likely after any first
    token, so the bare end token has the highest probability of any output, though greedy says more."""
    vocab = 5
    probs = np.full((vocab, vocab), 0.1)
    probs[:, END] = 0.55
    probs[4] = [0.35, 0.45, 0.1, 0.05, 0.05]  # row of the prompt's last token
    probs /= probs.sum(axis=1, keepdims=True)
    return BigramLM(np.log(probs))


def test_weak_model_exact_search_returns_the_empty_output_and_the_default_does_not():
    model = weak_table()
    generator = Generator(model, pad_to_multiple=1)
    assert generator.generate([[4]], max_len=5, end_id=END, num_beams=3, exact=True) == [[END]]
    default = generator.generate([[4]], max_len=5, end_id=END, num_beams=3)
    assert default == [ref_bert4keras(model.logp(4), 3, 5, END)] and default[0] != [END]
    penalised = generator.generate([[4]], max_len=5, end_id=END, num_beams=3, length_penalty=1.0)
    assert penalised == [ref_transformers(model.logp(4), 3, 5, END, 1.0)] and penalised[0] != [END]
    decoder = TableDecoder(model, 4, end_id=END, maxlen=5)
    assert decoder.beam_search([np.zeros(1)], topk=3).tolist() == default[0]
    assert decoder.beam_search([np.zeros(1)], topk=3, exact=True).tolist() == [END]


# ------------------------------------------------------------------------------------------------ a tiny UniLM
def tiny_unilm(seed=3, vocab=12, end_bias=3.0):
    model = build_transformer_model({"vocab_size": vocab, "hidden_size": 16, "num_hidden_layers": 1,
                                     "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 16},
                                    application="unilm", with_mlm="linear")
    rng = np.random.default_rng(seed)
    for w in model.weights:
        value = (1.0 if w.path.endswith("gamma") else 0.0) + 0.6 * rng.normal(size=w.shape)
        if w.path == "MLM-Bias/bias":
            value[END] = end_bias
        w.assign(value.astype("float32"))
    return model


def unilm_logp(model, prompt):
    """log p(next | prompt, seq) by running the whole (uncached) model on prompt + seq, right-padded to 16."""
    memo = {}

    def fn(seq):
        if seq not in memo:
            ids = list(prompt) + list(seq)
            token_ids = np.zeros((1, 16), "int32")
            segment_ids = np.zeros((1, 16), "int32")
            token_ids[0, :len(ids)] = ids
            segment_ids[0, len(prompt):len(ids)] = 1
            logits = np.asarray(model.predict_on_batch([token_ids, segment_ids]), np.float64)[0, len(ids) - 1]
            memo[seq] = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
        return memo[seq]

    return fn


def test_every_rule_equals_its_reference_on_a_tiny_unilm():
    model = tiny_unilm()
    generator = Generator(model)
    prompts = [[2, 5, 6, 7], [2, 9]]
    outputs = []
    for rule in ("bert4keras", "exact", (1.0, False)):
        expected = [reference(rule, unilm_logp(model, p), 3, 5, END) for p in prompts]
        got = generator.generate(prompts, max_len=5, end_id=END, num_beams=3, **rule_kwargs(rule))
        assert got == expected, rule
        outputs += got
    assert len({len(o) for o in outputs}) > 1, "degenerate test: every output has the same length"


# ------------------------------------------------------------------------------------------------ argument checks
def small_lm():
    return build_transformer_model({"vocab_size": 20, "hidden_size": 8, "num_hidden_layers": 1,
                                    "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 12},
                                   application="unilm")


BAD_GENERATE = [
    ({"temperature": float("nan"), "do_sample": True}, ValueError, "temperature"),
    ({"temperature": -1.0, "do_sample": True}, ValueError, "temperature"),
    ({"temperature": 0, "do_sample": True}, ValueError, "temperature"),
    ({"num_beams": 2.5}, TypeError, "num_beams"),
    ({"num_beams": 0}, ValueError, "num_beams"),
    ({"min_len": 5, "max_len": 3}, ValueError, "min_len"),
    ({"max_len": 0}, ValueError, "max_len"),
    ({"top_k": 0, "do_sample": True}, ValueError, "top_k"),
    ({"top_p": 1.5, "do_sample": True}, ValueError, "top_p"),
    ({"top_p": 0.0, "do_sample": True}, ValueError, "top_p"),
    ({"end_id": 20}, ValueError, "end_id"),
    ({"length_penalty": 1.0}, ValueError, "num_beams > 1"),
    ({"num_beams": 2, "exact": True, "length_penalty": 1.0}, ValueError, "exact"),
    ({"num_beams": 2, "length_penalty": 1.0, "early_stopping": "sometimes"}, ValueError, "early_stopping"),
    ({"end_id": 1, "prefix_tree": PrefixTree([[3, 25]], end_id=1)}, ValueError, "prefix_tree"),
]


@pytest.fixture(scope="module")
def lm_generator():
    return Generator(small_lm())


@pytest.mark.parametrize("kwargs,error,message", BAD_GENERATE, ids=[str(c[0]) for c in BAD_GENERATE])
def test_generate_argument_checks(lm_generator, kwargs, error, message):
    with pytest.raises(error, match=message):
        lm_generator.generate([[2, 5, 6]], **kwargs)


BAD_INPUTS = [
    ([[2, -1, 5]], None, ValueError, r"prompts\[0\] has token ids outside \[0, 20\)"),
    ([[2, 5], [2, 20]], None, ValueError, r"prompts\[1\] has token ids outside \[0, 20\)"),
    ([[2, 5]], [[0, 2]], ValueError, r"segment_ids\[0\] has ids outside \[0, 2\)"),
    ([[2, 5]], [[0, -1]], ValueError, "type_vocab_size"),
    ([[2, 5]], [[0]], ValueError, "segment_ids"),
    ([[2, 5, 6, 7, 8, 9, 10, 11, 12]], None, ValueError, "12 learned positions"),
    ([[2], []], None, ValueError, r"prompts\[1\] is empty"),
    ([], None, ValueError, "prompts is empty"),
    ([[2, 5.5]], None, TypeError, "integers"),
    ("text", None, TypeError, "prompts"),
]


@pytest.mark.parametrize("prompts,segments,error,message", BAD_INPUTS, ids=[str(c[-1]) for c in BAD_INPUTS])
def test_generate_input_checks(lm_generator, prompts, segments, error, message):
    with pytest.raises(error, match=message):
        lm_generator.generate(prompts, segments, max_len=4)


def test_pad_to_multiple_check():
    with pytest.raises(ValueError, match="pad_to_multiple"):
        Generator(random_bigram(0), pad_to_multiple=0)
    with pytest.raises(TypeError, match="pad_to_multiple"):
        Generator(random_bigram(0), pad_to_multiple=2.0)


def test_decoder_argument_checks():
    model = random_bigram(0)
    with pytest.raises(ValueError, match="minlen"):
        TableDecoder(model, 1, end_id=END, maxlen=3, minlen=5)
    with pytest.raises(TypeError, match="maxlen"):
        TableDecoder(model, 1, end_id=END, maxlen=3.0)
    decoder = TableDecoder(model, 1, end_id=END, maxlen=3)
    for temperature in (-1, 0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            decoder.random_sample([np.zeros(1)], 1, temperature=temperature)
        with pytest.raises(ValueError, match="temperature"):
            decoder.beam_search([np.zeros(1)], topk=2, temperature=temperature)
    with pytest.raises(TypeError, match="topk"):
        decoder.beam_search([np.zeros(1)], topk=2.5)
    with pytest.raises(ValueError, match="topp"):
        decoder.random_sample([np.zeros(1)], 1, topp=1.5)
    with pytest.raises(ValueError, match="prefix_tree holds token id 9"):
        decoder.beam_search([np.zeros(1)], topk=2, prefix_tree=PrefixTree([[3, 9]], end_id=END))
    with pytest.raises(ValueError, match="early_stopping"):
        decoder.beam_search([np.zeros(1)], topk=2, early_stopping=True)


# ------------------------------------------------------------------------------------ failures leave the model intact
def test_a_failed_generate_leaves_the_model_intact():
    model = small_lm()
    generator = Generator(model)
    prompts = [[2, 5, 6], [2, 7]]
    before = generator.generate(prompts, max_len=4, num_beams=2)
    weights = [np.array(w) for w in model.get_weights()]
    with pytest.raises(ValueError, match="outside"):
        generator.generate([[2, 50]], max_len=4)
    # A failure inside the compiled search (while tracing) must not leave the variables in a traced state either.
    transformer = model.transformer
    original = transformer.decode_step

    def broken(*args):
        raise RuntimeError("broken step")

    transformer.decode_step = broken
    try:
        with pytest.raises(RuntimeError, match="broken step"):
            Generator(model).generate(prompts, max_len=4, num_beams=3)
    finally:
        transformer.decode_step = original
    assert generator.generate(prompts, max_len=4, num_beams=2) == before
    for old, new in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(old, new)
    token_ids = np.array([[2, 5, 6, 0]], "int32")
    assert model.predict([token_ids, np.zeros_like(token_ids)], verbose=0).shape == (1, 4, 20)
    assert keras.ops.convert_to_numpy(model([token_ids, np.zeros_like(token_ids)])).shape == (1, 4, 20)


@pytest.mark.skipif(in_subprocess, reason="this test launches the jax run itself")
def test_beam_search_on_jax_backend():
    run_pytest_on_backend("jax", "tests/test_beam_search.py", "-k", "bigram_tables and 0 or intact or checks")
