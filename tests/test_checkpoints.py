"""Tests for bert4x.checkpoints (format-level IO) and the list_variables CLI."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from bert4x import checkpoints
from bert4x.checkpoints import (
    detect_format,
    open_checkpoint,
    write_google_checkpoint,
    write_safetensors,
)
from weights_converters import list_variables

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
TOY_BERT = SHARED_DATA / "checkpoints" / "keras-bert_test_checkpoint_tf" / "bert_model.ckpt"


@pytest.fixture(scope="module")
def tf():
    return pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture
def toy_bert():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"../shared/data not found: {SHARED_DATA}")
    return str(TOY_BERT)


def mixed_tensors():
    import ml_dtypes

    rng = np.random.default_rng(0)
    return {
        "bert/embeddings/word_embeddings": rng.standard_normal((15, 4)).astype("float32"),
        "layer/kernel_f16": rng.standard_normal((3, 5)).astype("float16"),
        "layer/kernel_f64": rng.standard_normal((2, 2, 2)),
        "layer/kernel_bf16": rng.standard_normal((4, 3)).astype(ml_dtypes.bfloat16),
        "ids_int32": np.arange(-3, 9, dtype="int32").reshape(3, 4),
        "global_step": np.array(123456789012, dtype="int64"),
        "mask": np.array([True, False, True]),
        "bytes_u8": np.arange(7, dtype="uint8"),
        "empty": np.zeros((0, 3), "float32"),
        "text": np.array([b"hello", b"", "\u4e2d\u6587".encode()], dtype=object),
    }


def assert_same_as_tf(tf, prefix, reader):
    """Every variable of the pure-Python reader equals tf.train.load_checkpoint's, exactly."""
    tf_reader = tf.train.load_checkpoint(prefix)
    tf_shapes = tf_reader.get_variable_to_shape_map()
    tf_dtypes = tf_reader.get_variable_to_dtype_map()
    assert sorted(tf_shapes) == reader.keys()
    for name in reader:
        expected = np.asarray(tf_reader.get_tensor(name))
        actual = reader.get(name)
        assert reader.shape(name) == tuple(tf_shapes[name]) == actual.shape, name
        assert reader.dtype(name) == tf_dtypes[name].name, name
        if reader.dtype(name) == "bfloat16":
            assert actual.dtype == np.float32
            expected = expected.astype("float32")
        elif reader.dtype(name) == "string":
            assert actual.tolist() == expected.tolist(), name
            continue
        assert actual.dtype == expected.dtype, name
        np.testing.assert_array_equal(actual, expected, err_msg=name)
    return len(tf_shapes)


# ---------------------------------------------------------------- Google format


def test_real_google_checkpoint_matches_tensorflow(tf, toy_bert):
    reader = open_checkpoint(toy_bert)
    assert reader.format == "google" and reader.path == toy_bert
    assert assert_same_as_tf(tf, toy_bert, reader) == 139  # 46 weights x (value, adam_m, adam_v) + global_step
    assert reader.shape("bert/embeddings/word_embeddings") == (15, 4)
    assert reader.dtype("global_step") == "int64" and reader.get("global_step").shape == ()


def test_google_round_trip_mixed_dtypes(tf, tmp_path):
    tensors = mixed_tensors()
    prefix = write_google_checkpoint(tensors, str(tmp_path / "sub" / "model.ckpt"))
    assert prefix == str(tmp_path / "sub" / "model.ckpt")
    assert os.path.isfile(prefix + ".index") and os.path.isfile(prefix + ".data-00000-of-00001")
    reader = open_checkpoint(prefix)
    assert assert_same_as_tf(tf, prefix, reader) == len(tensors)
    for name, expected in tensors.items():
        actual = reader.get(name)
        if name == "layer/kernel_bf16":
            assert reader.dtype(name) == "bfloat16" and actual.dtype == np.float32
            np.testing.assert_array_equal(actual, expected.astype("float32"))  # bf16 -> f32 is exact
        elif name == "text":
            assert actual.tolist() == expected.tolist()
        else:
            assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
            np.testing.assert_array_equal(actual, expected)


def test_google_many_keys_span_several_index_blocks_and_large_tensor(tf, tmp_path):
    rng = np.random.default_rng(1)
    # Long, distinct names so the index outgrows TF's 256 KiB table block size.
    tensors = {f"v{i:05d}/" + "w" * 160: np.full((2,), i, "int32") for i in range(2000)}
    tensors["big"] = rng.standard_normal((1024, 1024)).astype("float32")  # 4 MiB of data
    prefix = write_google_checkpoint(tensors, str(tmp_path / "many.ckpt"))
    with open(prefix + ".index", "rb") as f:
        index = f.read()
    footer = index[-48:]
    _, pos = checkpoints._read_varint(footer, 0)
    _, pos = checkpoints._read_varint(footer, pos)
    index_block = checkpoints._read_block(index, footer[pos:], "index")
    assert len(list(checkpoints._block_entries(index_block))) >= 2  # several data blocks
    reader = open_checkpoint(prefix)
    assert len(reader) == 2001
    assert reader.get("v01999/" + "w" * 160).tolist() == [1999, 1999]
    np.testing.assert_array_equal(reader.get("big"), tensors["big"])
    assert assert_same_as_tf(tf, prefix, reader) == 2001


def test_google_checkpoint_with_several_data_shards(tf, tmp_path):
    """TF's sharded saves merge per-device bundles: one index, several data files."""
    first = write_google_checkpoint({"x": np.arange(3.0), "y": np.ones(2, "int32")}, str(tmp_path / "t" / "a"))
    second = write_google_checkpoint({"z": np.arange(4, dtype="float32")}, str(tmp_path / "t" / "b"))
    merged = str(tmp_path / "merged.ckpt")
    tf.raw_ops.MergeV2Checkpoints(checkpoint_prefixes=[first, second], destination_prefix=merged)
    assert os.path.isfile(merged + ".data-00001-of-00002")
    reader = open_checkpoint(merged)
    assert reader.get("z").tolist() == [0.0, 1.0, 2.0, 3.0] and reader.get("y").tolist() == [1, 1]
    assert assert_same_as_tf(tf, merged, reader) == 3
    os.remove(merged + ".data-00001-of-00002")
    with pytest.raises(FileNotFoundError, match=r"'z'.*merged\.ckpt\.data-00001-of-00002"):
        reader.get("z")


def _snappy_literals(data: bytes) -> bytes:
    """A valid (uncompressing) snappy stream: the size, then literals of <= 256 bytes."""
    out = bytearray()
    size = len(data)
    while True:  # varint
        out.append((size & 0x7F) | (0x80 if size > 0x7F else 0))
        size >>= 7
        if not size:
            break
    for start in range(0, len(data), 256):
        chunk = data[start : start + 256]
        out += bytes([60 << 2, len(chunk) - 1]) + chunk
    return bytes(out)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def test_snappy_decompress_handles_every_element_kind():
    # literal "abcd"; 1-byte-offset copy (len 4, off 4); overlapping 2-byte-offset copy (len 6, off 2);
    # 4-byte-offset copy (len 2, off 14)
    stream = _varint(16) + bytes([3 << 2]) + b"abcd" + bytes([0b000_000_01, 4])
    stream += bytes([(5 << 2) | 2, 2, 0]) + bytes([(1 << 2) | 3, 14, 0, 0, 0])
    assert checkpoints._snappy_decompress(stream) == b"abcdabcdcdcdcdab"
    with pytest.raises(ValueError, match="copy offset"):
        checkpoints._snappy_decompress(_varint(4) + bytes([0b000_000_01, 9]))


def _snappy_trailer(block: bytes) -> bytes:
    """A table block's trailer: compression type 1 (snappy), then the masked CRC32C of the block and that byte."""
    return b"\x01" + checkpoints._mask_crc(checkpoints._crc32c(block + b"\x01")).to_bytes(4, "little")


def test_google_reader_reads_snappy_compressed_index(tmp_path, toy_bert):
    """Rewrite the real index with snappy-compressed blocks; values must not change."""
    with open(toy_bert + ".index", "rb") as f:
        index = f.read()
    footer = index[-48:]
    _, pos = checkpoints._read_varint(footer, 0)
    _, pos = checkpoints._read_varint(footer, pos)
    blocks = [
        (key, checkpoints._read_block(index, handle, "index"))
        for key, handle in checkpoints._block_entries(checkpoints._read_block(index, footer[pos:], "index"))
    ]
    table, index_entries = bytearray(), []
    for key, block in blocks:
        compressed = _snappy_literals(block)
        index_entries.append((key, _varint(len(table)) + _varint(len(compressed))))
        table += compressed + _snappy_trailer(compressed)
    index_block = b"".join(_varint(0) + _varint(len(k)) + _varint(len(v)) + k + v for k, v in index_entries)
    index_block = _snappy_literals(index_block + (0).to_bytes(4, "little") + (1).to_bytes(4, "little"))
    handle = _varint(len(table)) + _varint(len(index_block))
    table += index_block + _snappy_trailer(index_block)
    table += (_varint(0) + _varint(0) + handle).ljust(40, b"\0") + (0xDB4775248B80FB57).to_bytes(8, "little")
    prefix = tmp_path / "snappy.ckpt"
    prefix.with_name("snappy.ckpt.index").write_bytes(bytes(table))
    data = Path(toy_bert + ".data-00000-of-00001").read_bytes()
    prefix.with_name("snappy.ckpt.data-00000-of-00001").write_bytes(data)
    original, rewritten = open_checkpoint(toy_bert), open_checkpoint(str(prefix))
    assert rewritten.keys() == original.keys()
    for name in original:
        np.testing.assert_array_equal(rewritten.get(name), original.get(name))


def test_google_reader_errors_name_the_problem(tf, tmp_path):
    prefix = write_google_checkpoint({"a": np.ones(3, "float32")}, str(tmp_path / "m.ckpt"))
    reader = open_checkpoint(prefix)
    with pytest.raises(KeyError, match=r"'missing/var'.*m\.ckpt"):
        reader.get("missing/var")
    assert "a" in reader and "b" not in reader
    # partitioned variables are listed but refuse to load with a clear message
    tf.raw_ops.SaveV2(
        prefix=str(tmp_path / "part.ckpt"), tensor_names=["part", "part"],
        shape_and_slices=["4 3 0,2:-", "4 3 2,2:-"], tensors=[tf.ones((2, 3)), tf.zeros((2, 3))],
    )
    sliced = open_checkpoint(str(tmp_path / "part.ckpt"))
    assert sliced.keys() == ["part"] and sliced.shape("part") == (4, 3)
    with pytest.raises(NotImplementedError, match="'part'.*slices"):
        sliced.get("part")
    # a truncated data file is reported, not silently returned short
    data_file = tmp_path / "m.ckpt.data-00000-of-00001"
    data_file.write_bytes(data_file.read_bytes()[:4])
    with pytest.raises(ValueError, match="truncated"):
        reader.get("a")
    (tmp_path / "bad.ckpt.index").write_bytes(b"not a table" * 10)
    with pytest.raises(ValueError, match="bad.ckpt.index.*magic"):
        open_checkpoint(str(tmp_path / "bad.ckpt"))


def test_reading_google_checkpoint_does_not_need_tensorflow(toy_bert):
    code = textwrap.dedent(f"""
        import sys
        sys.modules["tensorflow"] = None  # any 'import tensorflow' now fails
        from bert4x.checkpoints import open_checkpoint
        reader = open_checkpoint({toy_bert!r})
        print(reader.get("bert/embeddings/word_embeddings").shape, len(reader.keys()))
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(15, 4) 139"


def test_write_google_checkpoint_without_tensorflow_says_so(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    with pytest.raises(ImportError, match="tensorflow is needed to write Google-format"):
        write_google_checkpoint({"a": np.ones(2)}, str(tmp_path / "m.ckpt"))


def test_writers_reject_bad_input(tmp_path):
    with pytest.raises(ValueError, match="non-empty dict"):
        write_safetensors({}, str(tmp_path))
    with pytest.raises(ValueError, match="non-empty strings"):
        write_safetensors({"": np.ones(2)}, str(tmp_path))
    with pytest.raises(ValueError, match="'names'.*object"):
        write_safetensors({"names": np.array(["a"], dtype=object)}, str(tmp_path))
    with pytest.raises(ValueError, match="metadata"):
        write_safetensors({"a": np.ones(2)}, str(tmp_path), metadata={"step": 3})


# ---------------------------------------------------------------- Hugging Face formats


def test_safetensors_round_trip_folder_and_file(tmp_path):
    tensors = {k: v for k, v in mixed_tensors().items() if k not in ("layer/kernel_bf16", "text")}
    tensors["non_contiguous"] = np.arange(12, dtype="float32").reshape(3, 4).T
    written = write_safetensors(tensors, str(tmp_path / "folder"))
    assert written == str(tmp_path / "folder" / "model.safetensors")
    file_path = write_safetensors(tensors, str(tmp_path / "x" / "weights.safetensors"))
    assert file_path == str(tmp_path / "x" / "weights.safetensors")
    for path in (str(tmp_path / "folder"), file_path):
        reader = open_checkpoint(path)
        assert reader.format == "huggingface" and reader.keys() == sorted(tensors)
        assert reader.metadata() == {"format": "pt"}
        for name, expected in tensors.items():
            assert reader.shape(name) == expected.shape and reader.dtype(name) == expected.dtype.name
            actual = reader.get(name)
            assert actual.dtype == expected.dtype
            np.testing.assert_array_equal(actual, expected)
        assert dict(reader.items()).keys() == set(tensors)
        with pytest.raises(KeyError, match=r"'nope'.*model\.safetensors|'nope'.*weights\.safetensors"):
            reader.get("nope")


def test_safetensors_bfloat16_is_upcast_exactly(torch, tmp_path):
    from safetensors.torch import save_file

    values = torch.randn(5, 7).to(torch.bfloat16)
    save_file({"bf": values, "f32": torch.ones(2)}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    reader = open_checkpoint(str(tmp_path))
    assert reader.dtype("bf") == "bfloat16" and reader.shape("bf") == (5, 7)
    actual = reader.get("bf")
    assert actual.dtype == np.float32
    np.testing.assert_array_equal(actual, values.float().numpy())
    np.testing.assert_array_equal(reader.get("f32"), np.ones(2, "float32"))


def test_sharded_safetensors_index(tmp_path):
    shard_a = {"a.weight": np.arange(6, dtype="float32").reshape(2, 3)}
    shard_b = {"b.weight": np.ones((4,), "float16"), "b.bias": np.zeros(1, "int64")}
    write_safetensors(shard_a, str(tmp_path / "model-00001-of-00002.safetensors"))
    write_safetensors(shard_b, str(tmp_path / "model-00002-of-00002.safetensors"))
    weight_map = {**dict.fromkeys(shard_a, "model-00001-of-00002.safetensors"),
                  **dict.fromkeys(shard_b, "model-00002-of-00002.safetensors")}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert detect_format(str(tmp_path)) == "huggingface"
    reader = open_checkpoint(str(tmp_path))
    assert reader.keys() == ["a.weight", "b.bias", "b.weight"]
    for name, expected in {**shard_a, **shard_b}.items():
        assert reader.dtype(name) == expected.dtype.name
        np.testing.assert_array_equal(reader.get(name), expected)
    # a shard named in the index but absent is reported by name
    weight_map["c.weight"] = "model-00003-of-00003.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(FileNotFoundError, match="model-00003-of-00003.safetensors"):
        open_checkpoint(str(tmp_path))


def test_pytorch_bin_single_and_sharded(torch, tmp_path):
    state = {"w": torch.randn(3, 4), "h": torch.randn(2).half(), "bf": torch.randn(6).bfloat16(),
             "ids": torch.arange(5)}
    single = tmp_path / "single"
    single.mkdir()
    torch.save(state, single / "pytorch_model.bin")
    reader = open_checkpoint(str(single))
    assert reader.format == "huggingface" and reader.keys() == ["bf", "h", "ids", "w"]
    assert reader.dtype("bf") == "bfloat16" and reader.dtype("ids") == "int64"
    for name, tensor in state.items():
        expected = (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
        actual = reader.get(name)
        assert actual.dtype == expected.dtype and reader.shape(name) == expected.shape
        np.testing.assert_array_equal(actual, expected)

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    torch.save({"w": state["w"]}, sharded / "pytorch_model-00001-of-00002.bin")
    torch.save({"ids": state["ids"]}, sharded / "pytorch_model-00002-of-00002.bin")
    weight_map = {"w": "pytorch_model-00001-of-00002.bin", "ids": "pytorch_model-00002-of-00002.bin"}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    reader = open_checkpoint(str(sharded))
    assert reader.keys() == ["ids", "w"]
    np.testing.assert_array_equal(reader.get("w"), state["w"].numpy())
    np.testing.assert_array_equal(reader.get("ids"), state["ids"].numpy())


def test_pytorch_bin_without_torch_names_file_and_fix(torch, monkeypatch, tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "pytorch_model.bin").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"broken/pytorch_model\.bin"):
        open_checkpoint(str(tmp_path / "broken"))
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"pytorch_model\.bin.*pip install torch"):
        open_checkpoint(str(tmp_path))


# ---------------------------------------------------------------- detection


def test_detect_format_accepts_every_google_spelling(tf, tmp_path):
    prefix = write_google_checkpoint({"a": np.ones(2, "float32")}, str(tmp_path / "one" / "bert_model.ckpt"))
    for path in (prefix, prefix + ".index", prefix + ".data-00000-of-00001", str(tmp_path / "one")):
        assert detect_format(path) == "google", path
        assert open_checkpoint(path).path == prefix
    # a folder with several checkpoints needs TF's 'checkpoint' state file (or an explicit prefix)
    write_google_checkpoint({"a": np.zeros(2, "float32")}, str(tmp_path / "one" / "other.ckpt"))
    with pytest.raises(ValueError, match=r"2 TF checkpoints.*bert_model\.ckpt\.index.*other\.ckpt\.index"):
        detect_format(str(tmp_path / "one"))
    (tmp_path / "one" / "checkpoint").write_text('model_checkpoint_path: "/old/machine/other.ckpt"\n')
    reader = open_checkpoint(str(tmp_path / "one"))
    assert reader.path == str(tmp_path / "one" / "other.ckpt") and reader.get("a").tolist() == [0, 0]


def test_detect_format_huggingface_and_errors(tmp_path):
    write_safetensors({"a": np.ones(2, "float32")}, str(tmp_path / "hf"))
    assert detect_format(str(tmp_path / "hf")) == "huggingface"
    assert detect_format(str(tmp_path / "hf" / "model.safetensors")) == "huggingface"
    (tmp_path / "weights.bin").write_bytes(b"")
    assert detect_format(str(tmp_path / "weights.bin")) == "huggingface"

    missing = str(tmp_path / "nothing_here")
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        detect_format(missing)
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text("{}")
    (odd / "tf_model.h5").write_bytes(b"")
    with pytest.raises(ValueError, match=r"odd.*\['config.json', 'tf_model.h5'\]"):
        detect_format(str(odd))
    with pytest.raises(ValueError, match=r"unrecognised checkpoint file.*config\.json"):
        detect_format(str(odd / "config.json"))


# ---------------------------------------------------------------- CLI


def test_list_variables_cli_on_real_checkpoint(toy_bert, capsys):
    assert list_variables.main([toy_bert]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 140  # 139 variables + total
    rows = [line.split() for line in lines[:-1]]
    names = [row[0] for row in rows]
    assert names == sorted(names)
    word_embeddings = next(row for row in rows if row[0] == "bert/embeddings/word_embeddings")
    assert word_embeddings == ["bert/embeddings/word_embeddings", "[15,", "4]", "float32"]
    assert ["global_step", "[]", "int64"] in rows
    assert lines[-1] == "139 variables, 2,104 parameters (google checkpoint)"

    assert list_variables.main([toy_bert, "--filter", "word_embeddings"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[:-1]] == [
        "bert/embeddings/word_embeddings", "bert/embeddings/word_embeddings/adam_m",
        "bert/embeddings/word_embeddings/adam_v",
    ]
    assert out[-1] == "3 variables matching 'word_embeddings', 180 parameters (google checkpoint)"


def test_list_variables_cli_reports_errors(tmp_path, capsys):
    assert list_variables.main([str(tmp_path / "absent")]) == 1
    assert "absent" in capsys.readouterr().err


# ---- checksums


def test_crc32c_and_its_mask():
    assert checkpoints._crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value (RFC 3720)
    crc = 0xE3069283
    rotated = ((crc >> 15) | (crc << 17)) & 0xFFFFFFFF
    assert checkpoints._mask_crc(crc) == (rotated + 0xA282EAD8) & 0xFFFFFFFF


def test_checksums_of_tensorflow_written_checkpoints_verify(tf, tmp_path):
    """Files from TensorFlow's own writers (object-based, v1 Saver, raw SaveV2 via bert4x) carry checksums that the
    reader recomputes: every tensor, strings included, reads back equal to TensorFlow's reader."""
    tf2 = tf.train.Checkpoint(v=tf.Variable(np.arange(12, dtype="float32").reshape(3, 4)))
    prefixes = [tf2.save(str(tmp_path / "tf2" / "ckpt"))]
    with tf.Graph().as_default():
        tf.compat.v1.get_variable("bert/w", initializer=np.ones((2, 3), "float32"))
        tf.compat.v1.get_variable("bert/s", initializer=np.int64(7))
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            prefixes.append(tf.compat.v1.train.Saver().save(session, str(tmp_path / "v1" / "model.ckpt")))
    prefixes.append(write_google_checkpoint(mixed_tensors(), str(tmp_path / "mixed" / "model.ckpt")))
    for prefix in prefixes:
        reader, reference = open_checkpoint(prefix), tf.train.load_checkpoint(prefix)
        assert all(reader._entries[name]["crc32c"] is not None for name in reader)
        for name in reader:
            np.testing.assert_array_equal(reader.get(name), np.asarray(reference.get_tensor(name)))


def test_google_written_checkpoint_verifies(toy_bert):
    reader = open_checkpoint(toy_bert)
    assert len(reader) == 139
    for name in reader:
        assert reader._entries[name]["crc32c"] is not None
        reader.get(name)


def test_flipped_byte_in_data_is_refused_naming_file_and_variable(tmp_path):
    prefix = write_google_checkpoint({"a/kernel": np.ones((4, 4), "float32"), "b": np.zeros(3, "float32")},
                                     str(tmp_path / "m.ckpt"))
    reader = open_checkpoint(prefix)
    entry = reader._entries["a/kernel"]
    data = Path(prefix + ".data-00000-of-00001")
    raw = bytearray(data.read_bytes())
    raw[entry["offset"] + 5] ^= 0x10
    data.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"m\.ckpt\.data-00000-of-00001' is corrupt.*'a/kernel'.*CRC32C"):
        open_checkpoint(prefix).get("a/kernel")
    np.testing.assert_array_equal(open_checkpoint(prefix).get("b"), np.zeros(3))  # other tensors still read


def test_flipped_byte_in_index_is_refused_naming_the_file(tmp_path):
    prefix = write_google_checkpoint({"a/kernel": np.ones((4, 4), "float32")}, str(tmp_path / "m.ckpt"))
    index = Path(prefix + ".index")
    raw = bytearray(index.read_bytes())
    raw[3] ^= 0x40
    index.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"m\.ckpt\.index' is corrupt"):
        open_checkpoint(prefix)
