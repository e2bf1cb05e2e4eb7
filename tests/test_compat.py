"""bert4keras's names and behaviour: `bert4x.backend` (K, sequence_masking, batch_gather, search_layer, set_gelu)
against numpy written from their definitions, the `Loss` layer, masks reaching the CRF/GlobalPointer/Loss layers,
strict loading that leaves the user's own layers alone, `transformer.initializer`, and fit with `(inputs, None)`."""

import itertools

import keras
import numpy as np
import pytest
from helpers import in_subprocess, run_pytest_on_backend
from keras import ops

from bert4x.backend import (
    K,
    batch_gather,
    gelu_erf,
    gelu_tanh,
    get_activation,
    search_layer,
    sequence_masking,
    set_gelu,
)
from bert4x.layers import Loss
from bert4x.layers.heads import ConditionalRandomField, GlobalPointer
from bert4x.models import CheckpointError, build_transformer_model

rng = np.random.default_rng(0)


def np_(x):
    return ops.convert_to_numpy(x)


# ------------------------------------------------------------------ backend
@pytest.mark.parametrize("axis", [None, 1, 2, -1])
@pytest.mark.parametrize("value", [0, -7.0, "-inf", "inf"])
def test_sequence_masking_matches_numpy(axis, value):
    x = rng.normal(size=(2, 4, 4, 3)).astype("float32")
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 0]])
    if axis == -1:
        x = x[..., 0]  # [2, 4, 4]: mask the last axis
    fill = {"-inf": -1e12, "inf": 1e12}.get(value, value)
    a = 1 if axis is None else axis % x.ndim
    shape = [x.shape[0]] + [1] * (x.ndim - 1)
    shape[a] = x.shape[a]
    expected = np.where(mask.reshape(shape).astype(bool), x, fill)
    np.testing.assert_allclose(np_(sequence_masking(x, mask, value, axis)), expected, rtol=1e-6)
    assert sequence_masking(x, None, value, axis) is x
    with pytest.raises(ValueError, match="value"):
        sequence_masking(x, mask, "-Inf")


def test_batch_gather_matches_numpy():
    params = rng.normal(size=(3, 5, 2))
    indices = rng.integers(0, 5, size=(3, 4))
    expected = np.stack([params[b][indices[b]] for b in range(3)])
    np.testing.assert_allclose(np_(batch_gather(params, indices)), expected, rtol=1e-6)
    params3 = rng.normal(size=(2, 3, 6))
    indices3 = rng.integers(0, 6, size=(2, 3, 2))
    expected3 = np.take_along_axis(params3, indices3, axis=2)
    np.testing.assert_allclose(np_(batch_gather(params3, indices3)), expected3, rtol=1e-6)


def test_search_layer_finds_upstream_layers():
    x = keras.Input((3,), name="x")
    h = keras.layers.Dense(4, name="body")(x)
    y = keras.layers.Dense(2, name="head")(keras.layers.Dropout(0.1, name="drop")(h))
    model = keras.Model(x, y)
    assert search_layer(model.output, "body") is model.get_layer("body")
    assert search_layer(y, "head") is model.get_layer("head")
    assert search_layer(y, "missing") is None


def test_set_gelu_switches_the_meaning_of_gelu():
    try:
        set_gelu("tanh")
        assert get_activation("gelu") is gelu_tanh
        set_gelu("erf")
        assert get_activation("gelu") is gelu_erf
        with pytest.raises(ValueError, match="erf"):
            set_gelu("fast")
    finally:
        set_gelu("erf")


def test_k_functions_match_numpy():
    a, b = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 4, 5))
    def close(actual, expected, rtol=1e-5):
        np.testing.assert_allclose(actual, expected, rtol=rtol, atol=1e-5)

    close(np_(K.sum(a, 1, keepdims=True)), a.sum(1, keepdims=True), rtol=1e-6)
    close(np_(K.mean(a, -1)), a.mean(-1), rtol=1e-6)
    close(np_(K.max(a)), a.max(), rtol=1e-6)
    close(np_(K.batch_dot(a, b)), a @ b, rtol=1e-5)
    close(np_(K.batch_dot(a, a, axes=2)), np.einsum("bik,bjk->bij", a, a), rtol=1e-5)
    close(np_(K.batch_dot(a[:, 0], a[:, 1], axes=1)), (a[:, 0] * a[:, 1]).sum(-1, keepdims=True), rtol=1e-5)
    close(np_(K.dot(a, b[0])), a @ b[0], rtol=1e-5)
    close(np_(K.permute_dimensions(a, (0, 2, 1))), a.transpose(0, 2, 1))
    close(np_(K.l2_normalize(a, -1)), a / np.linalg.norm(a, axis=-1, keepdims=True), rtol=1e-5)
    close(np_(K.switch(np.array([True, False]), a[:, 0], -a[:, 0])), np.stack([a[0, 0], -a[1, 0]]), rtol=1e-6)
    close(np_(K.gather(a[0], np.array([2, 0]))), a[0][[2, 0]], rtol=1e-6)
    assert K.int_shape(keras.Input((None, 3))) == (None, None, 3)
    assert K.floatx() == "float32" and K.epsilon() == keras.backend.epsilon()
    labels, probs = np.array([1, 0]), np.array([[0.2, 0.8], [0.6, 0.4]])
    close(np_(K.sparse_categorical_crossentropy(labels, probs)), -np.log([0.8, 0.6]), rtol=1e-5)
    close(np_(K.sparse_categorical_crossentropy(labels[:, None], probs)), -np.log([0.8, 0.6]), rtol=1e-5)
    close(np_(K.categorical_crossentropy(np.eye(2)[labels], probs)), -np.log([0.8, 0.6]), rtol=1e-5)
    assert not hasattr(K, "learning_phase")


# ------------------------------------------------------------------ Loss and masks
class MaskedCrossEntropy(Loss):
    def compute_loss(self, inputs, mask=None):
        y_true, y_pred = inputs
        weights = ops.cast(mask[1], "float32")
        losses = keras.losses.sparse_categorical_crossentropy(y_true, y_pred)
        return ops.sum(losses * weights) / ops.sum(weights)


def test_loss_layer_adds_its_loss_selects_outputs_and_serializes():
    layer = MaskedCrossEntropy(output_axis=1)
    assert layer.get_config()["output_axis"] == 1
    assert MaskedCrossEntropy.from_config(layer.get_config()).output_axis == 1
    y, p = np.array([[1]]), np.array([[[0.25, 0.75]]], "float32")
    assert Loss(output_axis=[0, 1]).compute_output_shape([(1, 1), (1, 1, 2)]) == [(1, 1), (1, 1, 2)]
    with pytest.raises(TypeError, match="output_axis"):
        Loss(output_axis="1")
    with pytest.raises(NotImplementedError, match="compute_loss"):
        Loss()([y, p])
    del y, p


def masked_lm(with_loss_layer=True):
    token_ids = keras.Input((None,), dtype="int32")
    targets = keras.Input((None,), dtype="int32")
    h = keras.layers.Embedding(12, 8, mask_zero=True)(token_ids)
    probs = keras.layers.Dense(12, activation="softmax")(h)
    return keras.Model([token_ids, targets], MaskedCrossEntropy(output_axis=1)([targets, probs]))


def test_loss_layer_reads_the_mask_and_trains_on_inputs_none_batches():
    from bert4x.snippets import DataGenerator, sequence_padding

    model = masked_lm()
    rows = [list(rng.integers(1, 12, size=n)) for n in (6, 6, 3, 5, 2, 6, 4, 1)]

    class Batches(DataGenerator):
        def __iter__(self, random=False):
            batch = []
            for is_end, row in self.sample(random):
                batch.append(row)
                if len(batch) == self.batch_size or is_end:
                    ids = sequence_padding(batch)
                    yield [ids, ids], None
                    batch = []

    # The loss of the padded batch equals the mean over its real tokens only.
    ids = sequence_padding(rows[:3])
    probs = keras.Model(model.inputs, model.layers[-1].input[1])([ids, ids])
    p = np_(probs)[np.arange(3)[:, None], np.arange(ids.shape[1])[None], ids]
    expected = -np.log(p)[ids > 0].mean()
    model([ids, ids])
    np.testing.assert_allclose(float(np_(model.losses[0])), expected, rtol=1e-5)
    model.compile(optimizer=keras.optimizers.Adam(0.05))
    history = model.fit(Batches(rows, batch_size=3), epochs=3, verbose=0).history
    assert history["loss"][-1] < history["loss"][0]
    history = model.fit(Batches(rows, batch_size=3).forfit(), steps_per_epoch=3, epochs=2, verbose=0).history
    assert np.isfinite(history["loss"]).all()


def crf_model():
    token_ids = keras.Input((None,), dtype="int32")
    h = keras.layers.Embedding(20, 6, mask_zero=True)(token_ids)
    emissions = keras.layers.Dense(4)(h)
    crf = ConditionalRandomField(lr_multiplier=2)
    return keras.Model(token_ids, crf(emissions)), crf


def test_crf_loss_of_a_padded_batch_equals_the_loss_of_its_unpadded_rows():
    model, crf = crf_model()
    lengths = [5, 3, 2]
    rows = [rng.integers(1, 20, size=n) for n in lengths]
    labels = [rng.integers(0, 4, size=n) for n in lengths]
    padded = np.zeros((3, 5), "int32")
    padded_labels = np.zeros((3, 5), "int32")
    for i, (r, y) in enumerate(zip(rows, labels)):
        padded[i, : len(r)], padded_labels[i, : len(y)] = r, y
    batch_loss = np_(crf.sparse_loss(padded_labels, model(padded)))
    single = [float(np_(crf.sparse_loss(y[None], model(r[None].astype("int32"))))[0]) for r, y in zip(rows, labels)]
    np.testing.assert_allclose(batch_loss, single, rtol=1e-5)
    # and it trains through compile/fit with the mask arriving from the Embedding
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss=crf.sparse_loss)
    history = model.fit(padded, padded_labels, epochs=5, verbose=0).history
    assert history["loss"][-1] < history["loss"][0]


def test_global_pointer_takes_the_keras_mask():
    token_ids = keras.Input((None,), dtype="int32")
    h = keras.layers.Embedding(20, 8, mask_zero=True)(token_ids)
    logits = GlobalPointer(heads=2, head_size=4)(h)
    model = keras.Model(token_ids, logits)
    ids = np.array([[3, 4, 5, 0, 0]], "int32")
    out = np_(model(ids))
    assert (out[0, :, 3:, :] < -1e8).all() and (out[0, :, :, 3:] < -1e8).all()
    assert (out[0, :, :3, :3][:, np.triu_indices(3)[0], np.triu_indices(3)[1]] > -1e8).all()


# ------------------------------------------------------------------ strict loading and initializer
TINY = {"vocab_size": 30, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 16}


def test_strict_loading_reports_user_layers_instead_of_refusing_them(tmp_path):
    source = build_transformer_model(TINY, return_keras_model=False)
    checkpoint = str(tmp_path / "bert_model.ckpt")
    source.save_weights_as_checkpoint(checkpoint, format="google")
    label = keras.Input((1,), dtype="int32", name="Input-Label")
    condition_embedding = keras.layers.Embedding(3, 5, name="embedding")
    cond = keras.layers.Flatten()(condition_embedding(label))
    bert = build_transformer_model(TINY, checkpoint, layer_norm_cond=cond, additional_input_layers=label,
                                   return_keras_model=False)
    report = bert.load_weights_from_checkpoint(checkpoint)
    assert report.ok and report.user == ["embedding/embeddings"]
    assert "not from the checkpoint" in report.describe()
    np.testing.assert_array_equal(np_(bert.model.get_layer("Embedding-Token").embeddings),
                                  np_(source.model.get_layer("Embedding-Token").embeddings))
    # The Transformer's own weights stay strict: a checkpoint lacking them is still refused.
    smaller = build_transformer_model(dict(TINY, num_hidden_layers=2), return_keras_model=False)
    with pytest.raises(CheckpointError, match="Transformer-1"):
        smaller.load_weights_from_checkpoint(checkpoint)


def test_initializer_is_an_initializer_attribute_and_still_a_factory():
    bert = build_transformer_model(dict(TINY, initializer_range=0.5), return_keras_model=False)
    values = np_(bert.initializer((4000,)))
    assert abs(values.std() - 0.5 * 0.88) < 0.03 and np.abs(values).max() <= 1.0  # truncated at 2 stddev
    dense = keras.layers.Dense(3, kernel_initializer=bert.initializer)
    dense.build((None, 2000))
    assert np.abs(np_(dense.kernel)).max() <= 1.0
    assert isinstance(bert.initializer(), keras.initializers.TruncatedNormal)
    restored = keras.layers.Dense.from_config(dense.get_config())
    assert restored.kernel_initializer.stddev == 0.5


@pytest.mark.skipif(in_subprocess, reason="this test launches the jax run itself")
def test_compat_on_jax_backend():
    run_pytest_on_backend("jax", "tests/test_compat.py", "-k", "not initializer and not strict")


# ------------------------------------------------------------------ snippets
def test_text_helpers():
    from bert4x.snippets import longest_common_subsequence, longest_common_substring, strQ2B, text_segmentate

    text = "第一句话。第二句话比较长，有逗号，还有更多。短。"
    pieces = text_segmentate(text, 10, "。，")
    assert "".join(pieces) == text and all(len(p) <= 10 for p in pieces)
    assert text_segmentate("短文本", 10) == ["短文本"]
    assert strQ2B("ＨＥＬＬＯ，ｗｏｒｌｄ！　１") == "HELLO,world! 1"

    def brute_substring(a, b):
        best = 0
        for i in range(len(a)):
            for j in range(i + 1, len(a) + 1):
                if a[i:j] in b:
                    best = max(best, j - i)
        return best

    def brute_subsequence(a, b):
        def is_subsequence(sub, text):
            rest = iter(text)
            return all(c in rest for c in sub)

        return max(k for k in range(len(a) + 1) for sub in itertools.combinations(a, k) if is_subsequence(sub, b))

    for _ in range(20):
        a = "".join(rng.choice(list("abc"), size=rng.integers(0, 9)))
        b = "".join(rng.choice(list("abc"), size=rng.integers(0, 9)))
        length, (i0, i1, j0, j1) = longest_common_substring(a, b)
        assert length == brute_substring(a, b) and a[i0:i1] == b[j0:j1] and i1 - i0 == length
        length, pairs = longest_common_subsequence(a, b)
        assert len(pairs) == length and all(a[i] == b[j] for i, j in pairs)
        assert all(p < q and r < t for (p, r), (q, t) in zip(pairs, pairs[1:]))
        assert length == brute_subsequence(a, b)


def test_open_reads_jsonl_with_an_index(tmp_path):
    from bert4x.snippets import open as b_open

    path = tmp_path / "data.jsonl"
    with b_open(str(path), "w", encoding="utf-8", jsonl=True) as f:
        for i in range(5):
            f.write({"id": i, "text": "文本" * i})
    index = tmp_path / "index.json"
    with b_open(str(path), encoding="utf-8", jsonl=True, indexable=str(index)) as f:
        assert len(f) == 5 and f[3]["text"] == "文本" * 3 and [d["id"] for d in f] == list(range(5))
    assert index.exists()
    with b_open(str(path), encoding="utf-8", indexable=str(index)) as f:  # the cached index
        assert f[4].startswith('{"id": 4')
    with pytest.raises(TypeError, match="indexable"):
        len(b_open(str(path), encoding="utf-8"))


@pytest.mark.parametrize("dummy", [True, False])
def test_parallel_apply_matches_map_and_raises_worker_errors(dummy):
    from bert4x.snippets import parallel_apply

    squares = parallel_apply(lambda x: x * x, range(50), workers=2, max_queue_size=3, dummy=dummy, unordered=False)
    assert squares == [x * x for x in range(50)]
    collected = []
    parallel_apply(lambda x: x + 1, range(10), 2, 2, callback=collected.append, dummy=dummy)
    assert sorted(collected) == list(range(1, 11))

    def fails(x):
        if x == 7:
            raise KeyError("seven")
        return x

    with pytest.raises(RuntimeError, match="seven"):
        parallel_apply(fails, range(20), workers=2, max_queue_size=2, dummy=dummy)


def test_array_and_argument_helpers():
    from bert4x.snippets import delete_arguments, insert_arguments, orthogonally_resize, to_array

    a, b = to_array([1, 2], [[3]])
    assert a.shape == (2,) and b.shape == (1, 1) and to_array([1]).shape == (1,)
    w = rng.normal(size=(4, 6))
    grown = orthogonally_resize(w, (8, 5))
    assert grown.shape == (8, 5) and np.isclose(np.linalg.norm(grown), np.linalg.norm(w))
    scale = np.linalg.norm(w) / np.linalg.norm(np.repeat(w.reshape(2, 2, 6), 2, axis=0).reshape(8, 6)[:, :5])
    np.testing.assert_allclose(grown, np.repeat(w.reshape(2, 2, 6), 2, axis=0).reshape(8, 6)[:, :5] * scale)
    with pytest.raises(ValueError, match="window"):
        orthogonally_resize(rng.normal(size=(3,)), (5,))

    class Layer:
        @insert_arguments(rate=0.1)
        @delete_arguments("bias")
        def __init__(self, units=1):
            self.units = units

    assert Layer(rate=0.3).rate == 0.3 and Layer().rate == 0.1
    with pytest.raises(TypeError, match="bias"):
        Layer(bias=True)
