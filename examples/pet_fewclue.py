"""PET on FewCLUE (eprstmt sentiment, tnews news topics): classification as a cloze filled in by a masked LM.

Patterns: eprstmt "{mask}满意。{text}" with label words 很 (Positive) / 不 (Negative);
tnews "这是一则{mask}新闻。{text}" with each class's 2-character Chinese name (故事, 文化, ...).
A class's score is the MLM log-probability of its label word at the [MASK] slots. Accuracy on test_public is
measured zero-shot (before training) and after few-shot training on train_few_all (labelled) plus masked-LM on
unlabelled texts (test_public's sentences, labels unused).

From scratch there is no pretrained MLM, so zero-shot is chance and few-shot learning starts from nothing; with a
real Chinese MLM checkpoint the same script runs PET as the seed article describes:
    python examples/pet_fewclue.py --task eprstmt
    python examples/pet_fewclue.py --task tnews --config bert_config.json --checkpoint bert_model.ckpt --vocab vocab.txt
`--quick` is a < 1 min smoke run.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import keras
import numpy as np
from task_data import CHINESE_VOCAB, TINY_CONFIG, hardware, load_fewclue, small_vocab_tokenizer, tnews_labels

from bert4x.models import build_transformer_model
from bert4x.snippets import sequence_padding
from bert4x.techniques import PromptPattern
from bert4x.tokenizers import Tokenizer

PET_TEMPLATES = {"eprstmt": "{mask}满意。{text}", "tnews": "这是一则{mask}新闻。{text}"}
PTUNING_TEMPLATES = {"eprstmt": "[unused1][unused2][unused3][unused4]{mask}[unused5][unused6][unused7][unused8]{text}",
                     "tnews": "[unused1][unused2][unused3][unused4]{mask}[unused5][unused6][unused7][unused8]{text}"}
PROMPT_TOKENS = [f"[unused{i}]" for i in range(1, 9)]


def label_words(task: str) -> tuple[list[str], list[str]]:
    """(label values as in the data, label words)."""
    if task == "eprstmt":
        return ["Positive", "Negative"], ["很", "不"]
    labels = tnews_labels()
    return [label for label, _ in labels], [name for _, name in labels]


def prepare(args, templates):
    """Data, tokenizer, pattern and the MLM (probabilities), from scratch or from a checkpoint."""
    labels, words = label_words(args.task)
    train, test = load_fewclue(args.task, "train"), load_fewclue(args.task, "test")
    # Limits take a seeded random subset: the files are sorted by label.
    if args.train_limit:
        train = random.Random(args.seed).sample(train, min(args.train_limit, len(train)))
    if args.test_limit:
        test = random.Random(args.seed).sample(test, min(args.test_limit, len(test)))
    texts = [t for t, _ in train + test] + [templates[args.task].replace("{mask}", "").replace("{text}", "")] + words
    if args.checkpoint:
        tokenizer = Tokenizer(str(args.vocab or CHINESE_VOCAB), do_lower_case=True)
        mlm = build_transformer_model(args.config, args.checkpoint, with_mlm=True)
    else:
        tokenizer, keep_tokens = small_vocab_tokenizer(texts, args.vocab or CHINESE_VOCAB, extra_tokens=PROMPT_TOKENS)
        mlm = build_transformer_model(dict(TINY_CONFIG, vocab_size=len(keep_tokens)), with_mlm=True)
    pattern = PromptPattern(tokenizer, templates[args.task], words)
    label_index = {label: i for i, label in enumerate(labels)}
    return train, test, label_index, pattern, mlm


def encode_batch(rows, length):
    """Pads to a fixed length: one compiled step for every batch."""
    ids, segments, targets = zip(*rows)
    pad = lambda seqs: sequence_padding(seqs, length=length)  # noqa: E731
    return [pad(ids), pad(segments)], pad(targets)


def accuracy(mlm, pattern, samples, label_index, maxlen, batch_size) -> float:
    right = 0
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        (ids, segments), _ = encode_batch([pattern.encode(t, maxlen=maxlen) for t, _ in chunk], maxlen)
        scores = pattern.scores(mlm.predict_on_batch([ids, segments]), ids)
        right += int(sum(s.argmax() == label_index[y] for s, (_, y) in zip(scores, chunk)))
    return right / len(samples)


def training_rows(pattern, train, unlabelled, label_index, maxlen, epochs, seed):
    """Each epoch: every labelled sample with its label word as target, and every unlabelled text with 15% of its
    tokens masked (PET's auxiliary MLM)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(epochs):
        epoch = [pattern.encode(t, label=label_index[y], maxlen=maxlen) for t, y in train]
        for t in unlabelled:
            ids, segments, _ = pattern.encode(t, maxlen=maxlen)
            masked, targets = pattern.random_mask(ids, 0.15, rng)
            epoch.append((masked, segments, targets))
        rng.shuffle(epoch)
        rows += epoch
    return rows


def run(args, templates=PET_TEMPLATES, make_trainable=None) -> dict:
    keras.utils.set_random_seed(args.seed)
    train, test, label_index, pattern, mlm = prepare(args, templates)
    zero_shot = accuracy(mlm, pattern, test, label_index, args.maxlen, args.batch_size)
    model = make_trainable(mlm, pattern) if make_trainable else mlm
    lr = args.lr or (2e-5 if args.checkpoint else 1e-3)
    model.compile(optimizer=keras.optimizers.Adam(lr), loss=keras.losses.SparseCategoricalCrossentropy(ignore_class=0))
    unlabelled = [t for t, _ in test] if args.unlabelled else []
    rows = training_rows(pattern, train, unlabelled, label_index, args.maxlen, args.epochs, args.seed)
    start = time.time()
    for i in range(0, len(rows), args.batch_size):
        model.train_on_batch(*encode_batch(rows[i:i + args.batch_size], args.maxlen))
    train_seconds = time.time() - start
    few_shot = accuracy(model, pattern, test, label_index, args.maxlen, args.batch_size)
    counts = np.bincount([label_index[y] for _, y in test], minlength=len(label_index))
    return {
        "task": args.task, "template": pattern.template, "train_labelled": len(train), "unlabelled_texts":
        len(unlabelled), "test_split": "test_public", "test_samples": len(test), "epochs": args.epochs,
        "zero_shot_accuracy": round(zero_shot, 4), "few_shot_accuracy": round(few_shot, 4),
        "majority_baseline": round(float(counts.max() / counts.sum()), 4), "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - args.t0, 1), "hardware": hardware(),
    }


def parse_args(argv=None, description=__doc__):
    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    parser.add_argument("--task", default="eprstmt", choices=["eprstmt", "tnews"])
    parser.add_argument("--config")
    parser.add_argument("--checkpoint", help="a BERT checkpoint with its MLM head")
    parser.add_argument("--vocab")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--maxlen", type=int, default=96)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--no-unlabelled", dest="unlabelled", action="store_false",
                        help="skip the auxiliary MLM on unlabelled texts")
    parser.add_argument("--train-limit", type=int)
    parser.add_argument("--test-limit", type=int)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--quick", action="store_true", help="smoke run: 300 labelled / 200 test samples, 2 epochs")
    args = parser.parse_args(argv)
    if args.quick:
        args.train_limit, args.test_limit, args.epochs = args.train_limit or 300, args.test_limit or 200, 2
    if args.checkpoint and not args.config:
        parser.error("--checkpoint needs --config")
    args.t0 = time.time()
    return args


if __name__ == "__main__":
    print(json.dumps(run(parse_args()), ensure_ascii=False))
