"""SimBERT / RoFormer-Sim: one UniLM model (`application='unilm'`, `with_pool='linear'`) that both generates
sentences similar to a query (sampling through `bert4x.generation.Generator`) and retrieves similar sentences by the
cosine of its pooled `[CLS]` vector.

A tiny random model (`--smoke`, seconds on CPU; generations are noise, the retrieval index is real):
    python examples/simbert.py --smoke
A released checkpoint (SimBERT: model bert; RoFormer-Sim: model roformer), with its config and vocabulary:
    python examples/simbert.py --model bert --config chinese_simbert_L-12_H-768_A-12/bert_config.json \
        --checkpoint chinese_simbert_L-12_H-768_A-12/bert_model.ckpt \
        --vocab chinese_simbert_L-12_H-768_A-12/vocab.txt --query "微信和支付宝哪个好？"

How (SimBERT's release): the model is BERT/RoFormer with the UniLM mask and a linear pooler on `[CLS]`, trained on
pairs of similar sentences so that `[CLS] a [SEP] b [SEP]` (segment 1 for b) generates b from a, while the pooled
vectors of a batch are pulled together for similar pairs. Two uses follow:

- similar-sentence generation: `[CLS] query [SEP]` as the prompt, `--samples` rows sampled with top-p; the
  candidates are then ranked by the cosine of their pooled vectors with the query's (as SimBERT's `gen_synonyms`);
- retrieval: every corpus sentence is encoded once to a unit-norm pooled vector; a query's neighbours are the
  corpus sentences with the highest dot product (cosine).

Data: the corpus is the distinct sentences of `../shared/data/datasets/sentence_pairs/LCQMC/dev.txt` (its first
`--corpus-size` pairs). The output is JSON: per query, the ranked generations and the retrieved neighbours.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import keras
import numpy as np

from bert4x.generation import Generator
from bert4x.models import build_transformer_model
from bert4x.snippets import sequence_padding
from bert4x.tokenizers import Tokenizer, load_vocab

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VOCAB = SHARED_DATA / "vocab" / "bert_chinese" / "vocab.txt"
LCQMC = SHARED_DATA / "datasets" / "sentence_pairs" / "LCQMC" / "dev.txt"
SMOKE_CONFIG = {"vocab_size": 21128, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                "intermediate_size": 64, "max_position_embeddings": 128, "type_vocab_size": 2,
                # Wide random weights: with the usual 0.02 every sentence of an untrained model pools to about the
                # same vector, and the smoke run's retrieval could not tell sentences apart.
                "initializer_range": 0.5}


def load_corpus(limit: int) -> list[str]:
    """The distinct sentences of LCQMC's dev pairs ("s1\\ts2\\tlabel"), in file order.

    Args:
        limit: how many pairs (lines) to read.
    """
    if not LCQMC.exists():
        raise FileNotFoundError(f"LCQMC dev.txt not found at {LCQMC} (expected ../shared/data beside the repo).")
    sentences: dict[str, None] = {}
    with open(LCQMC, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if number > limit:
                break
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 3:
                raise ValueError(f"{LCQMC}:{number}: expected 3 tab-separated fields, got {len(fields)}.")
            sentences.update(dict.fromkeys(fields[:2]))
    return list(sentences)


class SimBERT:
    """Generation and retrieval with one SimBERT-style model.

    Args:
        model: a keras model built with `application='unilm'` and `with_pool='linear'` (outputs: pooled vector, LM).
        tokenizer: its WordPiece tokenizer.
        max_len: longest input in tokens ([CLS] and [SEP] included).
    """

    def __init__(self, model, tokenizer: Tokenizer, max_len: int = 64):
        if not isinstance(model.outputs, list) or len(model.outputs) != 2:
            raise ValueError("SimBERT needs a model built with with_pool and an LM head (two outputs).")
        self.tokenizer, self.max_len = tokenizer, max_len
        self.encoder = keras.Model(model.inputs, model.outputs[0])
        self.generator = Generator(model)

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Unit-norm pooled vectors `[len(texts), hidden]`.

        Args:
            texts: sentences to encode.
            batch_size: sentences per forward pass.
        """
        vectors = []
        for start in range(0, len(texts), batch_size):
            ids = [self.tokenizer.encode(t, maxlen=self.max_len)[0] for t in texts[start:start + batch_size]]
            ids = sequence_padding(ids, self.max_len)  # one shape: one compiled predict
            vectors.append(np.asarray(self.encoder.predict_on_batch([ids, np.zeros_like(ids)]), np.float32))
        vectors = np.concatenate(vectors)
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

    def generate(self, query: str, samples: int = 8, top_p: float = 0.95, seed: int = 0) -> list[dict]:
        """Sampled candidates similar to `query`, ranked by cosine to it: a list of {"text", "cosine"}.

        Args:
            query: the sentence to paraphrase.
            samples: rows sampled (duplicates and empty outputs are dropped).
            top_p: nucleus sampling threshold.
            seed: makes the samples reproducible.
        """
        ids = self.tokenizer.encode(query, maxlen=self.max_len)[0]
        outputs = self.generator.generate([ids] * samples, [[0] * len(ids)] * samples, max_len=self.max_len,
                                          end_id=self.tokenizer.end_id, do_sample=True, top_p=top_p, seed=seed)
        texts = list(dict.fromkeys(t for t in (self.tokenizer.decode(o) for o in outputs) if t))
        if not texts:
            return []
        vectors = self.encode([query, *texts])
        cosines = vectors[1:] @ vectors[0]
        order = np.argsort(-cosines)
        return [{"text": texts[i], "cosine": round(float(cosines[i]), 4)} for i in order]

    def index(self, corpus: list[str]) -> None:
        """Encodes the corpus for `retrieve`.

        Args:
            corpus: the sentences to search.
        """
        self.corpus, self.vectors = list(corpus), self.encode(corpus)

    def retrieve(self, query: str, top: int = 5) -> list[dict]:
        """The `top` corpus sentences nearest to `query` by cosine: a list of {"text", "cosine"}.

        Args:
            query: the sentence to look up.
            top: how many neighbours.
        """
        cosines = self.vectors @ self.encode([query])[0]
        order = np.argsort(-cosines, kind="stable")[:top]
        return [{"text": self.corpus[i], "cosine": round(float(cosines[i]), 4)} for i in order]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bert", help="bert (SimBERT) or roformer (RoFormer-Sim)")
    parser.add_argument("--config", help="bert_config.json / config.json; default with --smoke: a tiny random model")
    parser.add_argument("--checkpoint", help="Google TF checkpoint prefix or Hugging Face folder")
    parser.add_argument("--vocab", help=f"vocab.txt (default {VOCAB})")
    parser.add_argument("--query", action="append", help="query sentence (repeatable); default: corpus sentences")
    parser.add_argument("--corpus-size", type=int, default=2000, help="LCQMC dev pairs indexed for retrieval")
    parser.add_argument("--samples", type=int, default=8, help="sampled candidates per query")
    parser.add_argument("--top", type=int, default=5, help="neighbours retrieved per query")
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a tiny random model, 50 pairs, 2 queries")
    args = parser.parse_args(argv)
    if args.smoke:
        args.corpus_size, args.samples, args.max_len = min(args.corpus_size, 50), min(args.samples, 4), 24
    elif not args.config:
        parser.error("--config is required (or --smoke for a tiny random model)")
    keras.utils.set_random_seed(args.seed)
    tokenizer = Tokenizer(load_vocab(args.vocab or VOCAB), do_lower_case=True)
    model = build_transformer_model(args.config or SMOKE_CONFIG, args.checkpoint, model=args.model,
                                    application="unilm", with_pool="linear", with_mlm=True)
    sim = SimBERT(model, tokenizer, args.max_len)
    corpus = load_corpus(args.corpus_size)
    sim.index(corpus)
    queries = args.query or corpus[:2]
    results = [{"query": q, "generated": sim.generate(q, args.samples, seed=args.seed),
                "retrieved": sim.retrieve(q, args.top)} for q in queries]
    print(json.dumps({"model": args.model, "corpus": len(corpus), "results": results}, ensure_ascii=False))


if __name__ == "__main__":
    main()
