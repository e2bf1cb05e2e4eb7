"""application='lm' and 'unilm' for every BERT-family model, proven by perturbation: what a position may not see
cannot change its output, and what it may see does."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import in_subprocess, run_pytest_on_backend

from bert4x.models import build_transformer_model

MODELS = ["bert", "wobert", "roformer", "roformer_v2"]
CONFIG = {"vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
          "intermediate_size": 32}
LENGTH, SOURCE = 10, 5  # unilm: positions 0-4 are segment 0 (source), 5-9 segment 1 (target)


def build(model, application, **kwargs):
    m = build_transformer_model(CONFIG, model=model, application=application, **kwargs)
    rng = np.random.default_rng(0)
    for w in m.weights:  # non-trivial norms and biases too
        scale = 0.1 if w.path.endswith(("beta", "bias")) else 0.3
        offset = 1.0 if w.path.endswith("gamma") else 0.0
        w.assign((offset + scale * rng.normal(size=w.shape)).astype("float32"))
    return m


def inputs(batch=2):
    rng = np.random.default_rng(1)
    token_ids = rng.integers(5, CONFIG["vocab_size"], size=(batch, LENGTH)).astype("int32")
    segment_ids = np.zeros_like(token_ids)
    segment_ids[:, SOURCE:] = 1
    return token_ids, segment_ids


def perturbed(token_ids, position):
    out = token_ids.copy()
    out[:, position] = 5 + (out[:, position] - 5 + 17) % (CONFIG["vocab_size"] - 5)
    return out


def changed(a, b, tolerance=1e-5):
    """Per position: does the output differ? `[length]` bool over the whole batch."""
    return np.abs(a - b).max(axis=(0, 2)) > tolerance


@pytest.mark.parametrize("model", MODELS)
def test_lm_and_unilm_output_the_next_token_distribution(model):
    token_ids, segment_ids = inputs()
    for application in ("lm", "unilm"):
        probas = build(model, application).predict([token_ids, segment_ids], verbose=0)
        assert probas.shape == (2, LENGTH, CONFIG["vocab_size"])
        np.testing.assert_allclose(probas.sum(-1), 1.0, atol=1e-5)
    logits = build(model, "lm", with_mlm="linear").predict([token_ids, segment_ids], verbose=0)
    assert logits.shape == (2, LENGTH, CONFIG["vocab_size"]) and logits.min() < 0


@pytest.mark.parametrize("model", MODELS)
def test_lm_mask_by_perturbation(model):
    m = build(model, "lm")
    token_ids, segment_ids = inputs()
    base = m.predict([token_ids, segment_ids], verbose=0)
    for position in (0, 4, 9):
        diff = changed(base, m.predict([perturbed(token_ids, position), segment_ids], verbose=0))
        assert not diff[:position].any(), f"{model}: an earlier output depends on token {position}"
        assert diff[position:].all(), f"{model}: a later output ignores token {position}"
    # Padding on the right changes no real position.
    padded = np.pad(token_ids, ((0, 0), (0, 3)))
    out = m.predict([padded, np.pad(segment_ids, ((0, 0), (0, 3)))], verbose=0)[:, :LENGTH]
    np.testing.assert_allclose(out, base, atol=1e-5)


@pytest.mark.parametrize("model", MODELS)
def test_unilm_mask_by_perturbation(model):
    m = build(model, "unilm")
    token_ids, segment_ids = inputs()
    base = m.predict([token_ids, segment_ids], verbose=0)
    # A source token is seen by every position (the source is bidirectional).
    for position in (0, SOURCE - 1):
        assert changed(base, m.predict([perturbed(token_ids, position), segment_ids], verbose=0)).all()
    # A target token is seen by itself and later targets only; never by the source.
    for position in (SOURCE, SOURCE + 2, LENGTH - 1):
        diff = changed(base, m.predict([perturbed(token_ids, position), segment_ids], verbose=0))
        assert not diff[:position].any(), f"{model}: target token {position} leaks into earlier outputs"
        assert diff[position:].all()
    # The source outputs do not depend on the target at all: drop it entirely.
    source_only = m.predict([token_ids[:, :SOURCE], segment_ids[:, :SOURCE]], verbose=0)
    np.testing.assert_allclose(source_only, base[:, :SOURCE], atol=1e-5)
    # For contrast, the encoder application sees everything.
    encoder = build(model, "encoder")
    e_base = encoder.predict([token_ids, segment_ids], verbose=0)
    assert changed(e_base, encoder.predict([perturbed(token_ids, LENGTH - 1), segment_ids], verbose=0)).all()


@pytest.mark.skipif(in_subprocess, reason="this test launches the jax run itself")
def test_applications_on_jax_backend():
    run_pytest_on_backend("jax", "tests/test_applications.py", "-k", "perturbation")
