"""T5-PEGASUS: Chinese summarisation / titling with an mT5.1.1 (`model='mt5.1.1'`) that reads a BERT-style WordPiece
vocabulary through jieba, as ZhuiyiTechnology's T5-PEGASUS release does; here on CSL (paper abstract -> title),
reporting ROUGE-L.

From scratch (a small random model; `--smoke` is a seconds-long check of the whole pipeline on CPU):
    python examples/t5_pegasus.py --smoke
Fine-tuning the release (its config.json, TF checkpoint and its own vocab.txt of words and characters):
    python examples/t5_pegasus.py --config chinese_t5_pegasus_small/config.json \
        --checkpoint chinese_t5_pegasus_small/model.ckpt --vocab chinese_t5_pegasus_small/vocab.txt --lr 2e-4

How (as the release's fine-tuning script): the tokenizer is `Tokenizer(vocab, pre_tokenize=jieba.cut(HMM=False))`,
so a jieba word found in the vocabulary is one token and any other word falls back to WordPiece characters. The
encoder reads `[CLS] abstract [SEP]`; the decoder starts from `[CLS]` (not T5's id 0: `decoder_start_id` is set on
the model), is trained to produce `title [SEP]` and generation stops at `[SEP]`. Id 0 (`[PAD]`) pads both sides. From
scratch, the vocabulary is the Chinese BERT one (`../shared/data/vocab/bert_chinese`) cut to the tokens the training
texts use; with `--vocab` and `--checkpoint` the release's vocabulary is used whole.

Data: `../shared/data/datasets/summarization/csl_title` (dev.tsv and test.tsv, 1000 rows each, no train split), so
this trains on dev.tsv and evaluates on test.tsv. Titles are generated with `bert4x.generation` (encoder once per
batch, cached decoder; greedy or `--beams`). ROUGE-L is the character-level LCS F1, averaged.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import keras
import numpy as np

# Shared with the mT5 recipe: the CSL reader and ROUGE-L (this directory is on sys.path when a script here runs).
from mt5_csl_title import load_csl, rouge_l

from bert4x.generation import Generator
from bert4x.models import build_transformer_model
from bert4x.snippets import DataGenerator, sequence_padding
from bert4x.tokenizers import Tokenizer, load_vocab

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VOCAB = SHARED_DATA / "vocab" / "bert_chinese" / "vocab.txt"

# A small mT5.1.1 for runs from scratch (vocab_size is set to the tokenizer's).
SMALL_CONFIG = {"d_model": 256, "d_kv": 32, "d_ff": 640, "num_heads": 8, "num_layers": 3, "num_decoder_layers": 3,
                "dropout_rate": 0.1, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}
SMOKE_CONFIG = dict(SMALL_CONFIG, d_model=64, d_kv=16, d_ff=128, num_heads=4, num_layers=1, num_decoder_layers=1)


def pegasus_tokenizer(vocab, texts: list[str] | None = None) -> Tokenizer:
    """T5-PEGASUS's tokenizer: WordPiece over jieba words.

    Args:
        vocab: a one-token-per-line vocab.txt.
        texts: training texts; when given (training from scratch) the vocabulary is cut to the tokens they use plus
            the special ones, renumbered from 0.
    """
    import jieba

    def pre_tokenize(text):
        return jieba.cut(text, HMM=False)

    token_dict = load_vocab(vocab)
    tokenizer = Tokenizer(token_dict, do_lower_case=True, pre_tokenize=pre_tokenize)
    if texts is None:
        return tokenizer
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    used = sorted({i for text in texts for i in tokenizer.encode(text)[0]} | {token_dict[t] for t in specials})
    id_to_token = {i: t for t, i in token_dict.items()}
    return Tokenizer({id_to_token[i]: n for n, i in enumerate(used)}, do_lower_case=True, pre_tokenize=pre_tokenize)


class TitleBatches(DataGenerator):
    """([abstract ids, `[CLS] title`], `title [SEP]`) batches at fixed shapes."""

    def __init__(self, data, tokenizer: Tokenizer, max_source: int, max_target: int, batch_size: int, **kwargs):
        super().__init__(data, batch_size=batch_size, **kwargs)
        self.tokenizer, self.max_source, self.max_target = tokenizer, max_source, max_target

    def __iter__(self, random=False):
        sources, inputs, targets = [], [], []
        for is_end, (abstract, title) in self.sample(random):
            sources.append(self.tokenizer.encode(abstract, maxlen=self.max_source)[0])
            title_ids = self.tokenizer.encode(title, maxlen=self.max_target + 1)[0]  # [CLS] title [SEP]
            inputs.append(title_ids[:-1])
            targets.append(title_ids[1:])
            if len(sources) == self.batch_size or is_end:
                yield ([sequence_padding(sources, self.max_source), sequence_padding(inputs, self.max_target)],
                       sequence_padding(targets, self.max_target))
                sources, inputs, targets = [], [], []


def generate_titles(t5, tokenizer: Tokenizer, abstracts: list[str], max_source: int, max_target: int,
                    beams: int = 1, batch_size: int = 32) -> list[str]:
    """Titles for `abstracts`, decoded from `[CLS]` until `[SEP]`.

    Args:
        t5: the mT5.1.1 `Transformer` (its `decoder_start_id` is set to `[CLS]`).
        tokenizer: `pegasus_tokenizer`'s tokenizer.
        abstracts: source texts.
        max_source: encoder tokens kept per abstract.
        max_target: most title tokens generated.
        beams: beam width (1 = greedy).
        batch_size: prompts per generation call.
    """
    t5.decoder_start_id = tokenizer.start_id  # T5-PEGASUS's decoder starts from [CLS]
    generator = Generator(t5)
    titles = []
    for start in range(0, len(abstracts), batch_size):
        prompts = [tokenizer.encode(a, maxlen=max_source)[0] for a in abstracts[start:start + batch_size]]
        outputs = generator.generate(prompts, max_len=max_target, end_id=tokenizer.end_id, num_beams=beams)
        titles.append([tokenizer.decode(o) for o in outputs])
    return [t for batch in titles for t in batch]


def run(config=None, checkpoint=None, vocab=None, epochs=10, batch_size=16, max_source=256, max_target=32, lr=None,
        beams=1, train_limit=None, eval_limit=None, verbose=1, seed=42) -> dict:
    keras.utils.set_random_seed(seed)
    train_pairs, test = load_csl("dev", train_limit), load_csl("test", eval_limit)
    texts = None if checkpoint else [t for pair in train_pairs for t in pair]
    tokenizer = pegasus_tokenizer(vocab or VOCAB, texts)
    if isinstance(config, dict):
        config = dict(config, vocab_size=tokenizer.vocab_size)
    t5 = build_transformer_model(config or dict(SMALL_CONFIG, vocab_size=tokenizer.vocab_size), checkpoint,
                                 model="mt5.1.1", with_lm="linear", return_keras_model=False)
    if t5.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"The model has {t5.vocab_size} token rows but the vocabulary {tokenizer.vocab_size}; "
                         "pass the vocab.txt released with the checkpoint.")
    t5.model.compile(
        optimizer=keras.optimizers.AdamW(lr or (2e-4 if checkpoint else 1e-3), weight_decay=0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=0),  # 0 pads the targets
        jit_compile="auto",
    )
    train = TitleBatches(train_pairs, tokenizer, max_source, max_target, batch_size)
    start = time.time()
    history = t5.model.fit(train, epochs=epochs, verbose=verbose)
    train_seconds = time.time() - start
    start = time.time()
    titles = generate_titles(t5, tokenizer, [a for a, _ in test], max_source, max_target, beams)
    scores = [rouge_l(title, reference) for title, (_, reference) in zip(titles, test)]
    return {
        "rouge_l": round(float(np.mean(scores)), 4),
        "final_train_loss": round(float(history.history["loss"][-1]), 4),
        "vocab_size": tokenizer.vocab_size,
        "train_samples": len(train.data),
        "eval_samples": len(test),
        "train_seconds": round(train_seconds, 1),
        "generate_seconds": round(time.time() - start, 1),
        "examples": [{"generated": t, "reference": r} for t, (_, r) in list(zip(titles, test))[:3]],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="T5-PEGASUS config.json; default: a small random mT5.1.1")
    parser.add_argument("--checkpoint", help="Google TF checkpoint prefix or Hugging Face folder")
    parser.add_argument("--vocab", help=f"the release's vocab.txt (default {VOCAB}, cut to the training texts)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-source", type=int, default=256, help="abstract tokens kept ([CLS], [SEP] included)")
    parser.add_argument("--max-target", type=int, default=32, help="title tokens with [SEP]; the generation limit")
    parser.add_argument("--lr", type=float, help="default 1e-3 from scratch, 2e-4 with --checkpoint")
    parser.add_argument("--beams", type=int, default=1, help="beam width for generation (1 = greedy)")
    parser.add_argument("--train-limit", type=int)
    parser.add_argument("--eval-limit", type=int)
    parser.add_argument("--smoke", action="store_true", help="tiny model, 32 training / 8 test rows, 1 epoch")
    args = parser.parse_args(argv)
    config = args.config
    if args.smoke:
        config = config or SMOKE_CONFIG
        args.epochs, args.train_limit, args.eval_limit = 1, args.train_limit or 32, args.eval_limit or 8
        args.max_source, args.max_target = min(args.max_source, 96), min(args.max_target, 16)
    result = run(config, args.checkpoint, args.vocab, args.epochs, args.batch_size, args.max_source, args.max_target,
                 args.lr, args.beams, args.train_limit, args.eval_limit, verbose=0 if args.smoke else 1)
    print(json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    main()
