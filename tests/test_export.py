"""bert4x.export: SavedModel, ONNX and LiteRT exports of every model family and head equal `predict` (1e-5, float32)
at shapes never traced, with the named TF Serving signature; the CRF's Viterbi output equals the numpy decoder;
the exported greedy/beam generation equals `Generator`; jax exports run in a jax-backend subprocess.

Artifacts are exported once per module (export is slow) and shared by the tests."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from bert4x.export import export_generator, export_model, load_saved_model_signature, viterbi_decode
from bert4x.layers import ConditionalRandomField, GlobalPointer
from bert4x.models import build_transformer_model
from bert4x.snippets import ViterbiDecoder

onnxruntime = pytest.importorskip("onnxruntime", reason="the [export] extra (onnxruntime) is not installed")
pytest.importorskip("tf2onnx", reason="the [export] extra (tf2onnx) is not installed")
litert = pytest.importorskip("ai_edge_litert.interpreter", reason="the [export] extra (ai-edge-litert) is missing")

if keras.backend.backend() != "tensorflow":
    pytest.skip("these tests export from the tensorflow backend (jax runs in a subprocess)", allow_module_level=True)

BERT = dict(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=32)
T5 = {"vocab_size": 40, "d_model": 8, "d_kv": 4, "d_ff": 16, "num_layers": 1, "num_heads": 2}
# (batch, length) never traced: exports are traced with free dims only.
SHAPES = [(1, 5), (3, 11), (2, 32)]


def _models():
    keras.utils.set_random_seed(0)
    bert = build_transformer_model(BERT, with_pool=True)
    classifier = keras.Model(bert.inputs, keras.layers.Dense(3, name="Classifier")(bert.output))
    tagger = build_transformer_model(BERT)
    crf = keras.Model(tagger.inputs, ConditionalRandomField(name="CRF")(keras.layers.Dense(5)(tagger.output)))
    gp = keras.Model(tagger.inputs, GlobalPointer(2, 8, name="GP")(tagger.output))
    t5 = build_transformer_model(T5, model="mt5.1.1", return_keras_model=False)
    return {
        "bert_classifier": classifier,
        "roformer": build_transformer_model(BERT, model="roformer"),
        "roformer_v2": build_transformer_model(BERT, model="roformer_v2", with_mlm="linear"),
        "bert_crf": crf,
        "bert_global_pointer": gp,
        "mt5": t5.model,
        "mt5_encoder": t5.encoder,
        "mt5_decoder": t5.decoder,
    }


# The formats each model is checked in (every model in the SavedModel; ONNX and LiteRT on a spread of them).
MATRIX = {
    "tf_saved_model": ["bert_classifier", "roformer", "roformer_v2", "bert_crf", "bert_global_pointer", "mt5",
                       "mt5_encoder"],
    "onnx": ["bert_classifier", "roformer", "bert_crf", "bert_global_pointer", "mt5"],
    "litert": ["bert_classifier", "bert_crf", "mt5_decoder"],
}


def _feeds(model, batch, length, rng):
    feeds = {}
    for tensor in model.inputs:
        if tensor.name == "Input-Context":
            feeds[tensor.name] = rng.normal(size=(batch, length + 2, tensor.shape[-1])).astype("float32")
        elif tensor.name == "Input-Segment":
            feeds[tensor.name] = rng.integers(0, 2, (batch, length)).astype("int32")
        else:
            ids = rng.integers(1, 30, (batch, length)).astype("int32")
            ids[0, max(1, length - 2):] = 0  # right padding in the first row
            feeds[tensor.name] = ids
    return feeds


def _runner(fmt, path):
    if fmt == "tf_saved_model":
        return load_saved_model_signature(path)
    if fmt == "onnx":
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        return lambda **feeds: dict(zip(names, session.run(None, feeds)))
    runner = litert.Interpreter(model_path=path).get_signature_runner("serving_default")
    return lambda **feeds: runner(**feeds)


@pytest.fixture(scope="module")
def models():
    return _models()


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    paths = {}
    for fmt, names in MATRIX.items():
        for name in names:
            suffix = {"onnx": ".onnx", "litert": ".tflite"}.get(fmt, "")
            paths[fmt, name] = export_model(models[name], str(root / f"{name}-{fmt}{suffix}"), format=fmt)
    return paths


@pytest.mark.parametrize("fmt,name", [(f, n) for f, names in MATRIX.items() for n in names])
def test_export_equals_predict_at_untraced_shapes(models, exported, fmt, name):
    model = models[name]
    run = _runner(fmt, exported[fmt, name])
    rng = np.random.default_rng(1)
    output_names = [t._keras_history.operation.name for t in model.outputs]
    for batch, length in SHAPES:
        feeds = _feeds(model, batch, length, rng)
        expected = model.predict([feeds[t.name] for t in model.inputs], verbose=0)
        expected = expected if isinstance(expected, list) else [expected]
        got = run(**feeds)
        for key, want in zip(output_names, expected):
            assert got[key].shape == want.shape, (key, batch, length)
            np.testing.assert_allclose(got[key], want, atol=1e-5, rtol=1e-5, err_msg=f"{name} {fmt} {key}")
        if name == "bert_crf":  # the served Viterbi path is the numpy decoder's on each row's real positions
            crf = model.get_layer("CRF")
            decoder = ViterbiDecoder(keras.ops.convert_to_numpy(crf.trans))
            real = feeds["Input-Token"] != 0
            for row in range(batch):
                want = decoder.decode(expected[0][row][real[row]])
                np.testing.assert_array_equal(got["CRF-Viterbi"][row][real[row]], want)
                assert (got["CRF-Viterbi"][row][~real[row]] == -1).all()


def test_saved_model_signature_is_named_for_tf_serving(exported):
    from tensorflow.core.protobuf import saved_model_pb2

    # TF Serving reads the SignatureDef: its input and output keys are what clients send and receive.
    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(exported["tf_saved_model", "bert_crf"], "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    signature = proto.meta_graphs[0].signature_def["serving_default"]
    assert sorted(signature.inputs) == ["Input-Segment", "Input-Token"]
    for info in signature.inputs.values():
        assert [d.size for d in info.tensor_shape.dim] == [-1, -1] and info.dtype == 3  # DT_INT32, free dims
    assert sorted(signature.outputs) == ["CRF", "CRF-Viterbi"]
    assert signature.outputs["CRF-Viterbi"].dtype == 3
    onnx_inputs = onnxruntime.InferenceSession(exported["onnx", "bert_crf"]).get_inputs()
    assert [(i.name, len(i.shape)) for i in onnx_inputs] == [("Input-Token", 2), ("Input-Segment", 2)]
    assert all(isinstance(d, str) for i in onnx_inputs for d in i.shape)  # free batch and length


def test_viterbi_decode_matches_numpy_decoder_with_padding_on_either_side():
    rng = np.random.default_rng(3)
    emissions = rng.normal(size=(4, 7, 3)).astype("float32")
    trans = rng.normal(size=(3, 3)).astype("float32")
    mask = np.ones((4, 7), bool)
    mask[1, 5:], mask[2, :2], mask[3, 1:] = False, False, False
    got = keras.ops.convert_to_numpy(viterbi_decode(emissions, trans, mask))
    for row in range(4):
        want = ViterbiDecoder(trans).decode(emissions[row][mask[row]])
        np.testing.assert_array_equal(got[row][mask[row]], want)
        assert (got[row][~mask[row]] == -1).all()


def test_export_refuses_bad_arguments(models, exported, tmp_path):
    with pytest.raises(ValueError, match="format must be one of"):
        export_model(models["bert_classifier"], str(tmp_path / "x"), format="coreml")
    with pytest.raises(ValueError, match="already exists"):
        export_model(models["bert_classifier"], exported["tf_saved_model", "bert_classifier"])
    with pytest.raises(TypeError, match="path must be"):
        export_model(models["bert_classifier"], 3)


# ----------------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("num_beams", [1, 3])
def test_generation_export_equals_generator(tmp_path, num_beams):
    from bert4x.generation import Generator

    keras.utils.set_random_seed(2)
    unilm = build_transformer_model(dict(BERT, max_position_embeddings=64), application="unilm")
    prompts = [[2, 5, 6, 7, 3], [2, 9, 3], [2, 11, 12, 13, 14, 15, 3]]
    segments = [[0] * len(p) for p in prompts]
    t5 = build_transformer_model(T5, model="mt5.1.1", return_keras_model=False) if num_beams > 1 else None
    t5_prompts = [[5, 6, 7, 1], [8, 1], [9, 10, 11, 12, 1]]
    kwargs = dict(max_len=6, end_id=3, num_beams=num_beams, min_len=3)
    cases = [(unilm, prompts, segments, kwargs, ["Input-Token", "Input-Segment"])]
    if num_beams > 1:  # mT5 through the beam search (greedy shares its adapter and its loop with sampling)
        cases.append((t5, t5_prompts, None, dict(kwargs, end_id=1), ["Encoder-Input-Token"]))
    for n, (model, rows, segs, options, names) in enumerate(cases):
        expected = Generator(model).generate(rows, segs, **options)
        path = export_generator(model, str(tmp_path / f"gen{n}"), batch_size=3, prompt_length=8, **options)
        feeds = {name: np.zeros((3, 8), "int32") for name in names}
        for i, row in enumerate(rows):
            feeds[names[0]][i, :len(row)] = row
            if segs is not None:
                feeds[names[1]][i, :len(row)] = segs[i]
        out = load_saved_model_signature(path)(**feeds)
        got = [r[:k].tolist() for r, k in zip(out["generated_ids"], out["lengths"])]
        assert got == expected
        assert any(len(g) > 3 for g in got) or num_beams > 1  # not a trivial immediate end


def test_generation_export_refuses_too_long(tmp_path):
    unilm = build_transformer_model(BERT, application="unilm")
    with pytest.raises(ValueError, match="learned positions"):
        export_generator(unilm, str(tmp_path / "g"), batch_size=1, prompt_length=30, max_len=8)


# ----------------------------------------------------------------------------------------------- jax backend
_JAX_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, keras, onnxruntime
    from bert4x.export import export_model, load_saved_model_signature
    from bert4x.layers import ConditionalRandomField
    from bert4x.models import build_transformer_model
    keras.utils.set_random_seed(0)
    cfg = dict(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
               max_position_embeddings=32)
    bert = build_transformer_model(cfg)
    crf = keras.Model(bert.inputs, ConditionalRandomField(name="CRF")(keras.layers.Dense(4)(bert.output)))
    roformer = build_transformer_model(cfg, model="roformer", with_pool=True)
    out = sys.argv[1]
    import bert4x.config
    from bert4x.kernels import dispatch
    seen, choose = [], dispatch.choose
    dispatch.choose = lambda spec: seen.append((spec.preferred, spec.fused_attention)) or choose(spec)
    saved = load_saved_model_signature(export_model(crf, out + "/crf"))
    dispatch.choose = choose
    assert seen and set(seen) == {("xla", "off")}, seen  # kernels that run anywhere, whatever the device
    assert bert4x.config.attention_implementation() is None and bert4x.config.fused_attention() == "auto"
    session = onnxruntime.InferenceSession(export_model(roformer, out + "/roformer.onnx", format="onnx"))
    rng = np.random.default_rng(0)
    for batch, length in [(1, 5), (3, 11), (2, 32)]:
        feeds = {"Input-Token": rng.integers(1, 50, (batch, length)).astype("int32"),
                 "Input-Segment": np.zeros((batch, length), "int32")}
        feeds["Input-Token"][0, -2:] = 0
        want = crf.predict(list(feeds.values()), verbose=0)
        got = saved(**feeds)
        assert np.abs(got["CRF"] - want).max() < 1e-5, np.abs(got["CRF"] - want).max()
        assert got["CRF-Viterbi"].shape == (batch, length)
        want = roformer.predict(list(feeds.values()), verbose=0)
        got = session.run(None, feeds)[0]
        assert np.abs(got - want).max() < 1e-5, np.abs(got - want).max()
    print("JAX EXPORTS OK")
""")


def test_jax_backend_exports_serve_untraced_shapes(tmp_path):
    pytest.importorskip("jax")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=root, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", _JAX_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0 and "JAX EXPORTS OK" in proc.stdout, (proc.stdout + proc.stderr)[-4000:]
