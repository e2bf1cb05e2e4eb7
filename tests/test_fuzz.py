"""Property-based tests (hypothesis): both tokenizers against their references on random text, and random config
dicts, which must build a working model or be refused with ValueError/TypeError."""

from __future__ import annotations

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_tokenizers import SP_MODEL, hf_bert, our_bert, shared_data, simple_normalize  # noqa: E402

from bert4x.tokenizers import SpTokenizer  # noqa: E402

FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True,
                database=None)

# Chinese, Latin with accents, digits, punctuation (full- and half-width), whitespace of several kinds, control and
# format chars, emoji, combining marks, Hangul and Japanese; plus any BMP char but lone surrogates (not text).
_CHARS = list("中文的一是了我不人在他有这个上们来到时大地为子你说生国年着就那和要她出也得里后")
_CHARS += list("abcXYZÉéèñüßÅ0123456789,.!?;:'\"()[]{}<>@#$%^&*-_=+/\\|~`，。！？；：“”‘’（）【】《》、…—")
_CHARS += [" ", "\t", "\n", "\r", "\u3000", "\u00a0", "\u2028", "\x00", "\x1c", "\ufffd", "\u200b", "\u200d", "\u0301",
           "😀", "👍🏽", "한", "국", "日本", "ｶ", "ﬁ", "㎡", "Ⅻ", "\U00020000"]
_ANY_BMP = st.characters(max_codepoint=0xFFFF, exclude_categories=("Cs",))
TEXT = st.lists(st.one_of(st.sampled_from(_CHARS), _ANY_BMP), max_size=40).map("".join)


@pytest.fixture(scope="module")
def sp_pair():
    spm = pytest.importorskip("sentencepiece")
    path = shared_data(*SP_MODEL)
    return SpTokenizer(path), spm.SentencePieceProcessor(model_file=str(path))


@pytest.mark.parametrize("lower", [True, False])
@FUZZ
@given(text=TEXT, second=TEXT)
def test_bert_tokenizer_equals_transformers(lower, text, second):
    ours, theirs = our_bert(lower), hf_bert(lower)
    assert ours.encode(text)[0] == theirs(text)["input_ids"]
    if second:  # transformers treats an empty second text as no pair; bert4x encodes [CLS] a [SEP] [SEP]
        ids, segments = ours.encode(text, second)
        reference = theirs(text, second)
        assert ids == reference["input_ids"] and segments == reference["token_type_ids"]

    tokens = ours.tokenize(text)
    mapping = ours.rematch(text, tokens)
    assert mapping[0] == [] and mapping[-1] == []
    covered = set()
    for token, positions in zip(tokens[1:-1], mapping[1:-1]):
        assert positions, (text, token)  # every token comes from some chars
        assert positions == sorted(set(positions)) and positions[-1] < len(text)
        covered.update(positions)
    # Every char that survives normalisation is in a token (the tokenizer may keep a few more: its tables of marks
    # follow Hugging Face's Unicode version, Python's unicodedata another).
    visible = {i for i, ch in enumerate(text) if simple_normalize(ch, lower)}
    assert visible <= covered, text


@FUZZ
@given(text=TEXT)
def test_sp_tokenizer_equals_sentencepiece(sp_pair, text):
    ours, reference = sp_pair
    ids, segments = ours.encode(text)
    assert ids == reference.encode(text) + [ours.end_id]
    assert segments == [0] * len(ids)
    tokens = ours.tokenize(text)
    assert tokens == reference.encode(text, out_type=str) + ["</s>"]
    mapping = ours.rematch(text, tokens)
    assert len(mapping) == len(tokens) and mapping[-1] == []
    previous = -1
    for token, positions in zip(tokens[:-1], mapping[:-1]):
        if not positions:
            assert token.strip("\u2581") == "", (text, token)  # only the '▁' sentencepiece adds maps to nothing
            continue
        assert positions == sorted(set(positions)) and positions[-1] < len(text)
        assert positions[0] >= previous  # in order (one char may give several pieces)
        previous = positions[-1]


# ------------------------------------------------------------------ config dicts

_BASE = {"vocab_size": 30, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
         "intermediate_size": 16, "max_position_embeddings": 12, "type_vocab_size": 2}
_KEYS = [*_BASE, "hidden_dropout_prob", "attention_probs_dropout_prob", "layer_norm_eps", "initializer_range",
         "hidden_act"]
_VALUES = st.one_of(
    st.integers(-3, 12),
    st.floats(min_value=-1, max_value=2),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, 1e-12, 1e-45, 0.5, 0.999]),
    st.booleans(),
    st.none(),
    st.text(max_size=4),
    st.sampled_from(["gelu", "relu", "8", "1e-12", "0.1", "swish"]),
    st.lists(st.integers(0, 4), max_size=2),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True,
          database=None)
@given(changes=st.dictionaries(st.sampled_from(_KEYS), _VALUES, min_size=1, max_size=3))
def test_random_configs_build_a_working_model_or_are_refused(changes):
    from bert4x.models import build_transformer_model

    config = {**_BASE, **changes}
    try:
        model = build_transformer_model(config)
    except (ValueError, TypeError) as error:
        assert str(error)  # refused with a message
        return
    length = min(4, model.get_layer("Embedding-Position").input_dim)
    ids = np.ones((1, length), "int32")
    inputs = [ids, np.zeros_like(ids)] if len(model.inputs) == 2 else [ids]
    output = model.predict(inputs, verbose=0)
    assert output.shape == (1, length, config["hidden_size"])
    assert np.all(np.isfinite(output)), config
