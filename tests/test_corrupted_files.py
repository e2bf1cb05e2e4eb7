"""A damaged file is refused with its name, or (where a format has no checksum) the limit is known: a byte flipped,
the file truncated, or emptied, for a Google checkpoint's .index and .data, safetensors and config.json."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from bert4x.checkpoints import open_checkpoint
from bert4x.models import build_transformer_model

CONFIG = {"vocab_size": 40, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
          "intermediate_size": 16, "max_position_embeddings": 12}
CORRUPTIONS = ["flip-start", "flip-quarter", "flip-middle", "flip-three-quarters", "flip-end", "truncate", "empty"]


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    folder = tmp_path_factory.mktemp("originals")
    transformer = build_transformer_model(CONFIG, return_keras_model=False)
    transformer.save_weights_as_checkpoint(str(folder / "google" / "bert_model.ckpt"), "google")
    transformer.save_weights_as_checkpoint(str(folder / "hf"), "huggingface")
    return folder


def corrupt(path: Path, how: str) -> None:
    raw = bytearray(path.read_bytes())
    if how == "empty":
        raw = bytearray()
    elif how == "truncate":
        raw = raw[: len(raw) // 2]
    else:  # 'flip' inverts a byte; 'nudge' changes its lowest bit (in a text file: another ASCII char)
        kind, where = how.split("-", 1)
        fraction = {"start": 0, "quarter": 0.25, "middle": 0.5, "three-quarters": 0.75, "end": 1}[where]
        raw[min(int(len(raw) * fraction), len(raw) - 1)] ^= 0xFF if kind == "flip" else 0x01
    path.write_bytes(bytes(raw))


def copy(originals: Path, tmp_path: Path, what: str) -> Path:
    shutil.copytree(originals / what, tmp_path / what)
    return tmp_path / what


def read_all(path: str) -> dict[str, np.ndarray]:
    reader = open_checkpoint(path)
    return {name: reader.get(name) for name in reader}


@pytest.mark.parametrize("how", CORRUPTIONS)
@pytest.mark.parametrize("suffix", [".index", ".data-00000-of-00001"])
def test_google_checkpoint_files(originals, tmp_path, suffix, how):
    folder = copy(originals, tmp_path, "google")
    prefix = str(folder / "bert_model.ckpt")
    want = read_all(prefix)
    corrupt(Path(prefix + suffix), how)
    try:
        got = read_all(prefix)
    except ValueError as error:
        assert f"bert_model.ckpt{suffix}" in str(error), error
        return
    # Only bytes that nothing reads (the footer's padding) may change without an error, and then nothing changed.
    assert suffix == ".index" and how == "flip-end" or got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    assert suffix == ".index", f"a corrupted .data file ({how}) was read without an error"


def safetensors_data_start(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_safetensors_file(originals, tmp_path, how):
    folder = copy(originals, tmp_path, "hf")
    path = folder / "model.safetensors"
    want, data_start, size = read_all(str(path)), safetensors_data_start(path), path.stat().st_size
    corrupt(path, how)
    try:
        got = read_all(str(path))
    except ValueError as error:
        assert "model.safetensors" in str(error), error
        return
    flipped_at = min(int(size * {"flip-start": 0, "flip-quarter": 0.25, "flip-middle": 0.5,
                                 "flip-three-quarters": 0.75, "flip-end": 1}.get(how, 0)), size - 1)
    # safetensors stores no checksum: a flipped byte among the tensor bytes reads without an error (README says so).
    assert how.startswith("flip") and flipped_at >= data_start, f"{how} at byte {flipped_at} read without an error"
    assert any(not np.array_equal(got[name], want[name]) for name in want)


@pytest.mark.parametrize("how", CORRUPTIONS + ["nudge-quarter", "nudge-middle", "nudge-three-quarters"])
@pytest.mark.parametrize("layout", ["hf", "google"])
def test_config_file(originals, tmp_path, layout, how):
    folder = copy(originals, tmp_path, layout)
    config = folder / ("config.json" if layout == "hf" else "bert_config.json")
    checkpoint = str(folder if layout == "hf" else folder / "bert_model.ckpt")
    reference = build_transformer_model(str(config), checkpoint).get_weights()
    corrupt(config, how)
    try:
        model = build_transformer_model(str(config), checkpoint)
    except (ValueError, TypeError) as error:
        if how in ("truncate", "empty") or "not valid" in str(error):
            assert str(config) in str(error), error  # unreadable: the file is named
        return
    # A changed byte that still parses and matches the weights must not change the model.
    for got, want in zip(model.get_weights(), reference):
        np.testing.assert_array_equal(got, want)


def test_config_matrix_covers_both_layouts(originals):
    assert json.loads((originals / "hf" / "config.json").read_text())["hidden_size"] == 8
    assert json.loads((originals / "google" / "bert_config.json").read_text())["hidden_size"] == 8
