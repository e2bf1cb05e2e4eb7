"""Model-owned cached decoding of the zoo's causal / UniLM models (`decode_prepare`, `decode_start`, `decode_step`):
greedy decoding with the cache equals the uncached model token for token, and GPT-2's equals transformers'
`generate(do_sample=False)` on the same weights."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from helpers import in_subprocess, run_pytest_on_backend

from bert4x.models import build_transformer_model

TINY = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24,
            max_position=32)


def cached_greedy(t, prompts, steps, segment_ids=None):
    """A plain greedy loop over the decoding contract (prompts of different lengths in one batch)."""
    assert t.decoding_unsupported() is None
    prompt = t.decode_prepare(prompts, segment_ids, 4, steps)
    logits, cache = t.decode_start(prompt, steps)
    tokens = []
    for i in range(steps):
        token = np.argmax(np.asarray(keras.ops.convert_to_numpy(logits)), axis=-1).astype("int32")
        tokens.append(token)
        logits, cache = t.decode_step(keras.ops.convert_to_tensor(token), cache, i)
    return np.stack(tokens, axis=1)


def uncached_greedy(model, prompt, steps, segments=None, target_segment=0):
    """Greedy decoding that reruns the whole keras model on the growing sequence (one prompt, no padding)."""
    ids, seg = list(prompt), list(segments) if segments is not None else None
    out = []
    for _ in range(steps):
        inputs = [np.array([ids], "int32")]
        if len(model.inputs) > 1:
            inputs.append(np.array([seg if seg is not None else [0] * len(ids)], "int32"))
        probs = np.asarray(keras.ops.convert_to_numpy(model(inputs, training=False)))[0, -1]
        token = int(np.argmax(probs))
        out.append(token)
        ids.append(token)
        if seg is not None:
            seg.append(target_segment)
    return out


def randomize(t, seed=0):
    """Random weights everywhere (LayerNorms included) so that every path matters."""
    rng = np.random.default_rng(seed)
    for w in t.model.weights:
        w.assign(rng.normal(0, 0.5, w.shape).astype("float32") + (1.0 if w.path.endswith("gamma") else 0.0))


PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 3], [13]]


@pytest.mark.parametrize("model,application,extra", [
    ("gpt", "lm", {}),
    ("gpt", "lm", dict(segment_vocab_size=40, shared_segment_embeddings=True)),
    ("gpt2", "lm", {}),
    ("gpt2_ml", "lm", {}),
    ("albert", "lm", dict(embedding_size=8)),
    ("albert_unshared", "lm", dict(embedding_size=8)),
    ("albert", "lm", dict(embedding_size=8, hierarchical_position=True, max_position=4)),
])
def test_cached_greedy_equals_the_uncached_model(model, application, extra):
    t = build_transformer_model(dict(TINY, **{k: v for k, v in extra.items() if k == "max_position"}), model=model,
                                application=application, return_keras_model=False,
                                **{k: v for k, v in extra.items() if k != "max_position"})
    randomize(t)
    steps = 6
    cached = cached_greedy(t, PROMPTS, steps)
    for row, prompt in enumerate(PROMPTS):
        assert cached[row].tolist() == uncached_greedy(t.model, prompt, steps), f"prompt #{row}"


def test_unilm_cached_greedy_equals_the_uncached_model():
    t = build_transformer_model(dict(TINY), model="albert", application="unilm", embedding_size=8,
                                return_keras_model=False)
    randomize(t, 1)
    segments = [[0] * len(p) for p in PROMPTS]
    cached = cached_greedy(t, PROMPTS, 5, segments)
    for row, (prompt, seg) in enumerate(zip(PROMPTS, segments)):
        assert cached[row].tolist() == uncached_greedy(t.model, prompt, 5, seg, target_segment=1)


def test_decoding_unsupported_says_why():
    encoder = build_transformer_model(dict(TINY), model="albert", return_keras_model=False)
    assert "application='lm' or 'unilm'" in encoder.decoding_unsupported()
    with pytest.raises(ValueError, match="cannot decode"):
        encoder.decode_prepare([[1, 2]], None, 8, 4)
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
    t = build_transformer_model(str(tmp_path / "config.json"), str(tmp_path), model="gpt2", return_keras_model=False)
    steps = 8
    ours = cached_greedy(t, PROMPTS, steps)
    for row, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                              pad_token_id=0, eos_token_id=None)
        assert ours[row].tolist() == out[0, len(prompt):].tolist(), f"prompt #{row}"


@pytest.mark.skipif(in_subprocess, reason="this test launches the jax run itself")
def test_zoo_decoding_on_jax_backend():
    run_pytest_on_backend("jax", "tests/test_zoo_decoding.py", "-k", "generate or compiled")


def compiled_greedy(t, prompts, steps):
    """The whole greedy loop (prompt pass + `ops.fori_loop` over tokens) as one compiled function."""
    from keras import ops

    prompt = t.decode_prepare(prompts, None, 4, steps)

    def loop(prompt):
        logits, cache = t.decode_start(prompt, steps)
        tokens = ops.zeros((len(prompts), steps), "int32")

        def body(i, state):
            logits, cache, tokens = state
            token = ops.cast(ops.argmax(logits, axis=-1), "int32")
            tokens = ops.slice_update(tokens, [0, i], ops.expand_dims(token, 1))
            logits, cache = t.decode_step(token, cache, i)
            return logits, cache, tokens

        return ops.fori_loop(0, steps, body, (logits, cache, tokens))[2]

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        variables = t.decode_variables()

        def pure(values, prompt):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return loop(prompt)

        return np.asarray(jax.jit(pure)([v.value for v in variables], prompt))
    if backend == "tensorflow":
        import tensorflow as tf

        return np.asarray(tf.function(loop, jit_compile=True)(prompt))
    return np.asarray(keras.ops.convert_to_numpy(loop(prompt)))


@pytest.mark.parametrize("model,extra", [("gpt2", {}), ("albert", dict(embedding_size=8, application="unilm"))])
def test_compiled_loop_equals_the_step_by_step_loop(model, extra):
    t = build_transformer_model(dict(TINY), model=model, return_keras_model=False,
                                **({"application": "lm"} if model == "gpt2" else extra))
    randomize(t, 2)
    np.testing.assert_array_equal(compiled_greedy(t, PROMPTS, 5), cached_greedy(t, PROMPTS, 5))
