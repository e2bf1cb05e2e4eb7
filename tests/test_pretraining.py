"""Pretraining: corpus extraction, jieba whole-word masking, the on-disk pipeline, objectives, a tiny run whose
checkpoints reload exactly."""

import csv
import io
import json
import zipfile

import numpy as np
import pytest
from helpers import SHARED_DATA, in_subprocess, run_pytest_on_backend

from bert4x.models import MODELS, build_transformer_model
from bert4x.pretraining import (
    PackedCorpus,
    PretrainingDataset,
    PretrainingLogger,
    WordPieceEncoder,
    build_pretraining_model,
    compile_for_pretraining,
    iter_corpus_texts,
    jieba_words,
    preprocess_corpus,
    save_checkpoints,
    split_rows,
    split_sentences,
    whole_word_mask,
)
from bert4x.pretraining.data import SENTENCE_START, WORD_START
from bert4x.tokenizers import Tokenizer

TEXTS = [
    "今天天气很好，我们一起去公园散步吧。", "这家餐厅的菜味道不错，服务也很周到！", "北京是中华人民共和国的首都。",
    "他每天早上六点起床，然后去跑步。", "人工智能正在改变我们的生活方式。", "这本书讲述了一个感人的故事。",
    "我喜欢在周末和朋友一起看电影。", "外卖送得很快，饭菜还是热的。", "上海的交通非常拥挤，地铁里人很多。",
    "学生们正在教室里认真地学习数学。", "这部手机的电池续航时间太短了。", "春天来了，花园里的花都开了。",
    "经济发展需要科技创新的支持。", "老师耐心地回答了同学们的问题。", "昨天晚上下了一场大雨，路上都是积水。",
    "我们公司明年计划在深圳开设新的办公室。",
]


def _shared_sentences(limit: int) -> list[str]:
    """Real review sentences when ../shared/data is there (the tests also run on the built-in ones)."""
    path = SHARED_DATA / "datasets" / "sentiment" / "chnsenticorp.zip"
    if not path.exists():
        return []
    sentences = []
    for text in iter_corpus_texts(str(path)):
        sentences.extend(split_sentences(text))
        if len(sentences) >= limit:
            break
    return sentences[:limit]


def make_tokenizer(texts) -> Tokenizer:
    chars = sorted({c for t in texts for c in t if not c.isspace()})
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[unused1]"] + chars
    return Tokenizer({t: i for i, t in enumerate(tokens)})


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(TEXTS + _shared_sentences(300))


@pytest.fixture(scope="module")
def corpus(tokenizer, tmp_path_factory):
    prefix = tmp_path_factory.mktemp("corpus") / "tiny"
    sentences = (s for t in TEXTS * 8 for s in split_sentences(t))  # a generator: streamed, never a list
    return preprocess_corpus(sentences, tokenizer, prefix, seq_len=24)


# ----------------------------------------------------------------- corpus
def test_split_sentences_keeps_punctuation_and_quotes():
    assert split_sentences("你好。他说：“走吧！”然后走了？好\n下一行") == [
        "你好。", "他说：“走吧！”", "然后走了？", "好", "下一行"
    ]
    assert split_sentences("") == []


def test_iter_corpus_texts_reads_zip_tsv_csv_json_and_char_tag_files(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("data/train.tsv", "label\ttext_a\n1\t这家酒店的位置很方便\n0\t房间太小了而且很吵\n")
    (tmp_path / "reviews.zip").write_bytes(buffer.getvalue())
    (tmp_path / "pairs.csv").write_text('label,review\n1,"很快，好吃，味道足"\n1,很快，好吃，味道足\n',
                                       encoding="utf-8")
    lines = [{"id": 1, "text": "王 艳 家 买 了 一 台 洗 衣 机", "label": {"人名": {"王艳": [[0, 1]]}}},
             {"id": 2, "text": "王艳家买了一台洗衣机"}]
    (tmp_path / "ner.json").write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines), encoding="utf-8")
    (tmp_path / "doc.json").write_text(json.dumps({"data": [{"context": "长城是中国古代的军事防御工程。"}]},
                                                  ensure_ascii=False), encoding="utf-8")
    (tmp_path / "ner.txt").write_text("在 O\n北 B-LOC\n京 I-LOC\n工 O\n作 O\n\n他 O\n很 O\n", encoding="utf-8")
    (tmp_path / "README.md").write_text("这是说明文件不是语料", encoding="utf-8")
    texts = list(iter_corpus_texts(str(tmp_path), min_chinese=2))
    assert texts == [
        "长城是中国古代的军事防御工程。",   # doc.json
        "王艳家买了一台洗衣机",             # ner.json: spaces between characters removed, the copy deduplicated
        "在北京工作", "他很",               # ner.txt: 'char TAG' lines joined back into sentences
        "很快，好吃，味道足",               # pairs.csv: labels left out, the duplicate row dropped
        "这家酒店的位置很方便", "房间太小了而且很吵",  # reviews.zip/data/train.tsv
    ]
    with pytest.raises(FileNotFoundError, match="matches no file"):
        list(iter_corpus_texts(str(tmp_path / "*.nothing")))


def test_iter_corpus_texts_on_shared_chinese_data():
    sentences = _shared_sentences(2000)
    if not sentences:
        pytest.skip(f"../shared/data not found at {SHARED_DATA}: needs datasets/sentiment/chnsenticorp.zip")
    assert len(sentences) == 2000
    assert all(not s.isdigit() and len(s) >= 1 for s in sentences)


# ----------------------------------------------------------------- whole-word masking
def test_whole_word_masking_never_splits_a_jieba_word_and_hits_the_rate(tokenizer):
    sentences = TEXTS + _shared_sentences(300)
    encode = WordPieceEncoder(tokenizer)
    rng = np.random.default_rng(0)
    random_ids = np.arange(6, tokenizer.vocab_size)
    chosen_total = tokens_total = multi_char_words_masked = 0
    outcome = {"mask": 0, "random": 0, "kept": 0}
    for sentence in sentences:
        ids, starts = encode(sentence)
        # The word spans, recomputed from jieba independently of the encoder's flags.
        spans, position = [], 0
        for word in jieba_words(sentence):
            n = len(encode.word_ids(word))
            if n:
                spans.append((position, position + n))
            position += n
        assert position == len(ids)
        for _ in range(20):
            inputs, chosen = whole_word_mask(ids, starts, rng, tokenizer.mask_id, random_ids)
            for begin, end in spans:
                assert chosen[begin:end].all() or not chosen[begin:end].any(), (sentence, begin, end)
                multi_char_words_masked += bool(end - begin > 1 and chosen[begin])
            assert chosen.sum() <= max(1, round(0.15 * len(ids)))
            chosen_total += chosen.sum()
            tokens_total += len(ids)
            picked, original = inputs[chosen], np.asarray(ids)[chosen]
            outcome["mask"] += np.sum(picked == tokenizer.mask_id)
            outcome["kept"] += np.sum(picked == original)
            outcome["random"] += np.sum((picked != original) & (picked != tokenizer.mask_id))
            assert np.array_equal(inputs[~chosen], np.asarray(ids)[~chosen])
    rate = chosen_total / tokens_total
    fractions = {k: v / chosen_total for k, v in outcome.items()}
    print(f"whole-word masking: rate {rate:.4f} over {tokens_total} tokens, outcome {fractions}")
    assert 0.14 <= rate <= 0.16
    assert multi_char_words_masked > 100  # whole multi-character words really are masked together
    assert abs(fractions["mask"] - 0.8) < 0.03
    assert abs(fractions["random"] - 0.1) < 0.03  # a random id can equal the original (counted as kept)
    assert abs(fractions["kept"] - 0.1) < 0.03


def test_whole_word_mask_rejects_bad_input():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="word_starts\\[0\\]"):
        whole_word_mask([5, 6], [0, 1], rng, 4, np.arange(5, 9))
    with pytest.raises(ValueError, match="mask_rate"):
        whole_word_mask([5, 6], [1, 1], rng, 4, np.arange(5, 9), mask_rate=1.5)
    with pytest.raises(ValueError, match="one length"):
        whole_word_mask([5, 6], [1], rng, 4, np.arange(5, 9))


# ----------------------------------------------------------------- pipeline
def test_preprocess_packs_sentences_in_order_without_losing_tokens(tokenizer, tmp_path):
    long_sentence = "我们" * 30 + "。"
    sentences = TEXTS[:5] + [long_sentence] + TEXTS[5:8]
    corpus = preprocess_corpus(iter(sentences), tokenizer, tmp_path / "c", seq_len=30)
    encode = WordPieceEncoder(tokenizer)
    expected = [i for s in sentences for i in encode(s)[0]]
    rows = [row[row > 0] for row in np.asarray(corpus.tokens)]
    assert np.array_equal(np.concatenate(rows), expected)
    assert all(len(r) <= 27 for r in rows) and corpus.meta["capacity"] == 27
    assert corpus.meta["long_sentences"] == 1 and corpus.meta["words_cut"] == 0
    assert corpus.meta["num_sentences"] == len(sentences)
    flags = np.asarray(corpus.flags)
    assert int(np.sum(flags & SENTENCE_START > 0)) == len(sentences)
    assert np.all(flags[:, 0] & WORD_START)  # every row starts on a word boundary
    reopened = PackedCorpus.open(tmp_path / "c")
    assert np.array_equal(reopened.tokens, corpus.tokens)
    with pytest.raises(FileNotFoundError, match="preprocess_corpus"):
        PackedCorpus.open(tmp_path / "absent")


def test_pipeline_is_shuffled_and_deterministic_given_a_seed(corpus):
    def epochs(seed, n=2, **kwargs):
        data = PretrainingDataset(corpus, batch_size=4, objective="mlm", seed=seed, **kwargs)
        out = []
        for _ in range(n):
            out.append([data[i] for i in range(len(data))])
            data.on_epoch_end()
        return data, out

    data, first = epochs(seed=3)
    _, again = epochs(seed=3)
    _, other = epochs(seed=4)

    def same(a, b):
        return all(np.array_equal(x, y) for p, q in zip(a, b) for x, y in zip(_flat(p), _flat(q)))

    assert same(first[0], again[0]) and same(first[1], again[1])
    assert not same(first[0], other[0])
    assert not same(first[0], first[1])  # a new permutation and new masks each epoch
    # Each epoch reads distinct rows (a permutation), and the order is not the file order.
    order0, order1 = data.order(0), data.order(1)
    assert len(set(order0.tolist())) == len(corpus) and not np.array_equal(order0, np.arange(len(corpus)))
    assert not np.array_equal(order0, order1)
    # Batch i of an epoch does not depend on which batches were read before it (any worker order).
    fresh = PretrainingDataset(corpus, batch_size=4, objective="mlm", seed=3)
    assert same([fresh[len(fresh) - 1]], [first[0][-1]])
    # Two shards of one permutation split it exactly (multi-host input).
    shards = [PretrainingDataset(corpus, batch_size=2, seed=3, shard=(i, 2)).order(0) for i in range(2)]
    assert sorted(np.concatenate(shards).tolist()) == list(range(len(corpus)))
    held_in, held_out = split_rows(len(corpus), 0.25, seed=0)
    assert len(held_out) == round(0.25 * len(corpus)) and not set(held_in) & set(held_out)


def _flat(item):
    inputs, targets, weights = item
    return [*inputs, targets, weights]


def test_mlm_batches_mask_whole_words_at_the_rate(corpus):
    data = PretrainingDataset(corpus, batch_size=8, objective="mlm", seed=0)
    flags = np.asarray(corpus.flags)
    chosen = real = 0
    for epoch in range(4):
        for i in range(len(data)):
            (token_ids, segment_ids), targets, weights = data[i]
            rows = data.order(epoch)[i * 8: (i + 1) * 8]
            for b, row in enumerate(rows):
                length = int(np.count_nonzero(corpus.tokens[row]))
                assert token_ids[b, 0] == corpus.meta["cls_id"] and token_ids[b, length + 1] == corpus.meta["sep_id"]
                assert np.array_equal(targets[b, 1: length + 1], corpus.tokens[row, :length])
                picked = weights[b, 1: length + 1] > 0
                word_ids = np.cumsum(flags[row, :length] & WORD_START)
                for w in np.unique(word_ids):
                    assert len(set(picked[word_ids == w])) == 1  # a word is wholly in or out
                chosen += picked.sum()
                real += length
            assert not segment_ids.any()
        data.on_epoch_end()
    assert 0.13 <= chosen / real <= 0.16


def test_lm_and_unilm_batches(corpus):
    cls_id, sep_id = corpus.meta["cls_id"], corpus.meta["sep_id"]
    (token_ids, segment_ids), targets, weights = PretrainingDataset(corpus, 4, "lm", seed=0)[0]
    for b in range(4):
        n = int(np.count_nonzero(token_ids[b]))
        assert token_ids[b, 0] == cls_id and token_ids[b, n - 1] == sep_id
        assert np.array_equal(targets[b, : n - 1], token_ids[b, 1:n])  # next-token targets
        assert np.array_equal(weights[b] > 0, np.arange(24) < n - 1)
    (token_ids, segment_ids), targets, weights = PretrainingDataset(corpus, 4, "unilm", seed=0)[0]
    for b in range(4):
        n = int(np.count_nonzero(token_ids[b]))
        first_target = int(np.argmax(segment_ids[b]))
        assert token_ids[b, first_target - 1] == sep_id and token_ids[b, n - 1] == sep_id
        assert segment_ids[b, first_target:n].all() and not segment_ids[b, n:].any()
        # Only the target part (and its closing [SEP]) is predicted, each from the position before it.
        assert np.array_equal(np.flatnonzero(weights[b]), np.arange(first_target - 1, n - 1))
        assert np.array_equal(targets[b, first_target - 1: n - 1], token_ids[b, first_target:n])
    with pytest.raises(ValueError, match="objective"):
        PretrainingDataset(corpus, 4, "nsp")


# ----------------------------------------------------------------- training and checkpoints
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        "max_position_embeddings": 32, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def _predict(model, inputs):
    return np.asarray(model.predict(inputs, verbose=0), dtype=np.float32)


def test_tiny_pretraining_lowers_mlm_loss_and_checkpoints_reload(corpus, tmp_path):
    import keras

    keras.utils.set_random_seed(0)
    config = dict(TINY, vocab_size=corpus.meta["vocab_size"])
    train_rows, held_rows = split_rows(len(corpus), 8, seed=0)
    train = PretrainingDataset(corpus, 8, "mlm", seed=0, rows=train_rows)
    held_out = PretrainingDataset(corpus, 8, "mlm", seed=1, rows=held_rows, shuffle=False)
    transformer = build_pretraining_model(config, model="bert", objective="mlm")
    model = compile_for_pretraining(transformer.model, learning_rate=3e-3, weight_decay=0.0)
    before = model.evaluate(held_out, verbose=0, return_dict=True)
    logger = PretrainingLogger(tmp_path / "curve.csv", tokens_per_step=8 * 24, every=5, held_out=held_out,
                               eval_every=len(train) * 4)
    model.fit(train, epochs=8, verbose=0, callbacks=[logger])
    after = model.evaluate(held_out, verbose=0, return_dict=True)
    print(f"tiny MLM run: held-out loss {before['loss']:.3f} -> {after['loss']:.3f}, "
          f"accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}")
    assert after["loss"] < 0.7 * before["loss"]
    assert after["accuracy"] > before["accuracy"] + 0.2
    with open(tmp_path / "curve.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) >= 8 and float(rows[-1]["loss"]) < float(rows[0]["loss"])
    assert rows[-1]["held_out_accuracy"] != "" and float(rows[-1]["held_out_accuracy"]) > 0.2

    paths = save_checkpoints(transformer, tmp_path / "ckpt", ["keras", "keras_model", "google", "huggingface"])
    inputs, _, _ = held_out[0]
    expected = _predict(model, inputs)
    for fmt, config_name in (("google", "bert_config.json"), ("huggingface", "config.json")):
        folder = (tmp_path / "ckpt" / fmt)
        reloaded = build_transformer_model(str(folder / config_name), paths[fmt], with_mlm="linear")
        np.testing.assert_allclose(_predict(reloaded, inputs), expected, rtol=0, atol=1e-5, err_msg=fmt)
    reloaded = build_pretraining_model(config).model
    reloaded.load_weights(paths["keras"])
    np.testing.assert_array_equal(_predict(reloaded, inputs), expected)
    np.testing.assert_array_equal(_predict(keras.saving.load_model(paths["keras_model"]), inputs), expected)


def test_lm_and_unilm_objectives_train(corpus):
    import keras

    for objective in ("lm", "unilm"):
        keras.utils.set_random_seed(0)
        data = PretrainingDataset(corpus, 8, objective, seed=0)
        transformer = build_pretraining_model(dict(TINY, vocab_size=corpus.meta["vocab_size"]), objective=objective)
        assert transformer.application == objective
        model = compile_for_pretraining(transformer.model, learning_rate=3e-3, weight_decay=0.0)
        history = model.fit(data, epochs=3, verbose=0).history["loss"]
        assert history[-1] < 0.8 * history[0], (objective, history)


@pytest.mark.parametrize("name", ["wobert", "roformer"])
def test_other_models_build_for_mlm(corpus, name):
    if name not in MODELS:
        pytest.skip(f"model {name!r} is not registered yet")
    import keras

    model = build_pretraining_model(dict(TINY, vocab_size=corpus.meta["vocab_size"]), model=name).model
    (token_ids, segment_ids), targets, weights = PretrainingDataset(corpus, 4, "mlm", seed=0)[0]
    inputs = [token_ids, segment_ids] if len(model.inputs) == 2 else token_ids
    logits = model(inputs)
    assert tuple(logits.shape) == (4, 24, corpus.meta["vocab_size"])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="mean_with_sample_weight")
    assert abs(float(loss(targets, logits, weights)) - np.log(corpus.meta["vocab_size"])) < 1.0  # untrained: ~ln V


@pytest.mark.skipif(in_subprocess, reason="already running on another backend")
def test_tiny_pretraining_on_jax_backend():
    run_pytest_on_backend("jax", "tests/test_pretraining.py", "-k", "tiny_pretraining and not jax_backend")
