"""CSL title generation (paper abstract -> title) with a UniLM BERT/RoFormer (application='unilm'), reporting ROUGE-L.

From scratch (a small random model; `--smoke` is a well-under-a-minute check of the whole pipeline):
    python examples/unilm_csl_title.py [--smoke] [--model roformer] [--epochs 10] [--beams 3]
Fine-tuning a released checkpoint (Google format or a Hugging Face folder, with its config and vocab):
    python examples/unilm_csl_title.py --config chinese_L-12_H-768_A-12/bert_config.json \
        --checkpoint chinese_L-12_H-768_A-12/bert_model.ckpt --vocab chinese_L-12_H-768_A-12/vocab.txt --lr 2e-5

How (as bert4keras's task_seq2seq_autotitle): the input is `[CLS] abstract [SEP] title [SEP]` with segment ids 0 for
the abstract and 1 for the title; the UniLM mask lets the abstract attend to itself both ways and each title token to
the abstract and the title tokens before it; the loss is the cross-entropy of every title token (and its final
[SEP]) predicted at the position before it. The vocabulary is the Chinese BERT one (`../shared/data/vocab/bert_chinese`)
simplified as in bert4keras (`load_vocab(simplified=True)`, whose `keep_tokens` also slices a checkpoint's embedding);
from scratch it is cut further to the tokens the training texts use.

Data: `../shared/data/datasets/summarization/csl_title` has dev.tsv and test.tsv (1000 rows each, "to title\\t
abstract\\ttitle") and no train split, so this trains on dev.tsv and evaluates on test.tsv. Titles are generated with
`bert4x.generation` (batched, KV cache; greedy or `--beams`). ROUGE-L is the character-level LCS F1, averaged.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import keras
import numpy as np

from bert4x.generation import Generator
from bert4x.models import build_transformer_model
from bert4x.snippets import DataGenerator, sequence_padding
from bert4x.tokenizers import Tokenizer, load_vocab

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CSL = SHARED_DATA / "datasets" / "summarization" / "csl_title"
VOCAB = SHARED_DATA / "vocab" / "bert_chinese" / "vocab.txt"

SMALL_CONFIG = {
    "vocab_size": 21128, "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
    "intermediate_size": 1024, "hidden_act": "gelu", "max_position_embeddings": 512, "type_vocab_size": 2,
    "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
}
SMOKE_CONFIG = dict(SMALL_CONFIG, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128)


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


def load_tokenizer(vocab, texts=None) -> tuple[Tokenizer, list[int]]:
    """bert4keras's simplified Chinese vocabulary, and the `keep_tokens` that slice a checkpoint's embedding to it.

    With `texts` (training from scratch) the vocabulary is cut further to the tokens those texts use (plus the
    special tokens): rows no text uses would never be trained, and a smaller output layer trains much faster.
    """
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    token_dict, keep_tokens = load_vocab(vocab or VOCAB, simplified=True, startswith=specials)
    tokenizer = Tokenizer(token_dict, do_lower_case=True)
    if texts is None:
        return tokenizer, keep_tokens
    used = sorted({i for text in texts for i in tokenizer.encode(text)[0]} | {token_dict[t] for t in specials})
    id_to_token = {i: t for t, i in token_dict.items()}
    token_dict = {id_to_token[i]: n for n, i in enumerate(used)}
    return Tokenizer(token_dict, do_lower_case=True), [keep_tokens[i] for i in used]


def encode_pair(tokenizer: Tokenizer, abstract: str, title: str | None, max_source: int, max_target: int):
    """`[CLS] abstract [SEP]` (segment 0) + `title [SEP]` (segment 1); the title part is left out if None."""
    source, _ = tokenizer.encode(abstract, maxlen=max_source)
    if title is None:
        return source, [0] * len(source)
    target = tokenizer.encode(title, maxlen=max_target + 1)[0][1:]  # drop [CLS]: title [SEP]
    return source + target, [0] * len(source) + [1] * len(target)


class UniLMBatches(DataGenerator):
    """([token_ids, segment_ids], next-token ids, weights) from (source, target) texts: weight 1 where the next
    token is a target token (the UniLM seq2seq loss)."""

    def __init__(self, data, tokenizer, max_source, max_target, batch_size, **kwargs):
        super().__init__(data, batch_size=batch_size, **kwargs)
        self.tokenizer, self.max_source, self.max_target = tokenizer, max_source, max_target

    def __iter__(self, random=False):
        length = self.max_source + self.max_target  # one fixed shape: one compiled train step
        tokens, segments = [], []
        for is_end, (abstract, title) in self.sample(random):
            t, s = encode_pair(self.tokenizer, abstract, title, self.max_source, self.max_target)
            tokens.append(t)
            segments.append(s)
            if len(tokens) == self.batch_size or is_end:
                token_ids = sequence_padding(tokens, length)
                segment_ids = sequence_padding(segments, length)
                next_ids = np.concatenate([token_ids[:, 1:], np.zeros_like(token_ids[:, :1])], axis=1)
                weights = np.concatenate([segment_ids[:, 1:], np.zeros_like(segment_ids[:, :1])], axis=1)
                yield (token_ids, segment_ids), next_ids, weights.astype("float32")
                tokens, segments = [], []


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


def generate_titles(model, tokenizer, abstracts, max_source, max_target, beams=1, batch_size=32) -> list[str]:
    generator = Generator(model)
    titles = []
    for start in range(0, len(abstracts), batch_size):
        prompts = [encode_pair(tokenizer, a, None, max_source, max_target)[0]
                   for a in abstracts[start:start + batch_size]]
        outputs = generator.generate(prompts, max_len=max_target, end_id=tokenizer.end_id, num_beams=beams)
        titles.extend(tokenizer.decode(o) for o in outputs)
    return titles


def run(model_name="bert", config=None, checkpoint=None, vocab=None, epochs=10, steps=None, batch_size=16,
        max_source=192, max_target=32, lr=None, beams=1, train_limit=None, eval_limit=None, verbose=2,
        seed=42) -> dict:
    keras.utils.set_random_seed(seed)
    train_pairs, test = load_csl("dev", train_limit), load_csl("test", eval_limit)
    texts = None if checkpoint else [t for pair in train_pairs for t in pair]
    tokenizer, keep_tokens = load_tokenizer(vocab, texts)
    model = build_transformer_model(config or SMALL_CONFIG, checkpoint, model=model_name, application="unilm",
                                    with_mlm="linear", keep_tokens=keep_tokens)
    model.compile(
        optimizer=keras.optimizers.AdamW(lr or (2e-5 if checkpoint else 1e-3), weight_decay=0.01),
        # Averaged over the target tokens only (the weights), not over every position.
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="mean_with_sample_weight"),
        jit_compile="auto",
    )
    train = UniLMBatches(train_pairs, tokenizer, max_source, max_target, batch_size)
    if steps:
        train.steps = min(steps, len(train))
        train.data = train.data[: train.steps * batch_size]
    start = time.time()
    history = model.fit(train, epochs=epochs, verbose=verbose)
    train_seconds = time.time() - start
    start = time.time()
    titles = generate_titles(model, tokenizer, [a for a, _ in test], max_source, max_target, beams)
    generate_seconds = time.time() - start
    scores = [rouge_l(title, reference) for title, (_, reference) in zip(titles, test)]
    return {
        "model": model_name,
        "rouge_l": round(float(np.mean(scores)), 4),
        "final_train_loss": round(float(history.history["loss"][-1]), 4),
        "vocab_size": tokenizer.vocab_size,
        "train_samples": len(train.data),
        "epochs": epochs,
        "eval_samples": len(test),
        "beams": beams,
        "train_seconds": round(train_seconds, 1),
        "generate_seconds": round(generate_seconds, 1),
        "backend": keras.backend.backend(),
        "examples": [{"generated": t, "reference": r} for t, (_, r) in list(zip(titles, test))[:3]],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bert", help="bert4x model: bert, roberta, wobert, roformer, roformer_v2")
    parser.add_argument("--config", help="bert_config.json / config.json; default: a small random model")
    parser.add_argument("--checkpoint", help="Google TF checkpoint prefix or Hugging Face folder")
    parser.add_argument("--vocab", help=f"vocab.txt (default {VOCAB})")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--steps", type=int, help="at most this many batches per epoch")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-source", type=int, default=192, help="abstract tokens kept ([CLS] and [SEP] included)")
    parser.add_argument("--max-target", type=int, default=32, help="title tokens with [SEP]; the generation limit")
    parser.add_argument("--lr", type=float, help="default 1e-3 from scratch, 2e-5 with --checkpoint")
    parser.add_argument("--beams", type=int, default=1, help="beam width for generation (1 = greedy)")
    parser.add_argument("--train-limit", type=int)
    parser.add_argument("--eval-limit", type=int)
    parser.add_argument("--smoke", action="store_true", help="tiny model, 64 training / 16 test rows, 1 epoch")
    args = parser.parse_args(argv)
    config = args.config
    if args.smoke:
        config = config or SMOKE_CONFIG
        args.epochs, args.train_limit, args.eval_limit = 1, args.train_limit or 64, args.eval_limit or 16
        args.max_source = min(args.max_source, 96)
    result = run(args.model, config, args.checkpoint, args.vocab, args.epochs, args.steps, args.batch_size,
                 args.max_source, args.max_target, args.lr, args.beams, args.train_limit, args.eval_limit)
    print(json.dumps(result, ensure_ascii=False, indent=2))


if __name__ == "__main__":
    main()
