"""Named-entity recognition with BERT + CRF (BIO tags, Viterbi decoding) on People's Daily or CLUENER.

Trains on the train split and reports entity-level micro F1 (exact type + char span) on the dev split. People's
Daily comes from `datasets/ner/peopledaily.zip` only (train.txt -> dev.txt). BIO tags cannot nest: where CLUENER
has overlapping entities, training keeps the earliest-starting (then longest) one and the output counts the others;
evaluation scores against every gold entity.

From scratch (a small random BERT, CPU; `--quick` for a < 1 min smoke run):
    python examples/ner_crf.py --dataset peopledaily
With real Chinese weights (bert4keras used lr 2e-5 and a CRF lr_multiplier of 1000):
    python examples/ner_crf.py --config bert_config.json --checkpoint bert_model.ckpt --vocab vocab.txt \
        --crf-lr-multiplier 1000
"""

from __future__ import annotations

import json
import time

import keras
import numpy as np
from ner_globalpointer import encode, load, parse_args
from task_data import CHINESE_VOCAB, TINY_CONFIG, BucketBatches, hardware, token_spans_to_chars

from bert4x.layers import ConditionalRandomField
from bert4x.models import build_transformer_model
from bert4x.snippets import ViterbiDecoder, bio_tags, bio_to_spans, entity_f1, sequence_padding, spans_to_bio
from bert4x.tokenizers import Tokenizer


def flat_spans(rows):
    """BIO cannot nest: in each row keeps the earliest-starting (then longest) of overlapping spans.

    Returns (rows of kept spans, number of spans dropped)."""
    flat, dropped = [], 0
    for spans in rows:
        kept, end = [], -1
        for span in sorted(spans, key=lambda s: (s[1], -s[2])):
            if span[1] > end:
                kept.append(span)
                end = span[2]
        flat.append(kept)
        dropped += len(spans) - len(kept)
    return flat, dropped


def batches(ids, token_spans, tags, args, shuffle=True) -> BucketBatches:
    """Length-bucketed batches of ([token_ids, segment_ids], BIO label ids) (0 = 'O', also on [CLS]/[SEP]/padding);
    `token_spans` must not overlap (see `flat_spans`)."""
    tag_ids = {t: i for i, t in enumerate(tags)}
    labels = [[tag_ids[t] for t in spans_to_bio(spans, len(row))] for row, spans in zip(ids, token_spans)]

    def make_batch(indices, length):
        x = sequence_padding([ids[i] for i in indices], length=length)
        return (x, np.zeros_like(x)), sequence_padding([labels[i] for i in indices], length=length)

    return BucketBatches([len(i) for i in ids], make_batch, args.batch_size, maxlen=args.maxlen, shuffle=shuffle,
                         seed=args.seed)


def build_model(config, checkpoint, num_tags: int, lr_multiplier: float):
    bert = build_transformer_model(config, checkpoint)
    emissions = keras.layers.Dense(num_tags, name="Emissions")(bert.output)
    crf = ConditionalRandomField(lr_multiplier=lr_multiplier, name="CRF")
    output = crf(emissions, mask=keras.ops.not_equal(bert.inputs[0], 0))
    return keras.Model(bert.inputs, output, name="ner_crf"), crf


def evaluate(model, crf, data: BucketBatches, mappings, samples, tags):
    decoder = ViterbiDecoder(keras.ops.convert_to_numpy(crf.trans), starts=[0], ends=[0])  # [CLS]/[SEP] are 'O'
    predicted = [None] * len(samples)
    for batch_index, (indices, _) in enumerate(data.batches):
        (ids, segments), _ = data[batch_index]
        emissions = np.asarray(model.predict_on_batch([ids, segments]))
        for i, e, row in zip(indices, emissions, ids):
            path = decoder.decode(e[row > 0])
            predicted[i] = token_spans_to_chars(bio_to_spans([tags[t] for t in path]), mappings[i])
    return entity_f1(predicted, [spans for _, spans in samples])


def run(args) -> dict:
    keras.utils.set_random_seed(args.seed)
    tokenizer = Tokenizer(str(args.vocab or CHINESE_VOCAB), do_lower_case=True)
    train, types = load(args.dataset, "train")
    dev, _ = load(args.dataset, "dev")
    train, dev = train[: args.train_limit or None], dev[: args.dev_limit or None]
    tags = bio_tags(types)
    train_ids, train_spans, _, train_dropped = encode(train, tokenizer, args.maxlen)
    train_spans, nested = flat_spans(train_spans)  # overlapping training entities BIO cannot hold
    dev_ids, dev_spans, dev_mappings, dev_dropped = encode(dev, tokenizer, args.maxlen)
    model, crf = build_model(args.config or TINY_CONFIG, args.checkpoint, len(tags), args.crf_lr_multiplier)
    lr = args.lr or (2e-5 if args.checkpoint else 1e-3)
    model.compile(optimizer=keras.optimizers.AdamW(lr, weight_decay=0.01), loss=crf.sparse_loss,
                  metrics=[crf.sparse_accuracy])
    start = time.time()
    model.fit(batches(train_ids, train_spans, tags, args).as_dataset(), epochs=args.epochs, verbose=args.verbose)
    train_seconds = time.time() - start
    # Dev labels only feed the batches; scoring compares with every gold entity of `dev`.
    dev_batches = batches(dev_ids, flat_spans(dev_spans)[0], tags, args, shuffle=False)
    scores = evaluate(model, crf, dev_batches, dev_mappings, dev, tags)
    return {
        "dataset": args.dataset, "head": "crf", "train_sentences": len(train), "dev_sentences": len(dev),
        "epochs": args.epochs, "maxlen": args.maxlen, "crf_lr_multiplier": args.crf_lr_multiplier,
        "train_entities_not_aligned": train_dropped, "train_entities_overlapping_dropped": nested,
        "dev_entities_beyond_maxlen_or_unaligned": dev_dropped,
        "dev_f1": round(scores["f1"], 4), "dev_precision": round(scores["precision"], 4),
        "dev_recall": round(scores["recall"], 4), "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - args.t0, 1), "hardware": hardware(),
    }


def main(argv=None):
    import argparse

    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--crf-lr-multiplier", type=float, default=10.0)
    known, rest = extra.parse_known_args(argv)
    args = parse_args(rest, description=__doc__)
    args.crf_lr_multiplier = known.crf_lr_multiplier
    print(json.dumps(run(args), ensure_ascii=False))


if __name__ == "__main__":
    main()
