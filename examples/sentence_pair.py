"""Sentence-pair classification (are two questions the same?) on AFQMC or LCQMC with a BERT pair encoder.

Splits: AFQMC trains on train.txt and evaluates on dev.txt. The shared data holds no LCQMC train split, so LCQMC
trains on dev.txt (8,802 pairs) and evaluates on test.txt (12,500 pairs).

Options show the training helpers: `--loss focal|logit_adjusted` (class imbalance: AFQMC is 69% negative),
`--fgm EPSILON` (adversarial training on the embeddings), `--layer-decay` (layer-wise LR decay for AdamW).

From scratch (a small random BERT, CPU; `--quick` for a < 1 min smoke run):
    python examples/sentence_pair.py --dataset lcqmc
    python examples/sentence_pair.py --dataset afqmc --loss logit_adjusted
With real Chinese weights:
    python examples/sentence_pair.py --config bert_config.json --checkpoint bert_model.ckpt --vocab vocab.txt
"""

from __future__ import annotations

import argparse
import json
import time

import keras
import numpy as np
from task_data import CHINESE_VOCAB, TINY_CONFIG, hardware, load_sentence_pairs

from bert4x import losses
from bert4x.models import build_transformer_model
from bert4x.optimizers import LayerwiseDecayAdamW, PiecewiseLinearSchedule, adversarial_training
from bert4x.snippets import sequence_padding
from bert4x.tokenizers import Tokenizer

SPLITS = {"afqmc": ("train", "dev"), "lcqmc": ("dev", "test")}


def encode(pairs, tokenizer, maxlen):
    ids, segments = [], []
    for a, b, _ in pairs:
        t, s = tokenizer.encode(a, b, maxlen=maxlen)
        ids.append(t)
        segments.append(s)
    return [sequence_padding(ids, length=maxlen), sequence_padding(segments, length=maxlen)], np.array(
        [label for _, _, label in pairs])


def build_model(config, checkpoint):
    bert = build_transformer_model(config, checkpoint, with_pool=True)
    x = keras.layers.Dropout(0.1, name="Classifier-Dropout")(bert.output)
    return keras.Model(bert.inputs, keras.layers.Dense(2, name="Classifier")(x), name="sentence_pair")


def make_loss(name: str, prior):
    if name == "ce":
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if name == "focal":
        return losses.SparseCategoricalFocalCrossentropy(gamma=2.0, from_logits=True)
    if name == "logit_adjusted":
        return losses.LogitAdjustedCrossentropy(prior=prior, tau=1.0)
    raise ValueError(f"--loss must be ce, focal or logit_adjusted, got {name!r}.")


def run(args) -> dict:
    keras.utils.set_random_seed(args.seed)
    tokenizer = Tokenizer(str(args.vocab or CHINESE_VOCAB), do_lower_case=True)
    train_split, eval_split = SPLITS[args.dataset]
    train = load_sentence_pairs(args.dataset, train_split)[: args.train_limit or None]
    test = load_sentence_pairs(args.dataset, eval_split)[: args.eval_limit or None]
    x_train, y_train = encode(train, tokenizer, args.maxlen)
    x_test, y_test = encode(test, tokenizer, args.maxlen)
    prior = np.bincount(y_train, minlength=2) / len(y_train)
    model = build_model(args.config or TINY_CONFIG, args.checkpoint)
    lr = args.lr or (2e-5 if args.checkpoint else 1e-3)
    steps = args.epochs * -(-len(train) // args.batch_size)
    schedule = PiecewiseLinearSchedule(lr, {max(steps // 10, 1): 1.0, steps: 0.1})  # warmup then linear decay
    if args.layer_decay < 1:
        optimizer = LayerwiseDecayAdamW(schedule, layer_decay=args.layer_decay, weight_decay=0.01)
    else:
        optimizer = keras.optimizers.AdamW(schedule, weight_decay=0.01)
    model.compile(optimizer=optimizer, loss=make_loss(args.loss, prior), metrics=["sparse_categorical_accuracy"])
    if args.fgm:
        adversarial_training(model, "Embedding-Token", epsilon=args.fgm)
    start = time.time()
    model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs, verbose=args.verbose)
    train_seconds = time.time() - start
    predicted = model.predict(x_test, batch_size=args.batch_size, verbose=0).argmax(axis=-1)
    tp = int(((predicted == 1) & (y_test == 1)).sum())
    f1 = 2 * tp / max(int((predicted == 1).sum()) + int((y_test == 1).sum()), 1)
    return {
        "dataset": args.dataset, "train_split": train_split, "eval_split": eval_split, "train_pairs": len(train),
        "eval_pairs": len(test), "loss": args.loss, "fgm": args.fgm, "layer_decay": args.layer_decay,
        "epochs": args.epochs, "accuracy": round(float((predicted == y_test).mean()), 4),
        "positive_f1": round(f1, 4), "majority_baseline": round(float(max(np.mean(y_test), 1 - np.mean(y_test))), 4),
        "predicted_positive_rate": round(float(np.mean(predicted)), 4), "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - args.t0, 1), "hardware": hardware(),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="lcqmc", choices=sorted(SPLITS))
    parser.add_argument("--loss", default="ce", choices=["ce", "focal", "logit_adjusted"])
    parser.add_argument("--fgm", type=float, default=0.0, help="FGM epsilon (0 = off)")
    parser.add_argument("--layer-decay", type=float, default=1.0, help="layer-wise LR decay (1 = off)")
    parser.add_argument("--config")
    parser.add_argument("--checkpoint")
    parser.add_argument("--vocab")
    parser.add_argument("--epochs", type=int, help="default: 3 on LCQMC (8.8k pairs), 1 on AFQMC (34k)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--maxlen", type=int, default=64)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--train-limit", type=int)
    parser.add_argument("--eval-limit", type=int)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2000 train / 1000 eval pairs, 1 epoch")
    parser.add_argument("--verbose", type=int, default=2)
    args = parser.parse_args(argv)
    if args.quick:
        args.train_limit, args.eval_limit, args.epochs = args.train_limit or 2000, args.eval_limit or 1000, 1
    if args.epochs is None:
        args.epochs = 3 if args.dataset == "lcqmc" else 1
    args.t0 = time.time()
    print(json.dumps(run(args), ensure_ascii=False))


if __name__ == "__main__":
    main()
