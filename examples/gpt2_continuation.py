"""Chinese text continuation with a GPT-2 (CPM-LM / GPT2-ML style): nucleus (top-p) sampling through
`bert4x.generation.Generator` (batched, KV cache, one compiled loop).

A tiny random GPT-2 (`--smoke`, a few seconds on CPU; the text is noise, the pipeline is real):
    python examples/gpt2_continuation.py --smoke
A released checkpoint (Hugging Face folder or Google TF checkpoint, with its config and vocabulary):
    python examples/gpt2_continuation.py --model gpt2_ml --config gpt2_ml/config.json \
        --checkpoint gpt2_ml/model.ckpt-100000 --vocab gpt2_ml/vocab.txt --prompt "今天天气不错" --samples 3
    python examples/gpt2_continuation.py --model gpt2 --config cpm/config.json --checkpoint cpm \
        --vocab cpm/chinese_vocab.model

How: the prompt is tokenized without its final end token (a WordPiece `vocab.txt`, as GPT2-ML and NEZHA-GEN ship,
keeps `[CLS]` in front; a sentencepiece `.model`, as CPM-LM ships, is read with jieba pre-tokenization), repeated
`--samples` times in one batch, and each row is sampled independently: `top_p` keeps the likeliest tokens whose
probabilities first reach p, `top_k` caps their number, `temperature` flattens or sharpens the distribution, and
`repetition_penalty` discourages tokens already generated. Generation stops at the end token or after `--max-len`
tokens. The output is JSON: the prompt and, per sample, the generated ids and text.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import keras

from bert4x.generation import Generator
from bert4x.models import build_transformer_model
from bert4x.tokenizers import SpTokenizer, Tokenizer, load_vocab

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VOCAB = SHARED_DATA / "vocab" / "bert_chinese" / "vocab.txt"
SMOKE_CONFIG = {"vocab_size": 21128, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                "intermediate_size": 64, "max_position": 128}


def load_tokenizer(vocab: str):
    """A WordPiece tokenizer for `vocab.txt` files, a jieba + sentencepiece one for `.model` files.

    Args:
        vocab: the release's vocab.txt or sentencepiece model.
    """
    if str(vocab).endswith(".model"):
        import jieba

        return SpTokenizer(str(vocab), token_start=None, token_end=None,
                           pre_tokenize=lambda s: jieba.cut(s, HMM=False))
    return Tokenizer(load_vocab(vocab), do_lower_case=True)


def continue_text(model, tokenizer, prompt: str, samples: int = 3, max_len: int = 32, top_p: float = 0.95,
                  top_k: int | None = None, temperature: float = 1.0, repetition_penalty: float = 1.0,
                  seed: int = 0) -> list[dict]:
    """`samples` continuations of `prompt`: a list of {"ids", "text"}.

    Args:
        model: a keras model from `build_transformer_model(..., model='gpt2' | 'gpt2_ml' | 'gpt')`.
        tokenizer: its tokenizer (`load_tokenizer`).
        prompt: the text to continue.
        samples: how many continuations (rows of one batch).
        max_len: most tokens generated per continuation.
        top_p: nucleus sampling threshold in (0, 1].
        top_k: also keep at most this many tokens, or None.
        temperature: logits are divided by it.
        repetition_penalty: > 1 discourages repeating generated tokens.
        seed: makes the samples reproducible.
    """
    ids = tokenizer.encode(prompt)[0]
    if tokenizer.end_id is not None and ids and ids[-1] == tokenizer.end_id:
        ids = ids[:-1]  # continue the text, do not start after its end
    if not ids:
        raise ValueError(f"prompt {prompt!r} has no tokens to continue.")
    outputs = Generator(model).generate(
        [ids] * samples, max_len=max_len, end_id=tokenizer.end_id, do_sample=True, top_p=top_p, top_k=top_k,
        temperature=temperature, repetition_penalty=repetition_penalty, seed=seed)
    return [{"ids": o, "text": tokenizer.decode(o)} for o in outputs]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2", choices=["gpt2", "gpt2_ml", "gpt"])
    parser.add_argument("--config", help="the release's config.json; default with --smoke: a tiny random GPT-2")
    parser.add_argument("--checkpoint", help="Google TF checkpoint prefix or Hugging Face folder")
    parser.add_argument("--vocab", help=f"vocab.txt (WordPiece) or a sentencepiece .model (default {VOCAB})")
    parser.add_argument("--prompt", default="今天天气不错，")
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--max-len", type=int, default=32)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a tiny random GPT-2, 16 tokens")
    args = parser.parse_args(argv)
    if args.smoke:
        args.max_len = min(args.max_len, 16)
    elif not args.config:
        parser.error("--config is required (or --smoke for a tiny random model)")
    keras.utils.set_random_seed(args.seed)
    tokenizer = load_tokenizer(args.vocab or VOCAB)
    model = build_transformer_model(args.config or SMOKE_CONFIG, args.checkpoint, model=args.model)
    samples = continue_text(model, tokenizer, args.prompt, args.samples, args.max_len, args.top_p, args.top_k,
                            args.temperature, args.repetition_penalty, args.seed)
    print(json.dumps({"model": args.model, "prompt": args.prompt, "samples": samples}, ensure_ascii=False))


if __name__ == "__main__":
    main()
