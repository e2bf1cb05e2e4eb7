"""`SpTokenizer`: a SentencePiece model (T5 / mT5) behind `Tokenizer`'s interface, with `rematch` from
sentencepiece's piece offsets."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from .base import TokenizerBase, _Span
from .vocab import PathLike


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
