"""Convert a checkpoint between the Google TF and Hugging Face formats, using bert4x's mapping tables.

    python -m weights_converters.convert --model bert --config bert_config.json \
        --source chinese_L-12_H-768_A-12/bert_model.ckpt --target out_hf --target-format huggingface

Every variable of the source must map (optimizer slots and step counters are dropped), so nothing is lost silently,
and every tensor must have the shape the config implies, so the config written beside the weights describes them.
The target's config file (bert_config.json or config.json) is written beside it. Existing files are never replaced
unless `--force` is given; each file is written under a temporary name in its folder and then renamed, so an
interrupted run leaves either the old file or the new one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

from bert4x.checkpoints import SAFETENSORS_FILE, write_google_checkpoint, write_safetensors
from bert4x.models.base import MODELS, CheckpointError, read_config

_GOOGLE_SUFFIXES = (".data-00000-of-00001", ".index")  # the order they are renamed in


class TargetExistsError(FileExistsError):
    """The conversion would replace existing files (pass `force=True` / `--force` to allow it)."""


def target_files(transformer, target: str, target_format: str) -> list[str]:
    """The files a conversion to `target` writes, in the order they are renamed into place.

    Args:
        transformer: the model template built from the config (it names the config file).
        target: a checkpoint prefix (google) or a folder (huggingface).
        target_format: 'google' or 'huggingface'.
    """
    name, _ = transformer.export_config(target_format)
    if target_format == "google":
        prefix = os.path.abspath(target)
        return [prefix + suffix for suffix in _GOOGLE_SUFFIXES] + [os.path.join(os.path.dirname(prefix), name)]
    if target_format == "huggingface":
        return [os.path.join(os.path.abspath(target), SAFETENSORS_FILE), os.path.join(os.path.abspath(target), name)]
    raise ValueError(f"--target-format must be 'google' or 'huggingface', got {target_format!r}.")


def check_shapes(transformer, tensors: dict[str, np.ndarray], target_format: str, config_path: str) -> None:
    """Raises `CheckpointError` unless every weight the config implies is among `tensors`, with the config's shape.

    Args:
        transformer: the model template built from the config.
        tensors: the converted tensors, under `target_format` names.
        target_format: 'google' or 'huggingface'.
        config_path: the config's path, named in the error.
    """
    model = transformer.model or transformer.build()
    table = transformer._resolve_table(target_format)
    wrong, absent = [], []
    for weight in model.weights:
        source = table.get(weight.path)
        if source is None:
            continue
        expected = transformer._write_source(source, np.empty(weight.shape, "float32"))
        for name, value in expected.items():
            if name not in tensors:
                if not source.optional:
                    absent.append(name)
            elif tuple(tensors[name].shape) != tuple(value.shape):
                wrong.append(f"{name}: checkpoint {tuple(tensors[name].shape)}, config implies {tuple(value.shape)}")
    if wrong or absent:
        lines = [f"The weights do not match config {config_path}; nothing was written."]
        if wrong:
            lines.append(f"{len(wrong)} shapes differ: " + "; ".join(wrong[:20]))
        if absent:
            lines.append(f"{len(absent)} weights the config implies are not in the source: {absent[:20]}")
        raise CheckpointError("\n".join(lines))


def convert(model: str, config_path: str, source: str, target: str, target_format: str, force: bool = False) -> str:
    """Converts `source` to `target_format` at `target` (a prefix for 'google', a folder for 'huggingface').

    Args:
        model: a registered model name ('bert', 'roformer', 'mt5', ...).
        config_path: the source's config file (Google or Hugging Face JSON).
        source: the source checkpoint (prefix, folder or file).
        target: a checkpoint prefix (google) or a folder (huggingface).
        target_format: 'google' or 'huggingface'.
        force: replace existing target files; without it, `TargetExistsError` lists them and nothing is written.

    Returns:
        The target prefix (google) or folder (huggingface).
    """
    import bert4x.models  # noqa: F401  (registers the models)

    if model not in MODELS:
        raise ValueError(f"Unknown model {model!r}; registered models: {sorted(MODELS)}.")
    transformer = MODELS[model].from_config(read_config(config_path), config_path)
    files = target_files(transformer, target, target_format)
    existing = [path for path in files if os.path.exists(path)]
    if existing and not force:
        raise TargetExistsError(f"these files exist and would be replaced (pass --force to replace them): {existing}")
    tensors = transformer.convert_checkpoint(source, target_format)
    check_shapes(transformer, tensors, target_format, config_path)
    _, config = transformer.export_config(target_format)
    folder = os.path.dirname(files[-1])
    os.makedirs(folder, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".bert4x-convert-", dir=folder)  # same folder, so renames are atomic
    try:
        staged = [os.path.join(staging, os.path.basename(path)) for path in files]
        if target_format == "google":
            write_google_checkpoint(tensors, os.path.join(staging, os.path.basename(target)))
        else:
            write_safetensors(tensors, staged[0])
        with open(staged[-1], "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
        # Data before index and weights before config: a reader never finds a new index over an old data file.
        for temporary, final in zip(staged, files):
            os.replace(temporary, final)
    finally:
        for name in os.listdir(staging):
            os.remove(os.path.join(staging, name))
        os.rmdir(staging)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bert", help="registered model name (bert, wobert, roformer, ...)")
    parser.add_argument("--config", required=True, help="the source's config (Google or Hugging Face JSON)")
    parser.add_argument("--source", required=True, help="source checkpoint (prefix, folder or file)")
    parser.add_argument("--target", required=True, help="a checkpoint prefix (google) or a folder (huggingface)")
    parser.add_argument("--target-format", required=True, choices=["google", "huggingface"])
    parser.add_argument("--force", action="store_true", help="replace target files that already exist")
    args = parser.parse_args(argv)
    try:
        out = convert(args.model, args.config, args.source, args.target, args.target_format, force=args.force)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.target_format} checkpoint: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
