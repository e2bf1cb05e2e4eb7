"""Convert a checkpoint between the Google TF and Hugging Face formats, using bert4x's mapping tables.

    python -m weights_converters.convert --model bert --config bert_config.json \
        --source chinese_L-12_H-768_A-12/bert_model.ckpt --target out_hf --target-format huggingface

Every variable of the source must map (optimizer slots and step counters are dropped), so nothing is lost silently.
The target's config file (bert_config.json or config.json) is written beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from bert4x.checkpoints import write_google_checkpoint, write_safetensors
from bert4x.models.base import MODELS, read_config


def convert(model: str, config_path: str, source: str, target: str, target_format: str) -> str:
    """Converts `source` to `target_format` at `target` (a prefix for 'google', a folder for 'huggingface')."""
    import bert4x.models  # noqa: F401  (registers the models)

    if model not in MODELS:
        raise ValueError(f"Unknown model {model!r}; registered models: {sorted(MODELS)}.")
    transformer = MODELS[model].from_config(read_config(config_path), config_path)
    tensors = transformer.convert_checkpoint(source, target_format)
    if target_format == "google":
        out = write_google_checkpoint(tensors, target)
        folder = os.path.dirname(os.path.abspath(out))
    elif target_format == "huggingface":
        os.makedirs(target, exist_ok=True)
        write_safetensors(tensors, os.path.join(target, "model.safetensors"))
        out = folder = target
    else:
        raise ValueError(f"--target-format must be 'google' or 'huggingface', got {target_format!r}.")
    name, config = transformer.export_config(target_format)
    with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bert", help="registered model name (bert, wobert, roformer, ...)")
    parser.add_argument("--config", required=True, help="the source's config (Google or Hugging Face JSON)")
    parser.add_argument("--source", required=True, help="source checkpoint (prefix, folder or file)")
    parser.add_argument("--target", required=True, help="target: a checkpoint prefix (google) or a folder (huggingface)")
    parser.add_argument("--target-format", required=True, choices=["google", "huggingface"])
    args = parser.parse_args(argv)
    try:
        out = convert(args.model, args.config, args.source, args.target, args.target_format)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.target_format} checkpoint: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
