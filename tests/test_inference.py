"""bert4x.inference.CompiledInference: the compiled inference call equals `predict` on every backend (a classifier,
a CRF tagger with its Viterbi path), refuses wrong inputs by name, and on jax computes a model's packing positions
on the device (equal to `packing_positions`), so a model without padding serves from the token inputs alone."""

import keras
import numpy as np
import pytest
from helpers import in_subprocess, run_pytest_on_backend

from bert4x.export import serving_function
from bert4x.inference import CompiledInference
from bert4x.layers import ConditionalRandomField
from bert4x.models import build_transformer_model
from bert4x.snippets import packing_positions, packing_width

CONFIG = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
JAX = keras.backend.backend() == "jax"


def _ids(batch, length, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 40, (batch, length)).astype("int32")
    for row in range(batch):
        ids[row, rng.integers(1, length + 1):] = 0
    ids[0] = 0  # a row of padding only
    ids[-1, :] = rng.integers(1, 40, length)  # and a full one
    return ids


def _classifier(**kwargs):
    keras.utils.set_random_seed(1)
    bert = build_transformer_model(CONFIG, with_pool=True, **kwargs)
    return keras.Model(bert.inputs, keras.layers.Dense(3, name="Classifier")(bert.output))


@pytest.mark.parametrize("shape", [(1, 5), (4, 9), (3, 16)])  # each compiles anew on jax
def test_equals_predict_at_each_shape(shape):
    model = _classifier(remove_padding=False)
    infer = CompiledInference(model)
    assert infer.input_names == ["Input-Token", "Input-Segment"]
    assert infer.compiles_per_shape == JAX
    ids = _ids(*shape)
    segments = np.zeros_like(ids)
    got = infer({"Input-Token": ids, "Input-Segment": segments})
    assert list(got) == ["Classifier"] and isinstance(got["Classifier"], np.ndarray)
    np.testing.assert_allclose(got["Classifier"], model.predict([ids, segments], verbose=0), rtol=1e-5, atol=1e-5)


def test_crf_tagger_gives_the_viterbi_path_of_the_serving_function():
    keras.utils.set_random_seed(2)
    tagger = build_transformer_model(CONFIG)
    model = keras.Model(tagger.inputs, ConditionalRandomField(name="CRF")(keras.layers.Dense(5)(tagger.output)))
    ids = _ids(3, 12, seed=3)
    feeds = {"Input-Token": ids, "Input-Segment": np.zeros_like(ids)}
    got = CompiledInference(model)(feeds)
    eager = serving_function(model)(feeds)
    assert sorted(got) == ["CRF", "CRF-Viterbi"]
    np.testing.assert_array_equal(got["CRF-Viterbi"], keras.ops.convert_to_numpy(eager["CRF-Viterbi"]))
    np.testing.assert_allclose(got["CRF"], keras.ops.convert_to_numpy(eager["CRF"]), rtol=1e-5, atol=1e-5)


def test_wrong_inputs_are_named():
    infer = CompiledInference(_classifier(remove_padding=False))
    ids = _ids(2, 6)
    with pytest.raises(ValueError, match=r"missing \['Input-Segment'\], unknown \[\]"):
        infer({"Input-Token": ids})
    with pytest.raises(ValueError, match=r"unknown \['Input-Extra'\]"):
        infer({"Input-Token": ids, "Input-Segment": ids, "Input-Extra": ids})
    with pytest.raises(TypeError, match="keras.Model"):
        CompiledInference("model.keras")


@pytest.mark.skipif(not JAX, reason="packing is computed on jax only; re-run on jax below")
def test_device_packing_equals_the_host_list():
    import jax.numpy as jnp

    from bert4x.inference import device_packing_positions

    for seed, (batch, length) in enumerate([(1, 7), (4, 16), (5, 33)]):
        ids = _ids(batch, length, seed)
        for buckets in (1, 4, 32):
            host = packing_positions(ids, buckets=buckets)
            assert host.shape[1] == packing_width(int((ids != 0).sum()), batch, length, buckets)
            device = device_packing_positions(jnp.asarray(ids), host.shape[1])
            np.testing.assert_array_equal(np.asarray(device), host)
    assert packing_positions(np.zeros((3, 8), "int32")).tolist() == [[-1]] * 3  # no real token: one slot a row


@pytest.mark.skipif(not JAX, reason="the packing input is jax's; re-run on jax below")
def test_model_without_padding_serves_from_its_token_inputs_alone():
    skipping, padded = _classifier(remove_padding=True), _classifier(remove_padding=False)
    padded.set_weights(skipping.get_weights())
    assert "Input-Packing" in [t.name for t in skipping.inputs]
    infer = CompiledInference(skipping)
    assert infer.input_names == ["Input-Token", "Input-Segment"]
    ids = _ids(6, 16, seed=4)
    segments = np.zeros_like(ids)
    got = infer({"Input-Token": ids, "Input-Segment": segments})["Classifier"]
    want = padded.predict([ids, segments], verbose=0)
    real = ids[:, 0] != 0  # the padding-only row has no [CLS] to compare
    np.testing.assert_allclose(got[real], want[real], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="'Input-Packing' is computed from 'Input-Token'"):
        infer({"Input-Token": ids, "Input-Segment": segments, "Input-Packing": packing_positions(ids)})
    # The weights are those of when it was made until refresh().
    skipping.set_weights([w * 0.5 for w in skipping.get_weights()])
    np.testing.assert_array_equal(infer({"Input-Token": ids, "Input-Segment": segments})["Classifier"], got)
    infer.refresh()
    assert not np.allclose(infer({"Input-Token": ids, "Input-Segment": segments})["Classifier"][real], got[real])


@pytest.mark.skipif(in_subprocess or JAX, reason="runs from the top-level process only")
def test_inference_on_jax_backend():
    run_pytest_on_backend("jax", "tests/test_inference.py")


@pytest.mark.skipif(in_subprocess or keras.backend.backend() == "torch", reason="runs from the top-level process only")
def test_inference_on_torch_backend():
    run_pytest_on_backend("torch", "tests/test_inference.py", "-k", "not on_jax_backend")
