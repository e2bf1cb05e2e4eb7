"""`TokenizerBase`: the surface `Tokenizer` and `SpTokenizer` share (special tokens, `tokenize`, `encode` with
truncation, id look-ups, `rematch`), and the truncation rule it applies."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence


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
            >>> from bert4x.tokenizers import Tokenizer
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
