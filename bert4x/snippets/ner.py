"""NER helpers in numpy: Viterbi decoding for the CRF, BIO tags <-> spans, GlobalPointer labels <-> spans, entity F1.

Spans are `(type, start, end)` tuples with an inclusive `end`, over token positions (as in bert4keras's examples).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

__all__ = [
    "ViterbiDecoder",
    "bio_tags",
    "bio_to_spans",
    "spans_to_bio",
    "global_pointer_labels",
    "global_pointer_sparse_labels",
    "decode_global_pointer",
    "entity_f1",
]

Span = tuple  # (type, start, end), end inclusive


class ViterbiDecoder:
    """The best label path under emission scores and a transition matrix `trans[from, to]` (a CRF's `trans`).

    `starts` / `ends`: label ids allowed at the first / last position (e.g. only 'O' and 'B-*' may start).

    Args:
        trans: transition scores `[num_labels, num_labels]`, `trans[from, to]`.
        starts: label ids allowed at the first position (default: all).
        ends: label ids allowed at the last position (default: all).

    Example:
    >>> decoder = ViterbiDecoder(np.array([[0.0, -5.0], [0.0, 0.0]]))
    >>> decoder.decode(np.array([[1.0, 0.0], [0.0, 1.0]])).tolist()
    [0, 0]
    """

    def __init__(self, trans, starts: Iterable[int] | None = None, ends: Iterable[int] | None = None):
        self.trans = np.asarray(trans, dtype="float64")
        if self.trans.ndim != 2 or self.trans.shape[0] != self.trans.shape[1]:
            raise ValueError(f"ViterbiDecoder: trans must be a square matrix, got shape {self.trans.shape}.")
        self.num_labels = self.trans.shape[0]
        self.starts = None if starts is None else sorted(set(starts))
        self.ends = None if ends is None else sorted(set(ends))
        for name, ids in (("starts", self.starts), ("ends", self.ends)):
            if ids is not None and (not ids or not all(0 <= i < self.num_labels for i in ids)):
                raise ValueError(f"ViterbiDecoder: {name} must be label ids in [0, {self.num_labels}), got {ids}.")

    def decode(self, nodes) -> np.ndarray:
        """`nodes` `[len, num_labels]` scores of one unpadded sequence -> int label ids `[len]`."""
        nodes = np.array(nodes, dtype="float64")
        if nodes.ndim != 2 or nodes.shape[1] != self.num_labels:
            raise ValueError(f"ViterbiDecoder.decode: nodes must be [len, {self.num_labels}], got {nodes.shape}.")
        if len(nodes) == 0:
            return np.zeros((0,), dtype="int64")
        if self.starts is not None:
            nodes[0, np.setdiff1d(np.arange(self.num_labels), self.starts)] = -np.inf
        if self.ends is not None:
            nodes[-1, np.setdiff1d(np.arange(self.num_labels), self.ends)] = -np.inf
        score = nodes[0]
        backpointers = []
        for t in range(1, len(nodes)):
            candidates = score[:, None] + self.trans  # [from, to]
            backpointers.append(np.argmax(candidates, axis=0))
            score = candidates.max(axis=0) + nodes[t]
        path = [int(np.argmax(score))]
        for pointers in reversed(backpointers):
            path.append(int(pointers[path[-1]]))
        return np.array(path[::-1], dtype="int64")


def bio_tags(categories: Sequence[str]) -> list[str]:
    """Tag list of the bert4keras id layout: 0 = 'O', 2k+1 = 'B-' + categories[k], 2k+2 = 'I-' + categories[k].

    Args:
        categories: entity type names, in id order.

    Returns:
        The tag of each label id.

    Example:
    >>> bio_tags(["PER", "LOC"])
    ['O', 'B-PER', 'I-PER', 'B-LOC', 'I-LOC']
    """
    tags = ["O"]
    for c in categories:
        tags += [f"B-{c}", f"I-{c}"]
    return tags


def bio_to_spans(tags: Sequence[str]) -> list[Span]:
    """BIO tags -> spans. An 'I-X' that does not continue an X entity starts a new one (as conlleval does).

    Args:
        tags: one BIO tag per position.

    Returns:
        `(type, start, end)` spans, ends inclusive.

    Example:
    >>> bio_to_spans(["B-PER", "I-PER", "O", "I-LOC", "B-LOC"])
    [('PER', 0, 1), ('LOC', 3, 3), ('LOC', 4, 4)]
    """
    spans, current = [], None  # current = [type, start, end]
    for i, tag in enumerate(tags):
        if tag == "O" or not tag:
            prefix, kind = "O", None
        elif len(tag) > 2 and tag[1] == "-" and tag[0] in "BI":
            prefix, kind = tag[0], tag[2:]
        else:
            raise ValueError(f"bio_to_spans: tag {tag!r} at position {i} is not 'O', 'B-<type>' or 'I-<type>'.")
        if prefix == "I" and current is not None and current[0] == kind:
            current[2] = i
            continue
        if current is not None:
            spans.append(tuple(current))
            current = None
        if prefix in "BI":
            current = [kind, i, i]
    if current is not None:
        spans.append(tuple(current))
    return spans


def spans_to_bio(spans: Iterable[Span], length: int) -> list[str]:
    """Spans -> BIO tags of `length` positions. Overlapping spans cannot be expressed in BIO and raise.

    Args:
        spans: `(type, start, end)` spans, ends inclusive, not overlapping.
        length: number of positions.

    Returns:
        One BIO tag per position.

    Example:
    >>> spans_to_bio([("PER", 0, 1)], 3)
    ['B-PER', 'I-PER', 'O']
    """
    tags = ["O"] * length
    for kind, start, end in sorted(spans, key=lambda s: (s[1], s[2])):
        if not 0 <= start <= end < length:
            raise ValueError(f"spans_to_bio: span {(kind, start, end)} is outside [0, {length}).")
        if any(t != "O" for t in tags[start : end + 1]):
            raise ValueError(f"spans_to_bio: span {(kind, start, end)} overlaps another span; BIO cannot nest.")
        tags[start] = f"B-{kind}"
        for i in range(start + 1, end + 1):
            tags[i] = f"I-{kind}"
    return tags


def _type_index(categories: Sequence[str]) -> dict:
    return {c: i for i, c in enumerate(categories)}


def global_pointer_labels(spans: Iterable[Span], categories: Sequence[str], length: int) -> np.ndarray:
    """Dense GlobalPointer labels `[len(categories), length, length]` with 1 at (type, start, end).

    Args:
        spans: `(type, start, end)` spans, ends inclusive.
        categories: entity type names; a span's type must be one of them.
        length: number of positions.

    Returns:
        int32 labels `[len(categories), length, length]`.

    Example:
    >>> int(global_pointer_labels([("PER", 1, 2)], ["PER"], 4)[0, 1, 2])
    1
    """
    index = _type_index(categories)
    labels = np.zeros((len(categories), length, length), dtype="int32")
    for kind, start, end in spans:
        if kind not in index:
            raise ValueError(f"global_pointer_labels: unknown entity type {kind!r}; categories are {list(categories)}.")
        if not 0 <= start <= end < length:
            raise ValueError(f"global_pointer_labels: span {(kind, start, end)} is outside [0, {length}).")
        labels[index[kind], start, end] = 1
    return labels


def global_pointer_sparse_labels(
    spans: Iterable[Span], categories: Sequence[str], max_entities: int | None = None
) -> np.ndarray:
    """Sparse GlobalPointer labels `[len(categories), max_entities, 2]` of (start, end), padded with (0, 0).

    Position 0 must never start an entity (it is [CLS] in bert4x inputs): (0, 0) is the padding.
    For a batch, pad every sample to the same `max_entities` (the largest count in the batch).

    Args:
        spans: `(type, start, end)` spans, ends inclusive; (0, 0) is the padding and raises `ValueError`.
        categories: entity type names; a span's type must be one of them.
        max_entities: rows per type (default: the largest count here, at least 1); more entities raise `ValueError`.

    Returns:
        int32 labels `[len(categories), max_entities, 2]`.

    Example:
    >>> global_pointer_sparse_labels([("PER", 1, 2)], ["PER", "LOC"], 2).tolist()
    [[[1, 2], [0, 0]], [[0, 0], [0, 0]]]
    """
    index = _type_index(categories)
    per_type = [[] for _ in categories]
    for kind, start, end in spans:
        if kind not in index:
            raise ValueError(
                f"global_pointer_sparse_labels: unknown entity type {kind!r}; categories are {list(categories)}."
            )
        if start == 0 and end == 0:
            raise ValueError("global_pointer_sparse_labels: span (0, 0) is the padding value; position 0 is [CLS].")
        if (start, end) not in per_type[index[kind]]:
            per_type[index[kind]].append((start, end))
    most = max((len(p) for p in per_type), default=0)
    if max_entities is None:
        max_entities = max(most, 1)
    elif most > max_entities:
        raise ValueError(
            f"global_pointer_sparse_labels: {most} entities of one type exceed max_entities={max_entities}.")
    labels = np.zeros((len(categories), max_entities, 2), dtype="int32")
    for t, pairs in enumerate(per_type):
        if pairs:
            labels[t, : len(pairs)] = pairs
    return labels


def decode_global_pointer(logits, categories: Sequence[str] | None = None, threshold: float = 0.0) -> list[Span]:
    """Spans of one sample's GlobalPointer logits `[heads, len, len]`: every (type, i, j) with logit > threshold.

    Types are names when `categories` is given, else head indices.

    Args:
        logits: one sample's span logits `[heads, len, len]`.
        categories: entity type names, one per head (default: head indices as types).
        threshold: a span is predicted where its logit exceeds it.

    Returns:
        `(type, start, end)` spans, ends inclusive.

    Example:
    >>> logits = -np.ones((1, 3, 3)); logits[0, 1, 2] = 5.0
    >>> decode_global_pointer(logits, ["PER"])
    [('PER', 1, 2)]
    """
    logits = np.asarray(logits)
    if logits.ndim != 3 or logits.shape[1] != logits.shape[2]:
        raise ValueError(f"decode_global_pointer: logits must be [heads, len, len], got {logits.shape}.")
    spans = []
    for t, i, j in zip(*np.where(logits > threshold)):
        spans.append((categories[t] if categories is not None else int(t), int(i), int(j)))
    return spans


def entity_f1(predicted: Iterable[Iterable[Span]], gold: Iterable[Iterable[Span]]) -> dict:
    """Micro entity F1 over samples: `{'f1', 'precision', 'recall', 'tp', 'pred', 'gold'}` (exact span + type match).

    Args:
        predicted: per sample, the predicted `(type, start, end)` spans.
        gold: per sample, the true spans.

    Returns:
        `f1`, `precision`, `recall` and the counts `tp`, `pred`, `gold`.

    Example:
    >>> entity_f1([[("PER", 0, 1)]], [[("PER", 0, 1), ("LOC", 3, 4)]])["f1"]
    0.6666666666666666
    """
    tp = n_pred = n_gold = 0
    for p, g in zip(predicted, gold):
        p, g = set(map(tuple, p)), set(map(tuple, g))
        tp += len(p & g)
        n_pred += len(p)
        n_gold += len(g)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"f1": f1, "precision": precision, "recall": recall, "tp": tp, "pred": n_pred, "gold": n_gold}
