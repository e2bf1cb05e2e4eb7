"""`Model`: a `keras.Model` whose `fit` on jax runs `steps_per_execution` steps as one compiled program.

Keras 3's jax trainer honours `steps_per_execution` with a Python loop that dispatches one compiled step at a time, so
every step still pays the host's dispatch of the whole training state (hundreds of arrays in and out for a BERT
classifier with AdamW), and on a fast GPU that dispatch, not the GPU, sets the step time. Here the `k` batches of one
execution are stacked on the device and the compiled program loops over them (`jax.lax.scan`): one dispatch per `k`
steps, and the same steps as Keras's loop, dropout draws included. Where the GPU is the limit it keeps the step
GPU-bound when the host slows. The measurements are in `benchmarks/RESULTS.md`.

On the tensorflow and torch backends, with `steps_per_execution=1`, under `run_eagerly`, `jit_compile=False` or a
`keras.distribution`, `Model` trains exactly as `keras.Model` does.

On every backend `predict`, `fit` and `evaluate` check their inputs on the host before anything is dispatched: ids fed
to an `Embedding` must lie in `[0, input_dim)` (token ids within the vocabulary, segment ids within the segment
table), sequences may not be longer than a learned `PositionEmbedding`, and the inputs of one batch must agree in
batch size and length. A `ValueError` names the input, the offending value and the limit. numpy arrays (and nested
lists) are checked once; batches from generators, `keras.utils.PyDataset`s and `tf.data.Dataset`s one at a time as they
are drawn. Tensors already on a device are not read back to the host, so they are not checked.

On jax, Keras's loops take the variables' values out of the model for the duration of a call (they pass the state
to compiled functions and put it back at the end), so a call that raises, or a second thread calling meanwhile, would
leave the model without weights. `Model` serialises these calls per model and, if one raises, puts the last state
back before the error propagates.

Both the fused steps and that guard override private parts of Keras's jax trainer (`_jax_state`, the variables'
`_value`), which Keras may change in any release: `TESTED_KERAS` is the range of Keras versions this module was
tested with (setup.py pins it), and building a `Model` under another version warns.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
import threading
import warnings

import keras
import numpy as np

__all__ = ["Model", "TESTED_KERAS", "check_keras_version"]

# [lowest, first untested) Keras release whose jax trainer internals `Model` relies on.
TESTED_KERAS = ((3, 10), (3, 16))


def check_keras_version(version: str | None = None) -> bool:
    """Warns (`RuntimeWarning`, naming the tested range) and returns False when Keras is outside `TESTED_KERAS`.

    Args:
        version: a Keras version string; defaults to the installed `keras.__version__`.
    """
    version = keras.__version__ if version is None else version
    try:
        release = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        release = None
    (low, high) = TESTED_KERAS
    if release is not None and low <= release < high:
        return True
    warnings.warn(
        f"bert4x.models.Model was tested with Keras >={low[0]}.{low[1]},<{high[0]}.{high[1]} and Keras {version} is "
        "installed: Model overrides private parts of Keras's jax trainer, which may have changed.",
        RuntimeWarning,
        stacklevel=3,
    )
    return False


def _guarded(method):
    """Wraps a Keras loop method with the input checks and, on jax, the state guard."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        args, kwargs = self._checked_arguments(method.__name__, args, kwargs)
        if keras.backend.backend() != "jax":
            return _reraise_input_errors(method, self, *args, **kwargs)
        self._check_jax_float16()
        with self._jax_call_lock:
            saved = self._jax_values()
            try:
                return _reraise_input_errors(method, self, *args, **kwargs)
            except BaseException:
                self._restore_jax_values(saved)
                raise

    return wrapper


def _reraise_input_errors(method, model, *args, **kwargs):
    """tf.data pipelines report a failed input check as a TensorFlow error: re-raised here as the `ValueError`."""
    try:
        return method(model, *args, **kwargs)
    except Exception as error:
        message = str(error)
        if type(error).__module__.startswith("tensorflow") and _CHECK_MARK in message:
            start = message.index(_CHECK_MARK) + len(_CHECK_MARK)
            raise ValueError(message[start:].split(_CHECK_MARK)[0]) from error
        raise


@keras.saving.register_keras_serializable(package="bert4x")
class Model(keras.Model):
    """`keras.Model` (functional or subclassed) whose jax `fit` runs `steps_per_execution` steps per dispatch.

    A drop-in replacement for `keras.Model`: build it from inputs and outputs, compile with `steps_per_execution=k`
    and `fit` as usual. Callbacks see one batch end per `k` steps, as with Keras's own `steps_per_execution`. The
    batches of an execution must share their shapes to be stacked; a chunk whose shapes differ (a smaller last
    batch, a generator of varying lengths) and the tail of an epoch shorter than `k` run one step per dispatch (that
    single step compiles once, on first use).

    Args:
        *args: as `keras.Model`: `inputs` and `outputs` for a functional model.
        **kwargs: as `keras.Model` (`name`, ...).

    Example:
        >>> import keras, numpy as np
        >>> from bert4x.models import Model
        >>> x = keras.Input((4,))
        >>> model = Model(x, keras.layers.Dense(1)(x))
        >>> model.compile("sgd", "mse", steps_per_execution=4)
        >>> model.fit(np.ones((32, 4)), np.zeros((32, 1)), batch_size=4, verbose=0).history["loss"][0] >= 0
        True
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_keras_version()

    fit = _guarded(keras.Model.fit)
    evaluate = _guarded(keras.Model.evaluate)
    predict = _guarded(keras.Model.predict)
    train_on_batch = _guarded(keras.Model.train_on_batch)
    test_on_batch = _guarded(keras.Model.test_on_batch)
    predict_on_batch = _guarded(keras.Model.predict_on_batch)

    def __setattr__(self, name: str, value) -> None:
        # Keras's jax loop stores the training state here after every dispatch, for callbacks that sync it. As a
        # layer attribute, each store would walk every state array through Keras's tracker, a host cost paid every
        # step (benchmarks/RESULTS.md); jax arrays are never tracked, so it is stored plainly.
        if name == "_jax_state":
            object.__setattr__(self, name, value)
            return
        super().__setattr__(name, value)

    def make_train_function(self, force: bool = False) -> None:
        if self.train_function is not None and not force:
            return
        if not self._fuses_steps():
            super().make_train_function(force)
            return
        import jax

        steps = self.steps_per_execution
        step = self.train_step

        def run_steps(state, batches):
            stacked = jax.tree.map(lambda *leaves: jax.numpy.stack(leaves), *batches)

            def body(state, data):
                logs, state = step(state, data)
                return state, logs

            state, logs = jax.lax.scan(body, state, stacked)
            return jax.tree.map(lambda values: values[-1], logs), state

        run_steps = jax.jit(run_steps, donate_argnums=0, compiler_options=_SCAN_COMPILER_OPTIONS)
        run_one = jax.jit(step, donate_argnums=0)

        def train_function(state, iterator):
            batches = [next(iterator)]  # StopIteration here ends the epoch, as in Keras's loop
            for _ in range(steps - 1):
                try:
                    batches.append(next(iterator))
                except StopIteration:
                    break
            if len(batches) == steps and _same_shapes(batches):
                return run_steps(state, tuple(batches))
            for data in batches:
                logs, state = run_one(state, data)
            return logs, state

        self.train_function = train_function

    # ----------------------------------------------------------------- weights files
    def save_weights(self, filepath, overwrite: bool = True, max_shard_size=None) -> None:
        """Keras's `save_weights`; a path without Keras's `.weights.h5` suffix (bert4keras scripts save to
        'best_model.weights') is written in the same format under exactly that name, through a temporary file in
        its folder, so an interrupted save leaves the previous file."""
        path = os.fspath(filepath) if isinstance(filepath, (str, os.PathLike)) else None
        if path is None or max_shard_size is not None or path.endswith((".weights.h5", ".weights.json")):
            return super().save_weights(filepath, overwrite=overwrite, max_shard_size=max_shard_size)
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{path!r} exists and overwrite=False.")
        descriptor, temporary = tempfile.mkstemp(suffix=".weights.h5", dir=os.path.dirname(os.path.abspath(path)))
        os.close(descriptor)
        try:
            super().save_weights(temporary)
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)

    def load_weights(self, filepath, skip_mismatch: bool = False, **kwargs) -> None:
        """Keras's `load_weights`, also for a weights file saved under a name without a suffix (see `save_weights`)."""
        path = os.fspath(filepath) if isinstance(filepath, (str, os.PathLike)) else None
        if path is None or not os.path.isfile(path) or path.endswith((".keras", ".h5", ".hdf5", ".json")):
            return super().load_weights(filepath, skip_mismatch=skip_mismatch, **kwargs)
        with open(path, "rb") as f:
            if f.read(8) != b"\x89HDF\r\n\x1a\n":
                raise ValueError(f"{path!r} is not a Keras weights file (no HDF5 signature).")
        folder = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(path)))
        alias = os.path.join(folder, "model.weights.h5")
        try:
            try:
                os.link(path, alias)
            except OSError:  # file systems without hard links
                shutil.copyfile(path, alias)
            return super().load_weights(alias, skip_mismatch=skip_mismatch, **kwargs)
        finally:
            if os.path.exists(alias):
                os.remove(alias)
            os.rmdir(folder)

    # ----------------------------------------------------------------- model config
    # A model that `build_transformer_model` built carries its `Transformer` (`.transformer`: the decoding methods,
    # checkpoint tables). Its config records how to build it again, so that `.keras` loading rebuilds the same
    # graph through the Transformer instead of layer by layer, and the loaded model keeps `.transformer`.
    def get_config(self) -> dict:
        config = super().get_config()
        transformer = getattr(self, "transformer", None)
        record = transformer.rebuild_record() if getattr(transformer, "model", None) is self else None
        if record is not None:
            config[_TRANSFORMER_KEY] = record
        return config

    @classmethod
    def from_config(cls, config: dict, custom_objects=None):
        record = config.get(_TRANSFORMER_KEY)
        config = {k: v for k, v in config.items() if k != _TRANSFORMER_KEY}
        if record is not None:
            from bert4x.models.base import rebuild_transformer

            model = rebuild_transformer(record).model
            # Only the very graph that was saved may stand in for it: same layers, settings and connections.
            if "name" in config:  # an unnamed model's generated name depends on what was built before it
                model.name = config["name"]
            rebuilt = {k: v for k, v in model.get_config().items() if k != _TRANSFORMER_KEY}
            if isinstance(model, cls) and _plain(rebuilt) == _plain(config):
                return model
            warnings.warn(
                f"bert4x.models.Model.from_config: rebuilding {record['model']!r} from its recorded arguments did not "
                "give the saved graph; it is loaded layer by layer instead, without `.transformer` (so no Generator).",
                stacklevel=2,
            )
        return super().from_config(config, custom_objects)

    # ----------------------------------------------------------------- compile config
    def get_compile_config(self) -> dict:
        """Keras's compile config, with losses and metrics that are methods of this model's layers (the CRF's
        `sparse_loss`, ...) recorded by layer name and method name, so that `load_model(compile=True)` restores them."""
        if not (self.compiled and hasattr(self, "_compile_config")):
            return {}
        from keras.src.saving import serialization_lib

        raw = {key: _map_structure(_layer_method_marker(self), value) for key, value in
               self._compile_config.config.items()}
        return serialization_lib.SerializableDict(**raw).serialize()

    def compile_from_config(self, config: dict) -> None:
        from keras.src.saving import serialization_lib

        markers = {}

        def take(value):
            if isinstance(value, dict) and set(value) == {_METHOD_KEY}:
                token = f"__bert4x_method_{len(markers)}__"
                layer_name, method = value[_METHOD_KEY]
                try:
                    markers[token] = getattr(self.get_layer(layer_name), method)
                except ValueError as error:
                    raise ValueError(
                        f"The compile config names {layer_name}.{method}, but the model has no layer {layer_name!r}."
                    ) from error
                return token
            return value

        config = {key: _map_structure(take, value) for key, value in config.items()}
        config = serialization_lib.deserialize_keras_object(config)
        config = {key: _map_structure(lambda v: markers.get(v, v) if isinstance(v, str) else v, value)
                  for key, value in config.items()}
        self.compile(**config)
        if getattr(self, "optimizer", None) is not None and self.built:
            self.optimizer.build(self.trainable_variables)

    # ----------------------------------------------------------------- input checks
    @property
    def input_checker(self) -> _InputChecker | None:
        """The host-side checks of this model's inputs (None for a model with no functional graph to read them from)."""
        if "_bert4x_input_checker" not in self.__dict__:
            object.__setattr__(self, "_bert4x_input_checker", _InputChecker.for_model(self))
        return self.__dict__["_bert4x_input_checker"]

    def _checked_arguments(self, method: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        checker = self.input_checker
        if checker is None:
            return args, kwargs
        args = list(args)
        if args:
            args[0] = checker.wrap(args[0], method)
        elif "x" in kwargs:
            kwargs["x"] = checker.wrap(kwargs["x"], method)
        if kwargs.get("validation_data") is not None:
            kwargs["validation_data"] = checker.wrap(kwargs["validation_data"], "fit", validation=True)
        return tuple(args), kwargs

    # ----------------------------------------------------------------- jax state guard
    def _check_jax_float16(self) -> None:
        """XLA on CPU has no float16 matmul with float32 accumulation, which Keras's jax backend asks for."""
        if "_bert4x_float16_layer" not in self.__dict__:
            import jax

            layer = None
            if jax.default_backend() == "cpu":
                layer = next((layer.name for layer in self._flatten_layers(include_self=True)
                              if layer.compute_dtype == "float16"), None)
            object.__setattr__(self, "_bert4x_float16_layer", layer)
        layer = self.__dict__["_bert4x_float16_layer"]
        if layer is not None:
            raise ValueError(
                f"Layer {layer!r} computes in float16 (e.g. the 'mixed_float16' policy), which Keras's jax backend "
                "cannot run on CPU (XLA's CPU dot has no float16 x float16 -> float32 form); use 'mixed_bfloat16' "
                "or 'float32' on CPU, or run on a GPU."
            )

    @property
    def _jax_call_lock(self) -> threading.RLock:
        if "_bert4x_lock" not in self.__dict__:
            object.__setattr__(self, "_bert4x_lock", threading.RLock())
        return self.__dict__["_bert4x_lock"]

    def _jax_values(self) -> list:
        """(variable, its current value) for every variable a Keras loop may take out of the model."""
        variables = list(self.variables) + list(self.metrics_variables)
        if getattr(self, "optimizer", None) is not None:
            variables += list(self.optimizer.variables)
        seen, saved = set(), []
        for variable in variables:
            if id(variable) not in seen:
                seen.add(id(variable))
                saved.append((variable, variable._value))
        return saved

    def _restore_jax_values(self, saved: list) -> None:
        """After a failed call: the state of the last step that ran (fit), else the values from before the call."""
        if getattr(self, "_jax_state", None):
            self._jax_state_synced = False
            with contextlib.suppress(Exception):  # a half-built state: the values saved before the call are used
                self.jax_state_sync()
        for variable, value in saved:
            current = variable._value
            if current is None or _is_deleted(current):
                if value is None or _is_deleted(value):
                    continue
                variable._value = value
        object.__setattr__(self, "_jax_state", None)
        self._jax_state_synced = True
        lost = [variable.path for variable, _ in saved if variable._value is None or _is_deleted(variable._value)]
        if lost:
            raise RuntimeError(f"The failed call left {len(lost)} variables without values: {lost[:10]}")

    def _fuses_steps(self) -> bool:
        if keras.backend.backend() != "jax" or self.steps_per_execution <= 1:
            return False
        if self.run_eagerly or not self.jit_compile or keras.config.is_nnx_enabled():
            return False
        return keras.distribution.distribution() is None


# XLA's latency-hiding scheduler orders the scanned step's backward pass as all input gradients first, then every
# weight-gradient reduction and optimizer update, whose inputs have by then left the L2 cache; without it the scanned
# step is as fast as single steps (benchmarks/RESULTS.md). The option is per program and ignored off the GPU.
_SCAN_COMPILER_OPTIONS = {"xla_gpu_enable_latency_hiding_scheduler": False}


_TRANSFORMER_KEY = "bert4x_transformer"


def _plain(value):
    """A config as it reads back from a `.keras` file (tuples as lists, without the ids that Keras's saving gives
    shared objects), for comparing a fresh config with a loaded one."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if k != "shared_object_id"}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _same_shapes(batches: list) -> bool:
    """Whether every batch has the first one's structure, shapes and dtypes (so that they stack)."""
    first = _signature(batches[0])
    return all(_signature(batch) == first for batch in batches[1:])


def _signature(batch) -> tuple:
    import jax

    leaves, structure = jax.tree.flatten(batch)
    return structure, [(getattr(leaf, "shape", None), getattr(leaf, "dtype", None)) for leaf in leaves]


_METHOD_KEY = "bert4x_layer_method"


def _layer_method_marker(model: keras.Model):
    """A function turning a bound method of one of `model`'s layers into {_METHOD_KEY: [layer name, method]}."""
    layers = {id(layer) for layer in model._flatten_layers(include_self=False)}

    def mark(value):
        owner = getattr(value, "__self__", None)
        if isinstance(owner, keras.layers.Layer) and id(owner) in layers and callable(value):
            return {_METHOD_KEY: [owner.name, value.__name__]}
        return value

    return mark


def _map_structure(fn, value):
    """`fn` applied to the leaves of nested lists, tuples and dicts (dicts that `fn` rewrites count as leaves)."""
    mapped = fn(value)
    if mapped is not value:
        return mapped
    if isinstance(value, (list, tuple)):
        return type(value)(_map_structure(fn, item) for item in value)
    if isinstance(value, dict):
        return {key: _map_structure(fn, item) for key, item in value.items()}
    return value


def _is_deleted(value) -> bool:
    return bool(getattr(value, "is_deleted", lambda: False)())


# Marks a failed input check inside a tf.data pipeline, whose error re-raises as TensorFlow's.
_CHECK_MARK = "[bert4x input check] "


# The Transformer's own inputs, which must agree in [batch, length].
_PAIRED_INPUTS = ("Input-Token", "Input-Segment", "Input-Position")


class _InputChecker:
    """Host-side checks of a functional model's integer inputs, derived from the layers that read them.

    `ids[i]` is the exclusive upper bound of input `i` (an `Embedding`'s `input_dim`) or None; `max_length` is the
    length of the shortest learned `PositionEmbedding`, which bounds axis 1 of every input with an id bound.
    Plain data (picklable), so that `PyDataset` workers can run it.
    """

    def __init__(self, names: list[str], ids: list[int | None], max_length: int | None, dict_input: bool):
        self.names, self.ids, self.max_length, self.dict_input = names, ids, max_length, dict_input

    @classmethod
    def for_model(cls, model: keras.Model) -> _InputChecker | None:
        inputs = getattr(model, "inputs", None)
        if not inputs or not hasattr(model, "_inputs_struct"):
            return None
        from bert4x.layers.embeddings import PositionEmbedding

        position = {id(tensor): index for index, tensor in enumerate(inputs)}
        ids: list[int | None] = [None] * len(inputs)
        lengths = []
        for layer in model._flatten_layers(include_self=False):
            if isinstance(layer, PositionEmbedding):
                lengths.append(int(layer.input_dim))
            if not isinstance(layer, keras.layers.Embedding):
                continue
            for node in layer._inbound_nodes:
                tensors = node.arguments.keras_tensors
                if tensors and id(tensors[0]) in position:
                    index = position[id(tensors[0])]
                    limit = int(layer.input_dim)
                    ids[index] = limit if ids[index] is None else min(ids[index], limit)
        if not any(limit is not None for limit in ids):
            return None
        names = [tensor.name for tensor in inputs]
        return cls(names, ids, min(lengths) if lengths else None, isinstance(model._inputs_struct, dict))

    # ---- the checks
    def check(self, x) -> None:
        """Raises `ValueError` if the model inputs `x` break a limit; arrays other than numpy's are not read."""
        arrays = self._arrays(x)
        if arrays is None:
            return
        first = None
        for name, limit, array in zip(self.names, self.ids, arrays):
            if limit is None or array is None:
                continue
            if array.ndim == 0:
                raise ValueError(f"Input {name!r} is a scalar; it needs a batch axis (shape [batch, length]).")
            if array.shape[0] == 0:
                raise ValueError(f"Input {name!r} is an empty batch (shape {array.shape}).")
            if array.ndim >= 2:
                if array.shape[1] == 0:
                    raise ValueError(f"Input {name!r} holds zero-length sequences (shape {array.shape}).")
                if self.max_length is not None and array.shape[1] > self.max_length:
                    raise ValueError(
                        f"Input {name!r} has sequences of length {array.shape[1]}, longer than the model's "
                        f"{self.max_length} learned positions (max_position_embeddings)."
                    )
                if name not in _PAIRED_INPUTS:  # a user's own input (a label for layer_norm_cond) has its own shape
                    continue
                if first is None:
                    first = (name, array.shape[:2])
                elif array.shape[:2] != first[1]:
                    raise ValueError(
                        f"Inputs {first[0]!r} and {name!r} differ in [batch, length]: {tuple(first[1])} vs "
                        f"{tuple(array.shape[:2])}."
                    )
            if array.dtype.kind not in "iub":
                continue
            low, high = array.min(), array.max()
            if low < 0 or high >= limit:
                bad = low if low < 0 else high
                where = tuple(int(i) for i in np.argwhere(array == bad)[0])
                raise ValueError(
                    f"Input {name!r} holds id {int(bad)} at {where}, outside [0, {limit}) (the size of the embedding "
                    "table it indexes: vocab_size for token ids, type_vocab_size for segment ids)."
                )

    def _arrays(self, x) -> list | None:
        if isinstance(x, dict):
            return [_host_array(x.get(name)) for name in self.names]
        if isinstance(x, (list, tuple)):
            if len(x) != len(self.names) or (len(self.names) == 1 and np.ndim(x[0]) == 0 and len(x) > 0):
                return [_host_array(x)] if len(self.names) == 1 else None
            return [_host_array(value) for value in x]
        return [_host_array(x)] if len(self.names) == 1 else None

    def check_batch(self, batch, with_targets: bool) -> None:
        x = keras.utils.unpack_x_y_sample_weight(batch)[0] if with_targets or isinstance(batch, tuple) else batch
        self.check(x)

    # ---- applying them to what a Keras loop is given
    def wrap(self, data, method: str, validation: bool = False):
        """`data` with its batches checked as they are drawn (arrays are checked here, once)."""
        with_targets = validation or method in ("fit", "evaluate", "train_on_batch", "test_on_batch")
        if validation and isinstance(data, tuple) and not _is_stream(data):
            self.check(keras.utils.unpack_x_y_sample_weight(data)[0])
            return data
        if isinstance(data, keras.utils.PyDataset):
            return _CheckedPyDataset(data, self, with_targets)
        if _is_tf_dataset(data):
            return _checked_tf_dataset(data, self, with_targets)
        if _is_generator(data):
            return (self._checked(batch, with_targets) for batch in data)
        self.check(data)
        return data

    def _checked(self, batch, with_targets: bool):
        self.check_batch(batch, with_targets)
        return batch


def _host_array(value) -> np.ndarray | None:
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (list, tuple)) and value:
        try:
            array = np.asarray(value)
        except ValueError:  # ragged
            return None
        return array if array.dtype != object else None
    return None


def _is_stream(data) -> bool:
    return isinstance(data, keras.utils.PyDataset) or _is_tf_dataset(data) or _is_generator(data)


def _is_generator(data) -> bool:
    import types

    return isinstance(data, types.GeneratorType) or (hasattr(data, "__next__") and hasattr(data, "__iter__"))


def _is_tf_dataset(data) -> bool:
    module = type(data).__module__
    if not module.startswith("tensorflow"):
        return False
    import tensorflow as tf

    return isinstance(data, tf.data.Dataset)


class _CheckedPyDataset(keras.utils.PyDataset):
    """A `PyDataset` whose batches are checked as they are read (in its workers, where it has some)."""

    def __init__(self, dataset: keras.utils.PyDataset, checker: _InputChecker, with_targets: bool):
        super().__init__(workers=dataset.workers, use_multiprocessing=dataset.use_multiprocessing,
                         max_queue_size=dataset.max_queue_size)
        self.dataset, self.checker, self.with_targets = dataset, checker, with_targets

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def num_batches(self):
        return self.dataset.num_batches

    def __getitem__(self, index):
        batch = self.dataset[index]
        if not getattr(self.dataset, "signature_only_read", False):  # a DataGenerator's shape probe is no data
            self.checker.check_batch(batch, self.with_targets)
        return batch

    def on_epoch_begin(self) -> None:
        self.dataset.on_epoch_begin()

    def on_epoch_end(self) -> None:
        self.dataset.on_epoch_end()


def _checked_tf_dataset(dataset, checker: _InputChecker, with_targets: bool):
    """`dataset` with each element passed through the checker on the host (in tf.data's pipeline)."""
    import tensorflow as tf

    def check(*flat):
        try:
            checker.check_batch(tf.nest.pack_sequence_as(dataset.element_spec, list(flat)), with_targets)
        except ValueError as error:
            raise ValueError(f"{_CHECK_MARK}{error}{_CHECK_MARK}") from None
        return np.bool_(True)

    def checked(*args):
        # tf.data passes a tuple element's members as separate arguments; the element keeps its structure.
        element = args if isinstance(dataset.element_spec, tuple) else args[0]
        flat = tf.nest.flatten(element)
        ok = tf.numpy_function(check, flat, tf.bool, stateful=True)
        with tf.control_dependencies([ok]):
            return tf.nest.map_structure(tf.identity, element)

    return dataset.map(checked)
