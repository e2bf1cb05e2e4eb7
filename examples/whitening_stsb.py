"""BERT-whitening on Chinese STS-B: Spearman correlation of cosine similarities, raw vs whitened (k dims kept).

Sentence vectors are the mean of the last layer's token states (padding excluded). The whitening kernel and bias
are computed from the *train* sentences' vectors (unsupervised: no scores are used) and applied to the test pairs.

From scratch there is no pretrained encoder, so by default a small BERT is first trained with masked-LM on the STS-B
train sentences (unsupervised, a couple of minutes on CPU); whitening is then measured on that encoder.
`--quick` is a < 1 min smoke run. With real weights, e.g. a Hugging Face folder:
    python examples/whitening_stsb.py --config model/config.json --checkpoint model --vocab model/vocab.txt
"""

from __future__ import annotations

import argparse
import json
import random
import time

import keras
import numpy as np
from task_data import CHINESE_VOCAB, TINY_CONFIG, hardware, load_stsb, small_vocab_tokenizer

from bert4x.models import build_transformer_model
from bert4x.snippets import sequence_padding
from bert4x.techniques import compute_kernel_bias, transform_and_normalize
from bert4x.tokenizers import Tokenizer


def spearman(x, y) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(v):
        v = np.asarray(v, dtype="float64")
        order = np.argsort(v, kind="mergesort")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for value in np.unique(v):  # average the ranks of ties
            tied = v == value
            r[tied] = r[tied].mean()
        return r

    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


def mlm_pretrain(encoder_config, tokenizer, sentences, args):
    """Masked-LM on `sentences`: 15% of tokens, 80/10/10 [MASK]/random/kept, loss on masked positions only."""
    model = build_transformer_model(encoder_config, with_mlm="linear", segment_vocab_size=0)
    rng = random.Random(args.seed)
    ids = [tokenizer.encode(s, maxlen=args.maxlen)[0] for s in sentences]
    inputs, targets = [], []
    for _ in range(args.mlm_epochs):
        for row in ids:
            masked, target = list(row), [0] * len(row)
            for i in range(1, len(row) - 1):
                if rng.random() < 0.15:
                    target[i] = row[i]
                    r = rng.random()
                    if r < 0.8:
                        masked[i] = tokenizer.mask_id
                    elif r < 0.9:
                        masked[i] = rng.randrange(5, tokenizer.vocab_size)
                    else:
                        masked[i] = row[i]
            inputs.append(masked)
            targets.append(target)
    model.compile(optimizer=keras.optimizers.AdamW(args.mlm_lr, weight_decay=0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=0))
    history = model.fit(sequence_padding(inputs, length=args.maxlen), sequence_padding(targets, length=args.maxlen),
                        batch_size=args.batch_size, epochs=1, verbose=args.verbose)
    encoder = keras.Model(model.inputs, model.get_layer(f"Transformer-{encoder_config['num_hidden_layers'] - 1}"
                                                        "-FeedForward-Norm").output)
    return encoder, float(history.history["loss"][-1])


def sentence_vectors(encoder, tokenizer, sentences, maxlen, batch_size):
    ids = sequence_padding([tokenizer.encode(s, maxlen=maxlen)[0] for s in sentences], length=maxlen)
    inputs = [ids] if len(encoder.inputs) == 1 else [ids, np.zeros_like(ids)]
    hidden = encoder.predict(inputs, batch_size=batch_size, verbose=0)
    mask = (ids > 0)[..., None]
    return (hidden * mask).sum(axis=1) / mask.sum(axis=1)


def run(args) -> dict:
    keras.utils.set_random_seed(args.seed)
    train, test = load_stsb("train"), load_stsb(args.eval_split)
    if args.train_limit:
        train = train[: args.train_limit]
    train_sentences = sorted({s for a, b, _ in train for s in (a, b)})
    mlm_loss = None
    if args.checkpoint:
        tokenizer = Tokenizer(str(args.vocab or CHINESE_VOCAB), do_lower_case=True)
        encoder = build_transformer_model(args.config, args.checkpoint)
        kind = "pretrained checkpoint"
    else:
        all_sentences = train_sentences + [s for a, b, _ in test for s in (a, b)]
        tokenizer, keep_tokens = small_vocab_tokenizer(all_sentences, args.vocab or CHINESE_VOCAB)
        config = dict(TINY_CONFIG, vocab_size=len(keep_tokens), hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)
        encoder, mlm_loss = mlm_pretrain(config, tokenizer, train_sentences, args)
        kind = f"small BERT, MLM on {len(train_sentences)} STS-B train sentences x{args.mlm_epochs}"
    train_vectors = sentence_vectors(encoder, tokenizer, train_sentences, args.maxlen, args.batch_size)
    a = sentence_vectors(encoder, tokenizer, [p[0] for p in test], args.maxlen, args.batch_size)
    b = sentence_vectors(encoder, tokenizer, [p[1] for p in test], args.maxlen, args.batch_size)
    scores = [p[2] for p in test]
    results = {}

    def cosine_spearman(kernel=None, bias=None):
        x, y = transform_and_normalize(a, kernel, bias), transform_and_normalize(b, kernel, bias)
        return round(spearman((x * y).sum(axis=1), scores), 4)

    results["raw"] = cosine_spearman()
    # Post-LayerNorm states satisfy one linear constraint (sum_i (h_i - beta_i) / gamma_i = 0), so their covariance
    # has rank dim - 1 at most: "all" dimensions means all that have variance.
    rank = int(np.linalg.matrix_rank(np.cov(train_vectors.T)))
    for k in sorted({rank, *[k for k in args.n_components if k < rank]}, reverse=True):
        kernel, bias = compute_kernel_bias(train_vectors, k)
        results[f"whitening_k{k}"] = cosine_spearman(kernel, bias)
    return {
        "encoder": kind, "eval_split": args.eval_split, "eval_pairs": len(test), "whitening_fit_sentences":
        len(train_sentences), "vector_dim": int(train_vectors.shape[1]), "covariance_rank": rank,
        "mlm_final_loss": mlm_loss, "spearman": results,
        "total_seconds": round(time.time() - args.t0, 1), "hardware": hardware(),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config")
    parser.add_argument("--checkpoint")
    parser.add_argument("--vocab")
    parser.add_argument("--eval-split", default="test", choices=["dev", "test"])
    parser.add_argument("--n-components", type=lambda s: [int(k) for k in s.split(",")], default=[64, 32])
    parser.add_argument("--maxlen", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--mlm-epochs", type=int, default=3, help="masking passes over the sentences (from scratch)")
    parser.add_argument("--mlm-lr", type=float, default=1e-3)
    parser.add_argument("--train-limit", type=int)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1000 train pairs, 1 MLM pass")
    parser.add_argument("--verbose", type=int, default=2)
    args = parser.parse_args(argv)
    if args.quick:
        args.train_limit, args.mlm_epochs = args.train_limit or 1000, 1
    if args.checkpoint and not args.config:
        parser.error("--checkpoint needs --config")
    args.t0 = time.time()
    print(json.dumps(run(args), ensure_ascii=False))


if __name__ == "__main__":
    main()
