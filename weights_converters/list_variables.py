"""List the variables of a checkpoint: name, shape and dtype, plus a parameter count.

Works on Google/TensorFlow checkpoints (no TensorFlow needed) and Hugging Face
safetensors / pytorch_model.bin files or folders.

Example:
    python -m weights_converters.list_variables \\
        ../shared/data/checkpoints/keras-bert_test_checkpoint_tf/bert_model.ckpt --filter embeddings
"""

from __future__ import annotations

import argparse
import math
import sys

from bert4x.checkpoints import open_checkpoint


def format_listing(path: str, name_filter: str | None = None) -> str:
    """Return the listing printed by the CLI: one ``name  shape  dtype`` row per variable.

    Example:
        >>> import numpy as np, tempfile
        >>> from bert4x.checkpoints import write_safetensors
        >>> print(format_listing(write_safetensors({"w": np.zeros((2, 3), "float32")}, tempfile.mkdtemp())))
        w  [2, 3]  float32
        1 variables, 6 parameters (huggingface checkpoint)
    """
    reader = open_checkpoint(path)
    names = [name for name in reader if name_filter is None or name_filter in name]
    rows = [(name, str(list(reader.shape(name))), str(reader.dtype(name))) for name in names]
    name_width = max((len(row[0]) for row in rows), default=0)
    shape_width = max((len(row[1]) for row in rows), default=0)
    lines = [f"{name:<{name_width}}  {shape:<{shape_width}}  {dtype}" for name, shape, dtype in rows]
    total = sum(math.prod(reader.shape(name)) for name in names)
    matching = f" matching {name_filter!r}" if name_filter is not None else ""
    lines.append(f"{len(names)} variables{matching}, {total:,} parameters ({reader.format} checkpoint)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m weights_converters.list_variables",
        description="Print name, shape and dtype of every variable in a checkpoint, sorted by name.",
    )
    parser.add_argument("path", help="TF checkpoint prefix/folder, or Hugging Face folder/.safetensors/.bin file")
    parser.add_argument("--filter", metavar="SUBSTR", help="only list variables whose name contains SUBSTR")
    args = parser.parse_args(argv)
    try:
        print(format_listing(args.path, args.filter))
    except (OSError, ValueError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
