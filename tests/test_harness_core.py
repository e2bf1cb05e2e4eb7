"""Every core layer and the BERT model through the shared harness (config, .keras, bf16, jit_compile, fit)."""

import keras
import numpy as np
import pytest
from harness import check_model, layer_model
from helpers import grad_of, in_subprocess, run_pytest_on_backend

from bert4x.backend import on_jax_cpu
from bert4x.layers import (
    AttentionMask,
    BiasAdd,
    Dropout,
    Embedding,
    FeedForward,
    FirstToken,
    LayerNormalization,
    MultiHeadAttention,
    PositionEmbedding,
)
from bert4x.models import build_transformer_model

rng = np.random.default_rng(0)

# Tests that compare XLA's own buffer accounting of two programs, which bert4x's recomputations target on jax's CPU.
jax_cpu_only = pytest.mark.skipif(
    not on_jax_cpu(),
    reason="XLA's buffer accounting on jax's CPU backend (test_harness_on_jax_backend runs this there)")


def xla_temporaries(fn, *args) -> int:
    """Bytes of temporaries XLA allocates for `jax.jit(fn)(*args)` (its deterministic accounting, not RSS)."""
    import jax

    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


X = rng.normal(size=(4, 6, 8)).astype("float32")
IDS = rng.integers(1, 20, size=(4, 6)).astype("int32")
IDS[1, 4:] = 0

LAYER_CASES = {
    "Embedding": (lambda: Embedding(20, 8), [((6,), "int32")], IDS, rng.normal(size=(4, 6, 8))),
    "PositionEmbedding": (lambda: PositionEmbedding(16, 8), [((6, 8), "float32")], X, X),
    "MultiHeadAttention": (lambda: MultiHeadAttention(2, 4, attention_dropout=0.1), [((6, 8), "float32")], X, X),
    "FeedForward": (lambda: FeedForward(16), [((6, 8), "float32")], X, X),
    "FeedForward-gated": (lambda: FeedForward(16, gated=True, use_bias=False), [((6, 8), "float32")], X, X),
    "BiasAdd": (lambda: BiasAdd(), [((6, 8), "float32")], X, X),
    "FirstToken": (lambda: FirstToken(), [((6, 8), "float32")], X, X[:, 0]),
    "LayerNormalization": (lambda: LayerNormalization(epsilon=1e-12), [((6, 8), "float32")], X, X),
    "Dropout": (lambda: Dropout(0.2, seed=3), [((6, 8), "float32")], X, X),
}


@pytest.mark.parametrize("name", sorted(LAYER_CASES))
def test_layer_harness(name, tmp_path):
    make_layer, specs, inputs, targets = LAYER_CASES[name]
    if name in ("BiasAdd", "FirstToken", "Dropout"):
        # Parameter-free or bias-only layers still need something to train: put a Dense before them.
        import keras

        def make():
            i = keras.Input(specs[0][0])
            return keras.Model(i, make_layer()(keras.layers.Dense(8)(i)))

        check_model(make, inputs, targets, tmp_path)
        return
    check_model(layer_model(make_layer, specs), inputs, targets, tmp_path)


def test_attention_mask_modes():
    ids = np.array([[5, 6, 7, 0]], dtype="int32")
    seg = np.array([[0, 0, 1, 0]], dtype="int32")
    enc = np.asarray(AttentionMask("encoder")(ids))
    assert enc.shape == (1, 1, 1, 4) and enc[0, 0, 0].tolist() == [True, True, True, False]
    lm = np.asarray(AttentionMask("lm")(ids))[0, 0]
    assert lm[:3, :3].tolist() == np.tril(np.ones((3, 3), bool)).tolist()
    uni = np.asarray(AttentionMask("unilm")(ids, seg))[0, 0]
    assert uni[0, :3].tolist() == [True, True, False]  # source sees source only
    assert uni[2, :3].tolist() == [True, True, True]  # target sees source and itself
    with pytest.raises(ValueError, match="mode"):
        AttentionMask("bidirectional")


TINY = {"vocab_size": 30, "hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 16, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}


@pytest.mark.parametrize("heads",
                         [{}, {"with_pool": True}, {"with_mlm": True}, {"with_pool": True, "with_mlm": "linear"}])
def test_bert_model_harness(heads, tmp_path):
    segments = np.zeros_like(IDS)
    if heads.get("with_pool") and heads.get("with_mlm"):
        targets = [rng.normal(size=(4, 8)), rng.normal(size=(4, 6, 30))]
    elif heads.get("with_pool"):
        targets = rng.normal(size=(4, 8))
    elif heads.get("with_mlm"):
        targets = rng.dirichlet(np.ones(30), size=(4, 6))
    else:
        targets = rng.normal(size=(4, 6, 8))
    check_model(lambda: build_transformer_model(TINY, **heads), [IDS, segments], targets, tmp_path)


def test_gelu_erf_gradient_is_the_closed_form():
    """bert4x's erf-GELU (own gradient, keeping only its input) equals the formula and its derivative."""
    from scipy import special

    from bert4x.backend import gelu_erf

    x = np.linspace(-6, 6, 241).astype("float32")
    cdf = 0.5 * (1 + special.erf(x / np.sqrt(2.0)))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(gelu_erf(keras.ops.convert_to_tensor(x))), x * cdf,
                               atol=1e-6)
    derivative = cdf + x * np.exp(-0.5 * x**2) / np.sqrt(2 * np.pi)
    np.testing.assert_allclose(grad_of(gelu_erf, x), derivative, atol=1e-6)


@jax_cpu_only
def test_gelu_erf_backward_keeps_only_its_input_on_jax():
    """On jax CPU, erf-GELU's backward recomputes the normal CDF rather than sharing the forward's: XLA merges identical
    computations, which kept one more [tokens, width] array per GELU alive until the backward pass (+132 MiB of
    temporaries for BERT-base at 8 x 128). Measured with XLA's own buffer accounting of a chain of matmul + GELU
    against the same chain with tanh, whose autodiff keeps one array a layer: GELU may keep one more (its input).
    (On GPUs the shared CDF is kept: it was 0.8% faster there.)"""
    import jax
    import jax.numpy as jnp

    from bert4x.backend import gelu_erf

    layers, tokens, width = 6, 512, 256

    def temporaries(activation):
        def loss(weights, x):
            for w in weights:
                x = activation(x @ w)
            return jnp.sum(x)

        weights = [jnp.full((width, width), 0.01)] * layers
        return xla_temporaries(jax.grad(loss), weights, jnp.ones((tokens, width)))

    one_activation = tokens * width * 4
    assert temporaries(gelu_erf) <= temporaries(jnp.tanh) + layers * one_activation


@jax_cpu_only
def test_feed_forward_recomputing_gelu_equals_autodiff_and_keeps_less(monkeypatch):
    """In training on jax CPU, FeedForward recomputes gelu(inner(x)) and its dropout mask in the backward pass instead
    of keeping them for the output projection's weight gradient: the same outputs and gradients as autodiff (same
    seeds, dropout on), and by XLA's own accounting one [tokens, units] array a layer less."""
    import jax
    import jax.numpy as jnp

    layers, batch, length, width, units = 4, 4, 64, 64, 256
    x = jnp.asarray(rng.normal(size=(batch, length, width)).astype("float32"))

    def gradients_and_temporaries():
        keras.utils.set_random_seed(3)
        inputs = keras.Input((length, width))
        outputs = inputs
        for _ in range(layers):
            outputs = FeedForward(units, activation="gelu", dropout_rate=0.1)(outputs)
        model = keras.Model(inputs, outputs)
        weights = [v.value for v in model.trainable_variables]
        state = [v.value for v in model.non_trainable_variables]

        def loss(weights, x):
            out, _ = model.stateless_call(weights, state, x, training=True)
            return jnp.sum(out**2), out

        step = jax.grad(loss, has_aux=True)
        return jax.jit(step)(weights, x), xla_temporaries(step, weights, x)

    (grads, out), recomputing = gradients_and_temporaries()
    monkeypatch.setattr(FeedForward, "_recomputes_activation", lambda self: False)
    (grads_autodiff, out_autodiff), kept = gradients_and_temporaries()
    np.testing.assert_allclose(np.asarray(out), np.asarray(out_autodiff), rtol=1e-6, atol=1e-6)
    assert float(jnp.mean(out == 0)) < 0.01  # outputs are dense: dropout acts before the output projection
    for g, g_autodiff in zip(grads, grads_autodiff):
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_autodiff), rtol=1e-5, atol=1e-6)
    assert recomputing <= kept - (layers - 1) * batch * length * units * 4


@jax_cpu_only
def test_bert_model_training_keeps_no_dropout_masks_on_jax_cpu():
    """Dropout masks are hashes of a seed, recomputed in the backward pass (hidden states, attention, feed-forward);
    XLA:CPU used to compute the backward's copies early and keep them (a BERT-base 8 x 128 train step: 588 MiB of
    temporaries without dropout, 752 with). With the recomputation tied to the incoming gradient, dropout adds almost
    nothing (tiny config below: 45.1 -> 70.3 MB before, 36.2 -> 38.3 MB now)."""
    import jax
    import jax.numpy as jnp

    ids = jnp.asarray(rng.integers(1, 100, (16, 128)))

    def temporaries(rate):
        bert = build_transformer_model(dict(
            vocab_size=100, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
            max_position_embeddings=128, type_vocab_size=2, hidden_act="gelu", hidden_dropout_prob=rate,
            attention_probs_dropout_prob=rate), with_pool=True)
        weights = [v.value for v in bert.trainable_variables]
        state = [v.value for v in bert.non_trainable_variables]

        def loss(weights):
            out, _ = bert.stateless_call(weights, state, [ids, jnp.zeros_like(ids)], training=True)
            return jnp.sum(out**2)

        return xla_temporaries(jax.grad(loss), weights)

    assert temporaries(0.1) <= 1.1 * temporaries(0.0)


def test_first_token_and_position_gradients_equal_autodiff():
    """FirstToken's and PositionEmbedding's own gradients (written so that XLA:GPU picks good layouts) equal the
    autodiff of the plain slice and broadcast add, for weighted sums so that every entry's gradient differs."""
    from bert4x.layers.embeddings import _add_positions
    from bert4x.layers.pooling import _first_token

    x = rng.normal(size=(3, 5, 4)).astype("float32")
    table = rng.normal(size=(5, 4)).astype("float32")
    w_first = keras.ops.convert_to_tensor(rng.normal(size=(3, 4)).astype("float32"))
    w_all = keras.ops.convert_to_tensor(rng.normal(size=x.shape).astype("float32"))
    plain_first = grad_of(lambda t: t[:, 0] * w_first, x)
    np.testing.assert_array_equal(grad_of(lambda t: _first_token(t) * w_first, x), plain_first)
    assert np.all(plain_first[:, 1:] == 0) and np.all(plain_first[:, 0] != 0)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(_first_token(keras.ops.convert_to_tensor(x))), x[:, 0])

    xs = keras.ops.convert_to_tensor(x)
    ours = grad_of(lambda t: _add_positions(xs, t) * w_all, table)
    np.testing.assert_allclose(ours, grad_of(lambda t: (xs + t[None]) * w_all, table), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours, keras.ops.convert_to_numpy(w_all).sum(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grad_of(lambda t: _add_positions(t, keras.ops.convert_to_tensor(table)) * w_all, x),
                               keras.ops.convert_to_numpy(w_all), rtol=0, atol=0)


def test_embedding_gradient_accumulates_in_float32_under_mixed_precision():
    """Under mixed_bfloat16 the table is gathered in float32 and cast after, so its gradient is summed in float32:
    4,096 uses of one token give exactly 4,096. From an autocast bfloat16 copy, jax and torch sum it to 256."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        layer = Embedding(50, 4)
        ids = np.full((2, 2048), 7, "int32")
        inputs = keras.Input((2048,), dtype="int32")
        model = keras.Model(inputs, layer(inputs))  # inside a model, as in fit: the layer runs under autocast
        assert keras.backend.standardize_dtype(model(ids).dtype) == "bfloat16"
        assert layer.embeddings.dtype == "float32"

        def summed(table):
            return keras.ops.cast(model.stateless_call([table], [], ids)[0], "float32")

        grad = grad_of(summed, keras.ops.convert_to_numpy(layer.embeddings))
        np.testing.assert_array_equal(grad[7], np.full(4, 4096.0, "float32"))
        assert np.all(np.delete(grad, 7, axis=0) == 0)
    finally:
        keras.config.set_dtype_policy(previous)


def test_layer_norm_gradient_is_the_closed_form():
    """bert4x's LayerNormalization (own gradient, keeping only its input) = Keras's, values and all three gradients."""
    from bert4x.kernels.layer_norm import layer_norm_keeping_only_its_input as ours

    x = (rng.normal(size=(3, 5, 16)) * 3 + 1).astype("float32")
    gamma, beta = rng.normal(size=16).astype("float32"), rng.normal(size=16).astype("float32")
    tensors = [keras.ops.convert_to_tensor(a) for a in (x, gamma, beta)]
    weights = keras.ops.convert_to_tensor(rng.normal(size=x.shape).astype("float32"))
    eps = keras.ops.convert_to_tensor(1e-12, "float32")

    def autodiff(x, gamma, beta):  # the textbook formula, differentiated by the backend
        mean = keras.ops.mean(x, axis=-1, keepdims=True)
        var = keras.ops.mean(keras.ops.square(x - mean), axis=-1, keepdims=True)
        return (x - mean) * keras.ops.rsqrt(var + 1e-12) * gamma + beta

    np.testing.assert_allclose(keras.ops.convert_to_numpy(ours(*tensors, eps)),
                               keras.ops.convert_to_numpy(autodiff(*tensors)), atol=2e-6)
    for name, wrt in (("x", 0), ("gamma", 1), ("beta", 2)):
        def of(fn, *extra, wrt=wrt):
            return lambda t: fn(*tensors[:wrt], t, *tensors[wrt + 1:], *extra) * weights

        point = (x, gamma, beta)[wrt]
        np.testing.assert_allclose(grad_of(of(ours, eps), point), grad_of(of(autodiff), point), atol=1e-5,
                                   err_msg=f"d/d{name}")
    layer, reference = LayerNormalization(epsilon=1e-12), keras.layers.LayerNormalization(epsilon=1e-12)
    for norm in (layer, reference):
        norm.build(x.shape)
        norm.set_weights([gamma, beta])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)), keras.ops.convert_to_numpy(reference(x)),
                               atol=2e-6)


def test_truncated_normal_initializer():
    """bert4x's host-drawn TruncatedNormal: the truncated-normal law, Keras's seeding rules, serializable."""
    from scipy import stats

    from bert4x.backend import TruncatedNormal

    init = TruncatedNormal(mean=0.1, stddev=0.02, seed=3)
    values = keras.ops.convert_to_numpy(init((400, 250)))
    assert values.dtype == np.float32 and values.shape == (400, 250)
    assert np.abs(values - 0.1).max() <= 0.04 + 1e-7  # nothing beyond 2 standard deviations
    law = stats.truncnorm(-2, 2, loc=0.1, scale=0.02)
    assert stats.kstest(values.ravel()[::7], law.cdf).pvalue > 1e-3
    np.testing.assert_array_equal(values, keras.ops.convert_to_numpy(init((400, 250))))  # an int seed repeats
    keras.utils.set_random_seed(5)
    a = keras.ops.convert_to_numpy(TruncatedNormal(stddev=1.0)((64,)))
    b = keras.ops.convert_to_numpy(TruncatedNormal(stddev=1.0)((64,)))
    keras.utils.set_random_seed(5)
    np.testing.assert_array_equal(a, keras.ops.convert_to_numpy(TruncatedNormal(stddev=1.0)((64,))))
    assert not np.array_equal(a, b)  # seed=None draws fresh values from the global seed generator
    restored = keras.initializers.deserialize(keras.initializers.serialize(init))
    assert isinstance(restored, TruncatedNormal) and restored.get_config() == init.get_config()
    assert keras.backend.standardize_dtype(init((3,), dtype="bfloat16").dtype) == "bfloat16"


@pytest.mark.skipif(in_subprocess, reason="this test launches the jax run itself")
def test_harness_on_jax_backend():
    run_pytest_on_backend("jax", "tests/test_harness_core.py", "-k",
                          "bert_model or MultiHeadAttention or truncated or gelu or layer_norm or LayerNormalization"
                          " or Dropout"
                          " or first_token or FirstToken or PositionEmbedding"
                          " or Embedding or embedding_gradient")
