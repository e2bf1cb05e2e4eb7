"""Decoding: bert4keras-style AutoRegressiveDecoder, PrefixTree constraints, and the fast cached generator, which must
give token-for-token the same outputs as the uncached decoder on the same model (every beam rule: see also
test_beam_search.py)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from helpers import in_subprocess, run_pytest_on_backend

from bert4x.generation import Generator
from bert4x.models import build_transformer_model
from bert4x.snippets import AutoRegressiveDecoder, PrefixTree

END = 3


def make_model(model="bert", application="lm", vocab=40, seed=0, end_bias=-1.0, layers=2, **kwargs):
    """A tiny random LM with peaked distributions (no near-ties) whose end token is neither certain nor rare.
    Weights come from numpy, so the model is the same on every backend."""
    config = {"vocab_size": vocab, "hidden_size": 16, "num_hidden_layers": layers, "num_attention_heads": 2,
              "intermediate_size": 32}
    m = build_transformer_model(config, model=model, application=application, **kwargs)
    rng = np.random.default_rng(seed)
    for w in m.weights:
        if w.path.endswith("gamma"):
            value = 1 + 0.1 * rng.normal(size=w.shape)
        elif w.path.endswith(("beta", "bias")):
            value = 0.1 * rng.normal(size=w.shape)
        else:
            value = 0.5 * rng.normal(size=w.shape)
        if w.path == "MLM-Bias/bias" and end_bias is not None:
            value[END] = end_bias
        if w.path == "Embedding-Token/embeddings" and model == "roformer_v2" and end_bias is not None:
            value[END] *= 2.0  # no output bias in RoFormerV2: make END likelier through its tied row instead
        w.assign(value.astype("float32"))
    return m


class ModelDecoder(AutoRegressiveDecoder):
    """The bert4keras recipe: re-run the whole model on prompt + output for every token (no cache)."""

    def __init__(self, model, application, **kwargs):
        super().__init__(**kwargs)
        self.model, self.application = model, application

    def last_output(self, inputs, output_ids):
        token_ids, segment_ids = inputs
        target = 1 if self.application == "unilm" else 0
        token_ids = np.concatenate([token_ids, output_ids], 1)
        segment_ids = np.concatenate([segment_ids, np.full_like(output_ids, target)], 1)
        # Right padding to one length changes nothing for lm/unilm (later tokens are never attended to by earlier
        # ones, pads are hidden) and saves a compilation per length.
        length = token_ids.shape[1]
        pad = ((0, 0), (0, 32 - length))
        outputs = self.model.predict_on_batch([np.pad(token_ids, pad), np.pad(segment_ids, pad)])
        return np.asarray(outputs, np.float64)[:, length - 1]

    @AutoRegressiveDecoder.wraps(default_rtype="probas")
    def predict(self, inputs, output_ids, states):
        return self.last_output(inputs, output_ids)


class PenalisedDecoder(ModelDecoder):
    """Reference repetition penalty on raw logits (model built with with_mlm='linear')."""

    def __init__(self, model, application, penalty, **kwargs):
        super().__init__(model, application, **kwargs)
        self.penalty = penalty

    @AutoRegressiveDecoder.wraps(default_rtype="logits")
    def predict(self, inputs, output_ids, states):
        logits = self.last_output(inputs, output_ids)
        for row, ids in enumerate(output_ids):
            for token in set(ids.tolist()):
                value = logits[row, token]
                logits[row, token] = value / self.penalty if value > 0 else value * self.penalty
        return logits


def as_inputs(prompt):
    return [np.array(prompt), np.zeros(len(prompt), dtype=int)]


def sequence_logps(model, application, prompt, sequences):
    """log p(token | prompt, earlier tokens) at every position of every sequence: one uncached forward pass over
    the batch of `prompt + sequence` (right-padded), as a list of `[len(sequence), vocab]` arrays."""
    target = 1 if application == "unilm" else 0
    token_ids = np.zeros((len(sequences), 32), int)
    segment_ids = np.zeros((len(sequences), 32), int)
    for row, seq in enumerate(sequences):
        token_ids[row, :len(prompt) + len(seq)] = list(prompt) + list(seq)
        segment_ids[row, len(prompt):len(prompt) + len(seq)] = target
    probas = np.asarray(model.predict_on_batch([token_ids, segment_ids]), np.float64)
    return [np.log(probas[row, len(prompt) - 1:len(prompt) - 1 + len(seq)] + 1e-12)
            for row, seq in enumerate(sequences)]


def best_by_enumeration(model, application, prompt, candidates):
    """The candidate output with the highest summed log-probability, and that score."""
    logps = sequence_logps(model, application, prompt, candidates)
    scores = [sum(logp[i, token] for i, token in enumerate(seq)) for logp, seq in zip(logps, candidates)]
    best = int(np.argmax(scores))
    return list(candidates[best]), scores[best]


PROMPTS = [[2, 5, 6, 7, 8], [2, 9], [2, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]


# ------------------------------------------------------------------------------------------------ decoder (numpy)
def test_prefix_tree():
    tree = PrefixTree([[5, 6], [5, 7, 8], [5, 6], [9]], end_id=END)
    assert len(tree) == 3
    assert tree.allowed([]) == [5, 9] and tree.allowed([5]) == [6, 7] and tree.allowed([5, 6]) == [END]
    assert tree.allowed([6]) == [] and tree.node([6]) is None
    assert sorted(tree.sequences()) == [[5, 6, END], [5, 7, 8, END], [9, END]]
    arrays = tree.arrays()
    root = slice(arrays["node_start"][0], arrays["node_start"][0] + arrays["node_count"][0])
    assert arrays["edge_tokens"][root].tolist() == [5, 9] and int(arrays["max_fanout"]) == 2
    with pytest.raises(ValueError, match="empty"):
        PrefixTree([[1], []])
    with pytest.raises(ValueError, match="at least one"):
        PrefixTree([])


class Table(AutoRegressiveDecoder):
    """A bigram LM given by a table: row = last token (row `start` before any token)."""

    def __init__(self, table, first_row, **kwargs):
        super().__init__(**kwargs)
        self.table, self.first_row = np.asarray(table, float), first_row

    @AutoRegressiveDecoder.wraps(default_rtype="probas")
    def predict(self, inputs, output_ids, states):
        last = output_ids[:, -1] if output_ids.shape[1] else np.full(len(output_ids), self.first_row)
        return self.table[last]


def test_beam_search_rules_on_a_bigram_table():
    # [0] (p=.45) beats every longer output, but the unfinished [1] (p=.55) leads the beam at step 1: bert4keras's rule
    # drops [0] and returns [1, 0] (p=.275); the exact rule keeps [0].
    table = [[0.3, 0.3, 0.4], [0.5, 0.5, 0.0], [0.45, 0.55, 0.0]]
    decoder = Table(table, 2, start_id=None, end_id=0, maxlen=3)
    assert decoder.beam_search([np.zeros(1)], topk=2).tolist() == [1, 0]
    assert decoder.beam_search([np.zeros(1)], topk=2, exact=True).tolist() == [0]
    # transformers' rule: log(.45) / 1 = -0.80 against log(.275) / 2 = -0.65 with length_penalty=1.
    assert decoder.beam_search([np.zeros(1)], topk=2, length_penalty=1.0).tolist() == [1, 0]
    assert decoder.beam_search([np.zeros(1)], topk=2, length_penalty=0.0).tolist() == [0]
    assert decoder.random_sample([np.zeros(1)], 1, topk=1)[0].tolist() == [1, 0]  # greedy
    # minlen (start/end included) bans the early end; min_ends needs two end tokens.
    short = Table(table, 2, start_id=None, end_id=0, maxlen=3, minlen=2)
    assert short.beam_search([0], topk=2, exact=True).tolist() == [1, 0]
    twice = Table([[0.6, 0.1, 0.3], [0.5, 0.4, 0.1], [0.45, 0.55, 0.0]], 2, start_id=None, end_id=0, maxlen=3)
    assert twice.beam_search([0], topk=3, min_ends=2, exact=True).tolist() == [0, 0]  # p = .27; next [1, 0, 0] .165
    # With a start token, outputs carry it, and the tree constrains what follows it.
    started = Table(table, 2, start_id=2, end_id=0, maxlen=3)
    assert started.beam_search([0], topk=2, exact=True).tolist() == [2, 0]
    tree = PrefixTree([[1, 1]], end_id=0)
    for rule in ({}, {"exact": True}, {"length_penalty": 1.0}):
        assert started.beam_search([0], topk=2, prefix_tree=tree, **rule).tolist() == [2, 1, 1, 0]


def complete_outputs(vocab, maxlen, end_id):
    """Every complete output: it ends with end_id (and has no earlier one), or it reaches maxlen."""
    out = []
    for length in range(1, maxlen + 1):
        for seq in itertools.product(range(vocab), repeat=length):
            if end_id not in seq[:-1] and (length == maxlen or seq[-1] == end_id):
                out.append(seq)
    return out


@pytest.mark.parametrize("application", ["lm", "unilm"])
def test_beam_equals_exhaustive_search_on_a_tiny_lm(application):
    vocab, maxlen, end = 6, 3, 4
    model = make_model(application=application, vocab=vocab, seed=7, end_bias=None, layers=1)
    prompt = [2, 1, 5]
    decoder = ModelDecoder(model, application, start_id=None, end_id=end, maxlen=maxlen)

    best, best_score = best_by_enumeration(model, application, prompt, complete_outputs(vocab, maxlen, end))
    wide = vocab ** (maxlen - 1)  # at least as many beams as unfinished prefixes
    assert decoder.beam_search(as_inputs(prompt), topk=wide, exact=True).tolist() == best
    outputs, scores = Generator(model).generate([prompt], max_len=maxlen, end_id=end, num_beams=wide, exact=True,
                                                return_scores=True)
    assert outputs == [best]
    assert scores[0] == pytest.approx(best_score, abs=1e-4)


# ------------------------------------------------------------------------------------------------ cached == uncached
@pytest.mark.parametrize("model_name,application", [("bert", "lm"), ("roformer", "unilm"), ("roformer_v2", "lm")])
def test_cached_generation_equals_the_uncached_decoder(model_name, application):
    model = make_model(model_name, application, seed=2 if model_name == "roformer_v2" else 1)
    generator = Generator(model)
    decoder = ModelDecoder(model, application, start_id=None, end_id=END, maxlen=8, minlen=3)
    greedy = generator.generate(PROMPTS, max_len=8, min_len=3, end_id=END)
    expected = [decoder.random_sample(as_inputs(p), 1, topk=1)[0].tolist() for p in PROMPTS]
    assert greedy == expected
    assert all(len(o) >= 3 for o in greedy)
    beam = generator.generate(PROMPTS, max_len=8, min_len=3, end_id=END, num_beams=3)
    expected = [decoder.beam_search(as_inputs(p), topk=3).tolist() for p in PROMPTS]
    assert beam == expected
    outputs = greedy + beam
    for rule in ({"exact": True}, {"length_penalty": 1.0})[:2 if model_name == "roformer" else 1]:
        expected = [decoder.beam_search(as_inputs(p), topk=3, **rule).tolist() for p in PROMPTS]
        outputs += generator.generate(PROMPTS, max_len=8, min_len=3, end_id=END, num_beams=3, **rule)
        assert outputs[-len(PROMPTS):] == expected, rule
    assert len({len(o) for o in outputs}) > 1, "degenerate test: all outputs have the same length"
    # Batching must not matter: one prompt alone gives the same output as inside the batch.
    assert generator.generate(PROMPTS[2:], max_len=8, min_len=3, end_id=END, num_beams=3) == beam[2:]


def test_repetition_penalty_matches_the_reference_and_no_repeat_ngrams():
    model = make_model("bert", "lm", seed=2, end_bias=-5.0, with_mlm="linear")
    generator = Generator(model)
    decoder = PenalisedDecoder(model, "lm", 3.0, start_id=None, end_id=END, maxlen=10)
    penalised = generator.generate(PROMPTS, max_len=10, end_id=END, repetition_penalty=3.0)
    assert penalised == [decoder.random_sample(as_inputs(p), 1, topk=1)[0].tolist() for p in PROMPTS]
    plain = generator.generate(PROMPTS, max_len=10, end_id=END)
    assert penalised != plain
    for n in (1, 2, 3):
        for out in generator.generate(PROMPTS, max_len=10, end_id=END, no_repeat_ngram_size=n):
            grams = [tuple(out[i:i + n]) for i in range(len(out) - n + 1)]
            assert len(grams) == len(set(grams)), (n, out)


# ------------------------------------------------------------------------------------------------ sampling
def test_sampling():
    model = make_model("roformer", "unilm", seed=3)
    generator = Generator(model)
    greedy = generator.generate(PROMPTS, max_len=8, end_id=END)
    assert generator.generate(PROMPTS, max_len=8, end_id=END, do_sample=True, top_k=1, seed=5) == greedy
    assert generator.generate(PROMPTS, max_len=8, end_id=END, do_sample=True, top_p=1e-6, seed=5) == greedy
    first = generator.generate(PROMPTS * 4, max_len=8, end_id=END, do_sample=True, temperature=2.0, seed=1)
    assert first == generator.generate(PROMPTS * 4, max_len=8, end_id=END, do_sample=True, temperature=2.0, seed=1)
    assert first != generator.generate(PROMPTS * 4, max_len=8, end_id=END, do_sample=True, temperature=2.0, seed=2)
    # top_k=2: every sampled token is one of the two most likely (checked against the model, token by token).
    decoder = ModelDecoder(model, "unilm", start_id=None, end_id=END, maxlen=8)
    for prompt, out in zip(PROMPTS, generator.generate(PROMPTS, max_len=8, end_id=END, do_sample=True, top_k=2)):
        logp = sequence_logps(model, "unilm", prompt, [out])[0]
        assert all(token in np.argsort(-logp[i])[:2] for i, token in enumerate(out))
    # The numpy decoder's sampling: n outputs, each ending with END or reaching maxlen.
    samples = decoder.random_sample(as_inputs(PROMPTS[0]), 5, topp=0.9, always_keep_end=True)
    assert len(samples) == 5 and all(s[-1] == END or len(s) == 8 for s in samples)


# ------------------------------------------------------------------------------------------------ prefix tree
def test_prefix_tree_constrained_decoding():
    vocab = 40
    model = make_model("roformer", "unilm", vocab=vocab, seed=4, end_bias=None)
    rng = np.random.default_rng(0)
    names = [rng.integers(4, vocab, size=rng.integers(1, 5)).tolist() for _ in range(30)]
    names += [names[0][:1], names[1] + [7]]  # a name that is a prefix of another, and one extending another
    tree = PrefixTree(names, end_id=END)
    paths = tree.sequences()
    generator = Generator(model)
    decoder = ModelDecoder(model, "unilm", start_id=None, end_id=END, maxlen=8, prefix_tree=tree)
    for options in ({}, {"do_sample": True, "seed": 3}, {"num_beams": 4}):
        for out in generator.generate(PROMPTS * 2, max_len=8, end_id=END, prefix_tree=tree, **options):
            assert out in paths, (options, out)
    for sample in decoder.random_sample(as_inputs(PROMPTS[0]), 6):
        assert sample.tolist() in paths
    # Constrained beam search == the best tree path by enumeration (model log-likelihood of each path).
    for prompt in PROMPTS:
        best, _ = best_by_enumeration(model, "unilm", prompt, paths)
        beams = len(paths)
        assert decoder.beam_search(as_inputs(prompt), topk=beams, exact=True).tolist() == best
        assert generator.generate([prompt], max_len=8, end_id=END, prefix_tree=tree, num_beams=beams,
                                  exact=True) == [best]


# ------------------------------------------------------------------------------------------------ errors
def test_models_that_cannot_decode_are_refused():
    encoder = build_transformer_model({"vocab_size": 30, "hidden_size": 8, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "intermediate_size": 16})
    with pytest.raises(ValueError, match="application='lm' or 'unilm'"):
        Generator(encoder)
    with pytest.raises(TypeError, match="bert4x model"):
        Generator("model.h5")
    # The Transformer and its keras model both work, and give the same outputs.
    transformer = build_transformer_model({"vocab_size": 30, "hidden_size": 8, "num_hidden_layers": 1,
                                           "num_attention_heads": 2, "intermediate_size": 16}, application="lm",
                                          return_keras_model=False)
    assert transformer.model.transformer is transformer and transformer.decoding_unsupported() is None
    assert Generator(transformer).generate([[2, 5]], max_len=4) == Generator(transformer.model).generate(
        [[2, 5]], max_len=4)


def test_models_loaded_from_keras_files_generate_like_the_original(tmp_path):
    import keras

    prompts = [[2, 5, 6, 7], [2, 9]]
    for n, (model, application) in enumerate([("bert", "unilm"), ("roformer", "lm")]):
        original = make_model(model, application, layers=1)
        original.save(tmp_path / f"m{n}.keras")
        loaded = keras.models.load_model(tmp_path / f"m{n}.keras")
        assert loaded is not original and loaded.transformer.model is loaded
        for options in (dict(max_len=6, end_id=END), dict(max_len=6, end_id=END, num_beams=3)):
            want = Generator(original).generate(prompts, **options)
            assert Generator(loaded).generate(prompts, **options) == want
            assert any(len(row) > 1 for row in want)
    # A record that does not rebuild the saved graph is not trusted: the file loads layer by layer, with a warning.
    import json
    import zipfile

    with zipfile.ZipFile(tmp_path / "m1.keras") as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(files["config.json"])
    config["config"]["bert4x_transformer"]["kwargs"]["hidden_act"] = "relu"
    files["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(tmp_path / "tampered.keras", "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    with pytest.warns(UserWarning, match="did not give the saved graph"):
        fallback = keras.models.load_model(tmp_path / "tampered.keras")
    assert not hasattr(fallback, "transformer")
    inputs = [np.array([[2, 5, 6]]), np.zeros((1, 3), "int32")]
    np.testing.assert_allclose(fallback.predict(inputs, verbose=0), original.predict(inputs, verbose=0), atol=1e-6)
    # A new keras.Model around a bert4x model's layers has no decoding methods: a clear TypeError says what to do.
    wrapped = keras.Model(original.inputs, original.outputs)
    with pytest.raises(TypeError, match="build_transformer_model and load the weights"):
        Generator(wrapped)


@pytest.mark.skipif(in_subprocess, reason="this test launches the jax run itself")
def test_generation_on_jax_backend():
    run_pytest_on_backend("jax", "tests/test_generation.py", "-k", "exhaustive or uncached or sampling or prefix_tree")
