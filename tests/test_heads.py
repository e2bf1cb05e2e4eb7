"""Task layers: GlobalPointer logits from the layer's own weights in numpy, CRF NLL against brute force over every
path, Viterbi against brute-force argmax, conditional LayerNorm / NormalizedDense / PromptEmbedding formulas, the
harness for every layer, and a GlobalPointer model that learns a nested-span task."""

import itertools

import keras
import numpy as np
import pytest
from harness import check_model, layer_model
from helpers import in_subprocess, run_pytest_on_backend
from keras import ops

from bert4x import backend, losses
from bert4x.layers import (
    ConditionalLayerNormalization,
    ConditionalRandomField,
    EfficientGlobalPointer,
    GlobalPointer,
    NormalizedDense,
    PromptEmbedding,
)
from bert4x.models import build_transformer_model
from bert4x.snippets import ViterbiDecoder, decode_global_pointer, entity_f1, global_pointer_labels
from bert4x.snippets.ner import bio_to_spans, global_pointer_sparse_labels, spans_to_bio

rng = np.random.default_rng(0)
NEG = backend.MASK_VALUE


def np_(x):
    return ops.convert_to_numpy(x)


def rope_numpy(x):
    """Interleaved RoPE on [..., n, d] (positions along axis -2), written out pair by pair."""
    n, d = x.shape[-2:]
    out = np.empty_like(x)
    for m in range(n):
        for i in range(d // 2):
            theta = m * 10000.0 ** (-2 * i / d)
            a, b = x[..., m, 2 * i], x[..., m, 2 * i + 1]
            out[..., m, 2 * i] = a * np.cos(theta) - b * np.sin(theta)
            out[..., m, 2 * i + 1] = b * np.cos(theta) + a * np.sin(theta)
    return out


def masked_numpy(logits, mask, tril):
    n = logits.shape[-1]
    keep = mask[:, None, :, None] & mask[:, None, None, :]
    if tril:
        keep = keep & (np.arange(n)[None, :] >= np.arange(n)[:, None])
    return np.where(keep, logits, NEG)


# ------------------------------------------------------------------ GlobalPointer
@pytest.mark.parametrize("rope,tril", [(True, True), (False, True), (True, False)])
def test_global_pointer_logits_match_numpy(rope, tril):
    heads, size, batch, n, dim = 3, 6, 2, 5, 8
    x = rng.normal(size=(batch, n, dim)).astype("float32")
    mask = np.ones((batch, n), bool)
    mask[1, 3:] = False
    layer = GlobalPointer(heads, size, RoPE=rope, tril_mask=tril)
    out = np_(layer(x, mask=mask))
    kernel, bias = (np_(w) for w in layer.dense.weights)
    proj = (x @ kernel + bias).reshape(batch, n, heads, 2 * size).transpose(0, 2, 1, 3)  # [b, h, n, 2d]
    q, k = proj[..., :size], proj[..., size:]
    if rope:
        q, k = rope_numpy(q), rope_numpy(k)
    expected = masked_numpy(np.einsum("bhmd,bhnd->bhmn", q, k) / np.sqrt(size), mask, tril)
    assert out.shape == (batch, heads, n, n) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_efficient_global_pointer_logits_match_numpy():
    heads, size, batch, n, dim = 3, 6, 2, 5, 8
    x = rng.normal(size=(batch, n, dim)).astype("float32")
    mask = np.ones((batch, n), bool)
    mask[0, 4:] = False
    layer = EfficientGlobalPointer(heads, size)
    out = np_(layer(x, mask=mask))
    pk, pb = (np_(w) for w in layer.p_dense.weights)
    qk, qb = (np_(w) for w in layer.q_dense.weights)
    p = x @ pk + pb  # [b, n, 2d]
    q, k = rope_numpy(p[..., 0::2]), rope_numpy(p[..., 1::2])
    terms = p @ qk + qb  # [b, n, 2 * heads]: column 2a = end term of type a, 2a + 1 = start term
    expected = np.zeros((batch, heads, n, n))
    for a in range(heads):
        expected[:, a] = (np.einsum("bmd,bnd->bmn", q, k) / np.sqrt(size)
                          + terms[:, :, 2 * a + 1][:, :, None] / 2 + terms[:, :, 2 * a][:, None, :] / 2)
    np.testing.assert_allclose(out, masked_numpy(expected, mask, True), rtol=1e-4, atol=1e-4)


def test_global_pointer_bad_arguments():
    with pytest.raises(ValueError, match="even head_size"):
        GlobalPointer(2, 5)
    with pytest.raises(ValueError, match="positive"):
        EfficientGlobalPointer(0, 4)


# ------------------------------------------------------------------ CRF and Viterbi
def path_score(emissions, trans, path):
    return sum(emissions[t, y] for t, y in enumerate(path)) + sum(trans[a, b] for a, b in zip(path[:-1], path[1:]))


@pytest.mark.parametrize("lr_multiplier", [1.0, 4.0])
def test_crf_nll_equals_brute_force_with_padding(lr_multiplier):
    batch, n, labels = 4, 5, 3
    emissions = rng.normal(size=(batch, n, labels)).astype("float32")
    mask = np.ones((batch, n), bool)
    mask[1, 3:] = False  # right padding
    mask[2, :2] = False  # left padding
    mask[3, 1:] = False  # one token
    crf = ConditionalRandomField(lr_multiplier=lr_multiplier)
    y_pred = crf(emissions, mask=mask)
    trans = np_(crf.trans)
    np.testing.assert_allclose(trans, np_(crf._trans) * lr_multiplier, rtol=1e-6)
    y_true = rng.integers(0, labels, size=(batch, n))
    nll = np_(crf.sparse_loss(y_true, y_pred))
    dense_nll = np_(crf.dense_loss(np.eye(labels)[y_true], y_pred))
    for b in range(batch):
        e, gold = emissions[b][mask[b]], y_true[b][mask[b]]
        scores = [path_score(e, trans, p) for p in itertools.product(range(labels), repeat=len(e))]
        expected = np.log(np.sum(np.exp(np.array(scores, "float64")))) - path_score(e, trans, gold)
        np.testing.assert_allclose(nll[b], expected, rtol=1e-5)
        np.testing.assert_allclose(dense_nll[b], expected, rtol=1e-5)


def test_crf_fits_variable_length_sequences_under_jit():
    ids = rng.integers(1, 20, size=(16, 7)).astype("int32")
    ids[::2, 5:] = 0
    labels = (ids % 3).astype("int32")
    inputs = keras.Input((None,), dtype="int32")
    x = keras.layers.Embedding(20, 8)(inputs)
    crf = ConditionalRandomField(lr_multiplier=10)
    model = keras.Model(inputs, crf(keras.layers.Dense(3)(x), mask=ops.not_equal(inputs, 0)))
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss=crf.sparse_loss, metrics=[crf.sparse_accuracy],
                  jit_compile=True)
    history = model.fit(ids, labels, epochs=30, verbose=0).history
    assert history["loss"][-1] < 0.5 * history["loss"][0]
    assert history["sparse_accuracy"][-1] > 0.9
    trans = np_(crf.trans)
    paths = [ViterbiDecoder(trans).decode(e[m]) for e, m in zip(model.predict(ids, verbose=0), ids > 0)]
    assert np.mean(np.concatenate([p == gold[m] for p, gold, m in zip(paths, labels, ids > 0)])) > 0.9


def test_crf_accuracy_ignores_padding():
    emissions = np.array([[[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]]], "float32")
    crf = ConditionalRandomField()
    y_pred = crf(emissions, mask=np.array([[1, 1, 0]]))
    # argmax is [0, 1, 0]; labels [0, 0, 1]: 1 of the 2 unpadded positions is right.
    assert float(np_(crf.sparse_accuracy(np.array([[0, 0, 1]]), y_pred))) == 0.5


@pytest.mark.parametrize("constraints", [(None, None), ([0, 1], [0, 2])])
def test_viterbi_equals_brute_force_argmax(constraints):
    starts, ends = constraints
    labels = 3
    trans = rng.normal(size=(labels, labels))
    decoder = ViterbiDecoder(trans, starts=starts, ends=ends)
    for n in range(1, 6):
        nodes = rng.normal(size=(n, labels))
        paths = [p for p in itertools.product(range(labels), repeat=n)
                 if (starts is None or p[0] in starts) and (ends is None or p[-1] in ends)]
        best = max(paths, key=lambda p: path_score(nodes, trans, p))
        assert decoder.decode(nodes).tolist() == list(best)
    with pytest.raises(ValueError, match="square"):
        ViterbiDecoder(np.zeros((2, 3)))


# ------------------------------------------------------------------ conditional LayerNorm, AM-Softmax dense, P-tuning
def test_conditional_layer_norm_formula():
    x = rng.normal(size=(2, 4, 6)).astype("float32")
    cond = rng.normal(size=(2, 3)).astype("float32")
    ln = ConditionalLayerNormalization(epsilon=1e-6, hidden_units=5, hidden_activation="tanh")
    plain = np_(ln([x, cond]))
    normed = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(plain, normed, rtol=1e-4, atol=1e-5)  # zero-initialised projections: plain LayerNorm
    for w in ln.weights:
        w.assign(rng.normal(size=w.shape).astype("float32"))
    hidden = np.tanh(cond @ np_(ln.hidden_dense.kernel))[:, None, :]
    gamma = np_(ln.gamma) + hidden @ np_(ln.gamma_dense.kernel)
    beta = np_(ln.beta) + hidden @ np_(ln.beta_dense.kernel)
    np.testing.assert_allclose(np_(ln([x, cond])), normed * gamma + beta, rtol=1e-4, atol=1e-4)


def test_normalized_dense_gives_cosines():
    x = rng.normal(size=(3, 4)).astype("float32")
    layer = NormalizedDense(5)
    out = np_(layer(x))
    w = np_(layer.kernel)
    expected = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=0, keepdims=True))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_prompt_embedding_trains_only_prompt_rows():
    emb = PromptEmbedding(10, 4, prompt_ids=[2, 5])
    ids = np.array([[1, 2, 5, 7]])
    model = keras.Sequential([keras.Input((4,), dtype="int32"), emb])
    before = np_(emb.embeddings).copy()
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    model.fit(ids, np.ones((1, 4, 4)), verbose=0)
    changed = np.any(np_(emb.embeddings) != before, axis=1)
    assert changed.tolist() == [i in (2, 5) for i in range(10)]
    hidden = np_(emb(ids))
    np.testing.assert_allclose(np_(emb(hidden, mode="dense")), hidden @ np_(emb.embeddings).T, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        PromptEmbedding(10, 4, prompt_ids=[10])


# ------------------------------------------------------------------ harness
X = rng.normal(size=(4, 6, 8)).astype("float32")
MASK = np.ones((4, 6), "int32")
MASK[1, 4:] = 0
SPAN_TARGETS = np.zeros((4, 2, 6, 6), "float32")
SPAN_TARGETS[:, 0, 1, 2] = 1
SPAN_TARGETS[:, 1, 0, 3] = 1


@pytest.mark.parametrize("cls", [GlobalPointer, EfficientGlobalPointer])
def test_span_heads_harness(cls, tmp_path):
    make = layer_model(lambda: cls(2, 4), [((6, 8), "float32"), ((6,), "int32")])
    check_model(make, [X, MASK], SPAN_TARGETS, tmp_path, loss=losses.global_pointer_crossentropy)


def test_crf_harness(tmp_path):
    made = {}

    def make():
        inputs, mask = keras.Input((6, 8)), keras.Input((6,), dtype="int32")
        crf = made["crf"] = ConditionalRandomField(lr_multiplier=2, name="CRF")
        return keras.Model([inputs, mask], crf(keras.layers.Dense(3)(inputs), mask=mask))

    labels = rng.integers(0, 3, size=(4, 6))
    check_model(make, [X, MASK], labels, tmp_path, loss=lambda y, p: made["crf"].sparse_loss(y, p))


def test_other_layers_harness(tmp_path):
    cond = rng.normal(size=(4, 3)).astype("float32")

    def make_norm():
        x, c = keras.Input((6, 8)), keras.Input((3,))
        return keras.Model([x, c], ConditionalLayerNormalization(hidden_units=4)([x, c]))

    check_model(make_norm, [X, cond], X, tmp_path)

    def make_dense():
        i = keras.Input((8,))
        return keras.Model(i, NormalizedDense(3)(i))

    check_model(make_dense, X[:, 0], rng.integers(0, 3, size=(4,)), tmp_path, loss=losses.AMSoftmaxCrossentropy())
    ids = rng.integers(0, 20, size=(4, 6)).astype("int32")
    check_model(layer_model(lambda: PromptEmbedding(20, 8, prompt_ids=list(range(20))), [((6,), "int32")]), ids, X,
                tmp_path)


TINY = {"vocab_size": 30, "hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 16, "hidden_dropout_prob": 0.1}


def test_bert_layer_norm_cond_harness(tmp_path):
    ids = rng.integers(1, 30, size=(4, 6)).astype("int32")
    cond = rng.normal(size=(4, 5)).astype("float32")

    def make():
        return build_transformer_model(dict(TINY, num_hidden_layers=1), layer_norm_cond=5,
                                       layer_norm_cond_hidden_size=4, layer_norm_cond_hidden_act="swish",
                                       with_mlm="linear")

    model = make()
    assert [i.name for i in model.inputs] == ["Input-Token", "Input-Segment", "Input-LayerNorm-Condition"]
    norms = [layer for layer in model.layers if layer.name.endswith("-Norm")]
    assert len(norms) == 4 and all(isinstance(norm, ConditionalLayerNormalization) for norm in norms)
    check_model(make, [ids, np.zeros_like(ids), cond], rng.normal(size=(4, 6, 30)), tmp_path)


def test_bert_layer_norm_cond_from_a_tensor():
    label = keras.Input((1,), dtype="int32", name="Input-Label")
    cond = keras.layers.Flatten()(keras.layers.Embedding(3, 5)(label))
    model = build_transformer_model(TINY, layer_norm_cond=cond, additional_input_layers=label, segment_vocab_size=0)
    assert [i.name for i in model.inputs] == ["Input-Token", "Input-Label"]
    ids = rng.integers(1, 30, size=(2, 6))
    a = model.predict([ids, np.array([[0], [0]])], verbose=0)
    for layer in model.layers:  # make the condition matter
        if isinstance(layer, ConditionalLayerNormalization):
            layer.beta_dense.kernel.assign(rng.normal(size=layer.beta_dense.kernel.shape))
    b = model.predict([ids, np.array([[0], [1]])], verbose=0)
    assert not np.allclose(b[0], b[1]) and a.shape == (2, 6, 8)
    with pytest.raises(TypeError, match="layer_norm_cond"):
        build_transformer_model(TINY, layer_norm_cond="label")


# ------------------------------------------------------------------ learning a nested-span task
def nested_span_data(count, n=14, seed=0):
    """Type 0 ('outer'): from a token 1 to the next token 2. Type 1 ('inner'): the bigram 3 4, often inside one."""
    r = np.random.default_rng(seed)
    ids = r.integers(5, 30, size=(count, n))
    ids[:, 0] = 2  # a [CLS]-like first token that never starts an entity
    spans = []
    for row in ids:
        s = set()
        i = int(r.integers(1, n - 6))
        j = i + int(r.integers(3, 6))
        row[i], row[j] = 1, 2
        s.add((0, i, j))
        k = int(r.integers(i + 1, j - 1)) if r.random() < 0.7 else int(r.integers(j + 1, n - 1)) if j + 2 < n else None
        if k is not None:
            row[k], row[k + 1] = 3, 4
            s.add((1, k, k + 1))
        spans.append(s)
    return ids.astype("int32"), spans


def test_span_label_helpers_round_trip():
    """Spans -> BIO tags -> spans, and spans -> GlobalPointer labels (dense and sparse) -> spans, on random spans."""
    rng = np.random.default_rng(7)
    types = ["PER", "LOC", "ORG"]
    for _ in range(50):
        length, spans, start = 30, [], 1  # position 0 is [CLS]
        while start < 30:  # non-overlapping spans for BIO
            start += int(rng.integers(0, 4))
            end = start + int(rng.integers(0, 4))
            if end < length:
                spans.append((types[rng.integers(3)], start, end))
            start = end + 1
        assert bio_to_spans(spans_to_bio(spans, length)) == spans
        nested = spans + [(types[rng.integers(3)], 1, length - 1)]  # GlobalPointer also takes nested spans
        dense = global_pointer_labels(nested, types, length)
        logits = np.where(dense > 0, 1.0, -1.0)
        assert sorted(decode_global_pointer(logits, types)) == sorted(set(nested))
        sparse = global_pointer_sparse_labels(nested, types, 40)
        for t, name in enumerate(types):
            pairs = {(int(i), int(j)) for i, j in sparse[t] if (i, j) != (0, 0)}
            assert pairs == {(i, j) for n, i, j in nested if n == name}


def test_global_pointer_learns_nested_spans():
    keras.utils.set_random_seed(0)
    n = 14
    train_ids, train_spans = nested_span_data(1200, n, seed=1)
    test_ids, test_spans = nested_span_data(200, n, seed=2)
    labels = np.stack([global_pointer_labels([(t, i, j) for t, i, j in s], [0, 1], n) for s in train_spans])
    config = dict(TINY, hidden_size=32, num_attention_heads=4, intermediate_size=64, hidden_dropout_prob=0.0)
    bert = build_transformer_model(config, segment_vocab_size=0)
    output = GlobalPointer(2, 16, name="GlobalPointer")(bert.output)
    model = keras.Model(bert.inputs, output)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss=losses.global_pointer_crossentropy)
    model.fit(train_ids, labels, batch_size=32, epochs=12, verbose=0)
    logits = model.predict(test_ids, verbose=0)
    predicted = [decode_global_pointer(sample_logits) for sample_logits in logits]
    scores = entity_f1(predicted, [sorted(s) for s in test_spans])
    assert scores["f1"] >= 0.95, scores


@pytest.mark.skipif(in_subprocess, reason="this test launches the jax run itself")
def test_heads_on_jax_backend():
    run_pytest_on_backend("jax", "tests/test_heads.py", "-k", "numpy or brute or harness and not bert")
