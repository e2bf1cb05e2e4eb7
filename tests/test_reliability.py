"""Bad input gets a clear error naming its cause, and a failed call loses nothing (issue 28).

Model-boundary checks run on every backend (this file re-runs itself on jax and torch); the jax state guard is tested
on jax only.
"""

from __future__ import annotations

import json
import os
import threading
import warnings

import keras
import numpy as np
import pytest
from helpers import in_subprocess, run_pytest_on_backend, shared_path

from bert4x.models import Model, build_transformer_model
from bert4x.tokenizers import Tokenizer, load_vocab
from bert4x.training import TESTED_KERAS, check_keras_version

BACKEND = keras.backend.backend()
CONFIG = {"vocab_size": 50, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
          "intermediate_size": 16, "max_position_embeddings": 16, "type_vocab_size": 2}
ON_JAX = pytest.mark.skipif(BACKEND != "jax", reason="jax-only behaviour; test_on_jax_backend runs it")


@pytest.fixture(scope="module")
def bert():
    return build_transformer_model(CONFIG)


def batch(rows=2, length=10, seed=0):
    ids = np.random.default_rng(seed).integers(1, CONFIG["vocab_size"], (rows, length)).astype("int32")
    return ids, np.zeros_like(ids)


def assert_refused(call, error=ValueError, *words):
    with pytest.raises(error) as info:
        call()
    for word in words:
        assert word in str(info.value), f"{word!r} not in: {info.value}"


# ------------------------------------------------------------------ the model boundary


@pytest.mark.parametrize("bad_id", [50, 51, 10**6, -1])
def test_token_id_outside_vocab_is_refused(bert, bad_id):
    ids, seg = batch()
    ids[1, 3] = bad_id
    assert_refused(lambda: bert.predict([ids, seg], verbose=0), ValueError,
                   "Input-Token", f"id {bad_id} at (1, 3)", "[0, 50)")


@pytest.mark.parametrize("bad_id", [2, -1])
def test_segment_id_outside_table_is_refused(bert, bad_id):
    ids, seg = batch()
    seg[0, 4] = bad_id
    assert_refused(lambda: bert.predict([ids, seg], verbose=0), ValueError,
                   "Input-Segment", f"id {bad_id} at (0, 4)", "[0, 2)")


def test_sequence_longer_than_positions_is_refused(bert):
    ids, seg = batch(length=17)
    assert_refused(lambda: bert.predict([ids, seg], verbose=0), ValueError, "length 17", "16 learned positions")


def test_empty_batch_is_refused(bert):
    ids, seg = batch(rows=0)
    assert_refused(lambda: bert.predict([ids, seg], verbose=0), ValueError, "Input-Token", "empty batch")


def test_zero_length_sequences_are_refused(bert):
    ids, seg = batch(length=0)
    assert_refused(lambda: bert.predict([ids, seg], verbose=0), ValueError, "Input-Token", "zero-length")


def test_token_and_segment_lengths_must_agree(bert):
    ids, seg = batch()
    assert_refused(lambda: bert.predict([ids, seg[:, :7]], verbose=0), ValueError,
                   "Input-Token", "Input-Segment", "(2, 10) vs (2, 7)")


def test_dict_inputs_are_checked(bert):
    ids, seg = batch()
    ids[0, 0] = 99
    assert_refused(lambda: bert.predict({"Input-Token": ids, "Input-Segment": seg}, verbose=0), ValueError, "id 99")


def test_valid_inputs_give_keras_results(bert):
    ids, seg = batch()
    plain = keras.Model(bert.inputs, bert.outputs)
    np.testing.assert_array_equal(bert.predict([ids, seg], verbose=0), plain.predict([ids, seg], verbose=0))


def compiled_bert():
    model = build_transformer_model(CONFIG, with_pool=True)
    model.compile("sgd", "mse")
    return model


def test_fit_and_evaluate_check_arrays_and_validation_data():
    model = compiled_bert()
    (ids, seg), y = batch(), np.zeros((2, 8))
    bad = ids.copy()
    bad[1, 1] = 50
    assert_refused(lambda: model.fit([bad, seg], y, verbose=0), ValueError, "id 50")
    assert_refused(lambda: model.evaluate([bad, seg], y, verbose=0), ValueError, "id 50")
    assert_refused(lambda: model.fit([ids, seg], y, validation_data=([bad, seg], y), verbose=0), ValueError, "id 50")
    assert_refused(lambda: model.train_on_batch([bad, seg], y), ValueError, "id 50")


def test_batches_from_generators_and_pydatasets_are_checked():
    model = compiled_bert()
    (ids, seg), y = batch(), np.zeros((2, 8))
    bad = ids.copy()
    bad[0, 2] = -3

    def generator():
        yield (ids, seg), y
        yield (bad, seg), y

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return 2

        def __getitem__(self, index):
            return ((ids, seg) if index == 0 else (bad, seg)), y

    assert_refused(lambda: model.fit(generator(), verbose=0), ValueError, "id -3 at (0, 2)")
    assert_refused(lambda: model.fit(Batches(), verbose=0), ValueError, "id -3 at (0, 2)")
    assert_refused(lambda: model.predict(((x,) for x, _ in generator()), verbose=0), ValueError, "id -3")


def test_batches_from_tf_data_are_checked():
    tf = pytest.importorskip("tensorflow")
    model = compiled_bert()
    ids, seg = batch()
    bad = ids.copy()
    bad[0, 5] = 77
    data = tf.data.Dataset.from_tensor_slices(((np.concatenate([ids, bad]), np.concatenate([seg, seg])),
                                               np.zeros((4, 8)))).batch(2)
    assert_refused(lambda: model.fit(data, verbose=0), ValueError, "id 77 at (0, 5)", "[0, 50)")
    assert_refused(lambda: model.predict(data.map(lambda x, _: (x,)), verbose=0), ValueError, "id 77")


# ------------------------------------------------------------------ jax: a failed call loses nothing


class Boom(keras.callbacks.Callback):
    def __init__(self, hook):
        super().__init__()
        setattr(self, hook, self.explode)

    def explode(self, *args, **kwargs):
        raise RuntimeError("boom")


def assert_intact(model, weights, ids, seg, tmp_path):
    for got, want in zip(model.get_weights(), weights):
        np.testing.assert_array_equal(got, want)
    assert np.all(np.isfinite(model.predict([ids, seg], verbose=0)))
    model([ids, seg])
    model.save(str(tmp_path / "after.keras"))


@ON_JAX
@pytest.mark.parametrize("hook", ["on_predict_batch_end", "on_predict_batch_begin"])
def test_jax_failed_predict_keeps_the_model(tmp_path, hook):
    model = build_transformer_model(CONFIG)
    ids, seg = batch()
    weights = model.get_weights()
    with pytest.raises(RuntimeError, match="boom"):
        model.predict([ids, seg], verbose=0, callbacks=[Boom(hook)])
    assert_intact(model, weights, ids, seg, tmp_path)


@ON_JAX
def test_jax_failure_inside_the_compiled_step_keeps_the_model(tmp_path):
    x = keras.Input((4,))
    model = Model(x, keras.layers.Dense(2)(x))
    weights = model.get_weights()
    with pytest.raises(ValueError):
        model.predict(np.ones((3, 5)), verbose=0)  # wrong width: raises while tracing, after Keras took the state
    for got, want in zip(model.get_weights(), weights):
        np.testing.assert_array_equal(got, want)
    assert model.predict(np.ones((3, 4)), verbose=0).shape == (3, 2)


@ON_JAX
def test_jax_failed_fit_keeps_the_last_completed_step(tmp_path):
    model = compiled_bert()
    ids, seg = batch(rows=8)
    y = np.ones((8, 8))
    with pytest.raises(RuntimeError, match="boom"):
        model.fit([ids, seg], y, batch_size=2, verbose=0, callbacks=[Boom("on_train_batch_end")])
    trained = model.get_weights()  # one step ran before the callback raised
    assert all(np.all(np.isfinite(w)) for w in trained)
    model.fit([ids, seg], y, batch_size=2, verbose=0)
    assert_intact(model, model.get_weights(), ids, seg, tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        model.evaluate([ids, seg], y, verbose=0, callbacks=[Boom("on_test_batch_end")])
    assert_intact(model, model.get_weights(), ids, seg, tmp_path)


@ON_JAX
def test_jax_concurrent_predict_matches_serial():
    model = build_transformer_model(CONFIG)
    inputs = [batch(seed=seed) for seed in range(4)]
    serial = [model.predict(list(x), verbose=0) for x in inputs]
    results, errors = [None] * 4, []

    def work(i):
        try:
            for _ in range(3):
                results[i] = model.predict(list(inputs[i]), verbose=0)
        except Exception as error:  # noqa: BLE001  (reported below)
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for got, want in zip(results, serial):
        np.testing.assert_array_equal(got, want)


@ON_JAX
def test_jax_float16_on_cpu_is_a_clear_error():
    import jax

    if jax.default_backend() != "cpu":
        pytest.skip("float16 runs on GPUs")
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = build_transformer_model(CONFIG)
    finally:
        keras.config.set_dtype_policy(policy)
    ids, seg = batch()
    assert_refused(lambda: model.predict([ids, seg], verbose=0), ValueError, "float16", "mixed_bfloat16", "CPU")


# ------------------------------------------------------------------ arguments


@pytest.mark.parametrize("key, value, error, words", [
    ("max_position_embeddings", 0, ValueError, ">= 1"),
    ("max_position_embeddings", "64", TypeError, "must be an integer"),
    ("max_position_embeddings", 16.0, TypeError, "must be an integer"),
    ("type_vocab_size", "2", TypeError, "must be an integer"),
    ("type_vocab_size", -1, ValueError, ">= 0"),
    ("hidden_size", True, TypeError, "must be an integer"),
    ("hidden_dropout_prob", "0.1", TypeError, "must be a number"),
    ("hidden_dropout_prob", 1.0, ValueError, "[0, 1)"),
    ("attention_probs_dropout_prob", -0.1, ValueError, "[0, 1)"),
    ("layer_norm_eps", "1e-12", TypeError, "must be a number"),
    ("layer_norm_eps", -1e-5, ValueError, "> 0"),
    ("layer_norm_eps", 0, ValueError, "> 0"),
    ("initializer_range", float("nan"), ValueError, "finite"),
    ("hidden_act", 3, TypeError, "must be a string"),
])
def test_config_values_are_checked(key, value, error, words):
    assert_refused(lambda: build_transformer_model({**CONFIG, key: value}), error, key, words)


def test_bad_config_file_value_names_the_file(tmp_path):
    path = tmp_path / "bert_config.json"
    path.write_text(json.dumps({**CONFIG, "layer_norm_eps": -1.0}))
    assert_refused(lambda: build_transformer_model(str(path)), ValueError, str(path), "layer_norm_eps")


@pytest.mark.parametrize("keep_tokens, error, words", [
    ([1.0, 2.0], TypeError, "element 0 is 1.0"),
    (np.array([1, 2.5]), TypeError, "integer ids"),
    (["1", "2"], TypeError, "element 0 is '1'"),
    ([True, False], TypeError, "bool"),
    ("12", TypeError, "1-D sequence"),
    ([], ValueError, "empty"),
    ([[1, 2]], ValueError, "1-D"),
    (np.zeros((2, 2), int), ValueError, "shape (2, 2)"),
    ([1, 3, 1], ValueError, "repeats ids [1]"),
    ([1, 50], ValueError, "[0, 50)"),
    ([-1], ValueError, "[0, 50)"),
])
def test_keep_tokens_are_checked(keep_tokens, error, words):
    assert_refused(lambda: build_transformer_model(CONFIG, keep_tokens=keep_tokens), error, "keep_tokens", words)


def test_keep_tokens_of_numpy_ints_work():
    model = build_transformer_model(CONFIG, keep_tokens=np.array([3, 1, 2], "int64"))
    assert model.get_layer("Embedding-Token").input_dim == 3


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(str(shared_path("vocab", "bert_chinese", "vocab.txt")), do_lower_case=True)


@pytest.mark.parametrize("truncate_from", [1, 3, -2, -4, "left", "right"])
def test_truncate_from_never_removes_start_or_end(tokenizer, truncate_from):
    ids, _ = tokenizer.encode("今天天气很好我们去公园", maxlen=6, truncate_from=truncate_from)
    assert len(ids) == 6 and ids[0] == tokenizer.start_id and ids[-1] == tokenizer.end_id
    ids, segments = tokenizer.encode("今天天气很好", "我们去公园", maxlen=8, truncate_from=truncate_from)
    assert len(ids) == 8 and ids[0] == tokenizer.start_id and ids.count(tokenizer.end_id) == 2 and ids[-1] == 102
    assert segments == [0] * segments.index(1) + [1] * (8 - segments.index(1))


@pytest.mark.parametrize("truncate_from, error, words", [
    (0, ValueError, "truncate_from=0 is out of range"),
    (-1, ValueError, "truncate_from=-1 is out of range"),
    (40, ValueError, "truncate_from=40 is out of range"),
    (-40, ValueError, "truncate_from=-40 is out of range"),
    (True, TypeError, "got bool"),
    (1.5, TypeError, "got float"),
    ("middle", ValueError, "'middle'"),
])
def test_truncate_from_out_of_range_is_refused(tokenizer, truncate_from, error, words):
    assert_refused(lambda: tokenizer.encode("今天天气很好", maxlen=5, truncate_from=truncate_from), error, words)


def test_vocab_file_not_utf8_is_named(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_bytes(b"[PAD]\n[UNK]\n" + "中".encode("gbk") + b"\n[CLS]\n[SEP]\n")
    assert_refused(lambda: Tokenizer(str(path)), ValueError, str(path), "not valid utf-8", "encoding=")
    assert Tokenizer(load_vocab(str(path), encoding="gbk")).token_to_id("中") == 2


def test_tokenizer_vocab_size_alias(tokenizer):
    assert tokenizer._vocab_size == tokenizer.vocab_size == 21128


# ------------------------------------------------------------------ saving


def test_bare_weights_name_round_trips(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, other = build_transformer_model(CONFIG), build_transformer_model(CONFIG)
    model.save_weights("best_model.weights")
    assert sorted(os.listdir(tmp_path)) == ["best_model.weights"]
    other.load_weights("best_model.weights")
    for a, b in zip(model.get_weights(), other.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert sorted(os.listdir(tmp_path)) == ["best_model.weights"]
    (tmp_path / "notes").write_text("not weights")
    assert_refused(lambda: other.load_weights("notes"), ValueError, "notes", "not a Keras weights file")


def test_crf_model_loads_compiled(tmp_path):
    from bert4x.layers.heads import ConditionalRandomField

    bert = build_transformer_model(CONFIG)
    crf = ConditionalRandomField(lr_multiplier=10, name="CRF")
    model = Model(bert.inputs, crf(keras.layers.Dense(3)(bert.output)))
    model.compile("adam", loss=crf.sparse_loss, metrics=[crf.sparse_accuracy])
    (ids, seg), labels = batch(), np.random.default_rng(1).integers(0, 3, (2, 10))
    model.fit([ids, seg], labels, verbose=0)
    model.save(str(tmp_path / "crf.keras"))
    loaded = keras.models.load_model(str(tmp_path / "crf.keras"))
    assert loaded.compiled
    want = model.evaluate([ids, seg], labels, verbose=0, return_dict=True)
    got = loaded.evaluate([ids, seg], labels, verbose=0, return_dict=True)
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5)
    loaded.fit([ids, seg], labels, verbose=0)  # the restored loss trains


def test_ordinary_compile_config_round_trips(tmp_path):
    bert = build_transformer_model(CONFIG, with_pool=True)
    model = Model(bert.inputs, keras.layers.Dense(3, name="head")(bert.output))
    model.compile(keras.optimizers.AdamW(1e-3), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy", keras.metrics.SparseTopKCategoricalAccuracy(k=2)])
    (ids, seg), labels = batch(), np.array([0, 2])
    model.fit([ids, seg], labels, verbose=0)
    model.save(str(tmp_path / "m.keras"))
    loaded = keras.models.load_model(str(tmp_path / "m.keras"))
    assert loaded.get_compile_config() == model.get_compile_config()
    want = model.evaluate([ids, seg], labels, verbose=0, return_dict=True)
    got = loaded.evaluate([ids, seg], labels, verbose=0, return_dict=True)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5)


# ------------------------------------------------------------------ Keras version


def test_installed_keras_is_in_the_tested_range():
    (low, high) = TESTED_KERAS
    assert check_keras_version(), (
        f"Keras {keras.__version__} is outside the range bert4x.models.Model was tested with "
        f"(>={low[0]}.{low[1]},<{high[0]}.{high[1]}); re-test Model's jax trainer overrides and widen TESTED_KERAS."
    )


@pytest.mark.parametrize("version", ["3.16.0", "3.9.2", "4.0.0"])
def test_untested_keras_warns_with_the_range(version):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not check_keras_version(version)
    assert any(">=3.10,<3.16" in str(w.message) and version in str(w.message) for w in caught)


# ------------------------------------------------------------------ other backends


BOUNDARY_TESTS = "refused or checked or agree or keras_results or jax"


@pytest.mark.skipif(in_subprocess, reason="already in a backend subprocess")
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_on_other_backends(backend):
    # The model-boundary checks and the jax state tests; arguments and files do not depend on the backend.
    run_pytest_on_backend(backend, "tests/test_reliability.py", "-x", "-k",
                          f"({BOUNDARY_TESTS}) and not config and not keep_tokens and not truncate")
