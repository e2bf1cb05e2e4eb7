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

Modules: ``locate`` (``detect_format``, ``open_checkpoint``), ``reader`` (``CheckpointReader``), ``google`` (the
tensor-bundle reader and writer) and ``huggingface`` (safetensors / ``.bin`` readers, the safetensors writer).
Import everything from ``bert4x.checkpoints``.
"""

# The private helpers below stay importable from here for the tests of the tensor-bundle parser.
from bert4x.checkpoints.google import (  # noqa: F401
    _block_entries,
    _crc32c,
    _mask_crc,
    _read_block,
    _read_varint,
    _snappy_decompress,
    write_google_checkpoint,
)
from bert4x.checkpoints.huggingface import (  # noqa: F401
    SAFETENSORS_FILE,
    SAFETENSORS_INDEX,
    TORCH_FILE,
    TORCH_INDEX,
    write_safetensors,
)
from bert4x.checkpoints.locate import detect_format, open_checkpoint
from bert4x.checkpoints.reader import CheckpointReader

__all__ = [
    "CheckpointReader",
    "detect_format",
    "open_checkpoint",
    "write_google_checkpoint",
    "write_safetensors",
]
