"""`Tokenizer`: BERT's WordPiece tokenizer (token-for-token equal to Hugging Face's `BertTokenizer`), with
WoBERT-style word-level `pre_tokenize`."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence

from .base import TokenizerBase, _Span
from .chars import (
    _clean_char,
    _fold_char,
    _is_cjk_character,
    _is_control,
    _is_punctuation,
    _is_space,
    _is_special,
    _stem,
)
from .vocab import PathLike, load_vocab


def _dedupe(positions: Iterable[int]) -> list[int]:
    """Drop repeats from a non-decreasing list of char positions."""
    out: list[int] = []
    for p in positions:
        if not out or out[-1] != p:
            out.append(p)
    return out


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
