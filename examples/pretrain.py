"""Pretrain a small Chinese BERT / RoFormer from scratch: whole-word-masked MLM (or causal LM / UniLM).

By default it reads every Chinese text under ../shared/data/datasets (zip, tsv, csv, json files), packs it into
rows of --seq-len tokens on disk (once; reused afterwards), trains for --minutes, logs the curve and the held-out
MLM accuracy to <work-dir>/curve.csv, and saves the model in bert4x, Google and Hugging Face formats under
<work-dir>/checkpoint. The defaults are tiny, so it also runs on a laptop CPU:

    python examples/pretrain.py --minutes 1 --max-sentences 5000

A ~10-minute run on one GPU (jax), with a small BERT:

    KERAS_BACKEND=jax python examples/pretrain.py --minutes 10 --hidden 256 --layers 4 --heads 4 \\
        --intermediate 1024 --seq-len 128 --batch-size 128 --lr 1e-3 --dtype mixed_bfloat16 --work-dir /tmp/pretrain

Without tensorflow installed the Google checkpoint cannot be written; the script then saves the other formats and
says how to convert later (`--convert-to-google <work-dir>/checkpoint`, on a machine with tensorflow).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", action="append", help="glob or folder of corpus files (repeatable); default: "
                   "every file under ../shared/data/datasets")
    p.add_argument("--vocab", default=str(SHARED / "vocab" / "bert_chinese" / "vocab.txt"))
    p.add_argument("--model", default="bert", help="bert, roformer, wobert, ... (any model with an MLM head)")
    p.add_argument("--objective", default="mlm", choices=["mlm", "lm", "unilm"])
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16, help="per device")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--minutes", type=float, default=2.0, help="training time budget (preprocessing not counted)")
    p.add_argument("--held-out", type=float, default=0.01, help="fraction of rows kept out for evaluation")
    p.add_argument("--eval-batches", type=int, default=50, help="held-out batches per evaluation")
    p.add_argument("--eval-every", type=int, default=1000, help="steps between held-out evaluations")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--max-sentences", type=int, help="use only the first N sentences (quick runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", help="keras dtype policy, e.g. mixed_bfloat16 on GPU")
    p.add_argument("--data-parallel", action="store_true", help="train on every device (DataParallel / Mirrored)")
    p.add_argument("--workers", type=int, default=4, help="loader threads")
    p.add_argument("--formats", default="keras,google,huggingface")
    p.add_argument("--work-dir", default="/tmp/bert4x_pretrain")
    p.add_argument("--corpus-cache", help="folder of the packed corpus (default: --work-dir); prepare it once with "
                   "--prepare-only and reuse it on another machine")
    p.add_argument("--prepare-only", action="store_true", help="pack the corpus, then exit")
    p.add_argument("--rebuild", action="store_true", help="re-tokenize the corpus even if it is on disk")
    p.add_argument("--convert-to-google", metavar="CHECKPOINT_DIR",
                   help="only convert CHECKPOINT_DIR/huggingface to CHECKPOINT_DIR/google, then exit")
    return p.parse_args(argv)


def convert_to_google(checkpoint_dir: str, model: str) -> str:
    """Re-saves the Hugging Face checkpoint of a finished run in Google format (needs tensorflow)."""
    from bert4x.models import build_transformer_model

    hf = os.path.join(checkpoint_dir, "huggingface")
    transformer = build_transformer_model(os.path.join(hf, "config.json"), hf, model=model, with_mlm="linear",
                                          return_keras_model=False)
    os.makedirs(os.path.join(checkpoint_dir, "google"), exist_ok=True)
    return transformer.save_weights_as_checkpoint(os.path.join(checkpoint_dir, "google", "bert_model.ckpt"))


def prepare_corpus(args, tokenizer):
    """Packs the corpus into <work-dir>/corpus-<seq_len> once, streaming sentence by sentence."""
    from itertools import islice

    from bert4x.pretraining import PackedCorpus, iter_corpus_sentences, preprocess_corpus

    name = f"corpus-{args.seq_len}" + (f"-{args.max_sentences}" if args.max_sentences else "")
    prefix = os.path.join(args.corpus_cache or args.work_dir, name)
    if os.path.exists(prefix + ".json") and not args.rebuild:
        logging.info("reusing the packed corpus at %s", prefix)
        return PackedCorpus.open(prefix)
    patterns = args.corpus or [str(SHARED / "datasets")]
    sentences = iter_corpus_sentences(patterns)
    if args.max_sentences:
        sentences = islice(sentences, args.max_sentences)
    start = time.perf_counter()
    corpus = preprocess_corpus(sentences, tokenizer, prefix, seq_len=args.seq_len)
    logging.info("packed %d sentences into %d rows (%d tokens) in %.0f s", corpus.meta["num_sentences"],
                 len(corpus), corpus.meta["num_tokens"], time.perf_counter() - start)
    return corpus


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.convert_to_google:
        print(convert_to_google(args.convert_to_google, args.model))
        return {}

    import keras

    from bert4x.distribution import data_parallel, global_batch_size, scope
    from bert4x.pretraining import (
        CheckpointSaver,
        PretrainingDataset,
        PretrainingLogger,
        TimeBudget,
        build_pretraining_model,
        compile_for_pretraining,
        split_rows,
    )
    from bert4x.tokenizers import Tokenizer, save_vocab

    if not os.path.exists(args.vocab):
        raise SystemExit(f"--vocab {args.vocab} not found (the default lives in ../shared/data).")
    formats = [f for f in args.formats.split(",") if f]
    if "google" in formats:
        try:
            import tensorflow  # noqa: F401
        except ImportError:
            formats.remove("google")
            logging.warning("tensorflow is not installed: the Google checkpoint will not be written now; afterwards "
                            "run `python examples/pretrain.py --convert-to-google %s/checkpoint --model %s` where "
                            "tensorflow is.", args.work_dir, args.model)
    os.makedirs(args.work_dir, exist_ok=True)
    keras.utils.set_random_seed(args.seed)
    keras.config.set_dtype_policy(args.dtype)

    tokenizer = Tokenizer(args.vocab, do_lower_case=True)
    corpus = prepare_corpus(args, tokenizer)
    if args.prepare_only:
        print(json.dumps({k: v for k, v in corpus.meta.items() if k != "special_ids"}, indent=2))
        return {}
    train_rows, held_rows = split_rows(len(corpus), args.held_out, seed=args.seed)

    strategy = data_parallel() if args.data_parallel else None
    batch = global_batch_size(args.batch_size, strategy)
    loader = dict(workers=args.workers, max_queue_size=16)
    train = PretrainingDataset(corpus, batch, args.objective, seed=args.seed, rows=train_rows, **loader)
    held_out = PretrainingDataset(corpus, min(batch, len(held_rows)), args.objective, seed=args.seed + 1,
                                  rows=held_rows, shuffle=False)
    config = dict(vocab_size=tokenizer.vocab_size, hidden_size=args.hidden, num_hidden_layers=args.layers,
                  num_attention_heads=args.heads, intermediate_size=args.intermediate,
                  max_position_embeddings=args.seq_len, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    with scope(strategy):
        transformer = build_pretraining_model(config, model=args.model, objective=args.objective)
        compile_for_pretraining(transformer.model, learning_rate=args.lr, warmup_steps=args.warmup_steps)
    checkpoint_dir = os.path.join(args.work_dir, "checkpoint")
    curve = PretrainingLogger(os.path.join(args.work_dir, "curve.csv"), tokens_per_step=batch * args.seq_len,
                              every=args.log_every, held_out=held_out, eval_every=args.eval_every,
                              eval_steps=min(args.eval_batches, len(held_out)))
    saver = CheckpointSaver(transformer, checkpoint_dir, formats)
    budget = TimeBudget(args.minutes)
    logging.info("training %s/%s: %d parameters, %d train rows, %d held-out rows, global batch %d, %d steps/epoch",
                 args.model, args.objective, transformer.model.count_params(), len(train_rows), len(held_rows),
                 batch, len(train))
    with scope(strategy):
        start = time.perf_counter()
        transformer.model.fit(train, epochs=10**6, verbose=0, callbacks=[curve, budget, saver])
        seconds = time.perf_counter() - start
    save_vocab(os.path.join(checkpoint_dir, "vocab.txt"), tokenizer.token_dict)

    steps = curve.step
    # Throughput of the windows after the first (which holds the compilation), weighted by their steps.
    windows = [r for r in curve.history[1:] if r["tokens_per_second"]]
    summary = dict(
        model=args.model, objective=args.objective, parameters=transformer.model.count_params(),
        seq_len=args.seq_len, global_batch=batch, steps=steps, epochs=curve.epoch + 1, train_seconds=round(seconds, 1),
        tokens_per_second=round(sum(r["tokens_per_second"] for r in windows) / len(windows), 1) if windows else None,
        # compilation and evaluations included:
        overall_tokens_per_second=round(steps * batch * args.seq_len / seconds, 1),
        row_fill=round(corpus.meta["num_tokens"] / (len(corpus) * corpus.meta["capacity"]), 4),
        corpus_tokens=corpus.meta["num_tokens"], held_out_rows=len(held_rows),
        final_loss=curve.history[-1]["loss"], held_out_loss=curve.history[-1]["held_out_loss"],
        held_out_accuracy=curve.history[-1]["held_out_accuracy"], checkpoints=saver.paths,
        curve=curve.csv_path, device=str(keras.distribution.list_devices()[0]) if keras.backend.backend() == "jax"
        else keras.backend.backend(),
    )
    with open(os.path.join(args.work_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
