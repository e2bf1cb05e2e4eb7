"""`residual_attention_scores=True` (RealFormer): each layer's pre-softmax scores are added to the next layer's.

Checked by perturbation against numpy: layer 1's scores equal its own scale * q1.k1 plus layer 0's scale * q0.k0,
before and after layer 0's query kernel changes; with the option off the model is the plain one."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from harness import check_model

from bert4x.models import build_transformer_model

CFG = dict(vocab_size=40, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
HEADS, HEAD = 2, 4


def _ids():
    ids = np.random.default_rng(0).integers(1, 40, size=(2, 6)).astype("int32")
    ids[1, 4:] = 0
    return [ids, np.zeros_like(ids)]


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x), np.float64)


def own_scores(h: np.ndarray, attention) -> np.ndarray:
    """scale * q.k of one layer from its input `h` `[batch, len, hidden]` and its fused q|k|v kernel (numpy)."""
    kernel, bias = (_np(w) for w in attention.qkv_dense.weights)
    qkv = (h @ kernel + bias).reshape(h.shape[0], h.shape[1], 3, HEADS, HEAD)
    return np.einsum("bqhd,bkhd->bhqk", qkv[:, :, 0], qkv[:, :, 1]) / np.sqrt(HEAD)


def test_layer_0_changes_reach_layer_1_scores_through_the_residual_path():
    t = build_transformer_model(dict(CFG), residual_attention_scores=True, return_keras_model=False)
    m = t.model
    a0, a1 = m.get_layer("Transformer-0-MultiHeadSelfAttention"), m.get_layer("Transformer-1-MultiHeadSelfAttention")
    probe = keras.Model(m.inputs, [m.get_layer("Embedding-Dropout").output, a0.output[1],
                                   m.get_layer("Transformer-0-FeedForward-Norm").output, a1.output[1]])
    inputs = _ids()

    def check():
        h0, scores0, h1, scores1 = (_np(o) for o in probe(inputs, training=False))
        np.testing.assert_allclose(scores0, own_scores(h0, a0), atol=1e-4)
        np.testing.assert_allclose(scores1, own_scores(h1, a1) + own_scores(h0, a0), atol=1e-4)
        return scores1, own_scores(h1, a1)

    before, own_before = check()
    kernel = a0.qkv_dense.kernel
    perturbed = _np(kernel)
    perturbed[:, :HEADS * HEAD] += np.random.default_rng(1).normal(0, 0.5, (8, HEADS * HEAD))  # the query part
    kernel.assign(perturbed.astype("float32"))
    after, own_after = check()
    # The change in layer 1's scores is more than its own (its input moved too): layer 0's scores changed with it.
    assert np.abs(after - before).max() > 1e-2
    assert not np.allclose(after - before, own_after - own_before, atol=1e-3)


def test_off_is_the_plain_model_and_on_differs():
    inputs = _ids()
    plain = build_transformer_model(dict(CFG), with_mlm="linear")
    off = build_transformer_model(dict(CFG), with_mlm="linear", residual_attention_scores=False)
    on = build_transformer_model(dict(CFG), with_mlm="linear", residual_attention_scores=True)
    rng = np.random.default_rng(2)
    for w in plain.weights:  # attention strong enough that passing its scores on shows in the outputs
        if w.path.endswith("qkv/kernel"):
            w.assign(rng.normal(0, 0.5, w.shape).astype("float32"))
    for other in (off, on):
        assert [w.path for w in other.weights] == [w.path for w in plain.weights]
        other.set_weights(plain.get_weights())
    np.testing.assert_array_equal(_np(off(inputs)), _np(plain(inputs)))
    assert not np.allclose(_np(on(inputs)), _np(plain(inputs)), atol=1e-4)


def test_unsupported_combinations_raise_with_the_reason():
    with pytest.raises(ValueError, match="does not combine with remove_padding"):
        build_transformer_model(dict(CFG), with_pool=True, remove_padding=True, residual_attention_scores=True)
    with pytest.raises(ValueError, match="not implemented for ALBERT"):
        build_transformer_model(dict(CFG, embedding_size=4), model="albert", residual_attention_scores=True)
    lm = build_transformer_model(dict(CFG), application="lm", residual_attention_scores=True,
                                 return_keras_model=False)
    assert "residual_attention_scores" in lm.decoding_unsupported()
    # With [CLS]-only outputs the default does not remove padding when the scores are passed on.
    pooled = build_transformer_model(dict(CFG), with_pool=True, residual_attention_scores=True,
                                     return_keras_model=False)
    assert not pooled.remove_padding


def test_residual_model_passes_the_harness(tmp_path):
    def make():
        return build_transformer_model(dict(CFG), with_pool=True, residual_attention_scores=True)

    check_model(make, _ids(), np.zeros((2, 8), "float32"), tmp_path, policies=("float32",))
