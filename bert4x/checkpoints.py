"""Format-level checkpoint IO: read and write weights by their own variable names.

Two families are supported, with no knowledge of any model:

* ``'google'``: TensorFlow V2 checkpoints ("tensor bundles"), as released by Google BERT
  (``bert_model.ckpt.index`` + ``bert_model.ckpt.data-00000-of-00001``). They are read by a
  pure-Python parser, so TensorFlow is *not* needed to read them; writing uses TensorFlow.
* ``'huggingface'``: ``model.safetensors``, ``pytorch_model.bin`` and their sharded
  ``*.index.json`` forms. ``.bin`` files need PyTorch.

Reading a Google checkpoint verifies the checksums TensorFlow's writer stores (a masked CRC32C per index block and
per tensor), so a damaged ``.index`` or ``.data`` file is refused with the file and variable named. Safetensors files
carry no checksum; their header is validated, their tensor bytes cannot be.

Everything is numpy in, numpy out. numpy has no bfloat16, so bfloat16 tensors are returned
upcast to float32 (exact); ``reader.dtype(name)`` still reports ``'bfloat16'``.

Example:
    >>> import numpy as np, tempfile, os
    >>> folder = tempfile.mkdtemp()
    >>> _ = write_safetensors({"w": np.ones((2, 3), "float32")}, folder)
    >>> reader = open_checkpoint(folder)
    >>> reader.format, reader.shape("w"), reader.dtype("w")
    ('huggingface', (2, 3), 'float32')
"""

from __future__ import annotations

import glob
import json
import os
import re
import struct
from collections.abc import Iterator, Mapping

import numpy as np

__all__ = [
    "CheckpointReader",
    "detect_format",
    "open_checkpoint",
    "write_google_checkpoint",
    "write_safetensors",
]

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
# Preference order when a folder holds several Hugging Face weight files.
_HF_FOLDER_FILES = (
    (SAFETENSORS_FILE, "safetensors"),
    (SAFETENSORS_INDEX, "safetensors_index"),
    (TORCH_FILE, "bin"),
    (TORCH_INDEX, "bin_index"),
)
_DATA_SUFFIX = re.compile(r"\.data-\d{5}-of-\d{5}$")


# --------------------------------------------------------------------------- detection


def detect_format(path: str) -> str:
    """Return ``'google'`` or ``'huggingface'`` for the checkpoint at ``path``.

    ``path`` may be a TF checkpoint prefix (``.../bert_model.ckpt``), its ``.index`` file,
    a folder holding one TF checkpoint (or a ``checkpoint`` state file), a Hugging Face
    folder, or a ``.safetensors`` / ``.bin`` / ``*.index.json`` file.

    Args:
        path: the checkpoint's path in any of the forms above.

    Example:
        >>> detect_format("/no/such/place")
        Traceback (most recent call last):
        ...
        FileNotFoundError: no checkpoint at '/no/such/place' (neither that path nor '/no/such/place.index' exists)
    """
    return _locate(path)[0]


def _locate(path: str) -> tuple[str, str, str]:
    """Resolve ``path`` to (format, kind, location); kind says which reader to use."""
    path = os.fspath(path)
    if os.path.isfile(path + ".index"):
        return "google", "google", path
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no checkpoint at {path!r} (neither that path nor {path + '.index'!r} exists)"
        )
    if os.path.isdir(path):
        return _locate_in_folder(path)
    name = os.path.basename(path)
    if name.endswith(".index") and not name.endswith(".index.json"):
        return "google", "google", path[: -len(".index")]
    if _DATA_SUFFIX.search(name):
        prefix = _DATA_SUFFIX.sub("", path)
        if os.path.isfile(prefix + ".index"):
            return "google", "google", prefix
        raise FileNotFoundError(f"{path!r} is a TF checkpoint data file but {prefix + '.index'!r} is missing")
    if name.endswith(".safetensors"):
        return "huggingface", "safetensors", path
    if name.endswith(".safetensors.index.json"):
        return "huggingface", "safetensors_index", path
    if name.endswith((".bin", ".pt", ".pth")):
        return "huggingface", "bin", path
    if name.endswith(".bin.index.json"):
        return "huggingface", "bin_index", path
    raise ValueError(
        f"unrecognised checkpoint file {path!r}: expected a TF checkpoint prefix or .index file, "
        "a .safetensors, .bin or *.index.json file, or a folder holding one"
    )


def _locate_in_folder(folder: str) -> tuple[str, str, str]:
    for file_name, kind in _HF_FOLDER_FILES:
        candidate = os.path.join(folder, file_name)
        if os.path.isfile(candidate):
            return "huggingface", kind, candidate
    state_file = os.path.join(folder, "checkpoint")
    if os.path.isfile(state_file):
        return "google", "google", _prefix_from_state_file(state_file)
    indexes = sorted(glob.glob(os.path.join(glob.escape(folder), "*.index")))
    if len(indexes) == 1:
        return "google", "google", indexes[0][: -len(".index")]
    if len(indexes) > 1:
        names = [os.path.basename(p) for p in indexes]
        raise ValueError(
            f"folder {folder!r} holds {len(indexes)} TF checkpoints {names}; "
            "pass the prefix of the one you want (e.g. the path without '.index')"
        )
    found = sorted(os.listdir(folder))
    shown = found[:30] + ([f"... ({len(found) - 30} more)"] if len(found) > 30 else [])
    raise ValueError(
        f"no recognised checkpoint in folder {folder!r}; found {shown}; expected a TF checkpoint "
        f"('*.index' + '*.data-*'), or one of {[name for name, _ in _HF_FOLDER_FILES]}"
    )


def _prefix_from_state_file(state_file: str) -> str:
    """Read ``model_checkpoint_path`` from TF's ``checkpoint`` text file."""
    folder = os.path.dirname(state_file)
    with open(state_file, encoding="utf-8") as f:
        match = re.search(r'^model_checkpoint_path:\s*"(.*)"\s*$', f.read(), re.MULTILINE)
    if not match:
        raise ValueError(f"{state_file!r} has no 'model_checkpoint_path' line")
    recorded = match.group(1)
    # The recorded path may be relative, or absolute on the machine that trained the model.
    for prefix in (os.path.join(folder, recorded), os.path.join(folder, os.path.basename(recorded))):
        if os.path.isfile(prefix + ".index"):
            return prefix
    raise FileNotFoundError(
        f"{state_file!r} points to checkpoint {recorded!r}, but no '{os.path.basename(recorded)}.index' "
        f"was found in {folder!r}"
    )


# --------------------------------------------------------------------------- readers


class CheckpointReader:
    """Read-only view of a checkpoint: names, shapes, dtypes and numpy values.

    Use :func:`open_checkpoint` to get one. ``dtype(name)`` is the stored dtype's name
    (``'float32'``, ``'bfloat16'``, ``'string'``...); ``get(name)`` returns a numpy array, with
    bfloat16 upcast to float32 and TF strings as an object array of ``bytes``.

    Example:
        >>> import numpy as np, tempfile, os
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


def open_checkpoint(path: str) -> CheckpointReader:
    """Open the checkpoint at ``path`` (any form accepted by :func:`detect_format`).

    Google checkpoints are checked as they are read: a damaged index is refused when opened, a tensor whose bytes
    do not match its stored CRC32C when read (``ValueError`` naming the file and the variable).

    Args:
        path: a checkpoint prefix, ``.index`` file, folder, or Hugging Face weights file.

    Example:
        >>> path = "../shared/data/checkpoints/keras-bert_test_checkpoint_tf/bert_model.ckpt"
        >>> reader = open_checkpoint(path)  # doctest: +SKIP
        >>> reader.shape("bert/embeddings/word_embeddings")  # doctest: +SKIP
        (15, 4)
    """
    _, kind, location = _locate(path)
    if kind == "google":
        return _GoogleReader(location)
    if kind == "safetensors":
        return _SafetensorsReader(location)
    if kind == "bin":
        return _TorchBinReader(location)
    return _ShardedReader(location)


# ---- Google / TensorFlow tensor bundle ------------------------------------------------
#
# ``prefix.index`` is an SSTable (LevelDB table format): data blocks of prefix-compressed
# key/value entries, an index block pointing at them, and a 48-byte footer. Each value is a
# serialized BundleEntryProto (the empty key holds a BundleHeaderProto). Tensor bytes live
# in ``prefix.data-NNNNN-of-MMMMM`` at the entry's offset.

_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_SIZE = 48
_BLOCK_TRAILER_SIZE = 5  # 1 byte compression type + 4 bytes masked crc32c
_CRC_MASK_DELTA = 0xA282EAD8

# TF DataType enum -> numpy dtype name ("bfloat16" / "string" are special-cased).
_TF_DTYPES = {
    1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8", 7: "string",
    8: "complex64", 9: "int64", 10: "bool", 14: "bfloat16", 17: "uint16", 18: "complex128",
    19: "float16", 22: "uint32", 23: "uint64",
}
_TF_DTYPE_NAMES = {11: "qint8", 12: "quint8", 13: "qint32", 15: "qint16", 16: "quint16",
                   20: "resource", 21: "variant"}


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint (longer than 10 bytes)")


def _proto_fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """Yield (field number, value) of a serialized protobuf message; enough for TF's protos."""
    pos = 0
    while pos < len(buf):
        tag, pos = _read_varint(buf, pos)
        field, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            value, pos = _read_varint(buf, pos)
        elif wire_type == 1:
            value, pos = int.from_bytes(buf[pos : pos + 8], "little"), pos + 8
        elif wire_type == 2:
            length, pos = _read_varint(buf, pos)
            value, pos = bytes(buf[pos : pos + length]), pos + length
        elif wire_type == 5:
            value, pos = int.from_bytes(buf[pos : pos + 4], "little"), pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type} in field {field}")
        yield field, value


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _snappy_decompress(data: bytes) -> bytes:
    """Decode a raw snappy block (TF may snappy-compress table blocks; bundles normally don't)."""
    expected_size, pos = _read_varint(data, 0)
    out = bytearray()
    while pos < len(data):
        tag = data[pos]
        pos += 1
        kind = tag & 3
        if kind == 0:  # literal
            length = tag >> 2
            if length >= 60:
                extra = length - 59
                length = int.from_bytes(data[pos : pos + extra], "little")
                pos += extra
            length += 1
            out += data[pos : pos + length]
            pos += length
            continue
        if kind == 1:
            length = 4 + ((tag >> 2) & 7)
            offset = ((tag >> 5) << 8) | data[pos]
            pos += 1
        elif kind == 2:
            length = 1 + (tag >> 2)
            offset = int.from_bytes(data[pos : pos + 2], "little")
            pos += 2
        else:
            length = 1 + (tag >> 2)
            offset = int.from_bytes(data[pos : pos + 4], "little")
            pos += 4
        if offset == 0 or offset > len(out):
            raise ValueError(f"corrupt snappy data: copy offset {offset} with {len(out)} bytes decoded")
        start = len(out) - offset
        if offset >= length:
            out += out[start : start + length]
        else:  # overlapping copy repeats the last `offset` bytes
            for i in range(length):
                out.append(out[start + i])
    if len(out) != expected_size:
        raise ValueError(f"corrupt snappy data: decoded {len(out)} bytes, header says {expected_size}")
    return bytes(out)


def _crc32c(data: bytes) -> int:
    import google_crc32c

    return google_crc32c.value(data)


def _mask_crc(crc: int) -> int:
    """TensorFlow's (LevelDB's) stored form of a CRC32C: rotated right by 15 bits, plus a constant."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _CRC_MASK_DELTA) & 0xFFFFFFFF


def _read_block(table: bytes, handle: bytes, file_name: str) -> bytes:
    offset, pos = _read_varint(handle, 0)
    size, _ = _read_varint(handle, pos)
    if offset + size + _BLOCK_TRAILER_SIZE > len(table):
        raise ValueError(f"{file_name!r} is truncated: block at {offset}+{size} beyond file size {len(table)}")
    block = table[offset : offset + size]
    compression = table[offset + size]
    stored_crc = struct.unpack_from("<I", table, offset + size + 1)[0]
    if _mask_crc(_crc32c(table[offset : offset + size + 1])) != stored_crc:
        raise ValueError(
            f"{file_name!r} is corrupt: the checksum of its table block at byte {offset} ({size} bytes) does not match"
        )
    if compression == 0:
        return block
    if compression == 1:
        return _snappy_decompress(block)
    raise ValueError(f"{file_name!r}: unknown table block compression type {compression}")


def _block_entries(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Yield the (key, value) entries of one table block, undoing key prefix compression."""
    num_restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    end = len(block) - 4 - 4 * num_restarts
    pos, key = 0, b""
    while pos < end:
        shared, pos = _read_varint(block, pos)
        unshared, pos = _read_varint(block, pos)
        value_size, pos = _read_varint(block, pos)
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        yield key, block[pos : pos + value_size]
        pos += value_size


def _read_sstable(index_path: str) -> Iterator[tuple[bytes, bytes]]:
    """Yield every (key, value) of a TF table file, in key order."""
    with open(index_path, "rb") as f:
        table = f.read()
    if len(table) < _FOOTER_SIZE or struct.unpack_from("<Q", table, len(table) - 8)[0] != _TABLE_MAGIC:
        raise ValueError(f"{index_path!r} is not a TensorFlow checkpoint index (bad table magic number)")
    footer = table[-_FOOTER_SIZE:]
    _, pos = _read_varint(footer, 0)  # metaindex handle: offset, size (unused)
    _, pos = _read_varint(footer, pos)
    index_block = _read_block(table, footer[pos:], index_path)
    try:
        for _, handle in _block_entries(index_block):
            yield from _block_entries(_read_block(table, handle, index_path))
    except (IndexError, struct.error) as error:
        raise ValueError(f"{index_path!r} is corrupt: its table blocks do not parse ({error})") from error


class _GoogleReader(CheckpointReader):
    def __init__(self, prefix: str):
        super().__init__(prefix, "google")
        index_path = prefix + ".index"
        self._entries: dict[str, dict] = {}
        num_shards, big_endian = 1, False
        for key, value in _read_sstable(index_path):
            if key == b"":
                try:
                    header = dict(_proto_fields(value))
                except (ValueError, IndexError) as error:
                    raise ValueError(f"{index_path!r} is corrupt: its header does not parse ({error})") from error
                num_shards, big_endian = header.get(1, 1), header.get(2, 0) == 1
                continue
            if key.startswith(b"\x00"):
                continue  # slices of partitioned variables, keyed by an encoded (name, slice)
            try:
                name = key.decode("utf-8")
                self._entries[name] = entry = self._parse_entry(value)
            except (ValueError, IndexError) as error:
                raise ValueError(f"{index_path!r} is corrupt: entry {key[:80]!r} does not parse ({error})") from error
            dtype = _TF_DTYPES.get(entry["dtype"]) or _TF_DTYPE_NAMES.get(entry["dtype"], f"tf_dtype_{entry['dtype']}")
            self._specs[name] = (entry["shape"], dtype)
        self._num_shards = num_shards
        self._byte_order = ">" if big_endian else "<"

    @staticmethod
    def _parse_entry(value: bytes) -> dict:
        entry = {"dtype": 0, "shape": (), "shard_id": 0, "offset": 0, "size": 0, "sliced": False, "crc32c": None}
        for field, field_value in _proto_fields(value):
            if field == 1:
                entry["dtype"] = field_value
            elif field == 2:  # TensorShapeProto: repeated Dim dim = 2 {int64 size = 1}
                dims = []
                for shape_field, dim in _proto_fields(field_value):
                    if shape_field == 2:
                        dims.append(_signed64(dict(_proto_fields(dim)).get(1, 0)))
                entry["shape"] = tuple(dims)
            elif field in (3, 4, 5):
                entry[{3: "shard_id", 4: "offset", 5: "size"}[field]] = field_value
            elif field == 6:  # fixed32: the masked CRC32C of the tensor's bytes in the data file
                entry["crc32c"] = field_value
            elif field == 7:
                entry["sliced"] = True
        return entry

    def _data_file(self, shard_id: int) -> str:
        return f"{self.path}.data-{shard_id:05d}-of-{self._num_shards:05d}"

    def _load(self, name: str) -> np.ndarray:
        entry = self._entries[name]
        shape, dtype = self._specs[name]
        if entry["sliced"]:
            raise NotImplementedError(
                f"variable {name!r} in {self.path!r} is saved in slices (a partitioned variable); "
                "reading sliced variables is not supported, use tf.train.load_checkpoint"
            )
        if dtype not in _TF_DTYPES.values():
            raise NotImplementedError(f"variable {name!r} in {self.path!r} has unsupported dtype {dtype!r}")
        data_file = self._data_file(entry["shard_id"])
        if not os.path.isfile(data_file):
            raise FileNotFoundError(f"variable {name!r} lives in {data_file!r}, which is missing")
        count = int(np.prod(shape, dtype=np.int64))
        stored = np.dtype("uint16" if dtype == "bfloat16" else "uint8" if dtype == "string" else dtype)
        stored = stored.newbyteorder(self._byte_order)
        if dtype != "string" and count * stored.itemsize != entry["size"]:
            raise ValueError(
                f"variable {name!r} in {data_file!r}: index says {entry['size']} bytes, "
                f"but shape {shape} x {dtype} needs {count * stored.itemsize}"
            )
        with open(data_file, "rb") as f:
            f.seek(entry["offset"])
            raw = f.read(entry["size"])
        if len(raw) != entry["size"]:
            raise ValueError(
                f"{data_file!r} is truncated: variable {name!r} needs {entry['size']} bytes at {entry['offset']}, "
                f"read {len(raw)}"
            )
        # TensorFlow refuses a tensor whose bytes do not match the checksum its writer stored; so does bert4x.
        crc = _string_tensor_crc(raw, count, name, data_file) if dtype == "string" else _crc32c(raw)
        if entry["crc32c"] is not None and _mask_crc(crc) != entry["crc32c"]:
            raise ValueError(
                f"{data_file!r} is corrupt: the bytes of variable {name!r} do not match the CRC32C checksum stored in "
                f"{self.path + '.index'!r}"
            )
        if dtype == "string":
            return _decode_string_tensor(raw, count, name, data_file).reshape(shape)
        array = np.frombuffer(raw, dtype=stored)
        if dtype == "bfloat16":
            array = _bfloat16_bits_to_float32(array)
        return array.astype(array.dtype.newbyteorder("=")).reshape(shape)  # a writable copy


def _string_tensor_crc(raw: bytes, count: int, name: str, data_file: str) -> int:
    """The CRC32C TensorFlow's writer computes for a string tensor: over each length as a little-endian uint32 (uint64
    beyond 2**32 - 1) rather than its stored varint, then the stored bytes that follow the varints."""
    import google_crc32c

    crc, pos = 0, 0
    try:
        for _ in range(count):
            length, pos = _read_varint(raw, pos)
            crc = google_crc32c.extend(crc, struct.pack("<I" if length <= 0xFFFFFFFF else "<Q", length))
    except IndexError:
        raise ValueError(
            f"string variable {name!r} in {data_file!r} is corrupt (its lengths run past its bytes)"
        ) from None
    return google_crc32c.extend(crc, raw[pos:])


def _decode_string_tensor(raw: bytes, count: int, name: str, data_file: str) -> np.ndarray:
    """Bundle string layout: varint64 lengths, 4-byte checksum of lengths, then the bytes."""
    values = np.empty(count, dtype=object)
    if count == 0:
        return values
    lengths, pos = [], 0
    for _ in range(count):
        length, pos = _read_varint(raw, pos)
        lengths.append(length)
    pos += 4
    for i, length in enumerate(lengths):
        values[i] = bytes(raw[pos : pos + length])
        pos += length
    if pos != len(raw):
        raise ValueError(f"string variable {name!r} in {data_file!r} is corrupt ({pos} != {len(raw)} bytes)")
    return values


def _bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32, so widening is exact."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


# ---- Hugging Face ----------------------------------------------------------------------

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


# --------------------------------------------------------------------------- writers


def _check_tensors(tensors: Mapping[str, object], what: str) -> dict[str, np.ndarray]:
    if not isinstance(tensors, Mapping) or not tensors:
        raise ValueError(f"{what}: tensors must be a non-empty dict of name -> array")
    arrays = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"{what}: variable names must be non-empty strings, got {name!r}")
        arrays[name] = np.asarray(value)
    return arrays


def write_google_checkpoint(tensors: Mapping[str, np.ndarray], prefix: str) -> str:
    """Write ``tensors`` as a TF V2 checkpoint at ``prefix`` (needs TensorFlow); return ``prefix``.

    Names are kept as given, so bert4keras-style readers (``tf.train.load_checkpoint``) see
    e.g. ``bert/embeddings/word_embeddings``. Writes ``prefix.index`` and
    ``prefix.data-00000-of-00001``; bfloat16 arrays (``ml_dtypes.bfloat16``) and
    bytes/str arrays are accepted.

    Args:
        tensors: ``{variable name: array}``, non-empty.
        prefix: the checkpoint prefix (its folder is created if needed).

    Example:
        >>> import numpy as np, tempfile, os
        >>> prefix = write_google_checkpoint({"layer/kernel": np.eye(2, dtype="float32")},
        ...                                  os.path.join(tempfile.mkdtemp(), "model.ckpt"))  # doctest: +SKIP
        >>> open_checkpoint(prefix).get("layer/kernel").tolist()  # doctest: +SKIP
        [[1.0, 0.0], [0.0, 1.0]]
    """
    arrays = _check_tensors(tensors, "write_google_checkpoint")
    try:
        import tensorflow as tf
    except ImportError as error:
        raise ImportError(
            "tensorflow is needed to write Google-format checkpoints (pip install tensorflow); "
            "reading them works without it"
        ) from error
    values = []
    for name, array in arrays.items():
        if array.dtype.kind in "OUS":
            array = np.vectorize(lambda s: s.encode() if isinstance(s, str) else s, otypes=[object])(array)
        try:
            values.append(tf.convert_to_tensor(array))
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"write_google_checkpoint: variable {name!r} ({array.dtype}) can't be saved: {error}"
            ) from error
    prefix = os.fspath(prefix)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    with tf.device("/CPU:0"):
        tf.raw_ops.SaveV2(prefix=prefix, tensor_names=list(arrays), shape_and_slices=[""] * len(arrays), tensors=values)
    return prefix


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
