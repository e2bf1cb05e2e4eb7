"""The on-disk pretraining pipeline: sentences -> packed, memory-mapped token rows -> masked batches.

`preprocess_corpus(sentences, tokenizer, prefix, seq_len)` streams sentences (any iterable: the corpus never has to
fit in memory) through jieba + the tokenizer and packs consecutive sentences into rows of `seq_len - 3` tokens
(room for [CLS] and two [SEP]), written to `prefix.tokens` / `prefix.flags` with a `prefix.json` description.
`PretrainingDataset` is a `keras.utils.PyDataset` over those files: each epoch reads the rows in a permutation drawn
from (seed, epoch), and batch i of epoch e is masked with a generator seeded by (seed, e, i), so a run is
reproducible whatever the number of loader workers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import keras
import numpy as np

from bert4x.pretraining.masking import WordPieceEncoder, jieba_words, whole_word_mask

logger = logging.getLogger("bert4x")

__all__ = ["preprocess_corpus", "PackedCorpus", "PretrainingDataset", "split_rows", "OBJECTIVES"]

WORD_START, SENTENCE_START = 1, 2
FORMAT = "bert4x-packed-corpus"
OBJECTIVES = ("mlm", "lm", "unilm")


@dataclasses.dataclass
class PackedCorpus:
    """A packed corpus on disk: `tokens` and `flags` are read-only memory maps of shape [rows, capacity].

    Args:
        prefix: the path prefix of the files (`.json`, `.tokens`, `.flags`); use `PackedCorpus.open(prefix)`.
        meta: the `.json` description.
        tokens: token ids `[rows, capacity]`.
        flags: word-start and sentence-start flags `[rows, capacity]`.
    """

    prefix: str
    meta: dict
    tokens: np.ndarray
    flags: np.ndarray

    @classmethod
    def open(cls, prefix: str | os.PathLike) -> PackedCorpus:
        """Opens the files that `preprocess_corpus` wrote under `prefix`."""
        prefix = str(prefix)
        meta_path = prefix + ".json"
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"No packed corpus at {prefix!r}: {meta_path} is missing (run preprocess_corpus).")
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path} is not a {FORMAT} description.")
        shape = (meta["num_rows"], meta["capacity"])
        tokens = np.memmap(prefix + ".tokens", dtype=meta["dtype"], mode="r", shape=shape)
        flags = np.memmap(prefix + ".flags", dtype=np.uint8, mode="r", shape=shape)
        return cls(prefix, meta, tokens, flags)

    def __len__(self) -> int:
        return self.meta["num_rows"]

    @property
    def seq_len(self) -> int:
        return self.meta["seq_len"]


def preprocess_corpus(
    sentences: Iterable[str],
    tokenizer,
    prefix: str | os.PathLike,
    seq_len: int = 128,
    segment: Callable[[str], Iterable[str]] = jieba_words,
    log_every: int = 100_000,
) -> PackedCorpus:
    """Tokenizes and packs `sentences` into rows of at most `seq_len - 3` tokens, streaming them to disk.

    Consecutive sentences share a row while they fit. A sentence longer than a row is cut at word boundaries into
    several rows (a single word longer than a row is cut inside; both are counted in the description, nothing is
    dropped). Each token carries flags: it starts a (jieba) word, it starts a sentence.

    `tokenizer` must map [PAD] to id 0 (the models treat id 0 as padding) and have [CLS], [SEP] and [MASK].

    Args:
        sentences: the text, one sentence at a time (e.g. `iter_corpus_sentences`).
        tokenizer: a bert4x `Tokenizer` with [PAD] = 0, [CLS], [SEP] and [MASK].
        prefix: path prefix of the files written (`.json`, `.tokens`, `.flags`).
        seq_len: model sequence length; rows hold `seq_len - 3` tokens (room for [CLS] and two [SEP]).
        segment: word segmentation, for whole-word masking.
        log_every: log progress every this many sentences.

    Returns:
        The `PackedCorpus` written.

    Example:
    >>> texts = ["我爱北京。", "天安门上太阳升。"]
    >>> corpus = preprocess_corpus(texts, tokenizer, "/tmp/corpus", seq_len=32)  # doctest: +SKIP
    >>> len(corpus), corpus.meta["num_tokens"]  # doctest: +SKIP
    (1, 11)
    """
    for name in ("pad_id", "start_id", "end_id", "mask_id"):
        if getattr(tokenizer, name, None) is None:
            raise ValueError(f"The tokenizer has no {name.replace('_id', '')} token; pretraining needs [PAD], [CLS], "
                             "[SEP] and [MASK].")
    if tokenizer.pad_id != 0:
        raise ValueError(f"The tokenizer's [PAD] id is {tokenizer.pad_id}; bert4x models treat id 0 as padding.")
    if seq_len < 8:
        raise ValueError(f"seq_len={seq_len} is too short to pack sentences (at least 8).")
    vocab_size = int(tokenizer.vocab_size)
    dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    capacity = seq_len - 3
    prefix = str(prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    encode = WordPieceEncoder(tokenizer, segment)
    stats = dict(num_rows=0, num_tokens=0, num_sentences=0, empty_sentences=0, long_sentences=0, words_cut=0)
    row_ids: list[int] = []
    row_flags: list[int] = []
    pending_tokens: list[np.ndarray] = []
    pending_flags: list[np.ndarray] = []

    with open(prefix + ".tokens", "wb") as tokens_file, open(prefix + ".flags", "wb") as flags_file:

        def write_pending():
            if pending_tokens:
                tokens_file.write(np.stack(pending_tokens).tobytes())
                flags_file.write(np.stack(pending_flags).tobytes())
                pending_tokens.clear()
                pending_flags.clear()

        def flush_row():
            if not row_ids:
                return
            tokens = np.zeros(capacity, dtype=dtype)
            flags = np.zeros(capacity, dtype=np.uint8)
            tokens[: len(row_ids)] = row_ids
            flags[: len(row_flags)] = row_flags
            pending_tokens.append(tokens)
            pending_flags.append(flags)
            stats["num_rows"] += 1
            stats["num_tokens"] += len(row_ids)
            row_ids.clear()
            row_flags.clear()
            if len(pending_tokens) >= 4096:
                write_pending()

        for sentence in sentences:
            ids, starts = encode(sentence)
            if not ids:
                stats["empty_sentences"] += 1
                continue
            stats["num_sentences"] += 1
            flags = [WORD_START * s for s in starts]
            flags[0] |= SENTENCE_START
            if len(row_ids) + len(ids) > capacity:
                flush_row()
            if len(ids) > capacity:
                stats["long_sentences"] += 1
                while len(ids) > capacity:
                    # Cut at the last word start that fits; inside a word only if one word fills the row.
                    cut = max((i for i in range(1, capacity + 1) if flags[i] & WORD_START), default=capacity)
                    if not flags[cut] & WORD_START:
                        stats["words_cut"] += 1
                    row_ids.extend(ids[:cut])
                    row_flags.extend(flags[:cut])
                    flush_row()
                    ids, flags = ids[cut:], flags[cut:]
                    flags[0] |= WORD_START
            row_ids.extend(ids)
            row_flags.extend(flags)
            if log_every and stats["num_sentences"] % log_every == 0:
                logger.info("preprocess_corpus: %d sentences, %d rows", stats["num_sentences"], stats["num_rows"])
        flush_row()
        write_pending()

    if stats["num_rows"] == 0:
        raise ValueError("preprocess_corpus: the sentences gave no tokens at all; is the corpus empty?")
    if stats["long_sentences"]:
        logger.warning("preprocess_corpus: %d sentences longer than a row (%d tokens) were cut across rows "
                       "(%d of the cuts fell inside a word).", stats["long_sentences"], capacity, stats["words_cut"])
    # Random replacements (the 10% of MLM) draw from ordinary tokens only, not [CLS], [unused1], ...
    specials = sorted(
        i for i in range(vocab_size)
        if _is_bracketed(tokenizer.id_to_token(i)) or i in (tokenizer.pad_id, tokenizer.start_id, tokenizer.end_id)
    )
    meta = dict(
        format=FORMAT, version=1, seq_len=seq_len, capacity=capacity, dtype=np.dtype(dtype).name,
        vocab_size=vocab_size, pad_id=0, cls_id=tokenizer.start_id, sep_id=tokenizer.end_id,
        mask_id=tokenizer.mask_id, special_ids=specials, **stats,
    )
    with open(prefix + ".json", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    return PackedCorpus.open(prefix)


def _is_bracketed(token) -> bool:
    return isinstance(token, str) and len(token) > 2 and token.startswith("[") and token.endswith("]")


def split_rows(num_rows: int, held_out: float | int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows): a seeded random `held_out` fraction (or count) of `range(num_rows)`.

    Args:
        num_rows: rows of the corpus.
        held_out: a fraction (below 1) or a row count; it must leave training rows.
        seed: the permutation's seed.

    Returns:
        Sorted row indices for training, and for held-out evaluation.
    """
    count = int(held_out) if held_out >= 1 else int(round(held_out * num_rows))
    if not 0 <= count < num_rows:
        raise ValueError(f"held_out={held_out} leaves no training rows out of {num_rows}.")
    order = np.random.default_rng([seed, 7]).permutation(num_rows)
    return np.sort(order[count:]), np.sort(order[:count])


class PretrainingDataset(keras.utils.PyDataset):
    """Batches of a packed corpus for one objective, shuffled per epoch and deterministic given `seed`.

    Objectives (the model is built with `with_mlm='linear'`; see `build_pretraining_model`):
      'mlm':   inputs `[CLS] row [SEP]` with whole-word masking, targets the original ids, weights on masked tokens.
      'lm':    inputs `[CLS] row [SEP]`, targets the next token (application='lm').
      'unilm': inputs `[CLS] source [SEP] target [SEP]` (the row cut at a sentence boundary), segment ids 0/1,
               targets the next token of the target part (application='unilm').

    Each item is `((token_ids, segment_ids), targets, sample_weight)` (`with_segments=False`: token_ids alone).
    `rows` restricts the dataset to some rows (see `split_rows`); `shuffle=False` reads them in order (held-out
    evaluation). With `drop_remainder` (default) every batch is full: the rows left over by an epoch are not lost,
    the next epoch's permutation puts them elsewhere. `shard=(index, count)` keeps every count-th row of the
    permutation, for one host of a multi-host job (each host then yields its own part of the global batch).
    Other keyword arguments (`workers`, `use_multiprocessing`, `max_queue_size`) go to `keras.utils.PyDataset`.

    Args:
        corpus: a `PackedCorpus` or its path prefix.
        batch_size: rows per batch (per host with `shard`).
        objective: 'mlm', 'lm' or 'unilm'.
        seed: seed of the shuffling and the masking.
        rows: the row indices to use (default: all).
        shuffle: a new permutation every epoch; False reads rows in order.
        mask_rate: share of tokens predicted ('mlm').
        replace_probs: (mask, random token, keep) probabilities of a predicted token ('mlm').
        with_segments: inputs are (token_ids, segment_ids); False gives token_ids alone.
        drop_remainder: only full batches.
        shard: `(index, count)`: this host's share of a multi-host job.
        **kwargs: `workers`, `use_multiprocessing`, `max_queue_size` of `keras.utils.PyDataset`.

    Example:
    >>> data = PretrainingDataset("/tmp/corpus", batch_size=32, objective="mlm", seed=1)   # doctest: +SKIP
    >>> (token_ids, segment_ids), targets, weights = data[0]                               # doctest: +SKIP
    """

    def __init__(
        self,
        corpus: str | os.PathLike | PackedCorpus,
        batch_size: int,
        objective: str = "mlm",
        seed: int = 0,
        rows: np.ndarray | None = None,
        shuffle: bool = True,
        mask_rate: float = 0.15,
        replace_probs: tuple[float, float, float] = (0.8, 0.1, 0.1),
        with_segments: bool = True,
        drop_remainder: bool = True,
        shard: tuple[int, int] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}.")
        self.corpus = corpus if isinstance(corpus, PackedCorpus) else PackedCorpus.open(corpus)
        self.rows = np.arange(len(self.corpus)) if rows is None else np.asarray(rows, dtype=np.int64)
        if len(self.rows) and (self.rows.min() < 0 or self.rows.max() >= len(self.corpus)):
            raise ValueError(f"rows must index the corpus's {len(self.corpus)} rows.")
        if shard is not None:
            index, count = shard
            if not 0 <= index < count:
                raise ValueError(f"shard=(index, count) needs 0 <= index < count, got {shard}.")
        self.shard = shard
        self.batch_size = int(batch_size)
        if self.batch_size < 1 or (drop_remainder and self._rows_per_epoch() < self.batch_size):
            raise ValueError(
                f"batch_size={batch_size} must be positive and at most the {self._rows_per_epoch()} rows available."
            )
        self.objective = objective
        self.seed = int(seed)
        self.shuffle = shuffle
        self.mask_rate = mask_rate
        self.replace_probs = tuple(replace_probs)
        self.with_segments = with_segments
        self.drop_remainder = drop_remainder
        self.epoch = 0
        meta = self.corpus.meta
        self.seq_len = meta["seq_len"]
        self.cls_id, self.sep_id, self.mask_id = meta["cls_id"], meta["sep_id"], meta["mask_id"]
        self.random_ids = np.setdiff1d(np.arange(meta["vocab_size"]), np.asarray(meta["special_ids"], dtype=np.int64))
        self._order_cache: tuple[int, np.ndarray] | None = None

    def _rows_per_epoch(self) -> int:
        if self.shard is None:
            return len(self.rows)
        index, count = self.shard
        return len(range(index, len(self.rows), count))

    def __len__(self) -> int:
        rows = self._rows_per_epoch()
        return rows // self.batch_size if self.drop_remainder else math.ceil(rows / self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """The rows of `epoch`, in reading order."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            rows = self.rows
            if self.shuffle:
                rows = rows[np.random.default_rng([self.seed, epoch]).permutation(len(rows))]
            if self.shard is not None:
                rows = rows[self.shard[0]:: self.shard[1]]
            self._order_cache = (epoch, rows)
        return self._order_cache[1]

    def on_epoch_end(self):
        self.epoch += 1

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range for {len(self)} batches")
        epoch = self.epoch
        rows = self.order(epoch)[index * self.batch_size: (index + 1) * self.batch_size]
        rng = np.random.default_rng([self.seed, epoch, index])
        return self.make_batch(rows, rng)

    def make_batch(self, rows: np.ndarray, rng: np.random.Generator):
        """Builds one batch from corpus rows (in the given order)."""
        read = np.sort(rows)  # sequential reads from the memory map, then back to the requested order
        back = np.searchsorted(read, rows)
        tokens = np.asarray(self.corpus.tokens[read], dtype=np.int32)[back]
        flags = np.asarray(self.corpus.flags[read])[back]
        batch = len(rows)
        token_ids = np.zeros((batch, self.seq_len), dtype=np.int32)
        segment_ids = np.zeros((batch, self.seq_len), dtype=np.int32)
        targets = np.zeros((batch, self.seq_len), dtype=np.int32)
        weights = np.zeros((batch, self.seq_len), dtype=np.float32)
        for b in range(batch):
            length = int(np.count_nonzero(tokens[b]))
            content, content_flags = tokens[b, :length], flags[b, :length]
            if self.objective == "mlm":
                masked, chosen = whole_word_mask(
                    content, content_flags & WORD_START, rng, self.mask_id, self.random_ids,
                    self.mask_rate, self.replace_probs,
                )
                token_ids[b, : length + 2] = [self.cls_id, *masked, self.sep_id]
                targets[b, 1: length + 1] = content
                weights[b, 1: length + 1] = chosen
                continue
            if self.objective == "lm":
                sequence = [self.cls_id, *content, self.sep_id]
                source_length = 1  # predict every token after [CLS]
            else:
                cut = self._unilm_cut(content_flags, rng)
                sequence = [self.cls_id, *content[:cut], self.sep_id, *content[cut:], self.sep_id]
                source_length = cut + 2
                segment_ids[b, source_length: len(sequence)] = 1
            token_ids[b, : len(sequence)] = sequence
            # Position i predicts token i + 1.
            targets[b, : len(sequence) - 1] = sequence[1:]
            weights[b, source_length - 1: len(sequence) - 1] = 1.0
        inputs = (token_ids, segment_ids) if self.with_segments else token_ids
        return inputs, targets, weights

    @staticmethod
    def _unilm_cut(flags: np.ndarray, rng: np.random.Generator) -> int:
        """Where the source ends: a random sentence start after the first token, else a random word start."""
        for kind in (SENTENCE_START, WORD_START):
            candidates = np.flatnonzero(flags[1:] & kind) + 1
            if len(candidates):
                return int(rng.choice(candidates))
        return max(1, len(flags) // 2)
