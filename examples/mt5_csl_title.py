"""CSL title generation (paper abstract -> title) with mT5 and the trimmed Chinese vocabulary, reporting ROUGE-L.

From scratch (a small random mT5, CPU-friendly; `--smoke` is a one-minute check):
    python examples/mt5_csl_title.py [--smoke]
Fine-tuning Google's mT5 (a TF checkpoint with a bert4keras-style or HF config.json, or a Hugging Face folder):
    python examples/mt5_csl_title.py --config mt5_small/config.json --checkpoint mt5_small/model.ckpt-1000000 \
        --epochs 5 --lr 2e-4

The trimmed vocabulary (`../shared/data/vocab/mt5_cn_trimmed`) is a 32596-piece sentencepiece model whose piece j is
mT5 id `keep_tokens[j]`: `load_keep_tokens` reads the pair and `keep_tokens=` cuts the embedding and the LM head of a
250112-row mT5 checkpoint down to those rows (a from-scratch model simply gets that vocabulary size).

Data: `../shared/data/datasets/summarization/csl_title` holds dev.tsv and test.tsv (1000 rows each, "to title\\t
abstract\\ttitle"); there is no train split there, so this trains on dev.tsv and evaluates on test.tsv. ROUGE-L is the
character-level LCS F1 (as bert4keras's CSL examples computed it on space-separated characters), averaged over titles.
Titles are generated with `bert4x.generation` (encoder once per batch, cached decoder; greedy or `--beams`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import keras
import numpy as np

from bert4x.generation import Generator
from bert4x.models import build_transformer_model, load_keep_tokens
from bert4x.snippets import DataGenerator, sequence_padding
from bert4x.tokenizers import SpTokenizer

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CSL = SHARED_DATA / "datasets" / "summarization" / "csl_title"
VOCAB = SHARED_DATA / "vocab" / "mt5_cn_trimmed"
SP_MODEL = VOCAB / "sentencepiece_cn.model"
KEEP_TOKENS = VOCAB / "sentencepiece_cn_keep_tokens.json"

# A small mT5 for runs from scratch: mT5's config with fewer, narrower layers (vocab_size is mT5's full 250112 rows,
# which keep_tokens brings down to the trimmed 32596).
SMALL_CONFIG = {
    "model_type": "mt5", "vocab_size": 250112, "d_model": 256, "d_kv": 32, "d_ff": 640, "num_heads": 8,
    "num_layers": 3, "num_decoder_layers": 3, "dropout_rate": 0.1, "feed_forward_proj": "gated-gelu",
    "tie_word_embeddings": False,
}
SMOKE_CONFIG = dict(SMALL_CONFIG, d_model=64, d_kv=16, d_ff=128, num_heads=4, num_layers=1, num_decoder_layers=1)


def load_csl(split: str, limit: int | None = None) -> list[tuple[str, str]]:
    """(abstract, title) pairs of 'dev' or 'test'."""
    path = CSL / f"{split}.tsv"
    if not path.exists():
        raise FileNotFoundError(f"CSL {split}.tsv not found at {path} (expected ../shared/data beside the repo).")
    pairs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 3:
                raise ValueError(f"{path}:{number}: expected 3 tab-separated fields, got {len(fields)}.")
            pairs.append((fields[1], fields[2]))
    return pairs[:limit] if limit else pairs


class TitleBatches(DataGenerator):
    """([abstract ids, decoder input ids], title ids + </s>) batches; the decoder input is the target behind id 0."""

    def __init__(self, data, tokenizer: SpTokenizer, max_source: int, max_target: int, batch_size: int, **kwargs):
        super().__init__(data, batch_size=batch_size, **kwargs)
        self.tokenizer, self.max_source, self.max_target = tokenizer, max_source, max_target

    def __iter__(self, random=False):
        sources, inputs, targets = [], [], []
        for is_end, (abstract, title) in self.sample(random):
            source, _ = self.tokenizer.encode(abstract, maxlen=self.max_source)
            target, _ = self.tokenizer.encode(title, maxlen=self.max_target)  # ends with </s> (id 1)
            sources.append(source)
            inputs.append([0] + target[:-1])
            targets.append(target)
            if len(sources) == self.batch_size or is_end:
                # Fixed shapes: one compiled train step (and Keras's tf.data adapter wants stable shapes too).
                yield ([sequence_padding(sources, self.max_source), sequence_padding(inputs, self.max_target)],
                       sequence_padding(targets, self.max_target))
                sources, inputs, targets = [], [], []


def rouge_l(candidate: str, reference: str) -> float:
    """Character-level ROUGE-L F1: the longest common subsequence against both lengths."""
    if not candidate or not reference:
        return 0.0
    previous = [0] * (len(reference) + 1)
    for a in candidate:
        current = [0]
        for j, b in enumerate(reference):
            current.append(previous[j] + 1 if a == b else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(candidate), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


def generate_titles(t5, tokenizer: SpTokenizer, abstracts: list[str], max_source: int, max_target: int,
                    beams: int = 1, batch_size: int = 32) -> list[str]:
    generator = Generator(t5)
    titles = []
    for start in range(0, len(abstracts), batch_size):
        prompts = [tokenizer.encode(a, maxlen=max_source)[0] for a in abstracts[start:start + batch_size]]
        outputs = generator.generate(prompts, max_len=max_target, end_id=tokenizer.end_id, num_beams=beams)
        titles.extend(tokenizer.decode(o) for o in outputs)
    return titles


def run(config=None, checkpoint=None, epochs=10, batch_size=16, max_source=256, max_target=32, lr=None, beams=1,
        train_limit=None, eval_limit=None, verbose=1, seed=42) -> dict:
    keras.utils.set_random_seed(seed)
    tokenizer = SpTokenizer(str(SP_MODEL), token_start=None, token_end="</s>")
    keep_tokens = load_keep_tokens(str(KEEP_TOKENS), str(SP_MODEL))
    t5 = build_transformer_model(config or SMALL_CONFIG, checkpoint, model="mt5.1.1", keep_tokens=keep_tokens,
                                 with_lm="linear", return_keras_model=False)
    assert t5.vocab_size == tokenizer.vocab_size  # the trimmed embedding covers exactly the tokenizer's ids
    t5.model.compile(
        optimizer=keras.optimizers.AdamW(lr or (2e-4 if checkpoint else 1e-3), weight_decay=0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=0),  # 0 pads the targets
        jit_compile="auto",
    )
    train = TitleBatches(load_csl("dev", train_limit), tokenizer, max_source, max_target, batch_size)
    start = time.time()
    history = t5.model.fit(train, epochs=epochs, verbose=verbose)
    train_seconds = time.time() - start
    test = load_csl("test", eval_limit)
    start = time.time()
    titles = generate_titles(t5, tokenizer, [a for a, _ in test], max_source, max_target, beams)
    scores = [rouge_l(title, reference) for title, (_, reference) in zip(titles, test)]
    return {
        "rouge_l": float(np.mean(scores)),
        "final_train_loss": float(history.history["loss"][-1]),
        "train_samples": len(train.data),
        "eval_samples": len(test),
        "train_seconds": round(train_seconds, 1),
        "generate_seconds": round(time.time() - start, 1),
        "examples": [{"generated": t, "reference": r} for t, (_, r) in list(zip(titles, test))[:3]],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="mT5 config.json (HF or bert4keras style); default: a small random mT5")
    parser.add_argument("--checkpoint", help="Google TF checkpoint prefix or Hugging Face folder of mT5")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-source", type=int, default=256, help="abstract tokens kept (with </s>)")
    parser.add_argument("--max-target", type=int, default=32,
                        help="title tokens (with </s>), also the generation limit")
    parser.add_argument("--lr", type=float, help="default 1e-3 from scratch, 2e-4 with --checkpoint")
    parser.add_argument("--beams", type=int, default=1, help="beam width for generation (1 = greedy)")
    parser.add_argument("--train-limit", type=int)
    parser.add_argument("--eval-limit", type=int)
    parser.add_argument("--smoke", action="store_true", help="tiny model, 64 training / 16 test rows, 1 epoch")
    args = parser.parse_args(argv)
    config = args.config
    if args.smoke:
        config = config or SMOKE_CONFIG
        args.epochs, args.train_limit, args.eval_limit = 1, args.train_limit or 64, args.eval_limit or 16
        args.max_source = min(args.max_source, 128)
    result = run(config, args.checkpoint, args.epochs, args.batch_size, args.max_source, args.max_target, args.lr,
                 args.beams, args.train_limit, args.eval_limit)
    print(json.dumps(result, ensure_ascii=False, indent=2))


if __name__ == "__main__":
    main()
