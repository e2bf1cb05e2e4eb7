"""Training helpers: the piecewise-linear schedule against np.interp, layer-wise decay giving each layer its rate
(checked on real AdamW steps), FGM's update against a numpy computation of its definition (weights restored), and
Keras's own gradient accumulation / EMA used through these classes."""

import keras
import numpy as np
import pytest
from helpers import in_subprocess, run_pytest_on_backend
from keras import ops

from bert4x.models import build_transformer_model
from bert4x.optimizers import (
    LayerwiseDecayAdamW,
    PiecewiseLinearSchedule,
    adversarial_training,
    layerwise_lr_multipliers,
    piecewise_linear,
)

rng = np.random.default_rng(0)


def np_(x):
    return ops.convert_to_numpy(x)


# ------------------------------------------------------------------ schedule
@pytest.mark.parametrize("schedule,from_zero", [({1000: 1.0, 2000: 0.1}, True), ({0: 0.5, 10: 1.0, 30: 0.0}, True),
                                                ({100: 1.0, 300: 0.2}, False)])
def test_piecewise_linear_matches_interp(schedule, from_zero):
    points = sorted(schedule.items())
    if from_zero and points[0][0] != 0:
        points = [(0, 0.0)] + points
    steps = np.arange(0, 2 * points[-1][0] + 5, 7)
    expected = np.interp(steps, [p[0] for p in points], [p[1] for p in points])  # holds the ends
    got = np.array([float(np_(piecewise_linear(s, schedule, from_zero))) for s in steps])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_schedule_serializes_and_drives_the_optimizer():
    schedule = PiecewiseLinearSchedule(0.1, {4: 1.0, 8: 0.5})
    restored = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(schedule))
    assert restored.schedule == {4: 1.0, 8: 0.5}
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=schedule), loss="mse")
    model.fit(rng.normal(size=(12, 3)), rng.normal(size=(12, 1)), batch_size=2, epochs=1, verbose=0)
    assert int(model.optimizer.iterations) == 6
    np.testing.assert_allclose(float(np_(model.optimizer.learning_rate)), 0.1 * (1.0 - 0.5 * 2 / 4), rtol=1e-6)
    with pytest.raises(ValueError, match="non-empty"):
        PiecewiseLinearSchedule(0.1, {})


# ------------------------------------------------------------------ layer-wise decay
TINY = {"vocab_size": 30, "hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 16}


def classifier():
    keras.utils.set_random_seed(1)
    bert = build_transformer_model(TINY)
    output = keras.layers.Dense(2, name="Classifier")(keras.layers.GlobalAveragePooling1D()(bert.output))
    return keras.Model(bert.inputs, output)


def expected_multiplier(path, decay=0.5, layers=2):
    if path.startswith("Embedding-"):
        return decay ** (layers + 1)
    for i in range(layers):
        if path.startswith(f"Transformer-{i}-"):
            return decay ** (layers - i)
    return 1.0


def test_layerwise_multipliers_follow_layer_index():
    model = classifier()
    multipliers = layerwise_lr_multipliers(model.trainable_variables, layer_decay=0.5)
    for v, m in zip(model.trainable_variables, multipliers):
        assert m == expected_multiplier(v.path), v.path
    assert sorted(set(multipliers)) == [0.125, 0.25, 0.5, 1.0]
    with pytest.raises(ValueError, match="layer_decay"):
        layerwise_lr_multipliers(model.trainable_variables, layer_decay=1.5)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_layerwise_decay_scales_each_layers_step(weight_decay):
    """AdamW's first step is linear in the learning rate, so layer i's step must be its multiplier times AdamW's."""
    ids = rng.integers(1, 30, size=(8, 5)).astype("int32")
    data = ([ids, np.zeros_like(ids)], rng.integers(0, 2, size=(8,)))
    steps = {}
    for name, optimizer in (("plain", keras.optimizers.AdamW(1e-2, weight_decay=weight_decay)),
                            ("layerwise", LayerwiseDecayAdamW(1e-2, layer_decay=0.5, weight_decay=weight_decay))):
        model = classifier()
        before = [np_(v).copy() for v in model.trainable_variables]
        model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=True)
        model.fit(*data, batch_size=8, epochs=1, verbose=0)
        steps[name] = {v.path: np_(v) - b for v, b in zip(model.trainable_variables, before)}
    rates = set()
    for path, step in steps["layerwise"].items():
        m = expected_multiplier(path)
        np.testing.assert_allclose(step, m * steps["plain"][path], rtol=1e-3, atol=1e-9, err_msg=path)
        if np.abs(steps["plain"][path]).max() > 0:
            rates.add(m)
    assert rates == {0.125, 0.25, 0.5, 1.0}


def test_keras_gradient_accumulation_and_ema_work_with_layerwise_decay():
    """Documented use: Keras's own gradient_accumulation_steps and use_ema, through LayerwiseDecayAdamW.

    Each case uses one fit call: on jax, Keras 3.15 fails on a second fit of a model whose optimizer has use_ema
    (plain AdamW too: "Attempt to donate the same buffer twice").
    """
    x, y = rng.normal(size=(4, 3)), rng.normal(size=(4, 1))
    moved = {}
    for batches in (1, 2):
        keras.utils.set_random_seed(3)
        inputs = keras.Input((3,))
        model = keras.Model(inputs, keras.layers.Dense(1, name="Transformer-0-Dense")(inputs))
        optimizer = LayerwiseDecayAdamW(0.1, layer_decay=0.5, gradient_accumulation_steps=2, use_ema=True,
                                        ema_momentum=0.5)
        model.compile(optimizer=optimizer, loss="mse")
        start = np_(model.trainable_variables[0]).copy()
        model.fit(x[: 2 * batches], y[: 2 * batches], batch_size=2, epochs=1, verbose=0)
        optimizer.finalize_variable_values(model.trainable_variables)  # the EMA weights
        moved[batches] = not np.array_equal(np_(model.trainable_variables[0]), start)
        assert optimizer.lr_multipliers == [0.5, 0.5]
    assert moved == {1: False, 2: True}  # the first batch is only accumulated; the second applies the mean gradient
    restored = LayerwiseDecayAdamW.from_config(optimizer.get_config())
    assert restored.layer_decay == 0.5 and restored.gradient_accumulation_steps == 2 and restored.use_ema


# ------------------------------------------------------------------ FGM
V, T, DIM = 7, 4, 3


def fgm_model():
    keras.utils.set_random_seed(2)
    ids = keras.Input((T,), dtype="int32")
    x = keras.layers.Embedding(V, DIM, name="Embedding-Token")(ids)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(ids, keras.layers.Dense(1, name="Out")(x))


def numpy_gradients(E, w, c, ids, y):
    """Gradients of mean((mean_t E[ids] . w + c - y)^2) in closed form."""
    h = E[ids].mean(axis=1)
    residual = 2 * (h @ w + c - y) / len(ids)  # [batch, 1]
    grad_E = np.zeros_like(E)
    for b in range(len(ids)):
        for t in ids[b]:
            grad_E[t] += residual[b, 0] * w[:, 0] / ids.shape[1]
    return grad_E, h.T @ residual, residual.sum(axis=0)


@pytest.mark.parametrize("clean_gradient", [True, False])
def test_fgm_step_matches_its_definition(clean_gradient):
    epsilon, lr = 0.7, 0.1
    ids = rng.integers(0, V, size=(6, T)).astype("int32")
    ids[:, 0] = 1  # a shared row, so the gradient has a clear direction
    y = rng.normal(size=(6, 1)).astype("float32")
    model = fgm_model()
    E, w, c = (np_(v).astype("float64") for v in model.trainable_variables)
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    adversarial_training(model, "Embedding-Token", epsilon=epsilon, clean_gradient=clean_gradient)
    history = model.fit(ids, y, batch_size=6, epochs=1, verbose=0).history
    g = numpy_gradients(E, w, c, ids, y)
    delta = epsilon * g[0] / (np.linalg.norm(g[0]) + 1e-8)
    g_adv = numpy_gradients(E + delta, w, c, ids, y)
    total = [a + b for a, b in zip(g, g_adv)] if clean_gradient else g_adv
    for variable, value, grad in zip(model.trainable_variables, (E, w, c), total):
        # The embeddings end at E - lr * grad: the perturbation itself was removed.
        np.testing.assert_allclose(np_(variable), value - lr * grad, rtol=1e-4, atol=1e-6, err_msg=variable.path)
    clean_loss = np.mean((E[ids].mean(1) @ w + c - y) ** 2)
    np.testing.assert_allclose(history["loss"][0], clean_loss, rtol=1e-4)


@pytest.mark.parametrize("clean_gradient", [True, False])
def test_pgd_step_matches_its_definition(clean_gradient):
    epsilon, step_size, steps, lr = 0.5, 0.3, 3, 0.1
    ids = rng.integers(0, V, size=(6, T)).astype("int32")
    ids[:, 0] = 1
    y = rng.normal(size=(6, 1)).astype("float32")
    model = fgm_model()
    E, w, c = (np_(v).astype("float64") for v in model.trainable_variables)
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    adversarial_training(model, "Embedding-Token", epsilon=epsilon, clean_gradient=clean_gradient, steps=steps,
                         step_size=step_size)
    model.fit(ids, y, batch_size=6, epochs=1, verbose=0)
    g = numpy_gradients(E, w, c, ids, y)
    r = np.zeros_like(E)
    gradient_E = g[0]
    for k in range(steps):
        r = r + step_size * gradient_E / (np.linalg.norm(gradient_E) + 1e-8)
        r = r * min(1.0, epsilon / (np.linalg.norm(r) + 1e-12))
        if k < steps - 1:
            gradient_E = numpy_gradients(E + r, w, c, ids, y)[0]
    g_adv = numpy_gradients(E + r, w, c, ids, y)
    total = [a + b for a, b in zip(g, g_adv)] if clean_gradient else g_adv
    for variable, value, grad in zip(model.trainable_variables, (E, w, c), total):
        np.testing.assert_allclose(np_(variable), value - lr * grad, rtol=1e-4, atol=1e-6, err_msg=variable.path)


def test_gradient_penalty_step_matches_finite_differences():
    from bert4x.optimizers import gradient_penalty

    epsilon, lr = 0.8, 0.1
    ids = rng.integers(0, V, size=(6, T)).astype("int32")
    y = rng.normal(size=(6, 1)).astype("float32")
    model = fgm_model()
    E, w, c = (np_(v).astype("float64") for v in model.trainable_variables)
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    gradient_penalty(model, "Embedding-Token", epsilon=epsilon)
    history = model.fit(ids, y, batch_size=6, epochs=1, verbose=0).history

    def penalized(params):
        E_, w_, c_ = params
        loss = np.mean((E_[ids].mean(1) @ w_ + c_ - y) ** 2)
        return loss + 0.5 * epsilon * np.sum(numpy_gradients(E_, w_, c_, ids, y)[0] ** 2)

    params = [E, w, c]
    for i, value in enumerate(params):
        grad = np.zeros_like(value)
        for index in np.ndindex(value.shape):
            up = [p.copy() for p in params]
            down = [p.copy() for p in params]
            up[i][index] += 1e-5
            down[i][index] -= 1e-5
            grad[index] = (penalized(up) - penalized(down)) / 2e-5
        np.testing.assert_allclose(np_(model.trainable_variables[i]), value - lr * grad, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(history["loss"][0], np.mean((E[ids].mean(1) @ w + c - y) ** 2), rtol=1e-4)


def test_fgm_improves_training_and_rejects_bad_arguments():
    model = fgm_model()
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    with pytest.raises(ValueError, match="no layer named"):
        adversarial_training(model, "Embedding-Missing")
    with pytest.raises(ValueError, match="epsilon"):
        adversarial_training(model, epsilon=0)
    adversarial_training(model, epsilon=0.1)
    ids = rng.integers(0, V, size=(32, T)).astype("int32")
    y = (ids == 3).sum(axis=1, keepdims=True).astype("float32")
    history = model.fit(ids, y, batch_size=8, epochs=20, verbose=0).history
    assert history["loss"][-1] < 0.3 * history["loss"][0]


@pytest.mark.skipif(in_subprocess, reason="this test launches the jax run itself")
def test_optimizers_on_jax_backend():
    run_pytest_on_backend("jax", "tests/test_optimizers.py", "-k",
                          "fgm or pgd or penalty or virtual or scales or interp or ema or bert4keras")


# ------------------------------------------------------------------ bert4keras's optimizers
from bert4x.optimizers import (  # noqa: E402
    Adam,
    AdamEMA,
    AdamW,
    extend_with_gradient_accumulation,
    extend_with_lazy_optimization,
    extend_with_lookahead,
    extend_with_parameter_wise_lr,
    extend_with_piecewise_linear_lr,
    extend_with_weight_decay,
)


def two_layer_variables():
    inputs = keras.Input((3,))
    x = keras.layers.Dense(2, name="Body")(inputs)
    x = keras.layers.Dense(1, name="Head-Norm")(x)
    model = keras.Model(inputs, x)
    return model, list(model.trainable_variables)


def apply(optimizer, variables, grads):
    optimizer.apply_gradients(zip([ops.convert_to_tensor(g, "float32") for g in grads], variables))


def test_bert4keras_adam_without_bias_correction_matches_numpy():
    _, variables = two_layer_variables()
    w = np_(variables[0]).astype("float64")
    optimizer = Adam(0.01, bias_correction=False)
    m = v = np.zeros_like(w)
    for _ in range(3):
        g = rng.normal(size=w.shape)
        apply(optimizer, variables, [g] + [np.zeros(np_(x).shape) for x in variables[1:]])
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        w = w - 0.01 * m / (np.sqrt(v) + 1e-6)
    np.testing.assert_allclose(np_(variables[0]), w, rtol=1e-5, atol=1e-6)


def test_bert4keras_weight_decay_matches_paths_and_decays_decoupled():
    model, variables = two_layer_variables()
    before = [np_(v) for v in variables]
    optimizer = AdamW(0.1, weight_decay_rate=0.5, exclude_from_weight_decay=["Norm", "bias"])
    apply(optimizer, variables, [np.zeros(b.shape) for b in before])  # zero gradient: only the decay acts
    for v, b in zip(variables, before):
        expected = b if ("Norm" in v.path or "bias" in v.path) else b * (1 - 0.1 * 0.5)
        np.testing.assert_allclose(np_(v), expected, rtol=1e-6, err_msg=v.path)
    assert optimizer.get_config()["weight_decay_rate"] == 0.5


def test_bert4keras_piecewise_lr_and_gradient_accumulation_compose():
    cls = extend_with_piecewise_linear_lr(extend_with_gradient_accumulation(extend_with_weight_decay(Adam)), "X")
    optimizer = cls(1e-3, lr_schedule={100: 1.0, 200: 0.5}, grad_accum_steps=4, weight_decay_rate=0.01)
    assert optimizer.gradient_accumulation_steps == 4 and optimizer.weight_decay == 0.01
    for step, multiplier in [(0, 0.0), (50, 0.5), (100, 1.0), (150, 0.75), (400, 0.5)]:
        np.testing.assert_allclose(float(np_(optimizer._learning_rate(step))), 1e-3 * multiplier, rtol=1e-5)
    config = optimizer.get_config()
    assert config["grad_accum_steps"] == 4 and config["lr_schedule"] == {"100": 1.0, "200": 0.5}
    with pytest.raises(ValueError, match="grad_accum_steps"):
        cls(1e-3, grad_accum_steps=0)


def test_bert4keras_ema_apply_and_reset_swap_weights():
    model, variables = two_layer_variables()
    optimizer = AdamEMA(0.1, ema_momentum=0.5)
    with pytest.raises(RuntimeError, match="not built"):
        optimizer.apply_ema_weights()
    for _ in range(3):
        apply(optimizer, variables, [rng.normal(size=np_(v).shape) for v in variables])
    trained = [np_(v) for v in variables]
    averages = [np_(a) for a in optimizer._model_variables_moving_average]
    assert not np.allclose(trained[0], averages[0])
    optimizer.apply_ema_weights()
    for v, a in zip(variables, averages):
        np.testing.assert_allclose(np_(v), a)
    optimizer.reset_old_weights()
    for v, t in zip(variables, trained):
        np.testing.assert_allclose(np_(v), t)
    with pytest.raises(RuntimeError, match="apply_ema_weights"):
        optimizer.reset_old_weights()


def test_bert4keras_lookahead_matches_its_definition():
    _, variables = two_layer_variables()
    lr, k, alpha = 0.1, 2, 0.5
    optimizer = extend_with_lookahead(keras.optimizers.SGD)(lr, steps_per_slow_update=k, slow_step_size=alpha)
    fast = [np_(v).astype("float64") for v in variables]
    slow = [f.copy() for f in fast]
    for step in range(5):
        grads = [rng.normal(size=f.shape) for f in fast]
        apply(optimizer, variables, grads)
        fast = [f - lr * g for f, g in zip(fast, grads)]
        if (step + 1) % k == 0:
            slow = [s + alpha * (f - s) for s, f in zip(slow, fast)]
            fast = [s.copy() for s in slow]
    for v, f in zip(variables, fast):
        np.testing.assert_allclose(np_(v), f, rtol=1e-5, atol=1e-6)


def test_bert4keras_lazy_optimization_leaves_untouched_rows():
    table = keras.Variable(np.ones((4, 3), "float32"), name="table")
    other = keras.Variable(np.ones((2,), "float32"), name="other")
    optimizer = extend_with_lazy_optimization(Adam)(0.1, include_in_lazy_optimization=["table"])
    g1, g2 = np.zeros((4, 3)), np.zeros((4, 3))
    g1[0], g2[1] = 1.0, 1.0
    apply(optimizer, [table, other], [g1, np.ones(2)])
    after_first, other_first = np_(table).copy(), np_(other).copy()
    apply(optimizer, [table, other], [g2, np.zeros(2)])
    value = np_(table)
    np.testing.assert_array_equal(value[0], after_first[0])  # Adam's momentum would have moved row 0
    assert np.all(value[1] < 1) and np.all(value[2:] == 1)
    assert np.all(np_(other) < other_first)  # not lazy: momentum moves it on a zero gradient
    plain = Adam(0.1)
    t2 = keras.Variable(np.ones((4, 3), "float32"))
    apply(plain, [t2], [g1])
    apply(plain, [t2], [g2])
    assert not np.allclose(np_(t2)[0], after_first[0])


def test_bert4keras_parameter_wise_lr_scales_the_update():
    model, variables = two_layer_variables()
    before = [np_(v) for v in variables]
    optimizer = extend_with_parameter_wise_lr(keras.optimizers.SGD)(0.1, paramwise_lr_schedule={"Head": 0.1})
    grads = [np.ones(b.shape) for b in before]
    apply(optimizer, variables, grads)
    for v, b in zip(variables, before):
        multiplier = 0.1 if v.path.startswith("Head") else 1.0
        np.testing.assert_allclose(np_(v), b - 0.1 * multiplier, rtol=1e-6, err_msg=v.path)


def test_bert4keras_optimizers_train_in_fit():
    keras.utils.set_random_seed(0)
    cls = extend_with_parameter_wise_lr(extend_with_lazy_optimization(extend_with_lookahead(AdamEMA)))
    optimizer = cls(0.05, steps_per_slow_update=3, include_in_lazy_optimization=["embeddings"],
                    paramwise_lr_schedule={"dense": 0.5}, ema_momentum=0.9)
    ids = rng.integers(1, 10, size=(64, 4)).astype("int32")
    y = (ids[:, :1] > 5).astype("float32")
    inputs = keras.Input((4,), dtype="int32")
    x = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(10, 8)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid", name="dense")(x))
    model.compile(optimizer=optimizer, loss="binary_crossentropy")
    history = model.fit(ids, y, batch_size=16, epochs=15, verbose=0).history
    assert history["loss"][-1] < 0.9 * history["loss"][0]
    optimizer.apply_ema_weights()
    optimizer.reset_old_weights()


def test_virtual_adversarial_training_trains_and_adds_the_kl_term():
    from bert4x.optimizers import virtual_adversarial_training

    ids = rng.integers(0, V, size=(32, T)).astype("int32")
    y = (ids == 3).any(axis=1).astype("int32")

    def make():
        keras.utils.set_random_seed(3)
        inputs = keras.Input((T,), dtype="int32")
        x = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(V, DIM, name="Embedding-Token")(inputs))
        model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
        model.compile(optimizer=keras.optimizers.Adam(0.05), loss="sparse_categorical_crossentropy")
        return model

    plain, vat = make(), make()
    with pytest.raises(ValueError, match="epsilon"):
        virtual_adversarial_training(vat, epsilon=0)
    virtual_adversarial_training(vat, "Embedding-Token", epsilon=1.0, weight=1.0)
    plain.fit(ids, y, batch_size=32, epochs=1, verbose=0)
    vat_history = vat.fit(ids, y, batch_size=32, epochs=1, verbose=0).history
    # the same supervised loss is reported, but the KL term moved the weights differently
    assert not np.allclose(np_(plain.trainable_variables[0]), np_(vat.trainable_variables[0]))
    history = vat.fit(ids, y, batch_size=8, epochs=15, verbose=0).history
    assert history["loss"][-1] < 0.7 * vat_history["loss"][0]
