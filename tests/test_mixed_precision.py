"""Mixed precision stays numerically safe: a bf16 BERT classifier learns without NaN, masks stay finite in bf16 and
fp16, and the fused key-padding attention path (cuDNN on jax GPUs) computes exactly what the masked path computes."""

import keras
import numpy as np
import pytest
from harness import dtype_policy
from helpers import in_subprocess, run_pytest_on_backend

from bert4x import backend
from bert4x.layers import MultiHeadAttention
from bert4x.models import build_transformer_model

TINY = {"vocab_size": 60, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}


def _padded_ids(rng, rows=16, length=12):
    ids = rng.integers(5, TINY["vocab_size"], size=(rows, length)).astype("int32")
    lengths = rng.integers(3, length + 1, size=rows)
    ids[np.arange(length)[None, :] >= lengths[:, None]] = 0
    ids[:, 0] = 2
    return ids


def test_bf16_classifier_loss_decreases_without_nan():
    rng = np.random.default_rng(0)
    ids = _padded_ids(rng)
    labels = (ids[:, 1] % 2).astype("int32")  # learnable from the second token
    with dtype_policy("mixed_bfloat16"):
        keras.utils.set_random_seed(0)
        bert = build_transformer_model(dict(TINY), with_pool=True)
        logits = keras.layers.Dense(2)(keras.layers.Dropout(0.1)(bert.output))
        model = keras.Model(bert.inputs, logits)
        assert all(w.dtype == "float32" for w in model.weights), "variables must stay float32 under mixed precision"
        model.compile(keras.optimizers.AdamW(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=True)
        history = model.fit([ids, np.zeros_like(ids)], labels, batch_size=8, epochs=12, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)), f"non-finite loss under mixed_bfloat16: {losses}"
    assert losses[-1] < 0.7 * losses[0], f"loss did not decrease: first {losses[0]:.4f}, last {losses[-1]:.4f}"
    assert all(np.all(np.isfinite(np.asarray(w))) for w in model.weights)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_masked_softmax_is_finite_in_half_precision(dtype):
    logits = keras.ops.cast(np.array([[[60000.0, -60000.0, 3.0, 1.0]]]), dtype)
    mask = np.array([[[True, False, True, False]]])
    probs = np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(backend.masked_softmax(logits, mask), "float32")))
    assert np.all(np.isfinite(probs)) and probs[0, 0, 1] == 0 and probs[0, 0, 3] == 0
    # A row whose keys are all masked stays finite (uniform) rather than 0/0 = NaN.
    none = np.asarray(keras.ops.convert_to_numpy(
        keras.ops.cast(backend.masked_softmax(logits, np.zeros_like(mask)), "float32")))
    assert np.all(np.isfinite(none))


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
@pytest.mark.parametrize("training", [False, True])
def test_attention_with_padding_is_finite_in_half_precision(policy, training):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 8, 16)).astype("float32") * 30  # large activations stress fp16
    keep = np.ones((3, 8), bool)
    keep[1, 5:] = False
    keep[2, :] = False  # an all-padding row
    with dtype_policy(policy):
        layer = MultiHeadAttention(heads=2, head_size=8, attention_dropout=0.1)
        out = layer(x, attention_mask=keep[:, None, None, :], training=training)
    out = np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(out, "float32")))
    assert np.all(np.isfinite(out)), f"{policy}, training={training}: non-finite attention output"


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="the fused key-padding path exists on jax only")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_fused_key_padding_attention_matches_masked_attention(dtype):
    """The reordering + key-length path equals boolean-mask attention for any key mask (holes, left padding)."""
    from bert4x.kernels.dispatch import key_padding_attention as _fused_key_padding_attention

    rng = np.random.default_rng(2)
    q, k, v = (keras.ops.cast(rng.normal(size=(4, 6, 2, 8)), dtype) for _ in range(3))
    keep = np.ones((4, 6), bool)
    keep[0, 4:] = False  # right padding
    keep[1, :2] = False  # left padding
    keep[2, [1, 3]] = False  # holes
    mask = keep[:, None, None, :]
    fused = _fused_key_padding_attention(q, k, v, mask, 0.35, implementation="xla")
    assert fused is not None
    f32 = [keras.ops.cast(t, "float32") for t in (q, k, v)]
    reference = keras.ops.dot_product_attention(*f32, mask=mask, scale=0.35)
    np.testing.assert_allclose(np.asarray(keras.ops.cast(fused, "float32")), np.asarray(reference),
                               atol=2e-2 if dtype == "bfloat16" else 3e-3)
    if dtype == "bfloat16":  # gradients too (XLA on CPU has no float16 dot_general gradient)
        import jax
        import jax.numpy as jnp

        weights = jnp.asarray(rng.normal(size=(4, 6, 2, 8)), jnp.float32)

        def fused_loss(q, k, v):
            out = _fused_key_padding_attention(q, k, v, mask, 0.35, implementation="xla")
            return jnp.sum(out.astype(jnp.float32) * weights)

        def reference_loss(q, k, v):
            q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
            return jnp.sum(jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(mask), scale=0.35) * weights)

        fused_grads = jax.jit(jax.grad(fused_loss, argnums=(0, 1, 2)))(q, k, v)
        reference_grads = jax.grad(reference_loss, argnums=(0, 1, 2))(q, k, v)
        for got, want in zip(fused_grads, reference_grads):
            np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), np.asarray(want), atol=5e-2)
    # Other masks (one row per query) are left to the general path.
    assert _fused_key_padding_attention(q, k, v, np.ones((4, 1, 6, 6), bool), 0.35, implementation="xla") is None


@pytest.mark.skipif(in_subprocess, reason="already in a backend subprocess")
def test_mixed_precision_on_jax_backend():
    run_pytest_on_backend("jax", "tests/test_mixed_precision.py")
