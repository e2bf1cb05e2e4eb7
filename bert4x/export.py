"""Deployment exports: any bert4x model as a TF SavedModel, an ONNX file or a LiteRT flatbuffer, with dynamic shapes.

`export_model(model, path, format=...)` writes one artifact that serves any batch size and any sequence length (up
to the model's learned positions, where it has any). Its serving signature takes the model's inputs by name
(`Input-Token`, `Input-Segment` for the BERT family; `Encoder-Input-Token`, `Decoder-Input-Token` for T5) and returns
a dict keyed by the names of the layers that make the model's outputs; a model whose output is a
`ConditionalRandomField` also returns `<crf name>-Viterbi`, the best label path of each row over its real tokens
(`Input-Token` not 0; int32 `[batch, len]`, -1 at padded positions), so a NER model needs no decoding code at the
server.

Formats and backends:

- `tf_saved_model` from tensorflow (the model's own graph) and from jax (`jax2tf`, with one symbolic length shared
  by the inputs that have the same length, which is what lets position and segment embeddings add up);
  `serving_default` is the TF Serving signature.
- `onnx` from tensorflow (`tf2onnx`); the graph's inputs and outputs carry the same names.
- `litert` from tensorflow (the TFLite converter on the SavedModel's signature; LiteRT resizes inputs per call).
- From jax, `onnx` and `litert` are written by a tensorflow-backend process from the same model saved as `.keras`
  (jax's ONNX converter cannot trace `arange` over a symbolic length yet).

`export_generator` exports a UniLM/LM BERT or an mT5 model's greedy or beam decoding, prompt ids to generated ids,
as one SavedModel function (tensorflow backend).

Example:
>>> import tempfile, numpy as np
>>> from bert4x.models import build_transformer_model
>>> model = build_transformer_model({"vocab_size": 50, "hidden_size": 8, "num_hidden_layers": 1,
...     "num_attention_heads": 2, "intermediate_size": 16}, with_pool=True)
>>> path = export_model(model, tempfile.mkdtemp() + "/bert", format="tf_saved_model")
>>> serve = load_saved_model_signature(path)
>>> out = serve(**{"Input-Token": np.array([[2, 5, 7, 3]], "int32"), "Input-Segment": np.zeros((1, 4), "int32")})
>>> sorted(out), out["Pooler-Dense"].shape
(['Pooler-Dense'], (1, 8))
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable

import keras
from keras import ops

from bert4x import config

__all__ = [
    "FORMATS",
    "export_model",
    "export_generator",
    "serving_function",
    "serving_inputs",
    "viterbi_decode",
    "max_length",
    "load_saved_model_signature",
]

FORMATS = ("tf_saved_model", "onnx", "litert")
_SIGNATURE = "serving_default"


# ==================================================================================================== the signature
def serving_inputs(model: keras.Model) -> list[tuple[str, tuple, str, tuple]]:
    """The serving inputs of `model`: `(name, shape, dtype, symbolic dims)` for each model input, in order.

    Every axis that the model leaves free (`None`) is free in the export. Symbolic dims name those axes for jax's
    shape polymorphism: `batch` for the first axis of every input; the token inputs of one sequence (`Input-Token`,
    `Input-Segment`, `Encoder-Input-Token`) share `length`; the decoder's tokens have `target` and a T5 decoder's
    context `source`; any other free axis has a name of its own.

    Args:
        model: a built `keras.Model` (a bert4x model or one built on it).
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"serving_inputs: model must be a keras.Model, got {type(model).__name__}.")
    if not model.inputs:
        raise ValueError(f"serving_inputs: model {model.name!r} has no symbolic inputs; build it first.")
    shared = {"Input-Token": "length", "Input-Segment": "length", "Encoder-Input-Token": "length",
              "Decoder-Input-Token": "target"}
    found, names = [], set()
    for index, tensor in enumerate(model.inputs):
        name = tensor.name
        if name in names:
            raise ValueError(f"serving_inputs: model {model.name!r} has two inputs named {name!r}.")
        names.add(name)
        shape = (None,) + tuple(tensor.shape[1:])
        dims = ["batch"]
        for axis, size in enumerate(shape[1:], start=1):
            if size is not None:
                dims.append(str(size))
            elif axis == 1 and name in shared:
                dims.append(shared[name])
            elif axis == 1 and name == "Input-Context":
                dims.append("source")
            else:
                dims.append(f"d{index}_{axis}")
        found.append((name, shape, keras.backend.standardize_dtype(tensor.dtype), tuple(dims)))
    return found


def max_length(model: keras.Model) -> int | None:
    """The longest sequence the model serves: its learned positions (`PositionEmbedding.input_dim`), or None where
    positions are computed (RoFormer's rotary, T5's relative buckets).

    Args:
        model: a built `keras.Model`.
    """
    from bert4x.layers import PositionEmbedding

    sizes = [layer.input_dim for layer in _all_layers(model) if isinstance(layer, PositionEmbedding)]
    return min(sizes) if sizes else None


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


def _length_constraints(model, specs) -> tuple[str, ...]:
    """jax shape constraints: the shared length fits the learned positions (what lets jax see that slicing the
    position table to `length` rows gives `length` rows)."""
    limit = max_length(model)
    used = {d for _, _, _, dims in specs for d in dims}
    return tuple(f"{d} <= {limit}" for d in ("length", "target") if d in used) if limit else ()


def _crf_outputs(model: keras.Model) -> dict[int, keras.layers.Layer]:
    """{output index: CRF layer} for the model outputs made by a `ConditionalRandomField`."""
    from bert4x.layers import ConditionalRandomField

    found = {}
    for i, tensor in enumerate(model.outputs):
        layer = tensor._keras_history.operation
        if isinstance(layer, ConditionalRandomField):
            found[i] = layer
    return found


def _output_names(model: keras.Model) -> list[str]:
    names = []
    for tensor in model.outputs:
        name = tensor._keras_history.operation.name
        if name in names:  # one layer with several outputs
            name = f"{name}_{len(names)}"
        names.append(name)
    return names


def viterbi_decode(emissions, trans, mask=None):
    """The best label path of each row under a linear-chain CRF, in `keras.ops` (runs inside an exported graph).

    Args:
        emissions: float `[batch, len, labels]` scores (a `ConditionalRandomField` output; its padded positions hold
            `MASK_VALUE`, which is how they are found when `mask` is None).
        trans: float `[labels, labels]` transitions `trans[from, to]` (`crf.trans`).
        mask: optional bool `[batch, len]`, True at real positions (contiguous in each row).

    Returns:
        int32 `[batch, len]` label ids, -1 at padded positions; the same path as
        `bert4x.snippets.ViterbiDecoder(trans).decode` on each row's real positions.
    """
    from bert4x import backend

    emissions = ops.cast(emissions, "float32")
    trans = ops.cast(trans, "float32")
    if mask is None:
        mask = ops.all(ops.greater(emissions, backend.MASK_VALUE / 2), axis=-1)
    mask = ops.cast(mask, "bool")
    labels = ops.shape(emissions)[-1]
    batch, length = ops.shape(emissions)[0], ops.shape(emissions)[1]
    identity = ops.broadcast_to(ops.expand_dims(ops.arange(labels, dtype="int32"), 0), ops.shape(emissions[:, 0]))
    expanded_trans = ops.expand_dims(trans, 0)
    # Writes at a step go through a one-hot `where`: tensorflow's slice_update is an XLA op that ONNX lacks.
    steps = ops.arange(length, dtype="int32")

    # Forward: best score of each label at t, and for each label the best previous one (pointers[t]). A loop with
    # an unknown trip count, so the export serves any length (tensorflow's `ops.scan` needs a static one).
    def forward(t, score, started, pointers):
        emission = ops.take(emissions, t, axis=1)
        valid = ops.take(mask, t, axis=1)
        candidates = ops.expand_dims(score, 2) + expanded_trans  # [batch, from, to]
        best = ops.max(candidates, axis=1)
        moved = best + emission
        pointer = _first_argmax(candidates, best, axis=1)
        # Before a row's first real position the path starts fresh; padded steps keep the score and point to self.
        keep = ops.expand_dims(valid, 1)
        new = ops.where(ops.expand_dims(started, 1), moved, emission)
        pointer = ops.where(ops.logical_and(keep, ops.expand_dims(started, 1)), pointer, identity)
        pointers = ops.where(ops.reshape(ops.equal(steps, t), (-1, 1, 1)), ops.expand_dims(pointer, 0), pointers)
        return t + 1, ops.where(keep, new, score), ops.logical_or(started, valid), pointers

    first = mask[:, 0]
    state = (ops.convert_to_tensor(1, "int32"), ops.where(ops.expand_dims(first, 1), emissions[:, 0], 0.0), first,
             ops.zeros((length, batch, labels), "int32"))
    _, score, _, pointers = ops.while_loop(lambda t, *_: ops.less(t, length), forward, state)
    last = _first_argmax(score, ops.max(score, axis=-1), axis=-1)

    # Backward: the label at t is the pointer at t + 1 of the label chosen at t + 1.
    def backward(t, label, path):
        label = ops.take_along_axis(ops.take(pointers, t + 1, axis=0), ops.expand_dims(label, 1), axis=1)[:, 0]
        return t - 1, label, ops.where(ops.equal(ops.expand_dims(steps, 0), t), ops.expand_dims(label, 1), path)

    path = ops.where(ops.equal(ops.expand_dims(steps, 0), length - 1), ops.expand_dims(last, 1),
                     ops.zeros((batch, length), "int32"))
    _, _, path = ops.while_loop(lambda t, *_: ops.greater_equal(t, 0), backward, (length - 2, last, path))
    return ops.where(mask, path, -1)


def _first_argmax(x, maximum, axis):
    """The first index of `maximum` along `axis` (np.argmax's tie rule), without `argmax`: tensorflow's argmax
    checks the sign bit with a Bitcast, an op ONNX lacks."""
    size = ops.shape(x)[axis]
    index = ops.arange(size, dtype="int32")
    index = ops.reshape(index, (1, -1, 1)) if axis == 1 and len(x.shape) == 3 else ops.reshape(index, (1, -1))
    hit = ops.equal(x, ops.expand_dims(maximum, axis))
    return ops.min(ops.where(hit, index, size), axis=axis)


def serving_function(model: keras.Model, crf_decode: bool = True) -> Callable[[dict], dict]:
    """`fn(inputs: {input name: tensor}) -> {output name: tensor}`: the model's inference call (training=False) as
    served by the exports, with each CRF output's Viterbi path added (`crf_decode`).

    Args:
        model: a built `keras.Model`.
        crf_decode: add `<crf layer name>-Viterbi` for every output made by a `ConditionalRandomField`.
    """
    names = [spec[0] for spec in serving_inputs(model)]
    outputs = _output_names(model)
    crfs = _crf_outputs(model) if crf_decode else {}

    def fn(inputs: dict) -> dict:
        missing = [n for n in names if n not in inputs]
        if missing:
            raise ValueError(f"serving function: missing inputs {missing}; it takes {names}.")
        args = [inputs[n] for n in names]
        result = model(args if len(args) > 1 else args[0], training=False)
        result = list(result) if isinstance(result, (list, tuple)) else [result]
        served = dict(zip(outputs, result))
        for index, crf in crfs.items():
            mask = None
            if "Input-Token" in inputs:  # a model without Keras masking leaves padded emissions as they are
                from bert4x import backend

                real = ops.not_equal(ops.cast(inputs["Input-Token"], "int32"), 0)
                marked = ops.all(ops.greater(ops.cast(result[index], "float32"), backend.MASK_VALUE / 2), axis=-1)
                mask = ops.logical_and(real, marked)
            served[f"{crf.name}-Viterbi"] = viterbi_decode(result[index], crf.trans, mask)
        return served

    return fn


# ==================================================================================================== exporters
def export_model(
    model: keras.Model,
    path: str,
    format: str = "tf_saved_model",  # noqa: A002 (the name Keras's model.export uses)
    *,
    crf_decode: bool = True,
    opset: int | None = None,
    verbose: bool = False,
) -> str:
    """Exports `model` for serving with dynamic batch size and sequence length; returns the artifact's path.

    Args:
        model: a built `keras.Model` (bert/wobert, roformer v1/v2, a T5/mT5 model, encoder or decoder, with any head).
        path: where to write: a directory for `tf_saved_model`; a file for `onnx` (`.onnx`) and `litert`
            (`.tflite`). An existing artifact at `path` is an error (nothing is overwritten).
        format: one of `FORMATS`: `tf_saved_model`, `onnx` or `litert` (from the tensorflow or jax backend).
        crf_decode: also serve the Viterbi path of every `ConditionalRandomField` output (`<name>-Viterbi`).
        opset: ONNX opset (default: the converter's).
        verbose: let the converters print their logs.
    """
    if format not in FORMATS:
        raise ValueError(f"export_model: format must be one of {FORMATS}, got {format!r}.")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"export_model: path must be a str or os.PathLike, got {type(path).__name__}.")
    path = os.fspath(path)
    if os.path.exists(path):
        raise ValueError(f"export_model: {path!r} already exists; remove it or choose another path.")
    backend_name = keras.backend.backend()
    supported = {"tf_saved_model": ("tensorflow", "jax"), "onnx": ("tensorflow", "jax"),
                 "litert": ("tensorflow", "jax")}
    if backend_name not in supported[format]:
        raise ValueError(
            f"export_model: format={format!r} is supported from the {' and '.join(supported[format])} backend(s), "
            f"not {backend_name!r}: save the model (.keras) and export it under KERAS_BACKEND=tensorflow."
        )
    _check_float32(model, format)
    fn = serving_function(model, crf_decode)
    specs = serving_inputs(model)
    if format == "tf_saved_model":
        _write_saved_model(model, fn, specs, path, verbose)
        _write_info(path, model, specs)
    elif format == "onnx":
        if backend_name == "tensorflow":
            _onnx_from_tensorflow(fn, specs, path, opset, verbose)
        else:
            _export_under_tensorflow(model, path, format, crf_decode, opset)
    elif backend_name == "tensorflow":
        _litert_from_tensorflow(model, fn, specs, path, verbose)
    else:
        _export_under_tensorflow(model, path, format, crf_decode, opset)
    return path


def _check_float32(model, format):
    if format != "tf_saved_model" and model.dtype_policy.compute_dtype not in ("float32",):
        raise ValueError(
            f"export_model: format={format!r} needs a float32 model; {model.name!r} computes in "
            f"{model.dtype_policy.compute_dtype} (build it under keras.config.set_dtype_policy('float32'))."
        )


def _tf_specs(specs):
    import tensorflow as tf

    return {name: tf.TensorSpec(shape, dtype, name=name) for name, shape, dtype, _ in specs}


def _write_saved_model(model, fn, specs, path, verbose):
    archive = keras.export.ExportArchive()
    archive.track(model)
    kwargs = {}
    if keras.backend.backend() == "jax":
        kwargs["jax2tf_kwargs"] = {
            "polymorphic_shapes": [{name: f"({', '.join(dims)})" for name, _, _, dims in specs}],
            "polymorphic_constraints": _length_constraints(model, specs),
            "native_serialization": True,
        }
    with _stablehlo_for_tensorflow(), _portable_kernels():
        archive.add_endpoint(_SIGNATURE, fn, input_signature=[_tf_specs(specs)], **kwargs)
        import tensorflow as tf

        # jax2tf functions carry jax's custom gradients, which a serving artifact does not need (nor can save).
        options = tf.saved_model.SaveOptions(experimental_custom_gradients=False)
        archive.write_out(path, verbose=verbose, options=options)


# The float32 rational approximation of erf that XLA and Eigen use on CPU (|error| < 5e-7), clamped to [-4, 4].
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)


def _erf_by_polynomial(x):
    import jax.numpy as jnp

    dtype = x.dtype
    x = jnp.clip(x.astype("float32"), -4.0, 4.0)
    x2 = x * x
    p = jnp.full_like(x2, _ERF_P[0])
    for c in _ERF_P[1:]:
        p = p * x2 + c
    q = jnp.full_like(x2, _ERF_Q[0])
    for c in _ERF_Q[1:]:
        q = q * x2 + c
    return (x * p / q).astype(dtype)


@contextlib.contextmanager
def _stablehlo_for_tensorflow():
    """On jax, lowers `erf` to plain arithmetic while exporting for tensorflow's XlaCallModule.

    jax writes `erf` (GELU's) as a CHLO composite that the installed tensorflow may not read (`vhlo.composite_v2`),
    or, at older StableHLO versions, as a decomposition whose dynamic shapes XlaCallModule cannot refine. The
    polynomial is the one XLA itself uses for float32 erf on CPU. Elsewhere this does nothing."""
    if keras.backend.backend() != "jax":
        yield
        return
    from jax._src.interpreters import mlir
    from jax._src.lax.special import erf_p

    generic = mlir._lowerings.get(erf_p)
    specific = {p: rules.pop(erf_p) for p, rules in mlir._platform_specific_lowerings.items() if erf_p in rules}
    mlir.register_lowering(erf_p, mlir.lower_fun(_erf_by_polynomial, multiple_results=False))
    try:
        yield
    finally:
        mlir._lowerings[erf_p] = generic
        for platform, rule in specific.items():
            mlir._platform_specific_lowerings[platform][erf_p] = rule


@contextlib.contextmanager
def _portable_kernels():
    """While tracing on jax for a SavedModel: XLA attention and Keras's LayerNorm, whatever the device. Traced on a
    GPU, the kernels would otherwise be cuDNN or Pallas (Triton) calls, which tensorflow on another device cannot
    run. Elsewhere this does nothing."""
    if keras.backend.backend() != "jax":
        yield
        return
    saved = (config.attention_implementation(), config.fused_attention(), config.fused_layer_norm())
    config.set_attention_implementation("xla")
    config.set_fused_attention("off")
    config.set_fused_layer_norm("off")
    try:
        yield
    finally:
        config.set_attention_implementation(saved[0])
        config.set_fused_attention(saved[1])
        config.set_fused_layer_norm(saved[2])


def _write_info(path, model, specs):
    """`assets.extra/bert4x.json` (TF Serving ignores it): the inputs, outputs and longest length served, which
    `bert4x.serve` reads."""
    import json

    os.makedirs(os.path.join(path, "assets.extra"), exist_ok=True)
    info = {"inputs": [s[0] for s in specs], "max_length": max_length(model), "backend": keras.backend.backend()}
    with open(os.path.join(path, "assets.extra", "bert4x.json"), "w") as f:
        json.dump(info, f)


def _rename_onnx_outputs(path, names):
    """Gives the ONNX graph's outputs the serving names (tf2onnx names them after TF's Identity nodes)."""
    import onnx

    proto = onnx.load(path)
    outputs = list(proto.graph.output)
    if len(outputs) != len(names):
        raise RuntimeError(f"ONNX export: {len(outputs)} graph outputs for {len(names)} serving outputs {names}.")
    # An Identity per output gives it its name without renaming tensors that loop bodies may read by name.
    for o, name in zip(outputs, names):
        if o.name != name:
            proto.graph.node.append(onnx.helper.make_node("Identity", [o.name], [name], name=f"serving_{name}"))
            o.name = name
    onnx.save(proto, path)


def _onnx_from_tensorflow(fn, specs, path, opset, verbose):
    import tensorflow as tf
    import tf2onnx
    from keras.src.export.tf2onnx_lib import patch_tf2onnx

    names = [s[0] for s in specs]
    signature = [tf.TensorSpec(shape, dtype, name=name) for name, shape, dtype, _ in specs]

    @tf.function(input_signature=signature, autograph=False)
    def flat(*args):
        return fn(dict(zip(names, args)))

    with _portable_ops(erf_polynomial=False):
        concrete = flat.get_concrete_function()
    out_names = sorted(concrete.structured_outputs)  # a dict's outputs flatten in key order
    patch_tf2onnx()  # numpy 2 names tf2onnx still uses
    import tf2onnx.optimizer

    # tf2onnx's reshape optimizer rewires the `Shape` of a Dense output (matmul, then reshape back to 3-D) to the 2-D
    # matmul result, so every later Reshape built from that shape only works at the traced length: leave it out.
    optimizers = tf2onnx.optimizer._optimizers
    tf2onnx.optimizer._optimizers = {k: v for k, v in optimizers.items() if k != "reshape_optimizer"}
    try:
        tf2onnx.convert.from_function(flat, input_signature=signature, opset=opset, output_path=path)
    finally:
        tf2onnx.optimizer._optimizers = optimizers
    _rename_onnx_outputs(path, out_names)


_TF_EXPORT_SCRIPT = """
import sys, keras
import bert4x.layers, bert4x.models  # registers bert4x's layers
from bert4x.export import export_model
model = keras.saving.load_model(sys.argv[1], compile=False)
opset = None if sys.argv[5] == "none" else int(sys.argv[5])
export_model(model, sys.argv[2], format=sys.argv[3], crf_decode=sys.argv[4] == "1", opset=opset)
"""


def _export_under_tensorflow(model, path, format, crf_decode, opset):  # noqa: A002
    """ONNX and LiteRT from jax: the same model and weights (saved as `.keras`) exported by a tensorflow-backend
    process. jax's own converters do not serve a free sequence length yet (jax2onnx cannot trace `arange` over a
    symbolic length, which positions, masks and span heads need), tensorflow's do."""
    import subprocess
    import sys

    with tempfile.TemporaryDirectory() as tmp:
        saved = os.path.join(tmp, "model.keras")
        model.save(saved)
        env = dict(os.environ, KERAS_BACKEND="tensorflow")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        proc = subprocess.run(
            [sys.executable, "-c", _TF_EXPORT_SCRIPT, saved, os.path.abspath(path), format, str(int(crf_decode)),
             "none" if opset is None else str(opset)],
            capture_output=True, text=True, env=env, timeout=1800,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"export_model: the tensorflow-backend export to {format!r} failed:\n"
                           f"{(proc.stdout + proc.stderr)[-3000:]}")


@contextlib.contextmanager
def _portable_ops(erf_polynomial: bool = True):
    """While tracing for LiteRT (and ONNX), tensorflow ops that LiteRT has no builtin for take builtin forms: `erf`
    (GELU's) the polynomial XLA uses (`erf_polynomial`; ONNX has Erf), `nonzero` (padding removal) one `where`
    sliced per axis instead of `Unpack`, and `eye` (T5's causal mask) a comparison of ranges instead of
    `MatrixSetDiag` (ONNX Runtime has no boolean EyeLike)."""
    import tensorflow as tf
    from keras.src.backend.tensorflow import math as tf_math
    from keras.src.backend.tensorflow import numpy as tf_numpy

    def erf(x):
        x = tf.convert_to_tensor(x)
        dtype = x.dtype
        x = tf.clip_by_value(tf.cast(x, tf.float32), -4.0, 4.0)
        x2 = x * x
        p = tf.fill(tf.shape(x2), _ERF_P[0])
        for c in _ERF_P[1:]:
            p = p * x2 + c
        q = tf.fill(tf.shape(x2), _ERF_Q[0])
        for c in _ERF_Q[1:]:
            q = q * x2 + c
        return tf.cast(x * p / q, dtype)

    def nonzero(x):
        x = tf.convert_to_tensor(x)
        where = tf.cast(tf.where(tf.cast(x, "bool")), "int32")
        return tuple(where[:, i] for i in range(x.shape.rank))

    def eye(N, M=None, k=0, dtype=None):  # noqa: N803 (numpy's names)
        M = N if M is None else M  # noqa: N806
        rows = tf.expand_dims(tf.range(N), 1)
        cols = tf.expand_dims(tf.range(M), 0)
        return tf.cast(tf.equal(rows + k, cols), dtype or keras.config.floatx())

    saved = tf_math.erf, tf_numpy.nonzero, tf_numpy.eye
    tf_math.erf = erf if erf_polynomial else saved[0]
    tf_numpy.nonzero, tf_numpy.eye = nonzero, eye
    try:
        yield
    finally:
        tf_math.erf, tf_numpy.nonzero, tf_numpy.eye = saved


def _litert_from_tensorflow(model, fn, specs, path, verbose):
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as tmp:
        saved = os.path.join(tmp, "saved_model")
        with _portable_ops():
            _write_saved_model(model, fn, specs, saved, verbose)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved, signature_keys=[_SIGNATURE])
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        flatbuffer = converter.convert()
    with open(path, "wb") as f:
        f.write(flatbuffer)


def load_saved_model_signature(path: str, signature: str = _SIGNATURE) -> Callable[..., dict]:
    """Loads an exported SavedModel's signature as `fn(**{input name: array}) -> {output name: np.ndarray}`.

    Args:
        path: the SavedModel directory written by `export_model` or `export_generator`.
        signature: the signature key (`serving_default`).
    """
    import tensorflow as tf

    loaded = tf.saved_model.load(path)
    if signature not in loaded.signatures:
        raise ValueError(f"{path!r} has no signature {signature!r}; it has {sorted(loaded.signatures)}.")
    concrete = loaded.signatures[signature]

    def call(**inputs):
        result = concrete(**{k: tf.convert_to_tensor(v) for k, v in inputs.items()})
        return {k: v.numpy() for k, v in result.items()}

    call.loaded = loaded  # keeps the variables alive
    call.input_specs = concrete.structured_input_signature[1]
    return call


# ==================================================================================================== generation
def export_generator(
    model,
    path: str,
    *,
    batch_size: int,
    prompt_length: int,
    max_len: int,
    end_id: int | None = None,
    num_beams: int = 1,
    min_len: int = 1,
    verbose: bool = False,
) -> str:
    """Exports greedy (`num_beams=1`) or beam decoding as one SavedModel function: prompt ids in, generated ids out.

    The function is `serving_default`. It takes `batch_size` prompts right-padded with 0 to `prompt_length`:
    `Input-Token` and `Input-Segment` (int32 `[batch_size, prompt_length]`) for a BERT-family model built with
    `application='unilm'` or `'lm'`, or `Encoder-Input-Token` for a T5/mT5 model. It returns `generated_ids` (int32
    `[batch_size, max_len]`) and `lengths` (`[batch_size]`: the tokens up to and including `end_id`);
    `generated_ids[i, :lengths[i]]` is what
    `bert4x.generation.Generator(model).generate(...)` returns for prompt i. The whole search (prompt pass, cached
    steps, early stop) runs inside the graph, compiled with XLA. Shapes are fixed at export: export one artifact per
    batch size / prompt length bucket you serve.

    Args:
        model: what `bert4x.generation.Generator` takes (a bert4x 'unilm'/'lm' keras model, a T5/mT5 model or its
            `T5` object), whose decoding `Transformer` has a built keras `.model`.
        path: the SavedModel directory to write (must not exist).
        batch_size: prompts per call.
        prompt_length: the padded prompt length (longest prompt served).
        max_len: the most tokens generated per prompt (end token included).
        end_id: the token that ends an output (None: always `max_len` tokens).
        num_beams: 1 for greedy decoding, more for beam search.
        min_len: `end_id` is banned until an output has this many tokens.
        verbose: print the SavedModel writer's messages.
    """
    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            "export_generator writes a tensorflow graph: run it under KERAS_BACKEND=tensorflow (load the .keras "
            f"model there); the backend is {keras.backend.backend()!r}."
        )
    for name, value in (("batch_size", batch_size), ("prompt_length", prompt_length), ("max_len", max_len),
                        ("num_beams", num_beams), ("min_len", min_len)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"export_generator: {name} must be a positive integer, got {value!r}.")
    path = os.fspath(path)
    if os.path.exists(path):
        raise ValueError(f"export_generator: {path!r} already exists; remove it or choose another path.")
    import tensorflow as tf

    from bert4x.generation import Generator

    generator = Generator(model, pad_to_multiple=prompt_length, jit=False)
    transformer = generator.model
    owner = getattr(transformer, "model", None)
    if not isinstance(owner, keras.Model):
        raise TypeError(f"export_generator: {type(transformer).__name__} has no built keras `.model` whose variables "
                        "the SavedModel could hold.")
    search = generator.search_function(max_len=max_len, end_id=end_id, num_beams=num_beams, min_len=min_len)
    try:  # validates the shapes (e.g. learned positions) as `generate` would, and shows the prompt format
        transformer.decode_prepare([[1] * prompt_length], None, prompt_length, max_len)
        template = transformer.decode_prepare([[1]], None, 2, max_len)
    except ValueError as e:
        raise ValueError(f"export_generator: prompt_length={prompt_length}, max_len={max_len}: {e}") from e
    if set(template) == {"token_ids"}:  # right-padded encoder inputs (T5): served as they come
        names, left_pad = ["Encoder-Input-Token"], False
    elif set(template) == {"token_ids", "segment_ids", "mask"}:  # `left_pad_prompts` (BERT family)
        names, left_pad = ["Input-Token", "Input-Segment"], True
        pad_id = int(template["token_ids"][0, 0])  # what decode_prepare writes at padding
    else:
        raise TypeError(f"export_generator: {type(transformer).__name__}.decode_prepare returns {sorted(template)}; "
                        "the export knows right-padded `token_ids` and left-padded token_ids/segment_ids/mask.")
    shape = (batch_size, prompt_length)

    @tf.function(jit_compile=True, autograph=False)
    def decode(inputs):
        token_ids = ops.cast(inputs[names[0]], "int32")
        if left_pad:  # the served prompts are right-padded with 0: move them right, as decode_prepare does
            lengths = ops.sum(ops.cast(ops.not_equal(token_ids, 0), "int32"), axis=1)
            source = ops.arange(prompt_length, dtype="int32")[None, :] - (prompt_length - lengths)[:, None]
            mask = ops.greater_equal(source, 0)
            source = ops.maximum(source, 0)
            segment_ids = ops.cast(inputs[names[1]], "int32")
            prompt = {
                "token_ids": ops.where(mask, ops.take_along_axis(token_ids, source, axis=1), pad_id),
                "segment_ids": ops.where(mask, ops.take_along_axis(segment_ids, source, axis=1), 0),
                "mask": mask,
            }
        else:
            prompt = {"token_ids": token_ids}
        tokens, _ = search(prompt)
        if end_id is None:
            lengths = ops.full((batch_size,), max_len, "int32")
        else:
            ended = ops.equal(tokens, end_id)
            first = ops.min(ops.where(ended, ops.arange(max_len, dtype="int32")[None, :], max_len), axis=1)
            lengths = ops.minimum(first + 1, max_len)
        return {"generated_ids": tokens, "lengths": lengths}

    archive = keras.export.ExportArchive()
    archive.track(owner)
    signature = {n: tf.TensorSpec(shape, "int32", name=n) for n in names}
    archive.add_endpoint(_SIGNATURE, decode, input_signature=[signature])
    archive.write_out(path, verbose=verbose)
    return path
