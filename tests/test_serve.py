"""bert4x.serve over real HTTP on 127.0.0.1 (ephemeral port): answers equal the model's own `predict` for ids and text,
concurrent requests are batched, bad requests get 400/404/413/422 with a message, and the server keeps serving."""

import http.client
import json
import threading

import keras
import numpy as np
import pytest
from helpers import in_subprocess, run_pytest_on_backend

from bert4x.models import build_transformer_model
from bert4x.serve import make_server
from bert4x.tokenizers import Tokenizer

CONFIG = dict(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
              max_position_embeddings=16)
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "中", "国", "##s"] + \
        [f"w{i}" for i in range(30)]


def _start(model_path, vocab=None, **kwargs):
    server = make_server(model_path, port=0, vocab=vocab, **kwargs)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return server, thread


def _stop(server, thread):
    server.shutdown()
    server.server_close()
    server.batcher.close()
    thread.join(timeout=10)
    assert not thread.is_alive()


def _request(server, method, path, body=None, raw=None):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    try:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    keras.utils.set_random_seed(0)
    bert = build_transformer_model(CONFIG, with_pool=True)
    model = keras.Model(bert.inputs, keras.layers.Dense(3, name="Classifier")(bert.output))
    root = tmp_path_factory.mktemp("serve")
    model_path = str(root / "classifier.keras")
    model.save(model_path)
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    server, thread = _start(model_path, str(vocab), max_batch=8, max_wait_ms=50, max_body_bytes=4096)
    yield model, server, Tokenizer(str(vocab), do_lower_case=True)
    _stop(server, thread)


def _predict(model, token_ids, segment_ids=None):
    segment_ids = [0] * len(token_ids) if segment_ids is None else segment_ids
    return model.predict([np.array([token_ids], "int32"), np.array([segment_ids], "int32")], verbose=0)[0]


def test_health(served):
    _, server, _ = served
    status, body = _request(server, "GET", "/health")
    assert status == 200 and body["status"] == "ok"
    assert body["inputs"] == ["Input-Token", "Input-Segment"] and body["outputs"] == ["Classifier"]
    assert body["max_length"] == 16 and body["text"] is True


def test_concurrent_requests_are_batched_and_exact(served):
    model, server, _ = served
    rng = np.random.default_rng(0)
    rows = [[2] + rng.integers(5, 40, size=n).tolist() + [3] for n in rng.integers(1, 12, size=12)]
    results = [None] * len(rows)
    before = server.batcher.batches_run

    def call(i):
        results[i] = _request(server, "POST", "/predict", {"token_ids": [rows[i]]})

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(rows))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for row, (status, body) in zip(rows, results):
        assert status == 200, body
        np.testing.assert_allclose(body["outputs"][0]["Classifier"], _predict(model, row), atol=1e-5)
        assert body["lengths"] == [len(row)]
    assert server.batcher.batches_run - before < len(rows)  # some requests shared a model call


def test_text_and_id_batches(served):
    model, server, tokenizer = served
    status, body = _request(server, "POST", "/predict", {"text": ["hello world", "中国"], "text_pair": ["w1", "w2"]})
    assert status == 200, body
    for i, (a, b) in enumerate([("hello world", "w1"), ("中国", "w2")]):
        ids, segments = tokenizer.encode(a, b)
        np.testing.assert_allclose(body["outputs"][i]["Classifier"], _predict(model, ids, segments), atol=1e-5)
    status, body = _request(server, "POST", "/predict", {"inputs": {"Input-Token": [[2, 5, 3], [2, 6, 7, 8, 3]],
                                                                    "Input-Segment": [[0, 0, 0], [0, 0, 0, 1, 1]]}})
    assert status == 200, body
    np.testing.assert_allclose(body["outputs"][1]["Classifier"], _predict(model, [2, 6, 7, 8, 3], [0, 0, 0, 1, 1]),
                               atol=1e-5)


@pytest.mark.parametrize("method,path,body,raw,status,message", [
    ("POST", "/predict", None, b'{"token_ids": [[2, 5', 400, "malformed JSON"),
    ("POST", "/predict", {"token_ids": [[2, "x", 3]]}, None, 400, "list of integers"),
    ("POST", "/predict", {"tokens": [[2, 3]]}, None, 400, "exactly one of"),
    ("POST", "/predict", None, json.dumps({"token_ids": [[2] * 3000]}).encode(), 413, "at most 4096"),
    ("POST", "/predict", {"token_ids": [[2] * 17]}, None, 422, "at most 16"),
    ("POST", "/predict", {"token_ids": [[2, 3]] * 9}, None, 422, "--max-batch"),
    ("GET", "/nowhere", None, None, 404, "no route"),
    ("POST", "/generate", {"token_ids": [[2, 3]]}, None, 404, "no route"),
])
def test_bad_requests_get_status_and_message_and_server_keeps_serving(served, method, path, body, raw, status,
                                                                       message):
    model, server, _ = served
    got_status, got = _request(server, method, path, body, raw)
    assert got_status == status and message in got["error"], got
    status_after, after = _request(server, "POST", "/predict", {"token_ids": [2, 5, 6, 3]})
    assert status_after == 200
    np.testing.assert_allclose(after["outputs"][0]["Classifier"], _predict(model, [2, 5, 6, 3]), atol=1e-5)


def test_text_without_vocab_is_refused(served, tmp_path):
    model, _, _ = served
    path = str(tmp_path / "m.keras")
    model.save(path)
    server, thread = _start(path)
    try:
        status, body = _request(server, "POST", "/predict", {"text": "hello"})
        assert status == 400 and "--vocab" in body["error"]
    finally:
        _stop(server, thread)


def test_serves_an_exported_saved_model(served, tmp_path):
    pytest.importorskip("tensorflow")
    if keras.backend.backend() != "tensorflow":
        pytest.skip("exports from the tensorflow backend")
    from bert4x.export import export_model

    model, _, _ = served
    path = export_model(model, str(tmp_path / "saved"))
    server, thread = _start(path)
    try:
        status, health = _request(server, "GET", "/health")
        assert status == 200 and health["max_length"] == 16 and health["outputs"] == ["Classifier"]
        rows = [[2, 5, 6, 3], [2, 7, 3]]
        status, body = _request(server, "POST", "/predict", {"token_ids": rows})
        assert status == 200, body
        for i, row in enumerate(rows):
            np.testing.assert_allclose(body["outputs"][i]["Classifier"], _predict(model, row), atol=1e-5)
        status, body = _request(server, "POST", "/predict", {"token_ids": [[2] * 17]})
        assert status == 422
    finally:
        _stop(server, thread)


def test_batcher_pads_to_bucketed_shapes_where_each_shape_compiles():
    """A runner that compiles per shape (jax) sees a few bucketed shapes; each row's answer is cut back to its own
    length, and rows the batcher added are not answered."""
    from bert4x.serve import Batcher, ModelRunner

    shapes = []

    def call(feeds):
        ids = feeds["Input-Token"]
        shapes.append(ids.shape)
        return {"Double": ids * 2, "Sum": ids.sum(axis=1, keepdims=True)}

    runner = ModelRunner(call, ["Input-Token"], ["Double", "Sum"], max_length=40, compiles_per_shape=True)
    batcher = Batcher(runner, max_batch=6, max_wait_ms=0)
    try:
        for rows in ([[1, 2, 3]], [[1] * 5, [2] * 9, [3]], [[4] * 33, [5] * 2], [[6] * 40] * 5):
            answers = batcher.submit({"Input-Token": rows})
            assert len(answers) == len(rows)
            for row, answer in zip(rows, answers):
                assert answer == {"Double": [2 * t for t in row], "Sum": [sum(row)]}
    finally:
        batcher.close()
    assert shapes == [(1, 4), (4, 16), (2, 40), (6, 40)]  # batch: powers of 2 up to max_batch; length: capped at 40


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="packing is jax's; re-run on jax below")
def test_jax_served_model_without_padding_equals_the_padded_model(tmp_path):
    """On jax a `.keras` model built with remove_padding=True takes Input-Packing; the server computes it."""
    keras.utils.set_random_seed(0)
    config = dict(CONFIG, hidden_size=32)
    skipping = build_transformer_model(config, with_pool=True, remove_padding=True)
    padded = build_transformer_model(config, with_pool=True, remove_padding=False)
    padded.set_weights(skipping.get_weights())
    path = str(tmp_path / "skipping.keras")
    skipping.save(path)
    server, thread = _start(path, max_batch=4, max_wait_ms=50)
    try:
        status, health = _request(server, "GET", "/health")
        assert status == 200 and health["inputs"] == ["Input-Token", "Input-Segment"]
        rows = [[2, 5, 6, 3], [2, 7, 8, 9, 10, 11, 3], [2, 3]]
        status, body = _request(server, "POST", "/predict", {"token_ids": rows})
        assert status == 200, body
        for row, answer in zip(rows, body["outputs"]):
            np.testing.assert_allclose(answer["Pooler-Dense"], _predict(padded, row), rtol=1e-5, atol=1e-5)
    finally:
        _stop(server, thread)


@pytest.mark.skipif(in_subprocess or keras.backend.backend() == "jax", reason="runs from the top-level process only")
def test_serve_on_jax_backend():
    run_pytest_on_backend("jax", "tests/test_serve.py", "-k", "jax_served or bucketed or concurrent or width_equal")


def test_sequence_outputs_keep_a_width_equal_to_the_padded_length(tmp_path):
    """A tagger with 8 labels answering a batch padded to 8 tokens: only the length axis is cut per row (the old rule,
    every leading axis of the padded length, cut the labels too)."""
    keras.utils.set_random_seed(0)
    tagger = build_transformer_model(CONFIG)
    model = keras.Model(tagger.inputs, keras.layers.Dense(8, name="Tags")(tagger.output))
    path = str(tmp_path / "tagger.keras")
    model.save(path)
    server, thread = _start(path, max_batch=4, max_wait_ms=50)
    try:
        rows = [[2, 5, 6, 7, 8, 9, 10, 3], [2, 5, 3]]
        status, body = _request(server, "POST", "/predict", {"token_ids": rows})
        assert status == 200, body
        for row, answer in zip(rows, body["outputs"]):
            assert np.asarray(answer["Tags"]).shape == (len(row), 8)
            np.testing.assert_allclose(answer["Tags"], _predict(model, row), rtol=1e-5, atol=1e-5)
    finally:
        _stop(server, thread)
