"""Attention variants: linear attention and KeyNorm against numpy formulas (masks included), Performer's error
against exact softmax attention as the number of random features grows, the options of MultiHeadAttention and
build_transformer_model through the harness, and checkpoints of their extra weights."""

import numpy as np
import pytest
from harness import check_model, layer_model
from helpers import in_subprocess, run_pytest_on_backend
from keras import ops

from bert4x.layers import MultiHeadAttention
from bert4x.layers import attention_variants as av
from bert4x.models import build_transformer_model

rng = np.random.default_rng(0)
B, N, H, D = 2, 7, 2, 8


def np_(x):
    return ops.convert_to_numpy(x)


def qkv(scale=1.0):
    return [(rng.normal(size=(B, N, H, D)) * scale).astype("float32") for _ in range(3)]


def phi(x):
    return np.where(x > 0, x + 1, np.exp(x))  # elu(x) + 1


def kernel_numpy(fq, fk, v, allowed):
    """out_i = sum_j a_ij v_j / sum_j a_ij with a_ij = fq_i . fk_j over allowed (i, j): [b, h, q, k] bool."""
    weights = np.einsum("bqhf,bkhf->bhqk", fq, fk) * allowed
    return np.einsum("bhqk,bkhd->bqhd", weights, v) / weights.sum(-1).transpose(0, 2, 1)[..., None]


def padding(lengths):
    mask = np.arange(N)[None, :] < np.array(lengths)[:, None]
    return mask[:, None, None, :]  # [b, 1, 1, k]


def test_linear_attention_matches_formula():
    q, k, v = qkv()
    everything = np.ones((B, H, N, N), bool)
    np.testing.assert_allclose(np_(av.linear_attention(q, k, v)), kernel_numpy(phi(q), phi(k), v, everything),
                               rtol=1e-4, atol=1e-5)
    pad = padding([N, 4])
    np.testing.assert_allclose(np_(av.linear_attention(q, k, v, mask=pad)),
                               kernel_numpy(phi(q), phi(k), v, np.broadcast_to(pad, (B, H, N, N))),
                               rtol=1e-4, atol=1e-5)
    causal = np.tril(np.ones((N, N), bool))[None, None]
    expected = kernel_numpy(phi(q), phi(k), v, np.broadcast_to(causal, (B, H, N, N)))
    # O(n) running sums and the explicit masked form agree with the formula.
    np.testing.assert_allclose(np_(av.linear_attention(q, k, v, causal=True)), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np_(av.linear_attention(q, k, v, mask=causal)), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="key"):
        av.linear_attention(q, k, v, mask=causal, causal=True)


def softmax_attention_numpy(q, k, v, allowed):
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(allowed, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def test_performer_error_shrinks_as_features_grow():
    """Mean absolute error of FAVOR+ against exact softmax attention, averaged over random projections."""
    q, k, v = (rng.normal(size=(2, 32, 2, 16)).astype("float32") * s for s in (0.7, 0.7, 1.0))
    pad = (np.arange(32)[None, :] < np.array([[32], [20]]))[:, None, None, :]
    exact = softmax_attention_numpy(q, k, v, np.broadcast_to(pad, (2, 2, 32, 32)))
    curve = {}
    for m in (4, 16, 64, 256, 1024, 4096):
        errors = [np.abs(np_(av.performer_attention(q, k, v, av.orthogonal_gaussian_projection(m, 16, seed), mask=pad))
                         - exact).mean() for seed in range(4)]
        curve[m] = float(np.mean(errors))
    print("performer mean |error| by features:", {m: round(e, 4) for m, e in curve.items()})
    errors = list(curve.values())
    assert all(b < a * 1.05 for a, b in zip(errors, errors[1:])), curve  # monotone (up to noise)
    # Measured (tensorflow, CPU): 4: 0.169, 16: 0.113, 64: 0.086, 256: 0.058, 1024: 0.040, 4096: 0.027. The Monte-Carlo
    # rate 1/sqrt(m) is only reached asymptotically: exp features are heavy-tailed at small m.
    assert errors[-1] < errors[0] / 5, curve
    assert errors[-1] < 0.035, curve
    # Causal FAVOR+ (running sums) against causal softmax.
    causal = np.tril(np.ones((32, 32), bool))[None, None]
    w = av.orthogonal_gaussian_projection(4096, 16, 0)
    running = np_(av.performer_attention(q, k, v, w, causal=True))
    np.testing.assert_allclose(running, np_(av.performer_attention(q, k, v, w, mask=causal)), rtol=1e-3, atol=1e-4)
    causal_error = np.abs(running - softmax_attention_numpy(q, k, v, np.broadcast_to(causal, (2, 2, 32, 32)))).mean()
    assert causal_error < 0.05  # measured 0.035: early rows average few keys


def test_orthogonal_projection_is_blockwise_orthogonal():
    w = av.orthogonal_gaussian_projection(20, 8, seed=3)
    directions = w / np.linalg.norm(w, axis=1, keepdims=True)
    np.testing.assert_allclose(directions[:8] @ directions[:8].T, np.eye(8), atol=1e-5)
    np.testing.assert_allclose(directions[8:16] @ directions[8:16].T, np.eye(8), atol=1e-5)
    np.testing.assert_array_equal(w, av.orthogonal_gaussian_projection(20, 8, seed=3))


def test_keynorm_attention_matches_formula():
    q, k, v = qkv(scale=2.0)
    scale = np.array([[3.0], [0.5]], "float32")  # one per head
    pad = padding([N, 5])
    bias = rng.normal(size=(1, H, N, N)).astype("float32")
    k_hat = k / np.linalg.norm(k, axis=-1, keepdims=True)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k_hat) * scale[None, :, :, None][..., 0, :][..., None] + bias
    logits = np.where(pad, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    expected = np.einsum("bhqk,bkhd->bqhd", p, v)
    got = av.keynorm_attention(q, k, v, scale=scale, mask=pad, bias=bias)
    np.testing.assert_allclose(np_(got), expected, rtol=1e-4, atol=1e-5)


def test_multi_head_attention_uses_the_variant_on_its_projections():
    x = rng.normal(size=(B, N, 16)).astype("float32")
    pad = padding([N, 3])
    for kind in ("linear", "performer", "keynorm"):
        layer = MultiHeadAttention(2, 8, attention_type=kind, performer_features=32)
        out = np_(layer(x, attention_mask=pad))
        kernel, bias = (np_(w) for w in layer.qkv_dense.weights)
        q, k, v = np.split((x @ kernel + bias).reshape(B, N, 3, 2, 8), 3, axis=2)
        q, k, v = (t[:, :, 0] for t in (q, k, v))
        if kind == "linear":
            inner = np_(av.linear_attention(q, k, v, mask=pad))
        elif kind == "performer":
            inner = np_(av.performer_attention(q, k, v, np_(layer.performer_projection), mask=pad))
        else:
            inner = np_(av.keynorm_attention(q, k, v, scale=1.0, mask=pad))
        out_kernel, out_bias = (np_(w) for w in layer.output_dense.weights)
        np.testing.assert_allclose(out, inner.reshape(B, N, 16) @ out_kernel + out_bias, rtol=1e-4, atol=1e-4)


def test_attention_type_errors():
    with pytest.raises(ValueError, match="attention_type"):
        MultiHeadAttention(2, 4, attention_type="sparse")
    with pytest.raises(ValueError, match="attention_dropout"):
        MultiHeadAttention(2, 4, attention_type="linear", attention_dropout=0.1)
    layer = MultiHeadAttention(2, 4, attention_type="performer")
    with pytest.raises(ValueError, match="attention_bias"):
        layer(np.ones((1, 3, 8), "float32"), attention_bias=np.zeros((1, 2, 3, 3), "float32"))
    with pytest.raises(ValueError, match="do not apply"):
        build_transformer_model(TINY, attention_type="linear", attention_options={"keynorm_scale": 2.0})
    with pytest.raises(ValueError, match="attention_dropout"):
        build_transformer_model(dict(TINY, attention_probs_dropout_prob=0.1), attention_type="linear")


X = rng.normal(size=(4, 6, 8)).astype("float32")
VARIANTS = {
    "linear": {},
    "performer": {"performer_features": 16, "performer_seed": 3},
    "keynorm": {"keynorm_scale": 2.0, "keynorm_learnable_scale": True},
}


@pytest.mark.parametrize("kind", sorted(VARIANTS))
def test_multi_head_attention_variant_harness(kind, tmp_path):
    check_model(layer_model(lambda: MultiHeadAttention(2, 4, attention_type=kind, **VARIANTS[kind]),
                            [((6, 8), "float32")]), X, X, tmp_path)


TINY = {"vocab_size": 30, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16}


@pytest.mark.parametrize("kind", sorted(VARIANTS))
def test_models_accept_attention_type(kind, tmp_path):
    ids = rng.integers(1, 30, size=(4, 6)).astype("int32")
    ids[1, 4:] = 0
    segments = np.zeros_like(ids)

    def make():
        return build_transformer_model(TINY, attention_type=kind, attention_options=VARIANTS[kind], with_pool=True)

    model = make()
    layer = model.get_layer("Transformer-0-MultiHeadSelfAttention")
    assert layer.attention_type == kind
    # mixed_bfloat16 is covered layer by layer above; float32 keeps this model-level case fast.
    check_model(make, [ids, segments], rng.normal(size=(4, 8)), tmp_path, policies=("float32",))
    # Causal LM: future tokens must not change earlier outputs.
    lm = build_transformer_model(TINY, application="lm", attention_type=kind, attention_options=VARIANTS[kind])
    changed = ids.copy()
    changed[:, -1] = 7
    a, b = lm.predict([ids, segments], verbose=0), lm.predict([changed, segments], verbose=0)
    np.testing.assert_allclose(a[:, :-1], b[:, :-1], rtol=1e-4, atol=1e-5)


def test_extension_weights_round_trip_through_checkpoints(tmp_path):
    options = {"keynorm_learnable_scale": True}
    plain = build_transformer_model(TINY, return_keras_model=False)
    plain.save_weights_as_checkpoint(str(tmp_path / "plain" / "bert_model.ckpt"))
    # An original checkpoint lacks the KeyNorm scales: they keep their initial value and are reported.
    keynorm = build_transformer_model(TINY, attention_type="keynorm", attention_options=options,
                                      return_keras_model=False)
    report = keynorm.load_weights_from_checkpoint(str(tmp_path / "plain" / "bert_model.ckpt"))
    assert report.ok and report.initialized == ["Transformer-0-MultiHeadSelfAttention/keynorm_scale"]
    # A bert4x checkpoint carries them (as 'bert4x/<path>') and loads them back.
    scale = keynorm.model.get_layer("Transformer-0-MultiHeadSelfAttention").keynorm_scale_weight
    scale.assign(np.array([[1.5], [2.5]], "float32"))
    for fmt, path in (("google", tmp_path / "kn" / "bert_model.ckpt"), ("huggingface", tmp_path / "kn_hf")):
        keynorm.save_weights_as_checkpoint(str(path), format=fmt)
        again = build_transformer_model(TINY, attention_type="keynorm", attention_options=options,
                                        return_keras_model=False)
        report = again.load_weights_from_checkpoint(str(path))
        assert report.ok and not report.initialized
        loaded = again.model.get_layer("Transformer-0-MultiHeadSelfAttention").keynorm_scale_weight
        np.testing.assert_array_equal(np_(loaded), [[1.5], [2.5]])


@pytest.mark.skipif(in_subprocess, reason="this test launches the jax run itself")
def test_attention_variants_on_jax_backend():
    run_pytest_on_backend("jax", "tests/test_attention_variants.py", "-k",
                          "formula or grow or projections or variant_harness")
