"""Google / TensorFlow V2 checkpoints ("tensor bundles"): a pure-Python reader of the `.index` SSTable and `.data`
shards that verifies TensorFlow's CRC32C checksums, and a writer (through TensorFlow)."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator, Mapping

import numpy as np

from bert4x.checkpoints.reader import CheckpointReader, _bfloat16_bits_to_float32, _check_tensors

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
