"""Data helpers with bert4keras's semantics: padding, truncation and a batch
generator that Keras 3's ``model.fit`` accepts directly."""

from __future__ import annotations

import math
import operator
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import keras
import numpy as np

__all__ = ["sequence_padding", "truncate_sequences", "packing_positions", "packing_width", "DataGenerator"]


def sequence_padding(
    inputs: Sequence[Any],
    length: int | Sequence[int] | None = None,
    value: Any = 0,
    seq_dims: int = 1,
    mode: str = "post",
) -> np.ndarray:
    """Pad a batch of sequences to one length and stack them into an array.

    Args:
        inputs: sequences (lists or arrays) with at least ``seq_dims`` dims and
            equal shapes beyond them.
        length: target length of the first ``seq_dims`` dims: an int (used for
            all of them), a list with one int per dim, or None for the longest.
            Longer sequences are cut to ``length`` (their first items are kept,
            whatever ``mode`` is), as in bert4keras.
        value: the padding value.
        seq_dims: how many leading dims to pad (2 for e.g. [n, n] label grids).
        mode: 'post' pads at the end, 'pre' at the start.

    Example:
        >>> sequence_padding([[1, 2, 3], [4]])
        array([[1, 2, 3],
               [4, 0, 0]])
        >>> sequence_padding([[1, 2, 3], [4]], length=2, mode="pre", value=-1)
        array([[ 1,  2],
               [-1,  4]])
    """
    if mode not in ("post", "pre"):
        raise ValueError(f'sequence_padding: mode must be "post" or "pre", got {mode!r}')
    if not isinstance(seq_dims, int) or seq_dims < 1:
        raise ValueError(f"sequence_padding: seq_dims must be a positive int, got {seq_dims!r}")
    if len(inputs) == 0:
        raise ValueError("sequence_padding: inputs is empty")

    arrays = []
    for i, x in enumerate(inputs):
        try:
            x = np.asarray(x)
        except ValueError as error:  # e.g. a ragged nested list
            raise ValueError(f"sequence_padding: inputs[{i}] is ragged below seq_dims={seq_dims}: {error}") from None
        if x.ndim < seq_dims or x.dtype == object:
            raise ValueError(
                f"sequence_padding: inputs[{i}] has shape {x.shape}, it needs {seq_dims} "
                f"sequence dim(s) and a regular shape beyond them"
            )
        if arrays and x.shape[seq_dims:] != arrays[0].shape[seq_dims:]:
            raise ValueError(
                f"sequence_padding: inputs[{i}] has shape {x.shape}, inputs[0] has "
                f"{arrays[0].shape}; they must agree beyond the first {seq_dims} dim(s)"
            )
        arrays.append(x)

    if length is None:
        lengths = np.max([x.shape[:seq_dims] for x in arrays], axis=0).tolist()
    elif isinstance(length, (int, np.integer)):
        lengths = [int(length)] * seq_dims
    else:
        lengths = [int(n) for n in length]
        if len(lengths) != seq_dims:
            raise ValueError(f"sequence_padding: length has {len(lengths)} entries, seq_dims={seq_dims}")
    if any(n < 0 for n in lengths):
        raise ValueError(f"sequence_padding: length must be >= 0, got {length!r}")

    cut = tuple(slice(0, n) for n in lengths)
    outputs = []
    for x in arrays:
        x = x[cut]
        pad_width = [(0, 0)] * x.ndim
        for d, n in enumerate(lengths):
            missing = n - x.shape[d]
            pad_width[d] = (0, missing) if mode == "post" else (missing, 0)
        outputs.append(np.pad(x, pad_width, mode="constant", constant_values=value))
    return np.array(outputs)


def truncate_sequences(
    maxlen: int, indices: int | Sequence[int], *sequences: list | None
) -> list[list]:
    """Shorten lists in place until their total length is at most ``maxlen``.

    Each step pops one item from the currently longest list (the first one on
    ties), at position ``indices`` (one index for all, or one per sequence;
    e.g. -2 keeps a trailing [SEP]). ``None`` sequences are skipped. Returns the
    (non-None) lists.

    Example:
        >>> a, b = [1, 2, 3, 4, 5, 9], [6, 7, 9]
        >>> truncate_sequences(6, -2, a, b)
        [[1, 2, 9], [6, 7, 9]]
    """
    if isinstance(indices, (int, np.integer)):
        indices = [int(indices)] * len(sequences)
    elif len(indices) != len(sequences):
        raise ValueError(
            f"truncate_sequences: {len(indices)} indices for {len(sequences)} sequences"
        )
    pairs = [(s, i) for s, i in zip(sequences, indices) if s is not None]
    while sum(len(s) for s, _ in pairs) > maxlen:
        longest, index = max(pairs, key=lambda pair: len(pair[0]))
        if not -len(longest) <= index < len(longest):
            raise ValueError(
                f"truncate_sequences: cannot pop index {index} from a sequence of "
                f"length {len(longest)}; maxlen={maxlen} is too small"
            )
        longest.pop(index)
    return [s for s, _ in pairs]


def packing_positions(token_ids: np.ndarray, pad_id: int = 0, buckets: int = 32) -> np.ndarray:
    """The `Input-Packing` array of a batch for a jax model built with `remove_padding=True`.

    It lists the flat positions (`row * len + column`) of the batch's non-padding tokens, row after row, then -1 up
    to a capacity: the smallest multiple of `batch * len / buckets` positions that holds them, shaped
    `[batch, capacity / batch]`. The model then runs its layers on that many tokens instead of `batch * len`.
    jax compiles one training step per capacity, so `buckets` bounds the compilations (and the rounding wastes at
    most `1 / buckets` of the positions).

    Example:
        >>> packing_positions(np.array([[101, 5, 0, 0], [101, 0, 0, 0]]), buckets=4).tolist()
        [[0, 1], [4, -1]]
    """
    token_ids = np.asarray(token_ids)
    if token_ids.ndim != 2:
        raise ValueError(f"packing_positions: token_ids must be [batch, len], got shape {token_ids.shape}")
    if not isinstance(buckets, (int, np.integer)) or buckets < 1:
        raise ValueError(f"packing_positions: buckets must be a positive int, got {buckets!r}")
    batch, length = token_ids.shape
    positions = np.flatnonzero(token_ids != pad_id)
    width = packing_width(positions.size, batch, length, buckets)
    packed = np.full(batch * width, -1, np.int32)
    packed[: positions.size] = positions
    return packed.reshape(batch, width)


def packing_width(real_tokens: int, batch: int, length: int, buckets: int = 32) -> int:
    """The width of `packing_positions`' array for a `[batch, length]` batch holding `real_tokens` non-padding
    tokens: the smallest positive multiple of `length / buckets` (rounded up) whose `batch` rows hold them, at most
    `length`.

    Example:
        >>> packing_width(13, batch=4, length=7, buckets=7)
        4
    """
    if buckets < 1:
        raise ValueError(f"packing_width: buckets must be a positive int, got {buckets!r}")
    per_row = max(1, -(-length // buckets))  # capacity granularity: batch * per_row positions
    return min(length, max(1, -(-int(real_tokens) // (batch * per_row))) * per_row)  # one slot at least


_END = object()


class DataGenerator(keras.utils.PyDataset):
    """bert4keras's batch generator, as a Keras ``PyDataset``.

    Subclass it and override ``__iter__(self, random=False)``: iterate
    ``self.sample(random)``, which yields ``(is_end, item)``, and yield a batch
    whenever ``batch_size`` items are collected or ``is_end`` is true (so the
    last batch is smaller, never dropped or padded). Then either

    * ``model.fit(generator, epochs=...)``: each epoch runs
      ``__iter__(random=self.random)`` once, i.e. every sample exactly once,
      shuffled afresh; ``len(generator)`` is ``ceil(len(data) / batch_size)``
      (or ``self.steps`` if you set it) and ``__iter__`` must yield exactly that
      many batches (RuntimeError otherwise); or
    * ``model.fit(generator.forfit(), steps_per_epoch=len(generator), ...)`` as
      in bert4keras.

    How Keras reads it: Keras asks for ``generator[i]`` len() times per epoch,
    in a shuffled order by default (``fit(shuffle=True)``). Since the batches
    are made by iterating ``__iter__`` (which already shuffles samples), the
    n-th request of an epoch gets the n-th batch whatever ``i`` is. Hence one
    reader at a time: ``workers > 1`` / ``use_multiprocessing`` need a
    ``__getitem__`` of your own, and ``on_epoch_begin``/``on_epoch_end``
    overrides must call ``super()``. Pass ``random=False`` for
    ``model.predict(generator)`` to keep the data order.

    Plain PyDataset style also works: override ``__getitem__(index)`` (and
    ``__len__`` if needed) instead of ``__iter__``.

    Data without ``len()`` (a stream) makes an endless dataset: ``len()``
    raises TypeError, and ``fit`` needs ``steps_per_epoch``.

    Args:
        data: the samples (anything iterable; indexable with ``len()`` for
            shuffling by permutation, else a ``buffer_size`` shuffle buffer).
        batch_size: samples per batch.
        buffer_size: shuffle buffer for data without ``len()``
            (default ``batch_size * 1000``).
        random: whether Keras's reads shuffle (passed to ``__iter__``).
        **kwargs: ``workers``, ``use_multiprocessing``, ``max_queue_size`` for
            ``keras.utils.PyDataset``.

    Example:
        >>> class Batches(DataGenerator):
        ...     def __iter__(self, random=False):
        ...         xs, ys = [], []
        ...         for is_end, (x, y) in self.sample(random):
        ...             xs.append(x)
        ...             ys.append(y)
        ...             if len(xs) == self.batch_size or is_end:
        ...                 yield np.array(xs), np.array(ys)
        ...                 xs, ys = [], []
        >>> batches = Batches([([i], i % 2) for i in range(5)], batch_size=2)
        >>> len(batches), [len(x) for x, _ in batches]
        (3, [2, 2, 1])
    """

    def __init__(
        self,
        data: Iterable[Any],
        batch_size: int = 32,
        buffer_size: int | None = None,
        random: bool = True,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"DataGenerator: batch_size must be a positive int, got {batch_size!r}")
        self.data = data
        self.batch_size = batch_size
        self.steps = math.ceil(len(data) / batch_size) if hasattr(data, "__len__") else None
        self.buffer_size = buffer_size or batch_size * 1000
        self.random = random
        self._batches: Iterator | None = None  # the stream Keras is reading
        self._served = 0
        self._in_epoch = False
        self._reads_outside_epoch = 0
        self.signature_only_read = False  # True while the last batch served only Keras's shape inference

    # -- size ------------------------------------------------------------------
    def __len__(self) -> int:
        if self.steps is None:
            raise TypeError(
                f"{type(self).__name__} has no len(): its data has no len(); set "
                "self.steps, or pass steps_per_epoch to fit()"
            )
        return self.steps

    @property
    def num_batches(self) -> int | None:
        """Batches per epoch for Keras; None (endless) when the data has no len()."""
        return self.steps

    # -- bert4keras interface ------------------------------------------------------
    def sample(self, random: bool = False) -> Iterator[tuple[bool, Any]]:
        """Yield ``(is_end, item)`` for every item, ``is_end`` True for the last;
        shuffled when ``random`` (by permutation if the data has len(), else
        through a ``buffer_size`` buffer)."""
        if not random:
            items = iter(self.data)
        elif hasattr(self.data, "__len__"):
            items = (self.data[i] for i in np.random.permutation(len(self.data)))
        else:
            items = self._buffer_shuffled()
        current = next(items, _END)
        if current is _END:
            return
        for item in items:
            yield False, current
            current = item
        yield True, current

    def _buffer_shuffled(self) -> Iterator[Any]:
        buffer = []
        for item in self.data:
            buffer.append(item)
            if len(buffer) > self.buffer_size:
                yield buffer.pop(np.random.randint(len(buffer)))
        while buffer:
            yield buffer.pop(np.random.randint(len(buffer)))

    def __iter__(self, random: bool = False) -> Iterator[Any]:
        """Yield batches. Override this (bert4keras style) or ``__getitem__``."""
        if type(self).__getitem__ is DataGenerator.__getitem__:
            raise NotImplementedError(
                f"{type(self).__name__} must override __iter__(self, random=False) "
                "(bert4keras style) or __getitem__(self, index) (PyDataset style)"
            )
        order = np.random.permutation(len(self)) if random else range(len(self))
        return (self[int(i)] for i in order)

    def forfit(self, random: bool = True) -> Iterator[Any]:
        """Endless batches (epoch after epoch), for ``fit(gen.forfit(), steps_per_epoch=len(gen))``.

        On the tensorflow backend this is a ``tf.data.Dataset`` whose signature leaves every axis unknown but the
        rank and axes of size 1, so batches of any length pass (Keras would otherwise fix the lengths of the first
        two batches);
        elsewhere a Python generator. Batches come in the form Keras reads: lists become tuples and a ``None``
        label (``yield inputs, None``, for models whose losses are added by layers) is dropped.

        Args:
            random: whether each pass shuffles the samples.
        """
        if keras.backend.backend() == "tensorflow":
            return self._tf_dataset(self._endless(random))
        return self._endless(random)

    def _endless(self, random: bool) -> Iterator[Any]:
        while True:
            empty = True
            for batch in self.__iter__(random):
                empty = False
                yield _as_keras_batch(batch)
            if empty:
                raise RuntimeError(f"{type(self).__name__}.__iter__ yielded no batches")

    @staticmethod
    def _tf_dataset(batches: Iterator[Any]):
        import tensorflow as tf

        first = next(batches)

        def spec(x):  # axes of size 1 (e.g. `[batch, 1]` labels) stay fixed: losses check them statically
            x = np.asarray(x)
            return tf.TensorSpec((None,) + tuple(1 if n == 1 else None for n in x.shape[1:]), tf.as_dtype(x.dtype))

        signature = keras.tree.map_structure(spec, first)

        def replay():
            yield first
            yield from batches

        return tf.data.Dataset.from_generator(replay, output_signature=signature)

    def to_dataset(self, types: Any, shapes: Any, names: Sequence[str] | None = None, padded_batch: bool = False):
        """bert4keras's ``to_dataset``: a batched, endless ``tf.data.Dataset`` (tensorflow needed) from an
        ``__iter__`` that yields single samples.

        Args:
            types: the dtype of each part of a sample (a structure matching it, e.g. ``("int32", "int32")``).
            shapes: the shape of each part of one sample, None for unknown lengths (e.g. ``([None], [None])``).
            names: with names, each sample becomes ``{name: part}`` (a flat sample and flat names).
            padded_batch: pad the samples of a batch to its longest (``padded_batch``) instead of stacking them.

        Example:
            >>> class Samples(DataGenerator):
            ...     def __iter__(self, random=False):
            ...         for is_end, x in self.sample(random):
            ...             yield [1] * x, x
            >>> ds = Samples([1, 3], batch_size=2).to_dataset(("int32", "int32"), ([None], []), padded_batch=True)
            >>> [t.shape.as_list() for t in next(iter(ds))]
            [[2, 3], [2]]
        """
        import tensorflow as tf

        samples = self._endless(self.random)
        if names is not None:
            names = list(names)

            def named(values):
                values = list(values)
                if len(values) != len(names):
                    raise ValueError(f"to_dataset: {len(names)} names for samples of {len(values)} parts")
                return dict(zip(names, values))

            types, shapes = named(types), named(shapes)
            samples = (named(sample) for sample in samples)
        def to_spec(dtype, shape):
            return tf.TensorSpec(shape, tf.as_dtype(dtype))

        if isinstance(types, dict):
            signature = {k: to_spec(types[k], shapes[k]) for k in types}
        elif isinstance(types, (list, tuple)):
            signature = tuple(to_spec(t, s) for t, s in zip(types, shapes))
        else:
            signature = to_spec(types, shapes)
        dataset = tf.data.Dataset.from_generator(lambda: samples, output_signature=signature)
        if padded_batch:
            return dataset.padded_batch(self.batch_size)
        return dataset.batch(self.batch_size)

    def fortest(self, random: bool = False) -> Iterator[Any]:
        """Endless batches' inputs only (``batch[0]``), for ``predict``."""
        for batch in self._endless(random):
            yield batch[0]

    # -- PyDataset interface ---------------------------------------------------
    def __getitem__(self, index: int) -> Any:
        """The next batch of the current epoch (see the class docstring)."""
        if self.workers > 1 or self.use_multiprocessing:
            raise RuntimeError(
                f"{type(self).__name__} makes batches by iterating __iter__, which cannot "
                "be shared by several workers: use workers=1, or override __getitem__"
            )
        index = operator.index(index)
        if self.steps is not None and not 0 <= index < self.steps:
            raise IndexError(f"batch index {index} out of range for {self.steps} batches")
        if self.steps is None:  # endless: keep reading across epochs, as forfit()
            if self._batches is None:
                self._batches = self._endless(self.random)
            return self._signature_read(next(self._batches))

        if self._batches is None:
            self._batches = iter(self.__iter__(self.random))
            self._served = 0
        batch = next(self._batches, _END)
        if batch is _END:
            self._batches = None
            raise RuntimeError(
                f"{type(self).__name__}.__iter__ yielded {self._served} batches but "
                f"len() is {self.steps}: it must yield exactly len() batches per pass "
                "(set self.steps if the batching differs from ceil(len(data) / batch_size))"
            )
        self._served += 1
        if self._served == self.steps:  # epoch complete: check and start afresh next time
            extra = next(self._batches, _END)
            self._batches = None
            if extra is not _END:
                raise RuntimeError(
                    f"{type(self).__name__}.__iter__ yielded more than len() = {self.steps} "
                    "batches (set self.steps to the real number of batches)"
                )
        return self._signature_read(_as_keras_batch(batch))

    def _signature_read(self, batch: Any) -> Any:
        """Keras's tensorflow adapter reads two batches before an epoch and fixes every axis on which they agree; the
        second of those reads comes back empty on every non-batch axis longer than 1 (it only serves the signature),
        so that lengths stay unknown there (a first batch padded to length 1 would still fix that axis)."""
        self.signature_only_read = False
        if self._in_epoch or keras.backend.backend() != "tensorflow" or not _called_from("get_tf_dataset"):
            return batch
        self._reads_outside_epoch += 1
        if self._reads_outside_epoch != 2:
            return batch
        self.signature_only_read = True  # read by wrappers (bert4x.models.Model's input checks) that must skip it

        def shorter(x):
            if x is None:
                return x
            x = np.asarray(x)  # axes of size 1 stay: `[batch, 1]` labels keep their static shape
            return x[(slice(None),) + tuple(slice(0, 0 if n > 1 else n) for n in x.shape[1:])]

        return keras.tree.map_structure(shorter, batch)

    def on_epoch_begin(self) -> None:
        self._in_epoch = True
        self._restart_epoch()

    def on_epoch_end(self) -> None:
        self._in_epoch = False
        self._reads_outside_epoch = 0
        self._restart_epoch()

    def _restart_epoch(self) -> None:
        # Batches read outside an epoch (before fit, Keras reads two to infer
        # shapes) must not eat into the next one. Endless data just goes on.
        if self.steps is not None:
            self._batches = None


def _called_from(function_name: str, depth: int = 6) -> bool:
    """Whether a caller within `depth` frames is a function of that name (Keras's signature peek, not a user)."""
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return False
        if frame.f_code.co_name == function_name:
            return True
        frame = frame.f_back
    return False


def _as_keras_batch(batch: Any) -> Any:
    """bert4keras batches are `[inputs...], labels`; Keras' data adapters want tuples for multi-input structures
    (the TensorFlow one rejects lists), so lists become tuples at the top two levels."""
    if isinstance(batch, (list, tuple)):
        parts = list(batch)
        while len(parts) > 1 and parts[-1] is None:  # `yield inputs, None`: no labels (losses added by layers)
            parts.pop()
        return tuple(tuple(part) if isinstance(part, list) else part for part in parts)
    return batch
