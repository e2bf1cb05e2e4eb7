"""`CheckpointReader`, the read-only interface every checkpoint format implements, and what the formats' readers and
writers share (bfloat16 widening, the check of the tensors given to a writer)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np


class CheckpointReader:
    """Read-only view of a checkpoint: names, shapes, dtypes and numpy values.

    Use :func:`open_checkpoint` to get one. ``dtype(name)`` is the stored dtype's name
    (``'float32'``, ``'bfloat16'``, ``'string'``...); ``get(name)`` returns a numpy array, with
    bfloat16 upcast to float32 and TF strings as an object array of ``bytes``.

    Example:
        >>> import numpy as np, tempfile, os
        >>> from bert4x.checkpoints import open_checkpoint, write_safetensors
        >>> path = write_safetensors({"b": np.arange(3, dtype="int64")},
        ...                          os.path.join(tempfile.mkdtemp(), "w.safetensors"))
        >>> reader = open_checkpoint(path)
        >>> "b" in reader, reader.keys(), reader.get("b").tolist()
        (True, ['b'], [0, 1, 2])
    """

    format: str
    path: str

    def __init__(self, path: str, format: str):
        self.path = path
        self.format = format
        # name -> (shape, dtype name); filled by subclasses
        self._specs: dict[str, tuple[tuple[int, ...], str]] = {}

    def keys(self) -> list[str]:
        return sorted(self._specs)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._spec(name)[0]

    def dtype(self, name: str) -> str:
        return self._spec(name)[1]

    def get(self, name: str) -> np.ndarray:
        self._spec(name)
        return self._load(name)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yield ``(name, array)`` in sorted name order, loading one tensor at a time."""
        for name in self.keys():
            yield name, self._load(name)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._specs)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} format={self.format!r} path={self.path!r} variables={len(self)}>"

    def _spec(self, name: str) -> tuple[tuple[int, ...], str]:
        try:
            return self._specs[name]
        except KeyError:
            raise KeyError(f"variable {name!r} not found in checkpoint {self.path!r}") from None

    def _load(self, name: str) -> np.ndarray:
        raise NotImplementedError


def _bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32, so widening is exact."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _check_tensors(tensors: Mapping[str, object], what: str) -> dict[str, np.ndarray]:
    if not isinstance(tensors, Mapping) or not tensors:
        raise ValueError(f"{what}: tensors must be a non-empty dict of name -> array")
    arrays = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"{what}: variable names must be non-empty strings, got {name!r}")
        arrays[name] = np.asarray(value)
    return arrays
