"""Hugging Face checkpoints: `model.safetensors`, `pytorch_model.bin` (needs PyTorch) and their sharded
`*.index.json` forms, read into numpy; and the safetensors writer."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping

import numpy as np

from bert4x.checkpoints.reader import CheckpointReader, _bfloat16_bits_to_float32, _check_tensors

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"

# safetensors dtype codes -> numpy dtype names
_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
    "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16",
    "U8": "uint8", "BOOL": "bool",
}


class _SafetensorsReader(CheckpointReader):
    def __init__(self, path: str):
        super().__init__(path, "huggingface")
        from safetensors import safe_open

        try:
            self._file = safe_open(path, framework="numpy")
        except Exception as error:  # safetensors raises its own error types
            raise ValueError(f"cannot read safetensors file {path!r}: {error}") from error
        for name in self._file.keys():  # noqa: SIM118 (safe_open is not a Mapping)
            tensor_slice = self._file.get_slice(name)
            code = tensor_slice.get_dtype()
            self._specs[name] = (tuple(tensor_slice.get_shape()), _SAFETENSORS_DTYPES.get(code, code))
        self._raw_offsets: dict[str, tuple[int, int]] | None = None

    def metadata(self) -> dict[str, str]:
        return self._file.metadata() or {}

    def _load(self, name: str) -> np.ndarray:
        dtype = self._specs[name][1]
        if dtype == "bfloat16":  # numpy can't hold bf16, so read the raw bits ourselves
            start, end = self._data_offsets(name)
            bits = np.fromfile(self.path, dtype="<u2", count=(end - start) // 2, offset=start)
            return _bfloat16_bits_to_float32(bits).reshape(self._specs[name][0])
        if dtype not in _SAFETENSORS_DTYPES.values():
            raise NotImplementedError(f"variable {name!r} in {self.path!r} has unsupported dtype {dtype!r}")
        return self._file.get_tensor(name)

    def _data_offsets(self, name: str) -> tuple[int, int]:
        """Absolute byte range of ``name``: the file is an 8-byte header size, a JSON header, data."""
        if self._raw_offsets is None:
            with open(self.path, "rb") as f:
                header_size = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(header_size))
            base = 8 + header_size
            self._raw_offsets = {
                key: (base + info["data_offsets"][0], base + info["data_offsets"][1])
                for key, info in header.items()
                if key != "__metadata__"
            }
        return self._raw_offsets[name]


def _import_torch(file_name: str):
    try:
        import torch
    except ImportError as error:
        raise ImportError(f"reading {file_name!r} needs PyTorch: pip install torch") from error
    return torch


class _TorchBinReader(CheckpointReader):
    def __init__(self, path: str):
        super().__init__(path, "huggingface")
        torch = _import_torch(path)
        try:  # mmap keeps big files out of memory; files in the legacy (non-zip) format can't mmap
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as error:
                raise ValueError(f"cannot read {path!r} with torch.load(weights_only=True): {error}") from error
        except Exception as error:
            raise ValueError(f"cannot read {path!r} with torch.load(weights_only=True): {error}") from error
        if not isinstance(state, Mapping):
            raise ValueError(f"{path!r} holds a {type(state).__name__}, expected a state dict of tensors")
        for name, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{path!r}: entry {name!r} is a {type(value).__name__}, not a tensor")
        self._state = state
        self._torch = torch
        self._specs = {name: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in state.items()}

    def _load(self, name: str) -> np.ndarray:
        tensor = self._state[name].detach()
        if tensor.dtype == self._torch.bfloat16:
            tensor = tensor.float()
        try:
            return tensor.numpy().copy()
        except TypeError as error:
            raise NotImplementedError(f"variable {name!r} in {self.path!r}: {error}") from error


class _ShardedReader(CheckpointReader):
    """``*.index.json`` whose ``weight_map`` sends each name to a shard file."""

    def __init__(self, index_path: str):
        super().__init__(index_path, "huggingface")
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index_path!r} has no 'weight_map' object")
        folder = os.path.dirname(index_path)
        self._shard_of = {name: os.path.join(folder, file) for name, file in weight_map.items()}
        missing = sorted({p for p in self._shard_of.values() if not os.path.isfile(p)})
        if missing:
            raise FileNotFoundError(f"{index_path!r} refers to missing shard file(s): {missing}")
        self._shards: dict[str, CheckpointReader] = {}
        for name, shard_path in self._shard_of.items():
            shard = self._shard(shard_path)
            if name not in shard:
                raise KeyError(f"{index_path!r} maps {name!r} to {shard_path!r}, which does not contain it")
            self._specs[name] = shard._specs[name]

    def _shard(self, shard_path: str) -> CheckpointReader:
        if shard_path not in self._shards:
            is_safetensors = shard_path.endswith(".safetensors")
            self._shards[shard_path] = (_SafetensorsReader if is_safetensors else _TorchBinReader)(shard_path)
        return self._shards[shard_path]

    def _load(self, name: str) -> np.ndarray:
        return self._shard(self._shard_of[name])._load(name)


def write_safetensors(tensors: Mapping[str, np.ndarray], path: str, metadata: dict | None = None) -> str:
    """Write ``tensors`` to a safetensors file; return the file's path.

    ``path`` ending in ``.safetensors`` is the file; anything else is a folder (created if
    needed) that receives ``model.safetensors``. ``metadata`` defaults to ``{'format': 'pt'}``,
    which transformers expects.

    Args:
        tensors: ``{variable name: array}``, non-empty; dtypes safetensors can store.
        path: a ``.safetensors`` file, or a folder that receives ``model.safetensors``.
        metadata: string-to-string metadata stored in the header.

    Example:
        >>> import numpy as np, tempfile
        >>> write_safetensors({"w": np.zeros(2, "float32")}, tempfile.mkdtemp()).endswith("model.safetensors")
        True
    """
    from safetensors.numpy import save_file

    arrays = _check_tensors(tensors, "write_safetensors")
    for name, array in arrays.items():
        if array.dtype.name not in _SAFETENSORS_DTYPES.values():
            raise ValueError(
                f"write_safetensors: variable {name!r} has dtype {array.dtype}, which safetensors can't store"
            )
        arrays[name] = np.require(array, requirements="C")  # ascontiguousarray would turn scalars 1-d
    metadata = {"format": "pt"} if metadata is None else metadata
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError(f"write_safetensors: metadata keys and values must be strings, got {metadata!r}")
    path = os.fspath(path)
    if os.path.isdir(path) or not path.endswith(".safetensors"):
        path = os.path.join(path, SAFETENSORS_FILE)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(arrays, path, metadata=metadata)
    return path
