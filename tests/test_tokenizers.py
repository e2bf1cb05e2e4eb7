"""Tokenizer tests: parity with Hugging Face and sentencepiece on real Chinese text.

Data comes from ../shared/data (next to the repository); tests that need it skip
when it is absent.
"""

import csv
import io
import json
import unicodedata
import zipfile
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from bert4x.tokenizers import SpTokenizer, Tokenizer, load_vocab, save_vocab

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """Path of a file under ../shared/data, or skip the test when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"../shared/data not found: {path}")
    return path


BERT_VOCAB = ("vocab", "bert_chinese", "vocab.txt")
WOBERT_VOCAB = ("vocab", "wobert", "wobert_chinese_base.vocab.txt")
SP_MODEL = ("vocab", "mt5_cn_trimmed", "sentencepiece_cn.model")


def _lines(*parts: str, limit: int) -> list[str]:
    # split("\n") and not splitlines(): some texts contain \u2028 / \x1c.
    text = shared_data("datasets", *parts).read_text(encoding="utf-8")
    return [line for line in text.split("\n") if line][:limit]


@cache
def real_sentences() -> tuple[str, ...]:
    """About 6,000 Chinese texts from eight datasets (reviews, questions,
    encyclopedia paragraphs, app descriptions with URLs, math, abstracts)."""
    texts = []
    with zipfile.ZipFile(shared_data("datasets", "sentiment", "chnsenticorp.zip")) as archive:
        rows = archive.read("train.tsv").decode("utf-8").split("\n")[1:1501]
    texts += [row.split("\t", 1)[1] for row in rows]
    for line in _lines("sentence_pairs", "LCQMC", "test.txt", limit=600):
        texts += line.split("\t")[:2]
    cmrc = json.loads(shared_data("datasets", "mrc", "cmrc2018", "cmrc2018_dev.json").read_text("utf-8"))
    texts += [p["context"] for article in cmrc["data"] for p in article["paragraphs"]][:300]
    texts += [json.loads(line)["text"] for line in _lines("ner", "cluener", "train.json", limit=1000)]
    reviews = shared_data("datasets", "sentiment", "waimai_10k.csv").read_text(encoding="utf-8")
    texts += [row["review"] for row in csv.DictReader(io.StringIO(reviews))][:1000]
    iflytek = _lines("clue_fewclue", "iflytek", "dev_few_all.json", limit=300)
    texts += [json.loads(line)["sentence"] for line in iflytek]
    ape = _lines("math", "ape210k", "test.ape.json", limit=500)
    texts += [json.loads(line)["original_text"] for line in ape]
    texts += [line.split("\t")[1] for line in _lines("summarization", "csl_title", "dev.tsv", limit=200)]
    return tuple(texts)


@cache
def hf_bert(lower: bool):
    """transformers' BertTokenizer on the Chinese vocab (checked to really use it:
    transformers 5 silently ignores ``vocab_file=`` and wants ``vocab=``)."""
    transformers = pytest.importorskip("transformers")
    vocab_path = shared_data(*BERT_VOCAB)
    size = len(load_vocab(vocab_path))
    cls = getattr(transformers, "BertTokenizerFast", transformers.BertTokenizer)
    for kwargs in ({"vocab": str(vocab_path)}, {"vocab_file": str(vocab_path)}):
        try:
            tokenizer = cls(do_lower_case=lower, **kwargs)
        except Exception:
            continue
        if len(tokenizer) == size:
            return tokenizer
    pytest.fail("could not build transformers' BertTokenizer on the Chinese vocab")


@cache
def our_bert(lower: bool) -> Tokenizer:
    return Tokenizer(shared_data(*BERT_VOCAB), do_lower_case=lower)


def first_mismatch(texts, ours, theirs):
    for text, a, b in zip(texts, ours, theirs):
        if a != b:
            return f"text={text[:120]!r}\nours  ={a[:60]}\ntheirs={b[:60]}"
    return None


# --------------------------------------------------------------------------
# Parity with Hugging Face
# --------------------------------------------------------------------------


@pytest.mark.parametrize("lower", [True, False])
def test_bert_tokens_and_ids_equal_hugging_face_on_real_text(lower):
    texts = real_sentences()
    assert len(texts) >= 5000
    hf, ours = hf_bert(lower), our_bert(lower)
    hf_ids = hf(list(texts))["input_ids"]
    hf_tokens = [hf.convert_ids_to_tokens(ids) for ids in hf_ids]
    our_tokens = [ours.tokenize(text) for text in texts]
    assert first_mismatch(texts, our_tokens, hf_tokens) is None
    our_ids = [ours.encode(text)[0] for text in texts]
    assert first_mismatch(texts, our_ids, hf_ids) is None
    assert all(ids[0] == 101 and ids[-1] == 102 for ids in our_ids)  # [CLS] ... [SEP]


def test_bert_pair_encoding_equals_hugging_face():
    lines = _lines("sentence_pairs", "LCQMC", "test.txt", limit=500)
    pairs = [line.split("\t")[:2] for line in lines]
    hf, ours = hf_bert(True), our_bert(True)
    encoded = hf([a for a, _ in pairs], [b for _, b in pairs])
    for (a, b), ids, segments in zip(pairs, encoded["input_ids"], encoded["token_type_ids"]):
        assert ours.encode(a, b) == (ids, segments), (a, b)


HARD_CASES = [
    "",
    "   \t\r\n ",
    "ＡＢＣ１２３ｄｅｆ，全角！",
    "café naïve Ångström ÉCOLE résumé Straße İstanbul ﬁne",
    "cafe\u0301 e\u0301te\u0301 (combining accents)",
    "emoji 😀👍🏻🇨🇳 ❤️ 🥰 😂好",
    "看 https://www.example.com/path?q=中文&x=1#frag 和 user@mail.com",
    "zero\u200bwidth\u200djoiner\ufeffbom\u00adsoft",
    "nul\x00and\ufffdreplacement\x7fdel\x1bescape",
    "tab\tnew\nline\rcr\x0bvt\x0cff\x85nel\u2028ls\u2029ps\u3000ideo\u00a0nbsp",
    "x" * 101 + " " + "y" * 100 + " " + "中" * 150,
    "pneumonoultramicroscopicsilicovolcanoconiosis" * 3,
    "2021年5月20日iPhone12售价5999元，打9.5折后约5699.05元(含税)……",
    "Hello, World! It's 3.14159; e=mc^2 @#$%^&*_+-=[]{}|\\:\";'<>?,./`~",
    "《红楼梦》第１回：甄士隐梦幻识通灵 —— 贾雨村风尘怀闺秀「」『』【】〔〕",
    "𠀀𠀁𪜀𫝀𫠠𬺰 CJK extensions and 丽 compatibility 﨎",
    "日本語のテキストとカタカナ、한국어 텍스트",
    "ΑΒΓ αβγ ΣΑΣ Привет мир ﻿العربية עברית हिन्दी ไทย",
    "\ue000private\U000f0000use",
    "[CLS] not special here [SEP] [unused1] [UNK]",
]


@pytest.mark.parametrize("lower", [True, False])
def test_bert_hard_cases_equal_hugging_face(lower):
    hf, ours = hf_bert(lower), our_bert(lower)
    for text in HARD_CASES:
        if "[" in text:  # HF splits special tokens out of raw text, we do not
            continue
        expected = hf(text)["input_ids"]
        assert ours.encode(text)[0] == expected, repr(text)
        assert ours.tokenize(text) == hf.convert_ids_to_tokens(expected), repr(text)


@pytest.mark.parametrize("lower", [True, False])
def test_bert_every_bmp_character_equals_hugging_face(lower):
    """Each assigned BMP code point, after a letter and before a combining
    accent, tokenizes as in Hugging Face (covers all character classes)."""
    if tuple(int(x) for x in unicodedata.unidata_version.split(".")) > (14, 0, 0):
        pytest.skip("character-class exceptions were measured for Unicode <= 14 (Python <= 3.11)")
    hf, ours = hf_bert(lower), our_bert(lower)
    texts = []
    for code in range(0x10000):
        ch = chr(code)
        if 0xD800 <= code <= 0xDFFF or unicodedata.category(ch) == "Cn":
            continue
        texts.append("a" + ch + "\u0301b")
    expected = hf(texts, add_special_tokens=False)["input_ids"]
    ours_ids = [ours.encode(text)[0][1:-1] for text in texts]
    assert first_mismatch(texts, ours_ids, expected) is None


def test_hard_case_details():
    lower, cased = our_bert(True), our_bert(False)
    assert lower.encode("")[0] == [101, 102]
    assert lower.tokenize("") == ["[CLS]", "[SEP]"]
    assert "".join(map(Tokenizer.stem, lower.tokenize("Ångström café")[1:-1])) == "angstromcafe"
    assert lower.tokenize("a\u200bb\x00c")[1:-1] == lower.tokenize("abc")[1:-1]
    assert lower.tokenize("x" * 101)[1:-1] == ["[UNK]"]  # longer than word_maxlen=100
    assert lower.tokenize("x" * 100)[1:-1] != ["[UNK]"]
    assert lower.tokenize("ＡＢＣ")[1:-1] == ["ａ", "##ｂ", "##ｃ"]  # full-width lower-cased
    assert cased.tokenize("ＡＢＣ")[1:-1] == ["[UNK]"]  # the vocab has no upper-case full-width
    # A custom word_maxlen is honoured.
    short = Tokenizer(lower.token_dict, do_lower_case=True, word_maxlen=5)
    assert short.tokenize("abcdef")[1:-1] == ["[UNK]"]


# --------------------------------------------------------------------------
# rematch and decode
# --------------------------------------------------------------------------


def simple_normalize(ch: str, lower: bool) -> str:
    """Independent re-statement of BERT's per-char normalization (common chars)."""
    if ch in "\x00\ufffd" or (unicodedata.category(ch) in ("Cc", "Cf", "Co") and ch not in "\t\n\r"):
        return ""
    if ch.isspace() or unicodedata.category(ch) == "Zs":
        return ""
    if lower:
        ch = "".join(c for c in unicodedata.normalize("NFD", ch) if unicodedata.category(c) != "Mn")
        ch = ch.lower()
    return ch


@pytest.mark.parametrize("lower", [True, False])
def test_rematch_maps_every_token_to_its_chars(lower):
    ours = our_bert(lower)
    unk_count = 0
    for text in real_sentences()[:: 1 if lower else 2]:
        tokens = ours.tokenize(text)
        mapping = ours.rematch(text, tokens)
        assert len(mapping) == len(tokens)
        assert mapping[0] == [] and mapping[-1] == []  # [CLS], [SEP]
        covered = []
        # Tokens with the same positions share chars (e.g. a Hangul syllable
        # decomposed into jamo by lower-casing); compare them together.
        groups = []
        for token, positions in zip(tokens[1:-1], mapping[1:-1]):
            assert positions, (text, token)
            assert positions == sorted(set(positions))  # increasing (deleted chars leave gaps)
            if groups and groups[-1][1] == positions:
                groups[-1][0].append(token)
            else:
                groups.append(([token], positions))
                covered += positions
        for group_tokens, positions in groups:
            if "[UNK]" in group_tokens:
                unk_count += 1
                continue
            chars = "".join(simple_normalize(text[i], lower) for i in positions)
            assert chars == "".join(map(Tokenizer.stem, group_tokens)), (text, group_tokens, positions)
        # Every char that survives normalization belongs to exactly one token.
        visible = [i for i, ch in enumerate(text) if simple_normalize(ch, lower)]
        assert covered == visible, text
    assert unk_count > 0  # [UNK] tokens were exercised


def test_rematch_unk_and_truncated_tokens():
    ours = our_bert(True)
    text = "我爱☃北京"
    tokens = ours.tokenize(text)
    assert tokens == ["[CLS]", "我", "爱", "[UNK]", "北", "京", "[SEP]"]
    assert ours.rematch(text, tokens) == [[], [0], [1], [2], [3], [4], []]
    truncated = ours.tokenize(text, maxlen=4)
    assert truncated == ["[CLS]", "我", "爱", "[SEP]"]
    assert ours.rematch(text, truncated) == [[], [0], [1], []]


def test_decode_reproduces_the_normalized_text():
    ours = our_bert(True)
    checked = 0
    for text in real_sentences()[:3000]:
        ids, _ = ours.encode(text)
        if ours.unk_id in ids:
            continue
        decoded = ours.decode(ids)
        expected = "".join(simple_normalize(ch, True) for ch in text)
        assert decoded.replace(" ", "") == expected, text
        checked += 1
    assert checked > 2000
    assert ours.decode(ours.encode("我用iPhone 12 拍照, it's 3.14 ok")[0]) == "我用iphone 12拍照, it's 3.14 ok"


# --------------------------------------------------------------------------
# WoBERT (word-level pre-tokenization with jieba)
# --------------------------------------------------------------------------


def test_wobert_keeps_vocab_words_whole():
    jieba = pytest.importorskip("jieba")
    jieba.setLogLevel(60)
    vocab_path = shared_data(*WOBERT_VOCAB)
    cut = lambda s: jieba.cut(s, HMM=False)  # noqa: E731
    wobert = Tokenizer(vocab_path, do_lower_case=True, pre_tokenize=cut)
    char_level = Tokenizer(vocab_path, do_lower_case=True)
    vocab = wobert.token_dict

    texts = [t for t in real_sentences() if t.strip()][:1500]
    chars = tokens_total = whole_words = 0
    for text in texts:
        tokens = wobert.tokenize(text)[1:-1]
        expected = []
        for word in cut(text.lower()):
            if word in vocab:
                expected.append(word)
                whole_words += len(word) > 1
            else:
                expected += char_level.tokenize(word)[1:-1]
        assert tokens == expected, text
        mapping = wobert.rematch(text, tokens)
        for token, positions in zip(tokens, mapping):
            if token != "[UNK]":
                normalized = "".join(simple_normalize(text[i], True) for i in positions)
                assert normalized == Tokenizer.stem(token), (text, token)
        chars += sum(len(t) for t in tokens if t != "[UNK]")
        tokens_total += len(tokens)
    assert whole_words > 5000
    assert chars / tokens_total > 1.2, chars / tokens_total
    # A word missing from the vocab falls back to characters.
    assert wobert.tokenize("龘靐齉")[1:-1] == char_level.tokenize("龘靐齉")[1:-1]


def test_pre_tokenize_must_return_pieces_of_the_text():
    tokenizer = Tokenizer({"[CLS]": 0, "[SEP]": 1, "[UNK]": 2, "a": 3}, pre_tokenize=lambda s: ["zzz"])
    with pytest.raises(ValueError, match="pre_tokenize returned 'zzz'"):
        tokenizer.tokenize("a")


# --------------------------------------------------------------------------
# Vocab loading, truncation, errors
# --------------------------------------------------------------------------


def test_load_vocab_simplified_is_consistent():
    vocab_path = shared_data(*BERT_VOCAB)
    full = load_vocab(vocab_path)
    assert len(full) == 21128 and full["[PAD]"] == 0 and full["[CLS]"] == 101
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    token_dict, keep_tokens = load_vocab(vocab_path, simplified=True, startswith=specials)
    assert len(token_dict) == len(keep_tokens)
    assert sorted(token_dict.values()) == list(range(len(token_dict)))
    assert [token_dict[t] for t in specials] == [0, 1, 2, 3]
    for token, new_id in token_dict.items():
        assert full[token] == keep_tokens[new_id]

    # Independent count with bert4keras's rule (plain unicodedata classes).
    def useless(token):
        stem = token[2:] if token.startswith("##") else token
        return len(token) > 1 and any(
            0x4E00 <= ord(c) <= 0x9FFF or 0x3400 <= ord(c) <= 0x4DBF or ord(c) >= 0x20000
            or unicodedata.category(c).startswith("P") or (c.isascii() and not c.isalnum())
            for c in stem
        )

    expected = [t for t in full if t not in specials and not useless(t)]
    assert len(token_dict) == len(specials) + len(expected)
    assert not any(t.startswith("[unused") or t == "##中" for t in token_dict)
    assert "中" in token_dict and "##s" in token_dict

    # The simplified vocab still tokenizes Chinese text identically (mod ids).
    small = Tokenizer(token_dict, do_lower_case=True)
    text = real_sentences()[0]
    assert small.tokenize(text) == our_bert(True).tokenize(text)
    ids, _ = small.encode(text)
    assert [keep_tokens[i] for i in ids] == our_bert(True).encode(text)[0]


def test_load_vocab_and_save_vocab_round_trip(tmp_path):
    path = tmp_path / "vocab.txt"
    save_vocab(path, {"[PAD]": 0, "[UNK]": 1, "中": 2, "##s": 3})
    assert load_vocab(path) == {"[PAD]": 0, "[UNK]": 1, "中": 2, "##s": 3}
    with pytest.raises(ValueError, match="startswith token '\\[CLS\\]'"):
        load_vocab(path, simplified=True, startswith=["[CLS]"])


def test_truncation_rules():
    ours = our_bert(True)
    long_text, short_text = "一二三四五六七八九十" * 3, "甲乙丙"
    ids, segments = ours.encode(long_text, maxlen=np.int64(10))
    assert len(ids) == 10 and ids[0] == ours.start_id and ids[-1] == ours.end_id
    assert ours.decode(ids) == "一二三四五六七八"
    assert ours.decode(ours.encode(long_text, maxlen=6, truncate_from="left")[0]) == "七八九十"
    # Pairs: the longer text loses tokens first; the total fits maxlen.
    ids, segments = ours.encode(long_text, short_text, maxlen=12)
    assert len(ids) == 12 and segments == [0] * 8 + [1] * 4
    assert ours.decode(ids[:8]) == "一二三四五六" and ours.decode(ids[8:]) == "甲乙丙"
    ids, segments = ours.encode(long_text, short_text, maxlen=12, pattern="S*ES*E")
    assert len(ids) == 12 and ids.count(ours.start_id) == 2
    assert ours.tokenize(long_text, maxlen=3) == ["[CLS]", "一", "[SEP]"]
    # Token lists passed in are not modified.
    tokens = ours.tokenize(long_text)
    ours.encode(tokens, maxlen=5)
    assert len(tokens) == 32


def test_special_ids_and_aliases():
    ours = our_bert(True)
    assert (ours.pad_id, ours.unk_id, ours.start_id, ours.end_id, ours.mask_id) == (0, 100, 101, 102, 103)
    assert (ours._token_pad_id, ours._token_unk_id, ours._token_start_id) == (0, 100, 101)
    assert (ours._token_end_id, ours._token_mask_id) == (102, 103)
    with pytest.raises(AttributeError):
        ours._token_pad_id = 5
    assert ours.vocab_size == 21128
    assert ours.tokens_to_ids(["[CLS]", "中"]) == [101, 704]
    assert ours.ids_to_tokens([101, 704]) == ["[CLS]", "中"]
    no_ends = Tokenizer(ours.token_dict, token_start=None, token_end=None)
    assert no_ends.tokenize("中国") == ["中", "国"] and no_ends.start_id is None


def test_errors_are_clear(tmp_path):
    missing = tmp_path / "no_such_vocab.txt"
    with pytest.raises(FileNotFoundError, match="no_such_vocab.txt"):
        Tokenizer(missing)
    with pytest.raises(FileNotFoundError, match="no_such_vocab.txt"):
        load_vocab(missing)
    with pytest.raises(FileNotFoundError, match="nothing.model"):
        SpTokenizer(tmp_path / "nothing.model")

    ours = our_bert(True)
    assert ours.token_to_id("no-such-token") == ours.unk_id
    with pytest.raises(IndexError, match="21128"):
        ours.id_to_token(21128)
    no_unk = Tokenizer({"[CLS]": 0, "[SEP]": 1, "a": 2})
    with pytest.raises(KeyError, match="no-such-token"):
        no_unk.token_to_id("no-such-token")
    with pytest.raises(ValueError, match="maxlen"):
        ours.encode("中国", maxlen=1)
    with pytest.raises(ValueError, match="maxlen"):
        ours.tokenize("中国", maxlen=1)
    with pytest.raises(ValueError, match="maxlen"):
        ours.encode("中国", "美国", maxlen=2)
    with pytest.raises(ValueError, match="pattern"):
        ours.encode("中国", "美国", pattern="SE")
    with pytest.raises(ValueError, match="token_start"):
        Tokenizer({"[SEP]": 0}, token_start="[CLS]")
    with pytest.raises(TypeError, match="text"):
        ours.tokenize(None)
    with pytest.raises(TypeError, match="maxlen"):
        ours.encode("中国", maxlen=3.5)


# --------------------------------------------------------------------------
# SentencePiece
# --------------------------------------------------------------------------


def test_sp_tokenizer_equals_sentencepiece():
    spm = pytest.importorskip("sentencepiece")
    model_path = shared_data(*SP_MODEL)
    reference = spm.SentencePieceProcessor(model_file=str(model_path))
    ours = SpTokenizer(model_path)
    assert (ours.pad_id, ours.end_id, ours.unk_id, ours.start_id) == (0, 1, 2, None)
    assert ours.vocab_size == reference.get_piece_size() == 32596

    texts = list(real_sentences()[::5]) + HARD_CASES
    assert len(texts) >= 1000
    for text in texts:
        expected_ids = reference.encode(text)
        ids, segments = ours.encode(text)
        assert ids == expected_ids + [1], text
        assert segments == [0] * len(ids)
        assert ours.tokenize(text) == reference.encode(text, out_type=str) + ["</s>"]
        assert ours.decode(ids) == reference.decode(expected_ids)

        tokens = ours.tokenize(text)
        mapping = ours.rematch(text, tokens)
        assert mapping[-1] == []  # </s>
        previous_end = 0
        for token, positions in zip(tokens[:-1], mapping[:-1]):
            if positions:
                assert positions[0] >= previous_end - 1 and positions[-1] < len(text)
                previous_end = positions[-1] + 1
                surface = unicodedata.normalize("NFKC", "".join(text[i] for i in positions))
                piece = token.replace("\u2581", " ").strip()
                if not (token.startswith("<0x") or piece == ""):
                    # One char may give several pieces (NFKC: '㎡' -> 'm', '2').
                    assert piece in surface, (text, token, positions)

    # Truncation keeps </s>; ids beyond the sentencepiece vocab decode to nothing.
    ids, _ = ours.encode(texts[0], maxlen=5)
    assert len(ids) == 5 and ids[-1] == 1
    assert ours.decode([ours.vocab_size, ours.vocab_size + 1]) == ""
    with pytest.raises(IndexError):
        ours.id_to_token(ours.vocab_size)
