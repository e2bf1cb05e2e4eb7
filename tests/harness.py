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


class LayerTestCase:
    """A class-based test case for one Keras layer, in the spirit of keras-hub's `run_layer_test` (own code).

    Subclass it (pytest collects `Test*` classes) and call `self.run_layer_test(...)` once per layer. It checks, on the
    current backend:
      1. `get_config` round-trips through `from_config`, and the clone computes outputs of the same shapes;
      2. the layer's symbolic output specs (what functional models see) agree with its eager outputs;
      3. a model around the layer predicts under `jit_compile=True` what the eager layer computes;
      4. `.keras` save/load reproduces the predictions exactly;
      5. under `mixed_bfloat16` its variables stay float32 and its outputs are finite;
      6. two `fit` steps give a finite loss and change every trainable weight of the layer (a layer without weights
         gets a `Dense` before each float input, whose weights must change: the layer passes gradients). A layer with no
         trainable weights and no float output (a mask builder) has nothing to train, and that is asserted.

    Input conventions (as keras-hub's): `input_data` is one array (the first call argument), a list of arrays (one
    call argument that is a list, as `ConditionalLayerNormalization` takes), or a dict of arrays passed as keyword
    arguments (`{"inputs": x, "token_ids": ids}`). `call_kwargs` holds non-tensor call arguments.
    """

    rtol = 1e-5
    atol = 1e-5

    def run_layer_test(
        self,
        layer_cls: type[keras.layers.Layer],
        init_kwargs: dict,
        input_data,
        *,
        call_kwargs: dict | None = None,
        loss=None,
        layer_loss: Callable[[keras.layers.Layer], Callable] | None = None,
        targets=None,
        expected_output_shape=None,
        trainable: bool = True,
    ) -> None:
        """Runs every check on `layer_cls(**init_kwargs)` called on `input_data`.

        Args:
            layer_cls: the layer class under test.
            init_kwargs: constructor arguments.
            input_data: numpy input(s), with a batch axis: an array, a list, or a dict of keyword arguments.
            call_kwargs: non-tensor keyword arguments of `call` (e.g. `{"mode": "dense"}`).
            loss: Keras loss of the fit step (with `targets`). By default the mean square distance of every float
                output from 1, which needs no target of the output's shape (RemovePadding's token count depends
                on the data, and tensorflow's XLA pads it to its bound).
            layer_loss: instead of `loss`, a function `layer -> loss` for losses that live on the layer
                (`ConditionalRandomField.sparse_loss`).
            targets: fit targets (one array, or a list for several float outputs) for `loss` or `layer_loss`.
            expected_output_shape: if given, the eager output shape(s) must equal it.
            trainable: False for layers with nothing to train: no weights, and no float output (mask builders) or
                float outputs that depend only on the input shapes (fixed position tables); that is then asserted
                instead of running the fit step.
        """
        import tempfile

        call_kwargs = dict(call_kwargs or {})
        layer = layer_cls(**init_kwargs)
        model, sym_outputs = self._functional(layer, input_data, call_kwargs)
        eager = [np.asarray(keras.ops.convert_to_numpy(o))
                 for o in _as_list(self._call(layer, input_data, call_kwargs))]

        # 1. config round trip (on the built layer, whose config must not depend on build state)
        config = layer.get_config()
        clone = layer_cls.from_config(config)
        assert clone.get_config() == config, f"{layer_cls.__name__}: get_config does not round-trip"
        cloned = _as_list(self._call(clone, input_data, call_kwargs))
        assert [tuple(o.shape) for o in cloned] == [o.shape for o in eager], f"{layer_cls.__name__}: clone's shapes"

        # 2. symbolic specs vs eager outputs
        assert len(sym_outputs) == len(eager), (
            f"{layer_cls.__name__}: {len(sym_outputs)} symbolic vs {len(eager)} eager outputs")
        for sym, out in zip(sym_outputs, eager):
            assert len(sym.shape) == out.ndim, f"{layer_cls.__name__}: symbolic rank {sym.shape} vs eager {out.shape}"
            for s, e in zip(sym.shape, out.shape):
                assert s is None or s == e, f"{layer_cls.__name__}: symbolic shape {sym.shape} vs eager {out.shape}"
            assert keras.backend.standardize_dtype(sym.dtype) == keras.backend.standardize_dtype(out.dtype), (
                f"{layer_cls.__name__}: symbolic dtype {sym.dtype} vs eager {out.dtype}")
        if expected_output_shape is not None:
            expected = expected_output_shape if isinstance(expected_output_shape, list) else [expected_output_shape]
            assert [o.shape for o in eager] == [tuple(s) for s in expected], f"{layer_cls.__name__}: output shapes"

        # 3. jit-compiled predict equals the eager call
        model.compile(jit_compile=True)
        predicted = self._predict(model, input_data)
        for a, b in zip(eager, predicted):
            self._assert_close(a, b, f"{layer_cls.__name__}: jit_compile predict vs eager call")

        # 4. .keras save/load
        with tempfile.TemporaryDirectory() as tmp:
            path = f"{tmp}/{layer_cls.__name__}.keras"
            model.save(path)
            loaded = keras.saving.load_model(path, compile=False)
        loaded_layer = loaded.get_layer(layer.name)
        assert type(loaded_layer) is layer_cls, f"loaded {type(loaded_layer).__name__}, not {layer_cls.__name__}"
        loaded.compile(jit_compile=True)  # the same compilation as `predicted`, so equality is exact
        for a, b in zip(predicted, self._predict(loaded, input_data)):
            np.testing.assert_array_equal(a, b, err_msg=f"{layer_cls.__name__}: .keras save/load changed outputs")

        # 5. mixed_bfloat16
        with dtype_policy("mixed_bfloat16"):
            half = layer_cls(**init_kwargs)
            outputs = _as_list(self._call(half, input_data, call_kwargs))
        for w in half.weights:
            assert keras.backend.standardize_dtype(w.dtype) in ("float32", "int32", "int64", "bool"), (
                f"{w.path} is {w.dtype} under mixed_bfloat16; variables must stay float32")
        for out in outputs:
            out = np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(out, "float32")))
            assert np.all(np.isfinite(out)), f"{layer_cls.__name__}: non-finite output under mixed_bfloat16"

        # 6. two fit steps
        if trainable:
            self._check_fit(layer, model, eager, init_kwargs, input_data, call_kwargs, loss, layer_loss, targets)
        else:
            assert not layer.trainable_weights, f"{layer_cls.__name__} has trainable weights: test its fit step"
            floats = [o for o in eager if np.issubdtype(o.dtype, np.floating)]
            if floats:  # a constant of the input shapes (a fixed position table) passes no gradient to train
                shifted = _shifted(input_data)
                again = [np.asarray(keras.ops.convert_to_numpy(o)) for o in _as_list(
                    self._call(layer, shifted, call_kwargs))]
                for a, b in zip(eager, again):
                    assert not np.issubdtype(a.dtype, np.floating) or np.array_equal(a, b), (
                        f"{layer_cls.__name__} has float outputs that depend on its inputs: test its fit step")

    # -- pieces --------------------------------------------------------------------------------------------------

    @staticmethod
    def _call(layer, input_data, call_kwargs):
        if isinstance(input_data, dict):
            return layer(**{k: keras.ops.convert_to_tensor(v) for k, v in input_data.items()}, **call_kwargs)
        if isinstance(input_data, list):
            return layer([keras.ops.convert_to_tensor(v) for v in input_data], **call_kwargs)
        return layer(keras.ops.convert_to_tensor(input_data), **call_kwargs)

    @staticmethod
    def _inputs(input_data, adapt=None):
        """Symbolic inputs like `input_data`, and what the layer is called on (through `adapt` on float inputs)."""

        def one(name, array):
            array = np.asarray(array)
            x = keras.Input(array.shape[1:], dtype=keras.backend.standardize_dtype(array.dtype), name=name)
            return x, (adapt(x) if adapt is not None and np.issubdtype(array.dtype, np.floating) else x)

        if isinstance(input_data, dict):
            pairs = {k: one(k, v) for k, v in input_data.items()}
            return {k: p[0] for k, p in pairs.items()}, {k: p[1] for k, p in pairs.items()}
        if isinstance(input_data, list):
            pairs = [one(f"input_{i}", v) for i, v in enumerate(input_data)]
            return [p[0] for p in pairs], [p[1] for p in pairs]
        return one("input", input_data)

    @staticmethod
    def _apply(layer, args, call_kwargs):
        if isinstance(args, dict):
            return layer(**args, **call_kwargs)
        return layer(args, **call_kwargs)

    def _functional(self, layer, input_data, call_kwargs, adapt=None):
        inputs, args = self._inputs(input_data, adapt)
        outputs = self._apply(layer, args, call_kwargs)
        return keras.Model(inputs, outputs), _as_list(outputs)

    @staticmethod
    def _predict(model, input_data):
        # predict_on_batch: inputs need not share a batch axis (RestorePadding's tokens vs slots).
        return [np.asarray(keras.ops.convert_to_numpy(o)) for o in _as_list(model.predict_on_batch(input_data))]

    def _assert_close(self, a, b, message):
        if np.issubdtype(a.dtype, np.floating):
            np.testing.assert_allclose(a, b, rtol=self.rtol, atol=self.atol, err_msg=message)
        else:
            np.testing.assert_array_equal(a, b, err_msg=message)

    def _check_fit(self, layer, model, eager, init_kwargs, input_data, call_kwargs, loss, layer_loss, targets):
        layer_cls = type(layer)
        name = layer_cls.__name__
        own = bool(layer.trainable_weights)
        adapters = []
        outputs = _as_list(model.outputs)
        if not own or not all(keras.backend.is_float_dtype(o.dtype) for o in outputs):
            # A fresh model: Dense adapters before float inputs (no weights of its own), or float outputs only.
            layer = layer_cls(**init_kwargs)

            def adapt(x):
                adapters.append(keras.layers.Dense(x.shape[-1], name=f"adapter_{len(adapters)}"))
                return adapters[-1](x)

            inputs, args = self._inputs(input_data, None if own else adapt)
            outputs = [o for o in _as_list(self._apply(layer, args, call_kwargs))
                       if keras.backend.is_float_dtype(o.dtype)]
        assert outputs, f"{name}: no float output to fit; pass trainable=False if it has nothing to train"
        assert own or adapters, f"{name}: no trainable weight and no float input; pass trainable=False"
        if adapters or len(outputs) != len(model.outputs):
            model = keras.Model(inputs, outputs if len(outputs) > 1 else outputs[0])
        if layer_loss is not None:
            loss = layer_loss(layer)
        elif loss is None:
            loss = _distance_from_one
            targets = [np.zeros(o.shape, "float32") for o in eager if np.issubdtype(o.dtype, np.floating)]
        assert targets is not None, f"{name}: pass targets with loss"
        targets = targets if len(outputs) > 1 else _as_list(targets)[0]
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=loss, jit_compile=True)
        watched = layer.trainable_weights if own else [w for a in adapters for w in a.trainable_weights]
        before = [np.array(keras.ops.convert_to_numpy(w), copy=True) for w in watched]  # a copy, not a view
        # Two steps: a weight behind a zero-initialised one (ConditionalLayerNormalization's hidden projection) gets
        # its first gradient in the second; one compiled step serves both.
        history = model.fit(_OneBatch(input_data, targets), epochs=2, verbose=0)
        value = history.history["loss"][-1]
        assert np.isfinite(value), f"{name}: non-finite loss {value} in fit steps"
        unchanged = [w.path for b, w in zip(before, watched) if np.array_equal(b, keras.ops.convert_to_numpy(w))]
        assert not unchanged, f"{name}: two fit steps left {unchanged} unchanged (no gradient reaches them)"


def _shifted(input_data):
    """`input_data` with every float array changed (integer arrays, e.g. ids, kept)."""
    def one(a):
        a = np.asarray(a)
        return a + 1.5 if np.issubdtype(a.dtype, np.floating) else a

    if isinstance(input_data, dict):
        return {k: one(v) for k, v in input_data.items()}
    if isinstance(input_data, list):
        return [one(v) for v in input_data]
    return one(input_data)


def _distance_from_one(y_true, y_pred):
    """A loss that ignores `y_true` (whose shape may differ from a data-dependent `y_pred`)."""
    del y_true
    return keras.ops.mean(keras.ops.square(keras.ops.cast(y_pred, "float32") - 1.0))


class _OneBatch(keras.utils.PyDataset):
    """One batch of (inputs, targets), whatever their first axes (a PyDataset is not checked for cardinality)."""

    def __init__(self, inputs, targets):
        super().__init__()
        # tensorflow's dataset signatures take tuples, not lists
        self.batch = tuple(tuple(x) if isinstance(x, list) else x for x in (inputs, targets))

    def __len__(self):
        return 1

    def __getitem__(self, index):
        return self.batch
