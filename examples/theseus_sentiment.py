"""BERT-of-Theseus compression on bert4keras's sentiment data (train -> test accuracy).

1. The predecessor (4 layers from scratch by default; 12 with a real checkpoint) is trained as a classifier.
2. The successor (half the layers, initialised from the predecessor's embeddings and first layers) replaces the
   predecessor's modules of 2 layers at random (`replace_rate`) while predecessor and head stay frozen.
3. The successor alone is fine-tuned with the head.
`--baseline` also trains a successor-sized model directly for the same number of epochs, for comparison.

    python examples/theseus_sentiment.py
    python examples/theseus_sentiment.py --config bert_config.json --checkpoint bert_model.ckpt --vocab vocab.txt
`--quick` is a < 1 min smoke run.
"""

from __future__ import annotations

import argparse
import json
import time

import keras
import numpy as np
from task_data import CHINESE_VOCAB, TINY_CONFIG, hardware, load_bert4keras_sentiment

from bert4x.layers import FirstToken
from bert4x.models import build_transformer_model
from bert4x.models.base import read_config
from bert4x.snippets import sequence_padding
from bert4x.techniques import init_successor_from_predecessor, theseus_encoder
from bert4x.tokenizers import Tokenizer


def encode(samples, tokenizer, maxlen):
    ids = [tokenizer.encode(t, maxlen=maxlen)[0] for t, _ in samples]
    ids = sequence_padding(ids, length=maxlen)
    return [ids, np.zeros_like(ids)], np.array([y for _, y in samples])


def classifier(encoder: keras.Model, head: list, name: str) -> keras.Model:
    x = encoder.output
    for layer in head:
        x = layer(x)
    return keras.Model(encoder.inputs, x, name=name)


def fit(model, data, args, lr, epochs):
    model.compile(optimizer=keras.optimizers.AdamW(lr, weight_decay=0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(*data, batch_size=args.batch_size, epochs=epochs, verbose=args.verbose)


def accuracy(model, data, batch_size) -> float:
    return round(float((model.predict(data[0], batch_size=batch_size, verbose=0).argmax(-1) == data[1]).mean()), 4)


def run(args) -> dict:
    keras.utils.set_random_seed(args.seed)
    tokenizer = Tokenizer(str(args.vocab or CHINESE_VOCAB), do_lower_case=True)
    train = encode(load_bert4keras_sentiment("train")[: args.train_limit or None], tokenizer, args.maxlen)
    test = encode(load_bert4keras_sentiment("test")[: args.test_limit or None], tokenizer, args.maxlen)
    config = read_config(args.config) if args.config else dict(TINY_CONFIG, num_hidden_layers=args.layers)
    layers = config["num_hidden_layers"]
    lr = args.lr or (2e-5 if args.checkpoint else 1e-3)
    timings, results = {}, {}

    start = time.time()
    predecessor = build_transformer_model(config, args.checkpoint, name="predecessor")
    head = [FirstToken(name="CLS"), keras.layers.Dropout(0.1, name="Head-Dropout"), keras.layers.Dense(2, name="Head")]
    fit(classifier(predecessor, head, "predecessor_classifier"), train, args, lr, args.epochs)
    results["predecessor"] = accuracy(classifier(predecessor, head, "p"), test, args.batch_size)
    timings["predecessor"] = round(time.time() - start, 1)

    start = time.time()
    successor = build_transformer_model(dict(config, num_hidden_layers=layers // 2), name="successor")
    init_successor_from_predecessor(predecessor, successor)
    for layer in head:
        layer.trainable = False
    theseus = classifier(theseus_encoder(predecessor, successor, args.replace_rate, seed=args.seed), head, "theseus")
    fit(theseus, train, args, lr, args.epochs)
    results["successor_after_theseus"] = accuracy(theseus, test, args.batch_size)  # inference = successor only
    timings["theseus"] = round(time.time() - start, 1)

    start = time.time()
    for layer in head:
        layer.trainable = True
    successor_classifier = classifier(successor, head, "successor_classifier")
    fit(successor_classifier, train, args, lr, args.epochs)
    results["successor_fine_tuned"] = accuracy(successor_classifier, test, args.batch_size)
    timings["successor_fine_tune"] = round(time.time() - start, 1)

    if args.baseline:
        start = time.time()
        keras.utils.set_random_seed(args.seed)
        small = build_transformer_model(dict(config, num_hidden_layers=layers // 2), name="baseline")
        small_head = [FirstToken(), keras.layers.Dropout(0.1), keras.layers.Dense(2)]
        fit(classifier(small, small_head, "baseline"), train, args, lr, 3 * args.epochs)
        results[f"baseline_{layers // 2}_layers_direct"] = accuracy(classifier(small, small_head, "b"), test,
                                                                    args.batch_size)
        timings["baseline"] = round(time.time() - start, 1)
    counts = np.bincount(test[1])
    return {
        "data": "bert4keras sentiment: train -> test", "train_samples": len(train[1]), "test_samples": len(test[1]),
        "predecessor_layers": layers, "successor_layers": layers // 2, "replace_rate": args.replace_rate,
        "epochs_per_stage": args.epochs, "test_accuracy": results,
        "majority_baseline": round(float(counts.max() / counts.sum()), 4), "seconds": timings,
        "total_seconds": round(time.time() - args.t0, 1), "hardware": hardware(),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config")
    parser.add_argument("--checkpoint")
    parser.add_argument("--vocab")
    parser.add_argument("--layers", type=int, default=4, help="predecessor layers when training from scratch")
    parser.add_argument("--replace-rate", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=1, help="epochs of each of the three stages")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--maxlen", type=int, default=64)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--baseline", action="store_true", help="also train a half-depth model directly")
    parser.add_argument("--train-limit", type=int)
    parser.add_argument("--test-limit", type=int)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--quick", action="store_true", help="smoke run: 600 train / 300 test samples, maxlen 32")
    parser.add_argument("--verbose", type=int, default=2)
    args = parser.parse_args(argv)
    if args.quick:
        args.train_limit, args.test_limit, args.maxlen = args.train_limit or 600, args.test_limit or 300, 32
    if args.checkpoint and not args.config:
        parser.error("--checkpoint needs --config")
    args.t0 = time.time()
    print(json.dumps(run(args), ensure_ascii=False))


if __name__ == "__main__":
    main()
