"""Seed techniques: whitening gives zero mean and identity covariance, PET patterns encode/score exactly and a tiny
MLM learns a few-shot task through one, P-tuning trains only prompt rows, BERT-of-Theseus switches modules and
compresses into a working successor."""

import random

import keras
import numpy as np
import pytest
from harness import check_model
from helpers import in_subprocess, run_pytest_on_backend
from keras import ops

from bert4x.layers import PromptEmbedding
from bert4x.models import build_transformer_model
from bert4x.techniques import (
    BinaryRandomChoice,
    PromptPattern,
    compute_kernel_bias,
    init_successor_from_predecessor,
    prompt_tuning_model,
    theseus_encoder,
    transform_and_normalize,
    whiten,
)
from bert4x.tokenizers import Tokenizer

rng = np.random.default_rng(0)


def np_(x):
    return ops.convert_to_numpy(x)


# ------------------------------------------------------------------ whitening
@pytest.mark.parametrize("k", [None, 5])
def test_whitening_gives_zero_mean_identity_covariance(k):
    mixing = rng.normal(size=(12, 12))
    vectors = rng.normal(size=(400, 12)) @ mixing + rng.normal(size=12) * 5  # correlated, off-centre
    kernel, bias = compute_kernel_bias(vectors, k)
    out = whiten(vectors, kernel, bias)
    assert out.shape == (400, k or 12)
    np.testing.assert_allclose(out.mean(axis=0), 0, atol=1e-9)
    np.testing.assert_allclose(np.cov(out.T), np.eye(k or 12), atol=1e-9)
    # The kept directions are those of largest variance: their total variance is the top-k eigenvalues'.
    top = np.sort(np.linalg.eigvalsh(np.cov(vectors.T)))[::-1][: k or 12]
    np.testing.assert_allclose(np.linalg.norm(kernel, axis=0) ** -2, top, rtol=1e-8)
    np.testing.assert_allclose(np.linalg.norm(transform_and_normalize(vectors, kernel, bias), axis=1), 1, rtol=1e-12)


def test_whitening_rejects_rank_deficient_requests():
    vectors = rng.normal(size=(5, 12))  # rank <= 4 after centring
    with pytest.raises(ValueError, match="rank"):
        compute_kernel_bias(vectors, 8)
    compute_kernel_bias(vectors, 4)
    with pytest.raises(ValueError, match="n_components"):
        compute_kernel_bias(vectors, 13)


# ------------------------------------------------------------------ PET
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "很", "不", "满", "意", "。", "好", "差", "菜", "饭", "汤", "的",
         "了", "吃", "太", "真"]


def tokenizer():
    return Tokenizer({t: i for i, t in enumerate(VOCAB)})


def test_prompt_pattern_encodes_cloze_inputs():
    tok = tokenizer()
    pattern = PromptPattern(tok, "{mask}满意。{text}", ["很", "不"])
    ids, segments, targets = pattern.encode("菜很好吃", label=1)
    assert tok.ids_to_tokens(ids) == ["[CLS]", "[MASK]", "满", "意", "。", "菜", "很", "好", "吃", "[SEP]"]
    assert targets == [0, tok.token_to_id("不")] + [0] * 8 and segments == [0] * 10
    assert pattern.slot_positions(ids) == [1]
    ids, _, targets = pattern.encode("菜很好吃", maxlen=8)
    assert tok.ids_to_tokens(ids)[-3:] == ["菜", "很", "[SEP]"] and not any(targets)  # only the text is cut
    # Text first, multi-token label words.
    two = PromptPattern(tok, "{text}，{mask}。", ["很好", "不好"])
    ids, _, targets = two.encode("汤", label=0)
    assert two.slots == 2 and two.slot_positions(ids) == [3, 4] and targets[3:5] == tok.tokens_to_ids(["很", "好"])
    # P-tuning templates: bracketed vocabulary tokens stay single tokens (in the template only).
    prompt = PromptPattern(Tokenizer({t: i for i, t in enumerate(VOCAB + ["[unused1]"])}), "[unused1]{mask}{text}",
                           ["很", "不"])
    assert prompt.tokenizer.ids_to_tokens(prompt.encode("[unused1]")[0])[:4] == [
        "[CLS]", "[unused1]", "[MASK]", "[UNK]"
    ]
    with pytest.raises(ValueError, match="same non-zero length"):
        PromptPattern(tok, "{mask}{text}", ["很", "不好"])
    with pytest.raises(ValueError, match="leaves no room"):
        pattern.encode("菜", maxlen=6)


def test_prompt_pattern_scores_are_label_word_log_probs():
    tok = tokenizer()
    pattern = PromptPattern(tok, "{text}{mask}", ["很好", "太差"])
    ids = [pattern.encode("饭")[0], pattern.encode("汤了")[0]]
    width = max(map(len, ids))
    ids = np.array([i + [0] * (width - len(i)) for i in ids])
    probs = rng.dirichlet(np.ones(len(VOCAB)), size=(2, width))
    scores = pattern.scores(probs, ids)
    for b in range(2):
        p = pattern.slot_positions(ids[b])
        for c, word in enumerate(pattern.label_ids):
            assert np.isclose(scores[b, c], np.log(probs[b, p[0], word[0]]) + np.log(probs[b, p[1], word[1]]))
    masked, targets = pattern.random_mask(ids[1], rate=1.0, rng=random.Random(0))
    slots = pattern.slot_positions(ids[1])
    text_positions = [i for i, t in enumerate(ids[1]) if t > 4]
    assert all(targets[i] == ids[1][i] for i in text_positions) and all(targets[i] == 0 for i in slots)


def test_pet_few_shot_training_learns_the_task():
    """A tiny MLM trained on PET targets (few-shot) classifies held-out texts through the pattern."""
    keras.utils.set_random_seed(0)
    tok = tokenizer()
    pattern = PromptPattern(tok, "{mask}满意。{text}", ["很", "不"])
    r = random.Random(0)

    def sample():
        label = r.randrange(2)
        words = [r.choice("菜饭汤的了吃真") for _ in range(5)]
        words.insert(r.randrange(6), "好" if label == 0 else "差")
        return "".join(words), label

    train, test = [sample() for _ in range(64)], [sample() for _ in range(100)]
    ids, _, targets = zip(*(pattern.encode(t, label=y) for t, y in train))
    bert = build_transformer_model({"vocab_size": len(VOCAB), "hidden_size": 32, "num_hidden_layers": 1,
                                    "num_attention_heads": 2, "intermediate_size": 64}, with_mlm=True,
                                   segment_vocab_size=0)
    bert.compile(optimizer=keras.optimizers.Adam(2e-3), loss=keras.losses.SparseCategoricalCrossentropy(ignore_class=0))
    bert.fit(np.array(ids), np.array(targets), batch_size=16, epochs=30, verbose=0)
    test_ids = np.array([pattern.encode(t)[0] for t, _ in test])
    predicted = pattern.scores(bert.predict(test_ids, verbose=0), test_ids).argmax(axis=1)
    accuracy = np.mean(predicted == np.array([y for _, y in test]))
    assert accuracy >= 0.95, accuracy


# ------------------------------------------------------------------ P-tuning
def test_prompt_tuning_trains_only_prompt_rows():
    keras.utils.set_random_seed(0)
    config = {"vocab_size": 20, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
              "intermediate_size": 16}
    mlm = build_transformer_model(config, with_mlm=True, segment_vocab_size=0)
    tuned = prompt_tuning_model(mlm, prompt_ids=[1, 2, 3])
    embedding = tuned.get_layer("Embedding-Token")
    assert isinstance(embedding, PromptEmbedding)
    assert not any(type(layer).__name__ == "Embedding" and layer.name == "Embedding-Token" for layer in tuned.layers)
    ids = rng.integers(1, 20, size=(8, 6)).astype("int32")
    np.testing.assert_allclose(tuned.predict(ids, verbose=0), mlm.predict(ids, verbose=0), rtol=1e-5, atol=1e-6)
    assert [v.path for v in tuned.trainable_variables] == ["Embedding-Token/embeddings"]
    before = {v.path: np_(v).copy() for v in tuned.weights}
    tuned.compile(optimizer=keras.optimizers.Adam(0.05), loss="sparse_categorical_crossentropy")
    tuned.fit(ids, (ids + 1) % 20, epochs=3, verbose=0)
    rows_changed = np.any(np_(embedding.embeddings) != before["Embedding-Token/embeddings"], axis=1)
    assert np.flatnonzero(rows_changed).tolist() == [1, 2, 3]
    assert all(np.array_equal(np_(v), before[v.path]) for v in tuned.weights if v.path != "Embedding-Token/embeddings")


# ------------------------------------------------------------------ Theseus
def test_binary_random_choice():
    a, b = np.zeros((2, 3), "float32"), np.ones((2, 3), "float32")
    assert np_(BinaryRandomChoice(0.0)([a, b], training=True)).max() == 0
    assert np_(BinaryRandomChoice(1.0)([a, b], training=True)).min() == 1
    assert np_(BinaryRandomChoice(0.0)([a, b])).min() == 1  # inference: the successor
    choice = BinaryRandomChoice(0.3, seed=1)
    picks = [float(np_(choice([a, b], training=True))[0, 0]) for _ in range(300)]
    assert set(picks) == {0.0, 1.0} and 0.2 < np.mean(picks) < 0.4
    with pytest.raises(ValueError, match="rate"):
        BinaryRandomChoice(1.5)


def test_binary_random_choice_harness(tmp_path):
    x = rng.normal(size=(4, 5)).astype("float32")

    def make():
        i = keras.Input((5,))
        return keras.Model(i, BinaryRandomChoice(0.5, seed=3)([keras.layers.Dense(5)(i), keras.layers.Dense(5)(i)]))

    check_model(make, x, x, tmp_path)


def test_theseus_compresses_into_the_successor():
    keras.utils.set_random_seed(0)
    config = {"vocab_size": 20, "hidden_size": 16, "num_hidden_layers": 4, "num_attention_heads": 2,
              "intermediate_size": 32}
    predecessor = build_transformer_model(config, segment_vocab_size=0, name="predecessor")
    successor = build_transformer_model(dict(config, num_hidden_layers=2), segment_vocab_size=0, name="successor")
    copied = init_successor_from_predecessor(predecessor, successor)
    assert "Embedding-Token" in copied and "Transformer-1-FeedForward" in copied
    encoder = theseus_encoder(predecessor, successor, replace_rate=0.5, seed=0)
    ids = rng.integers(1, 20, size=(32, 6)).astype("int32")
    ids[::3, 4:] = 0
    # At inference every module is the successor's: the output is the successor's own.
    np.testing.assert_allclose(encoder.predict(ids, verbose=0), successor.predict(ids, verbose=0), rtol=1e-4,
                               atol=1e-5)
    head = keras.layers.Dense(2, name="Head")
    model = keras.Model(encoder.inputs, head(keras.layers.GlobalAveragePooling1D()(encoder.output)))
    predecessor_before = [np_(w).copy() for w in predecessor.weights]
    successor_before = {w.path: np_(w).copy() for w in successor.weights}
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    labels = (ids[:, 0] > 10).astype("int32")
    model.fit(ids, labels, batch_size=8, epochs=3, verbose=0)
    assert all(np.array_equal(b, np_(w)) for b, w in zip(predecessor_before, predecessor.weights))
    changed = {w.path for w in successor.weights if not np.array_equal(successor_before[w.path], np_(w))}
    assert any(p.startswith("Transformer-0-") for p in changed) and any(p.startswith("Transformer-1-") for p in changed)
    assert not any(p.startswith("Embedding-") for p in changed)  # the embeddings are the predecessor's, frozen
    with pytest.raises(ValueError, match="modules"):
        theseus_encoder(predecessor, build_transformer_model(dict(config, num_hidden_layers=3), segment_vocab_size=0))


@pytest.mark.skipif(in_subprocess, reason="this test launches the jax run itself")
def test_techniques_on_jax_backend():
    run_pytest_on_backend("jax", "tests/test_techniques.py", "-k", "prompt_tuning or choice or theseus")
