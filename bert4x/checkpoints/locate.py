"""Finding a checkpoint: `detect_format` resolves a prefix, file or folder to its format, and `open_checkpoint`
returns the reader for it."""

from __future__ import annotations

import glob
import os
import re

from bert4x.checkpoints.google import _GoogleReader
from bert4x.checkpoints.huggingface import (
    SAFETENSORS_FILE,
    SAFETENSORS_INDEX,
    TORCH_FILE,
    TORCH_INDEX,
    _SafetensorsReader,
    _ShardedReader,
    _TorchBinReader,
)
from bert4x.checkpoints.reader import CheckpointReader

# Preference order when a folder holds several Hugging Face weight files.
_HF_FOLDER_FILES = (
    (SAFETENSORS_FILE, "safetensors"),
    (SAFETENSORS_INDEX, "safetensors_index"),
    (TORCH_FILE, "bin"),
    (TORCH_INDEX, "bin_index"),
)
_DATA_SUFFIX = re.compile(r"\.data-\d{5}-of-\d{5}$")


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
