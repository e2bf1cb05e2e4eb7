"""bert4x.kernels: the attention seam (its additive terms against numpy attention written from the definition), the
table's choices and refusals, `explain`, `bert4x.config`, and the padding mask that encoder outputs carry."""

import keras
import numpy as np
import pytest
from helpers import in_subprocess, run_pytest_on_backend

import bert4x.config
from bert4x import kernels
from bert4x.kernels import AttentionSpec
from bert4x.layers import MultiHeadAttention
from bert4x.models import build_transformer_model

rng = np.random.default_rng(0)
B, Q, K, H, D = 2, 3, 5, 2, 4


def _numpy_attention(q, k, v, mask=None, bias=None, relative_keys=None, relative_values=None, residual=None,
                     scale=None):
    """Attention from its definition: (scores, output)."""
    scale = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
    scores = np.einsum("bqhd,bkhd->bhqk", q, k)
    if relative_keys is not None:
        scores = scores + np.einsum("bqhd,qkd->bhqk", q, relative_keys)
    scores = scores * scale
    if bias is not None:
        scores = scores + bias
    if residual is not None:
        scores = scores + residual
    hidden = scores if mask is None else np.where(mask, scores, -np.inf)
    p = np.exp(hidden - hidden.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", p, v)
    if relative_values is not None:
        out = out + np.einsum("bhqk,qkd->bqhd", p, relative_values)
    return scores, out


def _random(*shape):
    return rng.normal(size=shape).astype("float32")


def _np(x):
    return keras.ops.convert_to_numpy(x)


Q_, K_, V_ = _random(B, Q, H, D), _random(B, K, H, D), _random(B, K, H, D)
MASK = np.ones((B, 1, 1, K), bool)
MASK[1, ..., 3:] = False


@pytest.mark.parametrize("term", ["bias", "relative_keys", "relative_values", "residual_scores", "all"])
def test_each_additive_term_equals_numpy_attention(term):
    terms = {
        "bias": _random(1, H, Q, K),
        "relative_keys": _random(Q, K, D),
        "relative_values": _random(Q, K, D),
        "residual_scores": _random(B, H, Q, K),
    }
    given = terms if term == "all" else {term: terms[term]}
    out, scores = kernels.attention(Q_, K_, V_, mask=MASK, return_scores=True, **given)
    want_scores, want = _numpy_attention(Q_, K_, V_, mask=MASK, bias=given.get("bias"),
                                         relative_keys=given.get("relative_keys"),
                                         relative_values=given.get("relative_values"),
                                         residual=given.get("residual_scores"))
    np.testing.assert_allclose(_np(out), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_np(scores), want_scores, rtol=1e-5, atol=1e-5)


def test_bias_alone_takes_dot_product_attention_and_equals_numpy():
    bias = _random(B, 1, Q, K)
    spec = kernels.make_spec(Q_.shape, K_.shape, "float32", mask_shape=MASK.shape, bias=True)
    assert kernels.choose(spec).name == "dot_product_attention"
    np.testing.assert_allclose(_np(kernels.attention(Q_, K_, V_, mask=MASK, bias=bias, scale=0.7)),
                               _numpy_attention(Q_, K_, V_, mask=MASK, bias=bias, scale=0.7)[1], rtol=1e-5, atol=1e-5)


def test_realformer_chain_of_two_layers_passes_scores_on():
    """Layer 2 adds layer 1's pre-softmax scores to its own, through MultiHeadAttention(return_scores=...)."""
    x = _random(B, K, 8)
    first, second = MultiHeadAttention(H, D), MultiHeadAttention(H, D)
    y, scores = first(x, attention_mask=MASK, return_scores=True)
    z, scores2 = second(y, attention_mask=MASK, residual_scores=scores, return_scores=True)
    qkv = np.reshape(_np(second.qkv_dense(y)), (B, K, 3, H, D))
    want_scores, want = _numpy_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask=MASK, residual=_np(scores))
    np.testing.assert_allclose(_np(scores2), want_scores, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_np(z), _np(second.output_dense(np.reshape(want, (B, K, H * D)))), rtol=1e-4,
                               atol=1e-4)


def test_nezha_terms_through_the_layer_equal_numpy():
    x = _random(B, K, 8)
    rel_k, rel_v = _random(K, K, D), _random(K, K, D)
    mha = MultiHeadAttention(H, D)
    out = mha(x, attention_mask=MASK, relative_keys=rel_k, relative_values=rel_v)
    qkv = np.reshape(_np(mha.qkv_dense(x)), (B, K, 3, H, D))
    want = _numpy_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask=MASK, relative_keys=rel_k,
                            relative_values=rel_v)[1]
    np.testing.assert_allclose(_np(out), _np(mha.output_dense(np.reshape(want, (B, K, H * D)))), rtol=1e-4,
                               atol=1e-4)


def _spec(**kwargs):
    base = dict(backend="jax", platform="gpu", dtype="bfloat16", batch=8, q_len=128, k_len=128, heads=12,
                head_size=64, mask="keys", dropout_rate=0.1, training=True, packed_qkv=True)
    base.update(kwargs)
    return AttentionSpec(**base)


@pytest.mark.parametrize("kwargs,chosen", [
    ({}, "pallas"),
    ({"layout": "tokens"}, "pallas_tokens"),
    ({"training": False}, "cudnn"),
    ({"dropout_rate": 0.0}, "cudnn"),
    ({"dtype": "float32"}, "xla"),
    ({"dtype": "float32", "training": False}, "dot_product_attention"),
    ({"platform": "cpu"}, "recompute"),
    ({"platform": "cpu", "fused_attention": "off"}, "xla"),
    ({"fused_attention": "interpret", "platform": "cpu", "dtype": "float32"}, "pallas"),
    ({"mask": "full"}, "xla"),
    ({"bias": True}, "xla"),
    ({"bias": True, "training": False}, "dot_product_attention"),
    ({"relative_keys": True, "training": False}, "xla"),
    ({"q_len": 100, "k_len": 100}, "xla"),
    ({"backend": "tensorflow", "platform": "gpu"}, "xla"),
    ({"distributed": True}, "xla"),
    ({"variant": "linear", "dropout_rate": 0.0}, "linear"),
    ({"preferred": "xla", "training": False}, "xla"),
])
def test_the_table_picks_as_documented(kwargs, chosen):
    assert kernels.choose(_spec(**kwargs)).name == chosen


def test_refusals_name_their_reason():
    choice = kernels.choose(_spec(relative_keys=True))
    reasons = dict(choice.refusals)
    assert choice.name == "xla"
    assert "relative positions on keys" in reasons["pallas"]
    assert "dropout" in reasons["dot_product_attention"] and "dropout" in reasons["cudnn"]
    reasons = dict(kernels.choose(_spec(relative_keys=True, training=False)).refusals)
    assert "relative positions on keys" in reasons["dot_product_attention"]
    assert "NVIDIA" in dict(kernels.choose(_spec(platform="cpu", fused_attention="interpret",
                                                 dtype="float32", mask="full")).refusals)["cudnn"]
    with pytest.raises(ValueError, match="attention_bias"):
        kernels.choose(_spec(variant="linear", bias=True))


def test_config_switches_and_their_errors(monkeypatch):
    for name in ("_FUSED_ATTENTION", "_FUSED_LAYER_NORM", "_ATTENTION_IMPLEMENTATION"):
        monkeypatch.setattr(bert4x.config, name, getattr(bert4x.config, name))  # restored after the test
    bert4x.config.set_fused_attention(False)
    assert bert4x.config.fused_attention() == "off"
    assert kernels.make_spec((1, 4, 2, 8), (1, 4, 2, 8), "float32").fused_attention == "off"
    bert4x.config.set_fused_layer_norm("interpret")
    assert bert4x.config.fused_layer_norm() == "interpret"
    bert4x.config.set_attention_implementation("xla")
    assert kernels.choose(kernels.make_spec((1, 4, 2, 8), (1, 4, 2, 8), "float32")).name == "xla"
    with pytest.raises(ValueError, match="BERT4X_FUSED_ATTENTION"):
        bert4x.config.set_fused_attention("sometimes")
    with pytest.raises(ValueError, match="not_a_kernel"):
        bert4x.config.set_attention_implementation("not_a_kernel")


TINY = {"vocab_size": 40, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 32, "attention_probs_dropout_prob": 0.1}


def test_explain_reports_each_attention_layer_and_the_refusals():
    model = build_transformer_model(TINY, with_pool=True, remove_padding=False)
    report = kernels.explain(model, print_report=False)
    assert [row.layer for row in report.rows] == ["Transformer-0-MultiHeadSelfAttention",
                                                  "Transformer-1-MultiHeadSelfAttention"]
    text = str(report)
    training, inference = report.rows[0].training[1], report.rows[0].inference[1]
    assert inference.name == "dot_product_attention"
    if keras.backend.backend() == "jax":
        assert training.name == "recompute"  # jax on CPU: the recomputing version
    else:
        assert training.name == "xla"
        assert "jax only" in dict(training.refusals)["pallas"]
        assert "keras.ops.dot_product_attention has no dropout" in text
    assert "training only" in dict(inference.refusals)["pallas"] or "jax only" in text
    assert report.rows[1].training[0].q_len == 1  # the last layer attends from [CLS] alone


def test_explain_names_a_term_refusal_in_a_model():
    x = keras.Input((6, 8))
    rel = keras.Input((6, 6, D), batch_size=None)
    layer = MultiHeadAttention(H, D, attention_dropout=0.1, name="nezha_like")
    model = keras.Model([x, rel], layer(x, relative_keys=rel[0]))
    (row,) = kernels.explain(model, print_report=False).rows
    assert row.inference[1].name == "xla"
    assert "relative positions on keys" in dict(row.inference[1].refusals)["dot_product_attention"]


IDS = np.array([[5, 6, 7, 8, 0, 0], [9, 10, 0, 0, 0, 0], [11, 12, 13, 14, 15, 16]], "int32")


class _MaskProbe(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True
        self.seen = []

    def call(self, inputs, mask=None):
        self.seen.append(mask)
        return inputs


@pytest.mark.parametrize("model,kwargs", [("bert", {}), ("bert", {"with_mlm": True}), ("wobert", {}),
                                          ("roformer", {}), ("roformer_v2", {}), ("bert", {"remove_padding": True})])
def test_encoder_outputs_carry_the_padding_mask(model, kwargs):
    if kwargs.get("remove_padding") and keras.backend.backend() == "jax":
        pytest.skip("on jax remove_padding=True takes a packing input (tests/test_remove_padding.py)")
    bert = build_transformer_model(TINY, model=model, **kwargs)
    probe = _MaskProbe()
    wrapped = keras.Model(bert.inputs, probe(bert.outputs[0]))
    wrapped([IDS, np.zeros_like(IDS)])
    np.testing.assert_array_equal(_np(probe.seen[-1]), IDS != 0)


def test_pooled_outputs_carry_no_mask_and_the_classifier_loss_is_unmasked():
    bert = build_transformer_model(TINY, with_pool=True)
    probe = _MaskProbe()
    classifier = keras.Model(bert.inputs, keras.layers.Dense(2)(probe(bert.output)))
    labels = np.array([0, 1, 1])
    classifier.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    loss = classifier.evaluate([IDS, np.zeros_like(IDS)], labels, verbose=0)
    assert probe.seen[-1] is None
    logits = _np(classifier([IDS, np.zeros_like(IDS)]))
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(loss, -log_p[np.arange(3), labels].mean(), rtol=1e-5)


@pytest.mark.skipif(in_subprocess or keras.backend.backend() == "jax", reason="runs from the top-level process only")
def test_kernels_on_jax_backend():
    run_pytest_on_backend("jax", "tests/test_kernels.py", "-k", "term or realformer or nezha or mask or explain")
