"""Question-to-entity retrieval as generation, constrained by a prefix tree over a list of names ("Seq2Seq + prefix
tree"), on CLUENER sentences.

The task, built from real data: every CLUENER sentence that mentions exactly one entity is a query, and the answer is
that entity's name; the list of names (the "knowledge base") is every such mention of the train and dev splits. A
UniLM model (application='unilm') learns query -> name on train.json; on dev.json it generates the name three ways:
free greedy decoding, greedy constrained by a `PrefixTree` of the names, and constrained beam search. Reported:
exact-match accuracy and the share of outputs that are names of the list (always 1.0 under the tree).

    python examples/prefix_tree_retrieval.py [--smoke] [--epochs 5] [--model roformer]
    python examples/prefix_tree_retrieval.py --config bert_config.json --checkpoint bert_model.ckpt --vocab vocab.txt

Vocabulary: the Chinese BERT one at `../shared/data/vocab/bert_chinese`, simplified as in bert4keras (and, from scratch,
cut to the tokens of the training queries and the names).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import keras
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from unilm_csl_title import SMALL_CONFIG, SMOKE_CONFIG, VOCAB, UniLMBatches, encode_pair, load_tokenizer  # noqa: E402

from bert4x.generation import Generator  # noqa: E402
from bert4x.models import build_transformer_model  # noqa: E402
from bert4x.snippets import PrefixTree  # noqa: E402

CLUENER = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "datasets" / "ner" / "cluener"


def load_queries(split: str, max_chars: int, limit: int | None = None) -> list[tuple[str, str]]:
    """(sentence, entity name) for the CLUENER sentences of `split` ('train' or 'dev') with exactly one mention."""
    path = CLUENER / f"{split}.json"
    if not path.exists():
        raise FileNotFoundError(f"CLUENER {split}.json not found at {path} (expected ../shared/data beside the repo).")
    pairs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not JSON: {e}") from e
            mentions = [name for spans in item.get("label", {}).values() for name in spans]
            if len(mentions) == 1 and len(item["text"]) <= max_chars:
                pairs.append((item["text"], mentions[0]))
    return pairs[:limit] if limit else pairs


def run(model_name="bert", config=None, checkpoint=None, vocab=None, epochs=5, steps=None, batch_size=32,
        max_source=64, max_target=16, lr=None, beams=4, train_limit=None, eval_limit=None, verbose=2,
        seed=42) -> dict:
    keras.utils.set_random_seed(seed)
    train_pairs = load_queries("train", max_source - 2, train_limit)
    test_pairs = load_queries("dev", max_source - 2, eval_limit)
    names = sorted({name for _, name in load_queries("train", max_source - 2) + load_queries("dev", max_source - 2)})
    # From scratch, the vocabulary is what the training queries and the name list use.
    texts = None if checkpoint else [q for q, _ in train_pairs] + names
    tokenizer, keep_tokens = load_tokenizer(vocab, texts)
    # The tree holds each name's token ids (no [CLS]) and [SEP], so decoding ends exactly where a name ends.
    name_ids = {name: tokenizer.encode(name)[0][1:-1] for name in names}
    tree = PrefixTree(name_ids.values(), end_id=tokenizer.end_id)
    known = {tuple(ids) for ids in name_ids.values()}

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

    generator = Generator(model)
    # Room for the longest name and its [SEP], so that every tree path can be completed.
    limit = max(max_target, max(len(ids) for ids in name_ids.values()) + 1)
    prompts = [encode_pair(tokenizer, text, None, max_source, max_target)[0] for text, _ in test_pairs]
    answers = [name_ids[name] + [tokenizer.end_id] for _, name in test_pairs]
    results = {}
    for label, options in (("free greedy", {}), ("tree greedy", {"prefix_tree": tree}),
                           (f"tree beam {beams}", {"prefix_tree": tree, "num_beams": beams, "exact": True})):
        start = time.time()
        outputs = []
        for i in range(0, len(prompts), 64):
            outputs += generator.generate(prompts[i:i + 64], max_len=limit, end_id=tokenizer.end_id, **options)
        results[label] = {
            "exact_match": round(float(np.mean([o == a for o, a in zip(outputs, answers)])), 4),
            "valid_names": round(float(np.mean([tuple(o[:-1]) in known and o[-1:] == [tokenizer.end_id]
                                                for o in outputs])), 4),
            "seconds": round(time.time() - start, 1),
            "examples": [{"query": q, "generated": tokenizer.decode(o), "answer": a}
                         for (q, a), o in list(zip(test_pairs, outputs))[:3]],
        }
    return {
        "model": model_name,
        "names_in_tree": len(tree),
        "vocab_size": tokenizer.vocab_size,
        "train_queries": len(train.data),
        "eval_queries": len(test_pairs),
        "epochs": epochs,
        "final_train_loss": round(float(history.history["loss"][-1]), 4),
        "train_seconds": round(train_seconds, 1),
        "backend": keras.backend.backend(),
        "results": results,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bert", help="bert4x model: bert, roberta, wobert, roformer, roformer_v2")
    parser.add_argument("--config", help="bert_config.json / config.json; default: a small random model")
    parser.add_argument("--checkpoint", help="Google TF checkpoint prefix or Hugging Face folder")
    parser.add_argument("--vocab", help=f"vocab.txt (default {VOCAB})")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps", type=int, help="at most this many batches per epoch")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-source", type=int, default=64, help="query tokens kept; longer sentences are skipped")
    parser.add_argument("--max-target", type=int, default=16,
                        help="name tokens with [SEP] in training; generation allows the longest name of the list")
    parser.add_argument("--lr", type=float, help="default 1e-3 from scratch, 2e-5 with --checkpoint")
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--train-limit", type=int)
    parser.add_argument("--eval-limit", type=int)
    parser.add_argument("--smoke", action="store_true", help="tiny model, 256 training / 64 dev queries, 1 epoch")
    args = parser.parse_args(argv)
    config = args.config
    if args.smoke:
        config = config or SMOKE_CONFIG
        args.epochs, args.train_limit, args.eval_limit = 1, args.train_limit or 256, args.eval_limit or 64
    result = run(args.model, config, args.checkpoint, args.vocab, args.epochs, args.steps, args.batch_size,
                 args.max_source, args.max_target, args.lr, args.beams, args.train_limit, args.eval_limit)
    print(json.dumps(result, ensure_ascii=False, indent=2))


if __name__ == "__main__":
    main()
