"""Tokenizers with bert4keras's interface.

* ``Tokenizer``: BERT WordPiece. Its output equals Hugging Face's
  ``transformers.BertTokenizer`` (``tokenize_chinese_chars=True``,
  ``strip_accents=None``) for both ``do_lower_case`` settings; optional
  ``pre_tokenize`` gives WoBERT-style word-level tokenization.
* ``SpTokenizer``: a SentencePiece model behind the same interface (T5 / mT5).
* ``load_vocab`` / ``save_vocab``: read and write one-token-per-line vocab files,
  optionally dropping tokens that a Chinese model never needs.

Both tokenizers map tokens back to characters of the original text with
``rematch`` (used for NER / span extraction).
"""

from __future__ import annotations

import functools
import operator
import os
import unicodedata
from collections.abc import Callable, Iterable, Sequence

__all__ = ["load_vocab", "save_vocab", "Tokenizer", "SpTokenizer"]

PathLike = str | os.PathLike

# ---------------------------------------------------------------------------
# Character classes, as Hugging Face's Rust `tokenizers` (BertNormalizer and
# BertPreTokenizer) defines them.
# ---------------------------------------------------------------------------

# "Chinese characters": the CJK ideograph blocks, exactly the ranges tokenizers
# uses (note 0x2B920, where bert4keras and HF's old Python code use 0x2B820).
_CJK_RANGES = (
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F), (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F),
)


def _code_points(*ranges: tuple[int, int] | int) -> frozenset[int]:
    points = set()
    for r in ranges:
        first, last = (r, r) if isinstance(r, int) else r
        points.update(range(first, last + 1))
    return frozenset(points)


# tokenizers classifies characters with Unicode 8.0 tables, Python's
# unicodedata with newer ones (14.0 in Python 3.11). These are the code points
# whose class changed in between, measured against tokenizers 0.22. Chars added
# after Unicode 14 (Python >= 3.12) may still differ; they are very rare.
_NOT_PUNCTUATION_IN_HF = _code_points(  # P* in Unicode 14, unassigned in 8.0
    0x61D, 0x9FD, 0xA76, 0xC77, 0xC84, (0x1B7D, 0x1B7E), (0x2E43, 0x2E4F),
    (0x2E52, 0x2E5D), 0x10EAD, (0x10F55, 0x10F59), (0x10F86, 0x10F89),
    (0x1144B, 0x1144F), (0x1145A, 0x1145B), 0x1145D, (0x11660, 0x1166C),
    0x116B9, 0x1183B, (0x11944, 0x11946), 0x119E2, (0x11A3F, 0x11A46),
    (0x11A9A, 0x11A9C), (0x11A9E, 0x11AA2), (0x11C41, 0x11C45),
    (0x11C70, 0x11C71), (0x11EF7, 0x11EF8), 0x11FFF, (0x12FF1, 0x12FF2),
    (0x16E97, 0x16E9A), 0x16FE2, (0x1E95E, 0x1E95F),
)
_PUNCTUATION_IN_HF = _code_points(0x166D, 0x111C9)  # were Po in Unicode 8.0
_KEPT_FORMAT_CHARS = _code_points(  # Cf in Unicode 14, unassigned in 8.0
    (0x890, 0x891), 0x8E2, 0x110CD, (0x13430, 0x13438),
)
_KEPT_NONSPACING_MARKS = _code_points(  # Mn in Unicode 14, unassigned in 8.0
    0x7FD, (0x898, 0x89F), (0x8CA, 0x8E1), 0x9FE, (0xAFA, 0xAFF), 0xB55, 0xC04,
    0xC3C, 0xD00, (0xD3B, 0xD3C), 0xD81, 0xEBA, 0x180F, (0x1885, 0x1886),
    (0x1ABF, 0x1ACE), (0x1DF6, 0x1DFB), 0xA82C, 0xA8C5, 0xA8FF, 0xA9BD,
    (0x10D24, 0x10D27), (0x10EAB, 0x10EAC), (0x10F46, 0x10F50),
    (0x10F82, 0x10F85), 0x11070, (0x11073, 0x11074), 0x110C2, 0x111C9, 0x111CF,
    0x1123E, 0x1133B, (0x11438, 0x1143F), (0x11442, 0x11444), 0x11446, 0x1145E,
    (0x1182F, 0x11837), (0x11839, 0x1183A), (0x1193B, 0x1193C), 0x1193E,
    0x11943, (0x119D4, 0x119D7), (0x119DA, 0x119DB), 0x119E0,
    (0x11A01, 0x11A0A), (0x11A33, 0x11A38), (0x11A3B, 0x11A3E), 0x11A47,
    (0x11A51, 0x11A56), (0x11A59, 0x11A5B), (0x11A8A, 0x11A96),
    (0x11A98, 0x11A99), (0x11C30, 0x11C36), (0x11C38, 0x11C3D), 0x11C3F,
    (0x11C92, 0x11CA7), (0x11CAA, 0x11CB0), (0x11CB2, 0x11CB3),
    (0x11CB5, 0x11CB6), (0x11D31, 0x11D36), 0x11D3A, (0x11D3C, 0x11D3D),
    (0x11D3F, 0x11D45), 0x11D47, (0x11D90, 0x11D91), 0x11D95, 0x11D97,
    (0x11EF3, 0x11EF4), 0x16F4F, 0x16FE4, (0x1CF00, 0x1CF2D), (0x1CF30, 0x1CF46),
    (0x1E000, 0x1E006), (0x1E008, 0x1E018), (0x1E01B, 0x1E021),
    (0x1E023, 0x1E024), (0x1E026, 0x1E02A), (0x1E130, 0x1E136), 0x1E2AE,
    (0x1E2EC, 0x1E2EF), (0x1E944, 0x1E94A),
)
_STRIPPED_SPACING_MARKS = _code_points(0x1734)  # was Mn in Unicode 8.0


def _is_cjk_character(ch: str) -> bool:
    code = ord(ch)
    return any(first <= code <= last for first, last in _CJK_RANGES)


def _is_punctuation(ch: str) -> bool:
    """ASCII symbols (``!`` .. ``~`` minus letters/digits) and Unicode P* chars."""
    code = ord(ch)
    if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
        return True
    if code in _PUNCTUATION_IN_HF:
        return True
    return unicodedata.category(ch).startswith("P") and code not in _NOT_PUNCTUATION_IN_HF


def _is_space(ch: str) -> bool:
    return ch in " \t\n\r\u2028\u2029" or unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
    """Characters that BERT's text cleaning deletes (\\t \\n \\r are spaces instead)."""
    if ch in "\t\n\r":
        return False
    category = unicodedata.category(ch)
    if category == "Cf":
        return ord(ch) not in _KEPT_FORMAT_CHARS
    return category in ("Cc", "Co", "Cs")


@functools.cache
def _clean_char(ch: str) -> str:
    """'' for deleted chars, ' ' for any whitespace, else the char itself."""
    if ch in "\x00\ufffd" or _is_control(ch):
        return ""
    return " " if _is_space(ch) else ch


def _is_stripped_mark(ch: str) -> bool:
    code = ord(ch)
    if code in _STRIPPED_SPACING_MARKS:
        return True
    return unicodedata.category(ch) == "Mn" and code not in _KEPT_NONSPACING_MARKS


@functools.cache
def _fold_char(ch: str) -> str:
    """Lower-casing as BERT does it: NFD, drop accents (Mn), then lower-case."""
    decomposed = unicodedata.normalize("NFD", ch)
    return "".join(c.lower() for c in decomposed if not _is_stripped_mark(c))


def _is_special(token: str) -> bool:
    """Bracketed tokens such as [CLS], [SEP], [UNK], [unused1]."""
    return len(token) > 2 and token[0] == "[" and token[-1] == "]"


def _stem(token: str) -> str:
    """The token without its WordPiece continuation prefix '##'."""
    return token[2:] if token[:2] == "##" else token


def _dedupe(positions: Iterable[int]) -> list[int]:
    """Drop repeats from a non-decreasing list of char positions."""
    out: list[int] = []
    for p in positions:
        if not out or out[-1] != p:
            out.append(p)
    return out


def _truncate(maxlen: int, index: int, *sequences: list | None, head: int = 0, tail: int = 0) -> None:
    """Pop ``sequence[index]`` from the longest sequence until the total length
    is <= maxlen (bert4x.snippets.truncate_sequences, kept here so that the
    tokenizers do not import keras). The first ``head`` and last ``tail`` items
    of each sequence (its start/end tokens) are never popped: an index that
    would reach them, as a sequence shrinks, is moved to the nearest other item."""
    sequences = [s for s in sequences if s is not None]
    while sum(len(s) for s in sequences) > maxlen:
        longest = max(sequences, key=len)
        if len(longest) <= head + tail:
            return  # only start/end tokens left; callers check that maxlen can hold them
        position = index if index >= 0 else len(longest) + index
        longest.pop(min(max(position, head), len(longest) - tail - 1))


# ---------------------------------------------------------------------------
# Vocabulary files
# ---------------------------------------------------------------------------


def _read_vocab_lines(dict_path: PathLike, encoding: str) -> list[str]:
    if not os.path.isfile(dict_path):
        raise FileNotFoundError(f"vocab file not found: {os.fspath(dict_path)!r}")
    try:
        with open(dict_path, encoding=encoding) as reader:
            lines = reader.read().split("\n")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"vocab file {os.fspath(dict_path)!r} is not valid {encoding} (byte {error.start}: {error.reason}); "
            "read it with load_vocab(path, encoding=...) and pass the dict"
        ) from None
    if lines and lines[-1] == "":
        lines.pop()  # the file's final newline
    return [line.rstrip("\r") for line in lines]


def load_vocab(
    dict_path: PathLike,
    encoding: str = "utf-8",
    simplified: bool = False,
    startswith: Sequence[str] | None = None,
) -> dict[str, int] | tuple[dict[str, int], list[int]]:
    """Read a one-token-per-line vocab file into ``{token: id}`` (id = line number).

    Lines are kept verbatim (only the line break is removed), as Hugging Face
    does, so ids always equal embedding rows; if a token occurs twice the later
    line wins.

    With ``simplified=True`` the vocab is shrunk for Chinese use, by bert4keras's
    rule: the ``startswith`` tokens come first (in that order), then every other
    token in id order except those longer than one char whose stem (the token
    without a leading '##') contains a CJK char or a punctuation char (this also
    drops '[unusedN]' and '##中'-style tokens). Returns ``(token_dict,
    keep_tokens)`` where ``keep_tokens[new_id]`` is the original id, so a model's
    embedding can be sliced with ``keep_tokens``.

    Args:
        dict_path: the vocab file.
        encoding: its text encoding (a file in another one raises ``ValueError`` naming it).
        simplified: shrink the vocab as described above and also return ``keep_tokens``.
        startswith: with ``simplified``, tokens placed first, in this order.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "vocab.txt")
        >>> _ = open(path, "w", encoding="utf-8").write("[PAD]\\n[unused1]\\n[UNK]\\n中\\n##中\\nab\\n")
        >>> load_vocab(path)["中"]
        3
        >>> load_vocab(path, simplified=True, startswith=["[PAD]", "[UNK]"])
        ({'[PAD]': 0, '[UNK]': 1, '中': 2, 'ab': 3}, [0, 2, 3, 5])
    """
    lines = _read_vocab_lines(dict_path, encoding)
    token_dict = {token: i for i, token in enumerate(lines)}
    if not simplified:
        return token_dict

    new_token_dict: dict[str, int] = {}
    keep_tokens: list[int] = []
    for token in startswith or []:
        if token not in token_dict:
            raise ValueError(
                f"load_vocab: startswith token {token!r} is not in {os.fspath(dict_path)!r}"
            )
        if token not in new_token_dict:
            new_token_dict[token] = len(new_token_dict)
            keep_tokens.append(token_dict[token])
    for token, token_id in sorted(token_dict.items(), key=lambda item: item[1]):
        if token in new_token_dict:
            continue
        useless = len(token) > 1 and any(
            _is_cjk_character(c) or _is_punctuation(c) for c in _stem(token)
        )
        if not useless:
            new_token_dict[token] = len(new_token_dict)
            keep_tokens.append(token_id)
    return new_token_dict, keep_tokens


def save_vocab(dict_path: PathLike, token_dict: dict[str, int], encoding: str = "utf-8") -> None:
    """Write ``token_dict`` as a vocab file, one token per line in id order.

    Args:
        dict_path: the file to write.
        token_dict: ``{token: id}`` with ids exactly ``0 .. len(token_dict) - 1``.
        encoding: the file's text encoding.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "vocab.txt")
        >>> save_vocab(path, {"[PAD]": 0, "a": 1})
        >>> load_vocab(path)
        {'[PAD]': 0, 'a': 1}
    """
    ids = sorted(token_dict.values())
    if ids != list(range(len(ids))):
        raise ValueError("save_vocab: token_dict ids must be exactly 0 .. len(token_dict)-1")
    with open(dict_path, "w", encoding=encoding) as writer:
        for token, _ in sorted(token_dict.items(), key=lambda item: item[1]):
            writer.write(token + "\n")


# ---------------------------------------------------------------------------
# Shared tokenizer surface
# ---------------------------------------------------------------------------

# A token and the positions (in the original text) of the chars it came from.
_Span = tuple[str, list[int]]


class TokenizerBase:
    """What ``Tokenizer`` and ``SpTokenizer`` share: special tokens, ``tokenize``,
    ``encode`` with truncation, id look-ups and ``rematch``. Subclasses implement
    ``_tokenize_with_spans``, ``token_to_id``, ``id_to_token``, ``decode`` and
    ``vocab_size``."""

    _token_pad = "[PAD]"
    _token_unk = "[UNK]"
    _token_mask = "[MASK]"

    def __init__(
        self,
        token_start: str | None = "[CLS]",
        token_end: str | None = "[SEP]",
        pre_tokenize: Callable[[str], Iterable[str]] | None = None,
        token_translate: dict[str, str] | None = None,
    ):
        if pre_tokenize is not None and not callable(pre_tokenize):
            raise TypeError(f"pre_tokenize must be callable, got {type(pre_tokenize).__name__}")
        self._token_start = token_start
        self._token_end = token_end
        self._pre_tokenize = pre_tokenize
        self._token_translate = dict(token_translate or {})
        self._token_translate_inv = {v: k for k, v in self._token_translate.items()}

    # -- special ids (None when the vocab lacks the token) -------------------
    pad_id: int | None = None
    unk_id: int | None = None
    mask_id: int | None = None
    start_id: int | None = None
    end_id: int | None = None

    # Read-only aliases for code ported from bert4keras.
    _token_pad_id = property(lambda self: self.pad_id)
    _token_unk_id = property(lambda self: self.unk_id)
    _token_mask_id = property(lambda self: self.mask_id)
    _token_start_id = property(lambda self: self.start_id)
    _token_end_id = property(lambda self: self.end_id)

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    # -- to be implemented ---------------------------------------------------
    def _tokenize_with_spans(self, text: str) -> list[_Span]:
        raise NotImplementedError

    def _tokenize(self, text: str) -> list[str]:
        return [token for token, _ in self._tokenize_with_spans(text)]

    def token_to_id(self, token: str) -> int:
        raise NotImplementedError

    def id_to_token(self, i: int) -> str:
        raise NotImplementedError

    # -- shared API ----------------------------------------------------------
    def _check_text(self, text: object, argument: str) -> str:
        if not isinstance(text, str):
            raise TypeError(f"{argument} must be a str, got {type(text).__name__}")
        return text

    def _num_specials(self) -> int:
        return int(self._token_start is not None) + int(self._token_end is not None)

    def tokenize(self, text: str, maxlen: int | None = None) -> list[str]:
        """Split ``text`` into tokens, with ``token_start``/``token_end`` added.

        ``maxlen`` truncates: tokens before the end token are dropped until the
        total length (specials included) is at most ``maxlen``.

        Args:
            text: the text.
            maxlen: the most tokens to return, start/end tokens included.
        """
        text = self._check_text(text, "text")
        tokens = [self._token_translate.get(t, t) for t in self._tokenize(text)]
        if self._token_start is not None:
            tokens.insert(0, self._token_start)
        if self._token_end is not None:
            tokens.append(self._token_end)
        if maxlen is not None:
            maxlen = self._check_maxlen(maxlen, self._num_specials())
            _truncate(maxlen, -int(self._token_end is not None) - 1, tokens)
        return tokens

    def _check_maxlen(self, maxlen: int, minimum: int) -> int:
        minimum = max(minimum, 1)
        try:
            maxlen = operator.index(maxlen)
        except TypeError:
            raise TypeError(f"maxlen must be an int, got {type(maxlen).__name__}") from None
        if maxlen < minimum:
            raise ValueError(
                f"maxlen={maxlen} is too small: it must be >= {minimum} to hold the start/end tokens"
            )
        return maxlen

    def tokens_to_ids(self, tokens: Iterable[str]) -> list[int]:
        return [self.token_to_id(token) for token in tokens]

    def ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return [self.id_to_token(i) for i in ids]

    def encode(
        self,
        first_text: str | list[str],
        second_text: str | list[str] | None = None,
        maxlen: int | None = None,
        pattern: str = "S*E*E",
        truncate_from: str | int = "right",
    ) -> tuple[list[int], list[int]]:
        """Return ``(token_ids, segment_ids)`` for one text or a pair.

        Texts may also be token lists (as returned by ``tokenize``). A pair is
        ``[CLS] a [SEP] b [SEP]`` with ``pattern='S*E*E'`` or
        ``[CLS] a [SEP] [CLS] b [SEP]`` with ``pattern='S*ES*E'``; segment ids
        are 0 for the first part and 1 for the second.

        ``maxlen`` truncates the result to at most ``maxlen`` ids (specials
        included): tokens are removed one at a time from the currently longer
        text, at its end (``truncate_from='right'``), its start (``'left'``) or
        a given index (an int), never the start/end tokens themselves.
        ``maxlen`` smaller than the number of special tokens raises ValueError.

        Args:
            first_text: a text or a token list.
            second_text: an optional second text or token list (segment 1).
            maxlen: the most ids to return, start/end tokens included.
            pattern: 'S*E*E' or 'S*ES*E', the layout of a pair.
            truncate_from: 'right', 'left', or an int index into the longer text's tokens (start/end tokens
                included) that must point at a text token.
        """
        if pattern not in ("S*E*E", "S*ES*E"):
            raise ValueError(f"pattern must be 'S*E*E' or 'S*ES*E', got {pattern!r}")
        first_tokens = self._as_tokens(first_text, "first_text")
        second_tokens = None if second_text is None else self._as_tokens(second_text, "second_text")

        head, tail = int(self._token_start is not None), int(self._token_end is not None)
        if maxlen is not None:
            if isinstance(truncate_from, str) and truncate_from == "right":
                index = -tail - 1
            elif isinstance(truncate_from, str) and truncate_from == "left":
                index = head
            elif isinstance(truncate_from, int) and not isinstance(truncate_from, bool):
                index = truncate_from
                longest = max(len(first_tokens), len(second_tokens or ()))
                if not (head <= index < longest - tail or -longest + head <= index < -tail):
                    raise ValueError(
                        f"truncate_from={index} is out of range: it indexes the longer text's tokens, start/end "
                        f"tokens included, and must point at a text token (from {head} to {longest - tail - 1}, "
                        f"or from {-longest + head} to {-tail - 1})"
                    )
            elif isinstance(truncate_from, str):
                raise ValueError(f"truncate_from must be 'right', 'left' or an int, got {truncate_from!r}")
            else:
                raise TypeError(
                    f"truncate_from must be 'right', 'left' or an int, got {type(truncate_from).__name__}"
                )
            if second_tokens is None:
                maxlen = self._check_maxlen(maxlen, self._num_specials())
            else:
                extra = self._num_specials() if pattern == "S*ES*E" else int(self._token_end is not None)
                maxlen = self._check_maxlen(maxlen, self._num_specials() + extra)
                if pattern == "S*E*E" and self._token_start is not None:
                    maxlen += 1  # the second start token is dropped below
            _truncate(maxlen, index, first_tokens, second_tokens, head=head, tail=tail)

        token_ids = self.tokens_to_ids(first_tokens)
        segment_ids = [0] * len(token_ids)
        if second_tokens is not None:
            if pattern == "S*E*E" and self._token_start is not None:
                second_tokens = second_tokens[1:]
            second_ids = self.tokens_to_ids(second_tokens)
            token_ids.extend(second_ids)
            segment_ids.extend([1] * len(second_ids))
        return token_ids, segment_ids

    def _as_tokens(self, text: str | list[str], argument: str) -> list[str]:
        if isinstance(text, str):
            return self.tokenize(text)
        if isinstance(text, (list, tuple)):
            return list(text)  # a copy: truncation must not touch the caller's list
        raise TypeError(f"{argument} must be a str or a list of tokens, got {type(text).__name__}")

    def rematch(self, text: str, tokens: Sequence[str]) -> list[list[int]]:
        """Map each token to the positions of the chars of ``text`` it came from.

        ``tokens`` is usually ``tokenize(text)`` (possibly truncated). Tokens are
        matched in order against this tokenizer's own tokenization of ``text``;
        a token that text does not produce (``[CLS]``, ``[SEP]``, ``[PAD]``...)
        maps to ``[]``. ``[UNK]`` maps to the chars it replaced.

        Args:
            text: the original text.
            tokens: tokens of that text, e.g. ``tokenize(text)``.

        Example:
            >>> vocab = {"[CLS]": 0, "[SEP]": 1, "[UNK]": 2, "hello": 3, "中": 4}
            >>> tokenizer = Tokenizer(vocab, do_lower_case=True)
            >>> tokens = tokenizer.tokenize("Héllo 中☃")
            >>> tokens
            ['[CLS]', 'hello', '中', '[UNK]', '[SEP]']
            >>> tokenizer.rematch("Héllo 中☃", tokens)
            [[], [0, 1, 2, 3, 4], [6], [7], []]
        """
        text = self._check_text(text, "text")
        produced = [
            (self._token_translate.get(t, t), span) for t, span in self._tokenize_with_spans(text)
        ]
        mapping, next_index = [], 0
        for token in tokens:
            for k in range(next_index, len(produced)):
                if produced[k][0] == token:
                    mapping.append(list(produced[k][1]))
                    next_index = k + 1
                    break
            else:
                mapping.append([])
        return mapping


# ---------------------------------------------------------------------------
# BERT WordPiece
# ---------------------------------------------------------------------------


class Tokenizer(TokenizerBase):
    """BERT's WordPiece tokenizer, token-for-token equal to Hugging Face's.

    Steps (as ``transformers.BertTokenizer``): delete control chars, \\x00 and
    U+FFFD; turn every whitespace char into a space; put spaces around CJK
    ideographs; if ``do_lower_case``, NFD-decompose, drop accents and
    lower-case; split on spaces and around punctuation; then split each word
    greedily into the longest vocab pieces ('##' marks a continuation). A word
    that cannot be split, or has more than ``word_maxlen`` chars, becomes
    ``[UNK]``. ``word_maxlen`` defaults to 100 as in Hugging Face (bert4keras
    used 200 and kept such words whole).

    Differences from Hugging Face: special tokens written in the text (e.g. the
    five chars "[SEP]") are tokenized like any other text, as bert4keras did.

    ``pre_tokenize`` (WoBERT): a callable text -> words, e.g.
    ``lambda s: jieba.cut(s, HMM=False)``. It receives the lower-cased text (if
    ``do_lower_case``); each word found in the vocab becomes one token and any
    other word goes through the steps above.

    ``token_translate``: a dict applied to tokens after tokenization (and
    reversed by ``decode``).

    Args:
        token_dict: ``{token: id}`` or the path of a vocab file.
        do_lower_case: lower-case and strip accents, as uncased BERT vocabularies expect.
        word_maxlen: words longer than this many chars become ``[UNK]``.
        token_start: added before each text (None: nothing).
        token_end: added after each text (None: nothing).
        pre_tokenize: a callable text -> words, see above.
        token_translate: a dict applied to tokens after tokenization.

    Example:
        >>> vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4,
        ...          "un": 5, "##aff": 6, "##able": 7, "中": 8, "国": 9, ",": 10}
        >>> tokenizer = Tokenizer(vocab, do_lower_case=True)
        >>> tokenizer.tokenize("UNAFFABLE,中国")
        ['[CLS]', 'un', '##aff', '##able', ',', '中', '国', '[SEP]']
        >>> tokenizer.encode("中国", "unaffable")
        ([2, 8, 9, 3, 5, 6, 7, 3], [0, 0, 0, 0, 1, 1, 1, 1])
        >>> tokenizer.decode([2, 8, 9, 3])
        '中国'
    """

    def __init__(
        self,
        token_dict: dict[str, int] | PathLike,
        do_lower_case: bool = False,
        word_maxlen: int = 100,
        token_start: str | None = "[CLS]",
        token_end: str | None = "[SEP]",
        pre_tokenize: Callable[[str], Iterable[str]] | None = None,
        token_translate: dict[str, str] | None = None,
    ):
        super().__init__(token_start, token_end, pre_tokenize, token_translate)
        if isinstance(token_dict, (str, os.PathLike)):
            token_dict = load_vocab(token_dict)
        if not isinstance(token_dict, dict) or not token_dict:
            raise TypeError("token_dict must be a non-empty {token: id} dict or a vocab file path")
        if not isinstance(word_maxlen, int) or word_maxlen < 1:
            raise ValueError(f"word_maxlen must be a positive int, got {word_maxlen!r}")
        self._token_dict = token_dict
        self._token_dict_inv = {i: t for t, i in token_dict.items()}
        self._do_lower_case = bool(do_lower_case)
        self._word_maxlen = word_maxlen
        # No vocab token is longer than this, so longer candidates are skipped.
        self._longest_token = max(len(t) for t in token_dict)

        for name in ("start", "end"):
            token = getattr(self, f"_token_{name}")
            if token is not None and token not in token_dict:
                raise ValueError(f"token_{name}={token!r} is not in the vocabulary")
        self.pad_id = token_dict.get(self._token_pad)
        self.unk_id = token_dict.get(self._token_unk)
        self.mask_id = token_dict.get(self._token_mask)
        self.start_id = None if token_start is None else token_dict[token_start]
        self.end_id = None if token_end is None else token_dict[token_end]

    @property
    def token_dict(self) -> dict[str, int]:
        return self._token_dict

    @property
    def vocab_size(self) -> int:
        return max(self._token_dict.values()) + 1

    @property
    def _vocab_size(self) -> int:
        """bert4keras's name for `vocab_size`, which its scripts read."""
        return self.vocab_size

    def token_to_id(self, token: str) -> int:
        """The token's id; unknown tokens get the ``[UNK]`` id (KeyError if the
        vocab has no ``[UNK]``)."""
        token_id = self._token_dict.get(token, self.unk_id)
        if token_id is None:
            raise KeyError(f"token {token!r} is not in the vocabulary, which has no [UNK] token")
        return token_id

    def id_to_token(self, i: int) -> str:
        try:
            return self._token_dict_inv[int(i)]
        except KeyError:
            raise IndexError(
                f"token id {i!r} is not in the vocabulary (ids 0..{self.vocab_size - 1})"
            ) from None

    # -- tokenization ------------------------------------------------------
    def _tokenize_with_spans(self, text: str) -> list[_Span]:
        positions = list(range(len(text)))
        if self._pre_tokenize is None:
            return self._bert_tokens(text, positions)

        # WoBERT: the pre-tokenizer sees the lower-cased text; we find each
        # word in it to keep track of where its chars came from.
        if self._do_lower_case:
            folded_chars, folded_positions = [], []
            for ch, pos in zip(text, positions):
                folded = _fold_char(ch)
                folded_chars.append(folded)
                folded_positions.extend([pos] * len(folded))
            folded_text = "".join(folded_chars)
        else:
            folded_text, folded_positions = text, positions

        spans: list[_Span] = []
        cursor = 0
        for word in self._pre_tokenize(folded_text):
            if not word:
                continue
            start = folded_text.find(word, cursor)
            if start < 0:
                raise ValueError(
                    f"pre_tokenize returned {word!r}, which is not the next part of the "
                    f"text after char {cursor}: it must return pieces of its input in order"
                )
            end = start + len(word)
            if start > cursor:  # text the pre-tokenizer skipped is not lost
                spans += self._bert_tokens(folded_text[cursor:start], folded_positions[cursor:start])
            if word in self._token_dict:
                spans.append((word, _dedupe(folded_positions[start:end])))
            else:
                spans += self._bert_tokens(word, folded_positions[start:end])
            cursor = end
        if cursor < len(folded_text):
            spans += self._bert_tokens(folded_text[cursor:], folded_positions[cursor:])
        return spans

    def _bert_tokens(self, text: str, positions: Sequence[int]) -> list[_Span]:
        """Basic tokenization + WordPiece of ``text``; ``positions[i]`` is where
        ``text[i]`` sits in the original text."""
        spans: list[_Span] = []
        for word, word_positions in self._split_words(text, positions):
            for token, start, end in self._word_piece(word):
                spans.append((token, _dedupe(word_positions[start:end])))
        return spans

    def _split_words(self, text: str, positions: Sequence[int]) -> list[tuple[str, list[int]]]:
        # Normalized chars with their source positions; ' ' separates words.
        chars: list[tuple[str, int]] = []
        for ch, pos in zip(text, positions):
            ch = _clean_char(ch)
            if not ch:
                continue
            is_cjk = _is_cjk_character(ch)
            if is_cjk:
                chars.append((" ", pos))
            normalized = _fold_char(ch) if self._do_lower_case else ch
            chars.extend((c, pos) for c in normalized)
            if is_cjk:
                chars.append((" ", pos))

        words: list[tuple[str, list[int]]] = []
        word, word_positions = [], []

        def flush():
            if word:
                words.append(("".join(word), list(word_positions)))
                word.clear()
                word_positions.clear()

        for c, pos in chars:
            if _is_space(c):
                flush()
            elif _is_punctuation(c):
                flush()
                words.append((c, [pos]))
            else:
                word.append(c)
                word_positions.append(pos)
        flush()
        return words

    def _word_piece(self, word: str) -> list[tuple[str, int, int]]:
        """Greedy longest-match-first split: ``[(token, start, end), ...]``."""
        whole_word_unknown = [(self._token_unk, 0, len(word))]
        if len(word) > self._word_maxlen:
            return whole_word_unknown
        pieces, start = [], 0
        while start < len(word):
            end = min(len(word), start + self._longest_token)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self._token_dict:
                    break
                end -= 1
            if end == start:
                return whole_word_unknown
            pieces.append((piece, start, end))
            start = end
        return pieces

    # -- decoding ------------------------------------------------------------
    def decode(self, ids: Iterable[int], tokens: Sequence[str] | None = None) -> str:
        """Readable text from ids (or from ``tokens`` if given).

        Special tokens are dropped, '##' pieces are glued to the previous one,
        CJK chars are joined without spaces and other words with one space;
        no space goes before punctuation, and after punctuation only after
        ``, . ! ? ; :`` (but not inside numbers such as 3.14).
        """
        if tokens is None:
            tokens = self.ids_to_tokens(ids)
        text = ""
        for token in tokens:
            token = self._token_translate_inv.get(token, token)
            if not token or _is_special(token):
                continue
            if token[:2] == "##" and len(token) > 2:
                text += token[2:]
                continue
            if text and self._space_between(text, token):
                text += " "
            text += token
        return text

    @staticmethod
    def _space_between(text: str, token: str) -> bool:
        last, first = text[-1], token[0]
        if _is_cjk_character(last) or _is_cjk_character(first) or _is_punctuation(first):
            return False
        if _is_punctuation(last):
            in_number = last in ".,:" and text[-2:-1].isdigit() and first.isdigit()
            return last in ",.!?;:" and not in_number
        return True

    # -- bert4keras helpers ------------------------------------------------------
    stem = staticmethod(_stem)
    _is_space = staticmethod(_is_space)
    _is_punctuation = staticmethod(_is_punctuation)
    _is_cjk_character = staticmethod(_is_cjk_character)
    _is_control = staticmethod(_is_control)
    _is_special = staticmethod(_is_special)


# ---------------------------------------------------------------------------
# SentencePiece
# ---------------------------------------------------------------------------


class SpTokenizer(TokenizerBase):
    """A SentencePiece model with ``Tokenizer``'s interface (for T5 / mT5).

    ``encode(text)`` gives the ids of ``SentencePieceProcessor.encode(text)``
    followed by the ``token_end`` id ('</s>' = 1 for T5) when ``token_end`` is
    set. ``pre_tokenize``, if given, is applied first and its words are joined
    with spaces (as bert4keras did). ``pad_id``/``unk_id`` are the model's own;
    ``mask_id`` is None unless the model has a '[MASK]' piece.

    ``rematch`` uses sentencepiece's piece offsets; byte-fallback pieces map
    to the char they are part of, the leading '▁' that sentencepiece adds maps
    to ``[]``.

    Args:
        sp_model_path: the sentencepiece model file.
        token_start: a piece added before each text (None: nothing).
        token_end: a piece added after each text (T5's '</s>').
        pre_tokenize: a callable text -> words, joined with spaces before sentencepiece.
        token_translate: a dict applied to pieces after tokenization.

    Example (with the trimmed mT5 model from ../shared/data):
        >>> tokenizer = SpTokenizer("../shared/data/vocab/mt5_cn_trimmed/sentencepiece_cn.model")  # doctest: +SKIP
        >>> tokenizer.tokenize("我爱北京")  # doctest: +SKIP
        ['▁', '我爱', '北京', '</s>']
        >>> tokenizer.encode("我爱北京")  # doctest: +SKIP
        ([259, 23609, 2443, 1], [0, 0, 0, 0])
        >>> tokenizer.decode([259, 23609, 2443, 1])  # doctest: +SKIP
        '我爱北京'
        >>> tokenizer.rematch("我爱北京", ['▁', '我爱', '北京', '</s>'])  # doctest: +SKIP
        [[], [0, 1], [2, 3], []]
    """

    def __init__(
        self,
        sp_model_path: PathLike,
        token_start: str | None = None,
        token_end: str | None = "</s>",
        pre_tokenize: Callable[[str], Iterable[str]] | None = None,
        token_translate: dict[str, str] | None = None,
    ):
        super().__init__(token_start, token_end, pre_tokenize, token_translate)
        import sentencepiece as spm

        if not os.path.isfile(sp_model_path):
            raise FileNotFoundError(f"sentencepiece model not found: {os.fspath(sp_model_path)!r}")
        self.sp_model = spm.SentencePieceProcessor()
        self.sp_model.Load(os.fspath(sp_model_path))
        self._vocab_size = self.sp_model.get_piece_size()

        def piece_id(piece: str | None) -> int | None:
            if piece is None:
                return None
            i = self.sp_model.piece_to_id(piece)  # unknown pieces give unk_id
            return i if self.sp_model.id_to_piece(i) == piece else None

        for name in ("start", "end"):
            token = getattr(self, f"_token_{name}")
            if token is not None and piece_id(token) is None:
                raise ValueError(f"token_{name}={token!r} is not a piece of {os.fspath(sp_model_path)!r}")
        pad, unk = self.sp_model.pad_id(), self.sp_model.unk_id()
        self.pad_id = pad if pad >= 0 else None
        self.unk_id = unk if unk >= 0 else None
        if self.pad_id is not None:
            self._token_pad = self.sp_model.id_to_piece(self.pad_id)
        if self.unk_id is not None:
            self._token_unk = self.sp_model.id_to_piece(self.unk_id)
        self.mask_id = piece_id(self._token_mask)
        self.start_id = piece_id(token_start)
        self.end_id = piece_id(token_end)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def token_to_id(self, token: str) -> int:
        """The piece's id; unknown pieces get the model's unk id."""
        return self.sp_model.piece_to_id(token)

    def id_to_token(self, i: int) -> str:
        i = int(i)
        if not 0 <= i < self._vocab_size:
            raise IndexError(f"token id {i} is not in the sentencepiece vocab (ids 0..{self._vocab_size - 1})")
        return self.sp_model.id_to_piece(i)

    def decode(self, ids: Iterable[int]) -> str:
        """Text from ids. Control ids (pad, '</s>') are skipped by sentencepiece;
        ids >= vocab_size (models whose embedding is padded beyond the
        sentencepiece vocab, e.g. mT5 with keep_tokens) are skipped too."""
        ids = [int(i) for i in ids if 0 <= int(i) < self._vocab_size]
        if self._token_translate_inv:
            pieces = [self.sp_model.id_to_piece(i) for i in ids]
            ids = [self.sp_model.piece_to_id(self._token_translate_inv.get(p, p)) for p in pieces]
        return self.sp_model.decode(ids)

    def _prepare(self, text: str) -> str:
        if self._pre_tokenize is not None:
            text = " ".join(self._pre_tokenize(text))
        return text

    def _tokenize(self, text: str) -> list[str]:
        return self.sp_model.encode(self._prepare(text), out_type=str)

    def _tokenize_with_spans(self, text: str) -> list[_Span]:
        if self._pre_tokenize is not None:
            raise NotImplementedError("SpTokenizer.rematch does not support pre_tokenize")
        try:
            proto = self.sp_model.encode(text, return_type="proto")
        except TypeError:  # sentencepiece < 0.2.1
            proto = self.sp_model.encode(text, out_type="immutable_proto")
        # sentencepiece reports byte offsets into the UTF-8 text.
        char_at_byte: list[int] = []
        for i, ch in enumerate(text):
            char_at_byte.extend([i] * len(ch.encode("utf-8")))
        char_at_byte.append(len(text))
        spans: list[_Span] = []
        for piece in proto.pieces:
            first, last = char_at_byte[piece.begin], char_at_byte[piece.end]
            if first == last and first < len(text) and (
                self.sp_model.is_byte(piece.id) or piece.piece.strip("\u2581")
            ):
                # byte-fallback pieces of one char, and the pieces NFKC expands one char into ('¼' -> '1', '⁄',
                # '4'), come with an empty span at that char: they all map to it
                last = first + 1
            spans.append((piece.piece, list(range(first, last))))
        return spans
