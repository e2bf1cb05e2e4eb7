"""One harness that every bert4x layer and model goes through.

`check_model(make_model, inputs, targets, tmp_path)` checks, for a model factory:
  1. every layer's `get_config` round-trips (`from_config(get_config())` gives the same config);
  2. `.keras` save/load reproduces the predictions exactly;
  3. a `fit` step under `jit_compile=True` gives a finite loss and changes the weights;
  4. under the `mixed_bfloat16` policy the model builds, keeps float32 variables, predicts finite values and fits.

`layer_model(make_layer, input_specs)` wraps a single layer into a functional model so layers use the same checks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import keras
import numpy as np


@contextlib.contextmanager
def dtype_policy(name: str):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def layer_model(make_layer: Callable[[], keras.layers.Layer], input_specs: Sequence[tuple], **call_kwargs):
    """A factory of functional models around one layer. `input_specs` are `(shape_without_batch, dtype)` pairs."""

    def make():
        inputs = [keras.Input(shape, dtype=dtype) for shape, dtype in input_specs]
        layer = make_layer()
        outputs = layer(*inputs, **call_kwargs)
        return keras.Model(inputs, outputs)

    return make


def _as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _predict(model, inputs):
    return [np.asarray(o, dtype=np.float32) for o in _as_list(model.predict(inputs, verbose=0))]


def check_config_round_trip(model: keras.Model) -> None:
    for layer in model.layers:
        config = layer.get_config()
        clone = type(layer).from_config(config)
        assert clone.get_config() == config, f"{layer.name}: get_config does not round-trip"


def check_save_load(model: keras.Model, inputs, tmp_path) -> None:
    path = str(tmp_path / f"{model.name or 'model'}.keras")
    before = _predict(model, inputs)
    model.save(path)
    loaded = keras.saving.load_model(path, compile=False)
    after = _predict(loaded, inputs)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


def check_fit_step(model: keras.Model, inputs, targets, loss="mse", jit_compile=True) -> float:
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, jit_compile=jit_compile)
    before = [np.array(w) for w in model.trainable_weights]
    history = model.fit(inputs, targets, epochs=1, batch_size=len(_as_list(inputs)[0]), verbose=0)
    value = history.history["loss"][-1]
    assert np.isfinite(value), f"non-finite loss {value}"
    changed = [not np.array_equal(b, np.array(w)) for b, w in zip(before, model.trainable_weights)]
    assert any(changed), "a fit step changed no weight"
    return value


def check_model(
    make_model: Callable[[], keras.Model],
    inputs,
    targets,
    tmp_path,
    loss="mse",
    policies: Sequence[str] = ("float32", "mixed_bfloat16"),
) -> None:
    """Runs all harness checks on models made by `make_model` (called once per dtype policy)."""
    for policy in policies:
        with dtype_policy(policy):
            model = make_model()
            if policy == "float32":
                check_config_round_trip(model)
                check_save_load(model, inputs, tmp_path)
            else:
                for w in model.weights:
                    assert keras.backend.standardize_dtype(w.dtype) in ("float32", "int32", "int64", "bool"), (
                        f"{w.path} is {w.dtype} under {policy}; variables must stay float32"
                    )
                for out in _predict(model, inputs):
                    assert np.all(np.isfinite(out)), f"non-finite output under {policy}"
            check_fit_step(model, inputs, targets, loss=loss, jit_compile=True)
