"""Named-entity recognition with GlobalPointer (or Efficient GlobalPointer) on People's Daily or CLUENER.

Trains on the train split and reports entity-level micro F1 (exact type + char span) on the dev split. People's
Daily comes from `datasets/ner/peopledaily.zip` only (train.txt -> dev.txt).

From scratch (a small random BERT, CPU; `--quick` for a < 1 min smoke run):
    python examples/ner_globalpointer.py --dataset peopledaily
    python examples/ner_globalpointer.py --dataset cluener --head egp
With real Chinese weights:
    python examples/ner_globalpointer.py --config bert_config.json --checkpoint bert_model.ckpt --vocab vocab.txt
"""

from __future__ import annotations

import argparse
import json
import time

import keras
import numpy as np
from task_data import (
    CHINESE_VOCAB,
    CLUENER_TYPES,
    PEOPLEDAILY_TYPES,
    TINY_CONFIG,
    BucketBatches,
    align_spans,
    hardware,
    load_cluener,
    load_peopledaily,
    token_spans_to_chars,
)

from bert4x.layers import EfficientGlobalPointer, GlobalPointer
from bert4x.losses import global_pointer_crossentropy
from bert4x.models import build_transformer_model
from bert4x.snippets import decode_global_pointer, entity_f1, global_pointer_labels, sequence_padding
from bert4x.tokenizers import Tokenizer


def load(dataset: str, split: str):
    if dataset == "peopledaily":
        return load_peopledaily(split), PEOPLEDAILY_TYPES
    if dataset == "cluener":
        return load_cluener(split), CLUENER_TYPES
    raise ValueError(f"--dataset must be 'peopledaily' or 'cluener', got {dataset!r}.")


def encode(samples, tokenizer, maxlen):
    """Per sample: token ids, token spans and the token -> char mapping; plus how many entities could not be aligned."""
    ids, token_spans, mappings, dropped = [], [], [], 0
    for text, spans in samples:
        token_ids, aligned, mapping, lost = align_spans(tokenizer, text, spans, maxlen)
        ids.append(token_ids)
        token_spans.append(aligned)
        mappings.append(mapping)
        dropped += lost
    return ids, token_spans, mappings, dropped


def batches(ids, token_spans, types, args, shuffle=True) -> BucketBatches:
    """Length-bucketed batches of ([token_ids, segment_ids], dense GlobalPointer labels [b, types, L, L])."""

    def make_batch(indices, length):
        x = sequence_padding([ids[i] for i in indices], length=length)
        y = np.stack([global_pointer_labels(token_spans[i], types, length) for i in indices])
        return (x, np.zeros_like(x)), y

    return BucketBatches([len(i) for i in ids], make_batch, args.batch_size, maxlen=args.maxlen, shuffle=shuffle,
                         seed=args.seed)


def build_model(config, checkpoint, num_types: int, head: str, head_size: int) -> keras.Model:
    bert = build_transformer_model(config, checkpoint)
    token_ids = bert.inputs[0]
    layer = {"gp": GlobalPointer, "egp": EfficientGlobalPointer}[head](num_types, head_size, name="GlobalPointer")
    output = layer(bert.output, mask=keras.ops.not_equal(token_ids, 0))
    return keras.Model(bert.inputs, output, name=f"ner_{head}")


def evaluate(model, data: BucketBatches, mappings, samples, types):
    predicted = [None] * len(samples)
    for batch_index, (indices, _length) in enumerate(data.batches):
        logits = np.asarray(model.predict_on_batch(data[batch_index][0]))
        for i, row_logits in zip(indices, logits):
            predicted[i] = token_spans_to_chars(decode_global_pointer(row_logits, types), mappings[i])
    return entity_f1(predicted, [spans for _, spans in samples])


def run(args) -> dict:
    keras.utils.set_random_seed(args.seed)
    tokenizer = Tokenizer(str(args.vocab or CHINESE_VOCAB), do_lower_case=True)
    train, types = load(args.dataset, "train")
    dev, _ = load(args.dataset, "dev")
    if args.train_limit:
        train = train[: args.train_limit]
    if args.dev_limit:
        dev = dev[: args.dev_limit]
    train_ids, train_spans, _, train_dropped = encode(train, tokenizer, args.maxlen)
    dev_ids, dev_spans, dev_mappings, dev_dropped = encode(dev, tokenizer, args.maxlen)
    model = build_model(args.config or TINY_CONFIG, args.checkpoint, len(types), args.head, args.head_size)
    lr = args.lr or (2e-5 if args.checkpoint else 1e-3)
    model.compile(optimizer=keras.optimizers.AdamW(lr, weight_decay=0.01), loss=global_pointer_crossentropy)
    start = time.time()
    model.fit(batches(train_ids, train_spans, types, args).as_dataset(), epochs=args.epochs, verbose=args.verbose)
    train_seconds = time.time() - start
    scores = evaluate(model, batches(dev_ids, dev_spans, types, args, shuffle=False), dev_mappings, dev, types)
    return {
        "dataset": args.dataset, "head": args.head, "train_sentences": len(train), "dev_sentences": len(dev),
        "epochs": args.epochs, "maxlen": args.maxlen,
        "train_entities_not_aligned": train_dropped, "dev_entities_beyond_maxlen_or_unaligned": dev_dropped,
        "dev_f1": round(scores["f1"], 4), "dev_precision": round(scores["precision"], 4),
        "dev_recall": round(scores["recall"], 4), "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - args.t0, 1), "hardware": hardware(),
    }


def parse_args(argv=None, description=__doc__):
    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    parser.add_argument("--dataset", default="peopledaily", choices=["peopledaily", "cluener"])
    parser.add_argument("--head", default="gp", choices=["gp", "egp"], help="GlobalPointer or Efficient GlobalPointer")
    parser.add_argument("--head-size", type=int, default=64)
    parser.add_argument("--config", help="bert_config.json of real weights (default: a small random BERT)")
    parser.add_argument("--checkpoint", help="Google TF prefix or Hugging Face folder")
    parser.add_argument("--vocab", help="vocab.txt (default: the Chinese BERT vocab in ../shared/data)")
    parser.add_argument("--epochs", type=int, help="default: 1 on People's Daily (50k sentences), 3 on CLUENER (10k)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--maxlen", type=int, default=128,
                        help="longer texts are cut (their lost entities count as misses)")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--train-limit", type=int)
    parser.add_argument("--dev-limit", type=int)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2000 train / 500 dev sentences, 1 epoch")
    parser.add_argument("--verbose", type=int, default=2)
    args = parser.parse_args(argv)
    if args.quick:
        args.train_limit, args.dev_limit, args.epochs = args.train_limit or 2000, args.dev_limit or 500, 1
    if args.epochs is None:
        args.epochs = 1 if args.dataset == "peopledaily" else 3
    args.t0 = time.time()
    return args


if __name__ == "__main__":
    print(json.dumps(run(parse_args()), ensure_ascii=False))
