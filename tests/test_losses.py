"""Each loss against an independent numpy implementation of its seed-article formula, gradients included where the
closed form is known; Loss classes through serialization and a fit."""

import keras
import numpy as np
import pytest
from helpers import grad_of, in_subprocess, run_pytest_on_backend
from keras import ops

from bert4x import losses

rng = np.random.default_rng(0)


def np_(x):
    return ops.convert_to_numpy(x)


# ------------------------------------------------------------------ multi-label softmax-CE
def mcce_numpy(y_true, s):
    """log(1 + sum_N e^s) + log(1 + sum_P e^-s), row by row, straight from the formula."""
    out = []
    for t, row in zip(y_true.reshape(-1, s.shape[-1]), s.reshape(-1, s.shape[-1])):
        pos, neg = row[t == 1], row[t == 0]
        out.append(np.log1p(np.exp(neg.astype("float64")).sum()) + np.log1p(np.exp(-pos.astype("float64")).sum()))
    return np.array(out).reshape(s.shape[:-1])


def test_multilabel_ce_equals_formula_and_gradient():
    s = rng.normal(scale=3, size=(4, 3, 10)).astype("float32")
    y = (rng.random((4, 3, 10)) < 0.3).astype("float32")
    y[0, 0] = 0  # a row with no positive
    y[0, 1] = 1  # a row with no negative
    np.testing.assert_allclose(np_(losses.multilabel_categorical_crossentropy(y, s)), mcce_numpy(y, s), rtol=1e-5)
    # Closed-form gradient: e^s_i / (1 + sum_N e^s) on negatives, -e^-s_j / (1 + sum_P e^-s) on positives.
    e_neg = np.exp(s) * (1 - y)
    e_pos = np.exp(-s) * y
    expected = e_neg / (1 + e_neg.sum(-1, keepdims=True)) - e_pos / (1 + e_pos.sum(-1, keepdims=True))
    got = grad_of(lambda t: losses.multilabel_categorical_crossentropy(y, t), s)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_multilabel_ce_is_stable_for_huge_scores():
    s = np.array([[1e4, -1e4, 30.0, -30.0]], "float32")
    y = np.array([[1, 0, 0, 1]], "float32")
    value = float(np_(losses.multilabel_categorical_crossentropy(y, s))[0])
    assert np.isfinite(value) and abs(value - (np.log1p(np.exp(30.0)) + np.log1p(np.exp(30.0)))) < 1e-3


@pytest.mark.parametrize("mask_zero", [False, True])
def test_sparse_multilabel_ce_equals_dense(mask_zero):
    batch, classes, k = 6, 12, 4
    s = rng.normal(scale=2, size=(batch, classes)).astype("float32")
    indices = np.zeros((batch, k), "int32")
    dense = np.zeros((batch, classes), "float32")
    for b in range(batch):
        if mask_zero:  # 0..k positives, padded with index 0
            chosen = rng.choice(np.arange(1, classes), size=rng.integers(0, k + 1), replace=False)
        else:  # without padding every slot is a real, distinct index
            chosen = rng.choice(classes, size=k, replace=False)
        indices[b, : len(chosen)] = chosen
        dense[b, chosen] = 1
    expected_scores = s.copy()
    if mask_zero:
        expected_scores = s[:, 1:]  # class 0 does not exist
        dense = dense[:, 1:]
    expected = mcce_numpy(dense, expected_scores)
    got = np_(losses.sparse_multilabel_categorical_crossentropy(indices, s, mask_zero=mask_zero))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_global_pointer_losses_dense_and_sparse_agree_with_formula():
    batch, heads, n = 3, 2, 6
    logits = rng.normal(scale=2, size=(batch, heads, n, n)).astype("float32")
    spans = {(0, 0, 1, 2), (0, 1, 3, 3), (1, 0, 2, 5), (2, 1, 1, 1), (2, 1, 2, 4)}
    dense = np.zeros((batch, heads, n, n), "float32")
    sparse = np.zeros((batch, heads, 2, 2), "int32")
    fill = {}
    for b, h, i, j in sorted(spans):
        dense[b, h, i, j] = 1
        slot = fill.setdefault((b, h), 0)
        sparse[b, h, slot] = (i, j)
        fill[(b, h)] = slot + 1
    expected = mcce_numpy(dense.reshape(batch, heads, -1), logits.reshape(batch, heads, -1)).mean(axis=1)
    np.testing.assert_allclose(np_(losses.global_pointer_crossentropy(dense, logits)), expected, rtol=1e-5)
    # The sparse form drops span (0, 0) (the [CLS] padding), so compare with the dense loss without it.
    expected_sparse = mcce_numpy(dense.reshape(batch, heads, -1)[..., 1:], logits.reshape(batch, heads, -1)[..., 1:])
    np.testing.assert_allclose(
        np_(losses.sparse_global_pointer_crossentropy(sparse, logits)), expected_sparse.mean(axis=1), rtol=1e-4
    )


# ------------------------------------------------------------------ class imbalance
def softmax(z):
    z = z - z.max(-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


@pytest.mark.parametrize("alpha", [None, 0.25, [0.1, 0.2, 0.3, 0.4]])
def test_focal_loss_equals_formula_and_gradient(alpha):
    gamma = 2.0
    z = rng.normal(size=(8, 4)).astype("float32")
    y = rng.integers(0, 4, size=(8,))
    p_t = softmax(z.astype("float64"))[np.arange(8), y]
    a_t = 1.0 if alpha is None else (np.asarray(alpha)[y] if isinstance(alpha, list) else alpha)
    expected = -a_t * (1 - p_t) ** gamma * np.log(p_t)
    got = np_(losses.sparse_categorical_focal_crossentropy(y, z, gamma=gamma, alpha=alpha, from_logits=True))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # From probabilities as well.
    got_p = np_(losses.sparse_categorical_focal_crossentropy(y, softmax(z), gamma=gamma, alpha=alpha))
    np.testing.assert_allclose(got_p, expected, rtol=1e-4)
    # Closed-form gradient w.r.t. the logits: dFL/dp_t * dp_t/dz, dp_t/dz = p_t (onehot - p).
    p = softmax(z.astype("float64"))
    d_dpt = a_t * (gamma * (1 - p_t) ** (gamma - 1) * np.log(p_t) - (1 - p_t) ** gamma / p_t)
    onehot = np.eye(4)[y]
    expected_grad = (d_dpt * p_t)[:, None] * (onehot - p)
    got_grad = grad_of(lambda t: losses.sparse_categorical_focal_crossentropy(y, t, gamma=gamma, alpha=alpha,
                                                                             from_logits=True), z)
    np.testing.assert_allclose(got_grad, expected_grad, rtol=1e-4, atol=1e-6)


def test_keras_categorical_focal_matches_the_same_formula():
    """The one-hot focal loss is Keras's own; check it computes the article's formula so we need not re-implement it."""
    z = rng.normal(size=(8, 4)).astype("float32")
    y = rng.integers(0, 4, size=(8,))
    p_t = softmax(z.astype("float64"))[np.arange(8), y]
    expected = -0.25 * (1 - p_t) ** 2 * np.log(p_t)
    got = keras.losses.categorical_focal_crossentropy(np.eye(4)[y], z, alpha=0.25, gamma=2.0, from_logits=True)
    np.testing.assert_allclose(np_(got), expected, rtol=1e-5)
    ours = losses.sparse_categorical_focal_crossentropy(y, z, gamma=2.0, alpha=0.25, from_logits=True)
    np.testing.assert_allclose(np_(ours), np_(got), rtol=1e-5)


def test_logit_adjusted_ce_equals_formula_and_gradient():
    prior = np.array([0.7, 0.2, 0.08, 0.02])
    tau = 1.5
    z = rng.normal(size=(8, 4)).astype("float32")
    y = rng.integers(0, 4, size=(8,))
    adjusted = z.astype("float64") + tau * np.log(prior)
    p = softmax(adjusted)
    expected = -np.log(p[np.arange(8), y])
    got = np_(losses.logit_adjusted_crossentropy(y, z, prior=prior * 10, tau=tau))  # priors are normalised
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    expected_grad = p - np.eye(4)[y]  # CE gradient at the adjusted logits
    got_grad = grad_of(lambda t: losses.logit_adjusted_crossentropy(y, t, prior=prior, tau=tau), z)
    np.testing.assert_allclose(got_grad, expected_grad, rtol=1e-4, atol=1e-6)
    # Post-hoc adjustment subtracts tau log(prior).
    np.testing.assert_allclose(np_(losses.adjust_logits(z, prior, tau)), z - tau * np.log(prior), rtol=1e-5)
    with pytest.raises(ValueError, match="prior"):
        losses.LogitAdjustedCrossentropy(prior=[0.5, 0.0])


def test_am_softmax_equals_formula_and_gradient():
    scale, margin = 30.0, 0.35
    cos = rng.uniform(-1, 1, size=(8, 5)).astype("float32")
    y = rng.integers(0, 5, size=(8,))
    logits = scale * (cos.astype("float64") - margin * np.eye(5)[y])
    p = softmax(logits)
    expected = -np.log(p[np.arange(8), y])
    np.testing.assert_allclose(np_(losses.am_softmax_crossentropy(y, cos, scale, margin)), expected, rtol=1e-5)
    got_grad = grad_of(lambda t: losses.am_softmax_crossentropy(y, t, scale, margin), cos)
    np.testing.assert_allclose(got_grad, scale * (p - np.eye(5)[y]), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ Loss classes
LOSS_CASES = [
    (losses.MultilabelCategoricalCrossentropy(), lambda: (rng.integers(0, 2, (4, 6)).astype("float32"), 6)),
    (losses.SparseMultilabelCategoricalCrossentropy(mask_zero=True), lambda: (np.array([[1, 2]] * 4), 6)),
    (losses.SparseCategoricalFocalCrossentropy(gamma=1.0, alpha=[0.5] * 6, from_logits=True),
     lambda: (rng.integers(0, 6, (4,)), 6)),
    (losses.LogitAdjustedCrossentropy(prior=[3, 1, 1, 1, 1, 1], tau=1.0), lambda: (rng.integers(0, 6, (4,)), 6)),
    (losses.AMSoftmaxCrossentropy(scale=10.0, margin=0.2), lambda: (rng.integers(0, 6, (4,)), 6)),
]


@pytest.mark.parametrize("case", range(len(LOSS_CASES)))
def test_loss_classes_serialize_and_train(case):
    loss, make = LOSS_CASES[case]
    y, width = make()
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(restored) is type(loss) and restored.get_config() == loss.get_config()
    x = rng.normal(size=(4, 3)).astype("float32")
    preds = rng.normal(size=(4, width)).astype("float32")
    np.testing.assert_allclose(float(np_(restored(y, preds))), float(np_(loss(y, preds))), rtol=1e-6)
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(width)(inputs))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss, jit_compile=True)
    first = model.evaluate(x, y, verbose=0)
    model.fit(x, y, epochs=20, verbose=0)
    assert model.evaluate(x, y, verbose=0) < first


@pytest.mark.skipif(in_subprocess, reason="this test launches the jax run itself")
def test_losses_on_jax_backend():
    run_pytest_on_backend("jax", "tests/test_losses.py", "-k", "formula or gradient or sparse")
