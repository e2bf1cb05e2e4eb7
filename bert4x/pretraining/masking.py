"""Chinese whole-word masking: jieba decides the words, and a word's tokens are masked together or not at all."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

import numpy as np

__all__ = ["jieba_words", "WordPieceEncoder", "whole_word_mask"]


def jieba_words(text: str) -> list[str]:
    """jieba's segmentation of `text` (precise mode, HMM on for unseen words).

    Args:
        text: the text to segment.

    Returns:
        Its words, in order.
    """
    import jieba

    jieba.setLogLevel(logging.WARNING)
    return jieba.lcut(text)


class WordPieceEncoder:
    """Encodes text into token ids and word-start flags: every word (from `segment`, jieba by default) is
    tokenized on its own, so no token straddles two words and a word's tokens are contiguous.

    `tokenizer` is a bert4x `Tokenizer` (anything with `encode` and `start_id` / `end_id`). Token ids of frequent
    words are cached (`cache_size` words).

    Args:
        tokenizer: a bert4x `Tokenizer` (anything with `encode` and `start_id` / `end_id`).
        segment: word segmentation (jieba by default).
        cache_size: words whose token ids are cached.

    Example:
    >>> from bert4x.tokenizers import Tokenizer
    >>> vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "我", "爱", "北", "京"])}
    >>> ids, starts = WordPieceEncoder(Tokenizer(vocab))("我爱北京")
    >>> ids, starts                                    # jieba: 我 / 爱 / 北京
    ([5, 6, 7, 8], [True, True, True, False])
    """

    def __init__(self, tokenizer, segment: Callable[[str], Iterable[str]] = jieba_words, cache_size: int = 500_000):
        self.tokenizer = tokenizer
        self.segment = segment
        self.cache_size = cache_size
        self._cache: dict[str, list[int]] = {}
        self._strip_start = int(getattr(tokenizer, "start_id", None) is not None)
        self._strip_end = int(getattr(tokenizer, "end_id", None) is not None)

    def word_ids(self, word: str) -> list[int]:
        ids = self._cache.get(word)
        if ids is None:
            ids = self.tokenizer.encode(word)[0]
            ids = ids[self._strip_start: len(ids) - self._strip_end]
            if len(self._cache) < self.cache_size:
                self._cache[word] = ids
        return ids

    def __call__(self, text: str) -> tuple[list[int], list[bool]]:
        token_ids: list[int] = []
        word_starts: list[bool] = []
        for word in self.segment(text):
            ids = self.word_ids(word)
            token_ids.extend(ids)
            word_starts.extend([True] + [False] * (len(ids) - 1) if ids else [])
        return token_ids, word_starts


def whole_word_mask(
    token_ids: Sequence[int] | np.ndarray,
    word_starts: Sequence[bool] | np.ndarray,
    rng: np.random.Generator,
    mask_id: int,
    random_ids: np.ndarray,
    mask_rate: float = 0.15,
    replace_probs: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> tuple[np.ndarray, np.ndarray]:
    """Masks whole words of one sequence (no special tokens in it) for MLM.

    round(mask_rate * length) tokens (at least one) are chosen word by word, in random word order, skipping a word
    that would overshoot the count (as Google's create_pretraining_data does), so a word is never split. Each chosen
    token becomes `mask_id`, a random id from `random_ids`, or stays itself, with `replace_probs`
    (80/10/10 by default).

    Returns `(input_ids, chosen)`: the corrupted ids and a boolean mask of the tokens to predict.

    Args:
        token_ids: the sequence's token ids, without special tokens.
        word_starts: per token, whether it starts a word.
        rng: the random generator.
        mask_id: the [MASK] id.
        random_ids: ids to draw random replacements from.
        mask_rate: share of tokens chosen.
        replace_probs: (mask, random id, keep) probabilities of a chosen token; they must sum to 1.

    Example:
    >>> rng = np.random.default_rng(0)
    >>> ids, chosen = whole_word_mask([5, 6, 7, 8], [1, 1, 1, 0], rng, mask_id=4, random_ids=np.arange(5, 9),
    ...                               mask_rate=0.5)
    >>> int(chosen.sum())
    2
    """
    token_ids = np.asarray(token_ids)
    starts = np.asarray(word_starts, dtype=bool)
    if token_ids.shape != starts.shape or token_ids.ndim != 1:
        raise ValueError(
            f"token_ids {token_ids.shape} and word_starts {starts.shape} must be 1-D sequences of one length."
        )
    if not 0.0 < mask_rate < 1.0:
        raise ValueError(f"mask_rate must be in (0, 1), got {mask_rate}.")
    if len(replace_probs) != 3 or abs(sum(replace_probs) - 1.0) > 1e-6 or min(replace_probs) < 0:
        raise ValueError(
            f"replace_probs (mask, random, keep) must be 3 probabilities summing to 1, got {replace_probs}.")
    chosen = np.zeros(len(token_ids), dtype=bool)
    if len(token_ids) == 0:
        return token_ids.copy(), chosen
    if not starts[0]:
        raise ValueError("word_starts[0] must be True: a sequence cannot begin inside a word.")
    # Plain Python ints in the loop: it runs once per sequence of every batch, numpy scalars would dominate.
    bounds = np.flatnonzero(starts).tolist() + [len(token_ids)]
    budget = max(1, int(round(mask_rate * len(token_ids))))
    for w in rng.permutation(len(bounds) - 1).tolist():
        begin, end = bounds[w], bounds[w + 1]
        if end - begin <= budget:
            chosen[begin:end] = True
            budget -= end - begin
            if budget == 0:
                break
    inputs = token_ids.copy()
    positions = np.flatnonzero(chosen)
    draw = rng.random(len(positions))
    to_mask = positions[draw < replace_probs[0]]
    to_random = positions[(draw >= replace_probs[0]) & (draw < replace_probs[0] + replace_probs[1])]
    inputs[to_mask] = mask_id
    inputs[to_random] = rng.choice(random_ids, size=len(to_random))
    return inputs, chosen
