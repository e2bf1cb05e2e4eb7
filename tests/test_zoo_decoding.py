"""The zoo's models through `bert4x.generation.Generator` (the cached decoding contract, `decode_prepare` /
`decode_start` / `decode_step`): greedy, beam search and sampling over a batch of left-padded prompts of different
lengths equal, token for token, the same search run on the whole uncached keras model (the pure-Python beam rule of
test_beam_search.py fed with its log-probabilities); GPT-2's greedy output equals transformers'
`generate(do_sample=False)` on the same weights; NEZHA's cached log-probabilities equal the uncached model's at
every step. Two jax subprocesses repeat the compiled runs."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from helpers import in_subprocess, run_pytest_on_backend
from test_beam_search import ref_bert4keras

from bert4x.generation import Generator
from bert4x.models import build_transformer_model

TINY = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24,
            max_position=32)
T5_TINY = {"vocab_size": 40, "hidden_size": 16, "attention_head_size": 6, "intermediate_size": 24,
           "num_hidden_layers": 2, "num_decoder_layers": 2, "num_attention_heads": 3, "hidden_act": "relu",
           "relative_attention_num_buckets": 8, "relative_attention_max_distance": 12}
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]  # left-padded to different lengths in one batch
END, MAX_LEN, BEAMS = 3, 6, 3


def randomize(t, seed=0):
    """Random weights everywhere (LayerNorms included) so that every path matters; the end token is made likely
    enough that some outputs end early and others do not."""
    rng = np.random.default_rng(seed)
    for w in t.model.weights:
        value = rng.normal(0, 0.5, w.shape).astype("float32")
        if w.path.endswith(("gamma", "scale")):
            value += 1.0
        if w.path == "MLM-Bias/bias":
            value[END] += 1.0
        w.assign(value)


def build(model, application="lm", **options):
    if model.startswith("t5"):
        t = build_transformer_model(dict(T5_TINY), model=model, return_keras_model=False, **options)
    else:
        config = dict(TINY, max_position=options.pop("max_position", TINY["max_position"]))
        t = build_transformer_model(config, model=model, application=application, return_keras_model=False,
                                    **options)
    randomize(t)
    return t


def uncached_logp(t, prompt, unilm=False, is_t5=False):
    """seq -> log p(next token | prompt, seq), from the whole keras model rerun on the full sequence (no cache, no
    padding), memoised."""
    memo = {}

    def fn(seq):
        if seq not in memo:
            if is_t5:
                inputs = [np.array([prompt], "int32"), np.array([[0, *seq]], "int32")]
            else:
                ids = list(prompt) + list(seq)
                inputs = [np.array([ids], "int32")]
                if len(t.model.inputs) > 1:
                    inputs.append(np.array([[0] * len(prompt) + [int(unilm)] * len(seq)], "int32"))
            out = np.asarray(keras.ops.convert_to_numpy(t.model(inputs, training=False)), np.float64)[0, -1]
            if out.min() >= 0 and abs(out.sum() - 1) < 1e-3:  # a softmax head
                memo[seq] = np.log(np.maximum(out, 1e-30))
            else:
                memo[seq] = out - out.max() - np.log(np.exp(out - out.max()).sum())
        return memo[seq]

    return fn


CASES = {
    "gpt": ("gpt", "lm", {}),
    "gpt_segments": ("gpt", "lm", dict(segment_vocab_size=40, shared_segment_embeddings=True)),
    "gpt2": ("gpt2", "lm", {}),
    "gpt2_ml": ("gpt2_ml", "lm", {}),
    "albert_lm": ("albert", "lm", dict(embedding_size=8)),
    "albert_unshared_lm": ("albert_unshared", "lm", dict(embedding_size=8)),
    "albert_hierarchical": ("albert", "lm", dict(embedding_size=8, hierarchical_position=True, max_position=4)),
    "albert_unilm": ("albert", "unilm", dict(embedding_size=8)),
    "t5.1.0": ("t5.1.0", None, {}),
    # BERT shares ALBERT's cached step, so its factorised embedding and hierarchical positions decode too.
    "bert_factorised_hierarchical": ("bert", "lm", dict(embedding_size=8, hierarchical_position=True, max_position=4)),
}
# The search is compiled on jax (the subprocess run below) and for gpt2 with XLA on tensorflow; the other tensorflow
# runs are eager (the same code) because each search setting costs an XLA compilation.
COMPILED_ON_TF = {"gpt2"}


@pytest.mark.parametrize("case", list(CASES))
def test_generator_equals_the_uncached_model(case):
    model, application, options = CASES[case]
    t = build(model, application, **dict(options))
    is_t5 = model.startswith("t5")
    end = 1 if is_t5 else END
    jit = keras.backend.backend() == "jax" or case in COMPILED_ON_TF
    generator = Generator(t.model, pad_to_multiple=4, jit=jit)
    segments = [[0] * len(p) for p in PROMPTS] if application == "unilm" else None
    refs = [uncached_logp(t, p, unilm=application == "unilm", is_t5=is_t5) for p in PROMPTS]
    common = dict(max_len=MAX_LEN, end_id=end)
    greedy = generator.generate(PROMPTS, segments, **common)
    assert greedy == [ref_bert4keras(f, 1, MAX_LEN, end) for f in refs], "greedy"
    beam = generator.generate(PROMPTS, segments, num_beams=BEAMS, **common)
    assert beam == [ref_bert4keras(f, BEAMS, MAX_LEN, end) for f in refs], "beam"
    # Sampling: top_k=1 is greedy; with top_k=2 every token is one of the uncached model's two likeliest.
    assert generator.generate(PROMPTS, segments, do_sample=True, top_k=1, seed=3, **common) == greedy
    for f, out in zip(refs, generator.generate(PROMPTS, segments, do_sample=True, top_k=2, top_p=0.9, seed=4,
                                               **common)):
        assert out and all(token in np.argsort(-f(tuple(out[:i])))[:2] for i, token in enumerate(out)), out


@pytest.mark.parametrize("application", ["lm", "unilm"])
def test_nezha_generator_equals_the_uncached_model(application):
    # Relative distances clipped at 3, below the 12 positions of the longest prompt + output: clipping is exercised.
    t = build("nezha", application, max_relative_position=3)
    generator = Generator(t.model, pad_to_multiple=4, jit=keras.backend.backend() == "jax")
    segments = [[0] * len(p) for p in PROMPTS] if application == "unilm" else None
    refs = [uncached_logp(t, p, unilm=application == "unilm") for p in PROMPTS]
    assert generator.generate(PROMPTS, segments, max_len=MAX_LEN, end_id=END) == [
        ref_bert4keras(f, 1, MAX_LEN, END) for f in refs], "greedy"
    assert generator.generate(PROMPTS, segments, max_len=MAX_LEN, end_id=END, num_beams=BEAMS) == [
        ref_bert4keras(f, BEAMS, MAX_LEN, END) for f in refs], "beam"


@pytest.mark.parametrize("application", ["lm", "unilm"])
def test_nezha_cached_logits_equal_the_uncached_model(application):
    # Every step's log-probabilities, not only the argmax: the relative terms between each new token and the cache
    # (per row, the prompts being left-padded to different lengths) are those the whole model computes.
    t = build("nezha", application, max_relative_position=3)
    steps, forced = 5, [7, 9, 11, 13, 15]
    logits, cache = t.decode_start(t.decode_prepare(PROMPTS, [[0] * len(p) for p in PROMPTS], 4, steps), steps)
    cached = [keras.ops.convert_to_numpy(logits)]
    for i, token in enumerate(forced[:-1]):
        logits, cache = t.decode_step(np.full((len(PROMPTS),), token, "int32"), cache, i)
        cached.append(keras.ops.convert_to_numpy(logits))
    refs = [uncached_logp(t, p, unilm=application == "unilm") for p in PROMPTS]
    for i, step in enumerate(cached):
        top = step.max(-1, keepdims=True)
        logp = step - top - np.log(np.exp(step - top).sum(-1, keepdims=True))
        for row, ref in enumerate(refs):
            np.testing.assert_allclose(logp[row], ref(tuple(forced[:i])), atol=1e-4, err_msg=f"step {i} row {row}")


def test_decoding_unsupported_says_why():
    encoder = build_transformer_model(dict(TINY), model="albert", return_keras_model=False)
    assert "application='lm' or 'unilm'" in encoder.decoding_unsupported()
    with pytest.raises(ValueError, match="cannot decode"):
        encoder.decode_prepare([[1, 2]], None, 8, 4)
    with pytest.raises(ValueError, match="application='lm' or 'unilm'"):
        Generator(encoder.model)
    gpt = build_transformer_model(dict(TINY), model="gpt2", return_keras_model=False)
    assert gpt.decoding_unsupported() is None
    with pytest.raises(ValueError, match="exceeds the model's 32 positions"):
        gpt.decode_prepare([[1] * 30], None, 8, 4)
    with pytest.raises(ValueError, match="outside \\[0, 40\\)"):
        gpt.decode_prepare([[1, 99]], None, 8, 4)
    assert len(gpt.decode_variables()) == len(gpt.model.variables)


def test_gpt2_greedy_equals_transformers_generate(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0,
                                     attn_pdrop=0.0, embd_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.5)  # a peaked distribution: no near-ties between the top tokens
    hf.save_pretrained(str(tmp_path))
    model = build_transformer_model(str(tmp_path / "config.json"), str(tmp_path), model="gpt2")
    steps = 8
    ours = Generator(model, pad_to_multiple=4, jit=keras.backend.backend() == "jax").generate(PROMPTS, max_len=steps)
    for row, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                              pad_token_id=0, eos_token_id=None, use_cache=True)
        assert ours[row] == out[0, len(prompt):].tolist(), f"prompt #{row}"


@pytest.mark.skipif(in_subprocess, reason="this test launches the jax run itself")
def test_zoo_decoding_on_jax_backend():
    # The mixin's compiled loop with every search (ALBERT UniLM) and GPT-2's blocks against transformers; T5 v1.0's
    # greedy loop is compiled on jax by test_zoo_models.py's jax run (against transformers).
    run_pytest_on_backend("jax", "tests/test_zoo_decoding.py", "-k", "gpt2_greedy or albert_unilm")


@pytest.mark.skipif(in_subprocess, reason="this test launches the jax run itself")
def test_nezha_decoding_on_jax_backend():
    # NEZHA's relative terms against the cache inside jax's compiled loop (greedy and beam); 'lm' runs the same
    # step with a causal prompt mask, checked on tensorflow.
    run_pytest_on_backend("jax", "tests/test_zoo_decoding.py", "-k", "nezha and unilm")
