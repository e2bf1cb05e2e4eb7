"""`bert4x.models.Model`: on jax, `steps_per_execution` steps run as one compiled program (a scan over the stacked
batches) and train exactly as Keras's loop of single steps, dropout included; chunks that cannot be stacked, the tail
of an epoch, and the other backends train as `keras.Model`. Runs on tensorflow here and on jax via
`test_training_on_jax_backend`."""

import os

import keras
import numpy as np
import pytest
from helpers import in_subprocess, run_pytest_on_backend

from bert4x.models import Model, build_transformer_model

CONFIG = dict(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
              max_position_embeddings=32, type_vocab_size=2, hidden_act="gelu", hidden_dropout_prob=0.1,
              attention_probs_dropout_prob=0.1)


def _data(rows: int = 40, length: int = 12):
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 100, (rows, length)).astype("int32")
    tokens[:, length - 3:] = 0
    return [tokens, np.zeros_like(tokens)], rng.integers(0, 2, rows).astype("int32")


def _classifier(model_class, steps_per_execution: int):
    keras.utils.set_random_seed(1)
    bert = build_transformer_model(CONFIG, with_pool=True)
    model = model_class(bert.inputs, keras.layers.Dense(2, name="Classifier")(bert.output))
    model.compile(keras.optimizers.AdamW(1e-3, weight_decay=0.01),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  steps_per_execution=steps_per_execution)
    return model


def _max_weight_difference(a: keras.Model, b: keras.Model) -> float:
    return max(float(np.abs(u - v).max()) for u, v in zip(a.get_weights(), b.get_weights()))


@pytest.fixture
def scans(monkeypatch):
    """The lengths of the step scans traced (jax only)."""
    import jax

    lengths, scan = [], jax.lax.scan

    def counting_scan(body, init, xs, *args, **kwargs):
        lengths.append(jax.tree.leaves(xs)[0].shape[0])
        return scan(body, init, xs, *args, **kwargs)

    monkeypatch.setattr(jax.lax, "scan", counting_scan)
    return lengths


def test_build_transformer_model_returns_a_bert4x_model():
    bert = build_transformer_model(CONFIG)
    assert isinstance(bert, Model) and isinstance(bert, keras.Model)


def test_fused_steps_train_as_keras_single_steps(request):
    """10 batches an epoch, 2 epochs: chunks of 4 fused, the tail of 2 batches one step at a time."""
    steps_per_execution = 4
    x, y = _data()
    reference = _classifier(keras.Model, 1)
    expected = reference.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0).history["loss"]
    model = _classifier(Model, steps_per_execution)
    lengths = request.getfixturevalue("scans") if keras.backend.backend() == "jax" else None
    losses = model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0).history["loss"]
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    assert _max_weight_difference(model, reference) < 1e-5
    if lengths is not None:  # one program of k steps, traced once and reused for every full chunk
        assert lengths == [steps_per_execution]


def test_chunks_of_different_shapes_run_one_step_at_a_time(request):
    """A generator of batches of varying length cannot be stacked: those chunks take the single-step program. (On
    tensorflow this also covers the pooled [CLS] of a sequence of unknown length, which failed to trace before.)"""
    x, y = _data(rows=32)

    def batches():
        for _epoch in range(2):
            for i in range(8):
                length = 12 if i % 2 else 9
                yield (x[0][4 * i:4 * i + 4, :length], x[1][4 * i:4 * i + 4, :length]), y[4 * i:4 * i + 4]

    reference = _classifier(keras.Model, 1)
    expected = reference.fit(batches(), steps_per_epoch=8, epochs=2, verbose=0).history["loss"]
    model = _classifier(Model, 4)
    lengths = request.getfixturevalue("scans") if keras.backend.backend() == "jax" else None
    losses = model.fit(batches(), steps_per_epoch=8, epochs=2, verbose=0).history["loss"]
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    assert _max_weight_difference(model, reference) < 1e-5
    if lengths is not None:
        assert lengths == []


class _KernelPerBatch(keras.callbacks.Callback):
    """Syncs the training state into the variables after every batch (as checkpointing callbacks do) and records the
    classifier's kernel."""

    def __init__(self):
        super().__init__()
        self.kernels = []

    def on_train_batch_end(self, batch, logs=None):
        if keras.backend.backend() == "jax":
            self.model.jax_state_sync()
        self.kernels.append(np.array(self.model.get_layer("Classifier").kernel))


@pytest.mark.parametrize("steps_per_execution", [1, 4])
def test_callbacks_see_the_state_after_each_execution(steps_per_execution):
    """`Model` stores the state Keras's loop hands to callbacks without Keras's attribute tracking; a callback that
    syncs it sees the same weights as under `keras.Model`."""
    x, y = _data(rows=32)
    seen = []
    for model_class in (keras.Model, Model):
        callback = _KernelPerBatch()
        _classifier(model_class, steps_per_execution).fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0,
                                                          callbacks=[callback])
        seen.append(callback.kernels)
    assert len(seen[1]) == len(seen[0]) == 8 // steps_per_execution
    for mine, theirs in zip(*seen):
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)
    assert not np.allclose(seen[1][0], seen[1][-1])  # the weights moved between the batches seen


def test_model_saves_and_loads_as_itself(tmp_path):
    x, y = _data(rows=8)
    model = _classifier(Model, 2)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    path = os.path.join(tmp_path, "classifier.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is Model
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    layers = lambda m: [(type(layer), layer.name) for layer in m.layers]  # noqa: E731
    assert layers(loaded) == layers(model)


@pytest.mark.skipif(in_subprocess, reason="this test launches the jax run itself")
def test_training_on_jax_backend():
    run_pytest_on_backend("jax", "tests/test_training.py")
