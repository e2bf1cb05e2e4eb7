"""Chinese sentiment classification on ChnSentiCorp with a BERT body, trained with `model.fit`.

From scratch (a tiny random BERT, CPU-friendly):
    python examples/sentiment_classifier.py
With real Chinese weights (e.g. Google's chinese_L-12_H-768_A-12, or WoBERT with --wobert):
    python examples/sentiment_classifier.py --config chinese_L-12_H-768_A-12/bert_config.json \
        --checkpoint chinese_L-12_H-768_A-12/bert_model.ckpt --vocab chinese_L-12_H-768_A-12/vocab.txt --epochs 2
"""

from __future__ import annotations

import argparse
import csv
import io
import time
import zipfile
from pathlib import Path

import keras
import numpy as np

from bert4x.models import build_transformer_model
from bert4x.snippets import DataGenerator, sequence_padding
from bert4x.tokenizers import Tokenizer

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATA = SHARED_DATA / "datasets" / "sentiment" / "chnsenticorp.zip"
CHINESE_VOCAB = SHARED_DATA / "vocab" / "bert_chinese" / "vocab.txt"

# A small BERT for runs from scratch; real checkpoints bring their own config.
TINY_CONFIG = {
    "vocab_size": 21128, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "intermediate_size": 128, "hidden_act": "gelu", "max_position_embeddings": 512, "type_vocab_size": 2,
    "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
}


def load_chnsenticorp(split: str, path: Path = DATA, limit: int | None = None) -> list[tuple[str, int]]:
    """(text, label) pairs of 'train', 'dev' or 'test' from the ChnSentiCorp zip (header: label, text_a)."""
    if not path.exists():
        raise FileNotFoundError(f"ChnSentiCorp not found at {path} (expected ../shared/data beside the repo).")
    with zipfile.ZipFile(path) as z:
        name = next((n for n in z.namelist() if n.endswith(f"{split}.tsv")), None)
        if name is None:
            raise ValueError(f"{path} has no {split}.tsv; members: {z.namelist()}")
        rows = csv.DictReader(io.TextIOWrapper(z.open(name), encoding="utf-8"), delimiter="\t", quoting=csv.QUOTE_NONE)
        data = [(row["text_a"], int(row["label"])) for row in rows]
    return data[:limit] if limit else data


class SentimentBatches(DataGenerator):
    """Batches of ([token_ids, segment_ids], labels), bert4keras style."""

    def __init__(self, data, tokenizer: Tokenizer, maxlen: int, batch_size: int, **kwargs):
        super().__init__(data, batch_size=batch_size, **kwargs)
        self.tokenizer, self.maxlen = tokenizer, maxlen

    def __iter__(self, random=False):
        tokens, segments, labels = [], [], []
        for is_end, (text, label) in self.sample(random):
            t, s = self.tokenizer.encode(text, maxlen=self.maxlen)
            tokens.append(t)
            segments.append(s)
            labels.append(label)
            if len(tokens) == self.batch_size or is_end:
                yield [sequence_padding(tokens), sequence_padding(segments)], np.array(labels)
                tokens, segments, labels = [], [], []


def build_classifier(config, checkpoint: str | None = None, num_classes: int = 2, **kwargs) -> keras.Model:
    """A BERT body (pooled [CLS]) with a softmax classification head."""
    bert = build_transformer_model(config, checkpoint, with_pool=True, **kwargs)
    x = keras.layers.Dropout(0.1, name="Classifier-Dropout")(bert.output)
    output = keras.layers.Dense(num_classes, activation="softmax", name="Classifier")(x)
    return keras.Model(bert.inputs, output, name="sentiment_classifier")


def evaluate(model: keras.Model, batches: SentimentBatches) -> float:
    right = total = 0
    for inputs, labels in batches:
        right += int((model.predict(inputs, verbose=0).argmax(-1) == labels).sum())
        total += len(labels)
    return right / total


def run(
    config=None, checkpoint=None, vocab=None, epochs=1, batch_size=32, maxlen=128, lr=None,
    train_limit=None, dev_limit=None, verbose=1, seed=42,
) -> dict:
    keras.utils.set_random_seed(seed)
    tokenizer = Tokenizer(str(vocab or CHINESE_VOCAB), do_lower_case=True)
    model = build_classifier(config or TINY_CONFIG, checkpoint)
    lr = lr or (2e-5 if checkpoint else 1e-3)
    model.compile(
        optimizer=keras.optimizers.AdamW(lr, weight_decay=0.01),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile="auto",
    )
    train = SentimentBatches(load_chnsenticorp("train", limit=train_limit), tokenizer, maxlen, batch_size)
    dev_data = load_chnsenticorp("dev", limit=dev_limit)
    dev = SentimentBatches(dev_data, tokenizer, maxlen, batch_size)
    start = time.time()
    model.fit(train, epochs=epochs, verbose=verbose)
    accuracy = evaluate(model, dev)
    counts = np.bincount([label for _, label in dev_data])
    return {
        "dev_accuracy": accuracy,
        "majority_baseline": float(counts.max() / counts.sum()),
        "train_seconds": time.time() - start,
        "train_samples": len(train.data),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="bert_config.json / config.json of a real checkpoint (default: tiny random)")
    parser.add_argument("--checkpoint", help="Google TF prefix or Hugging Face folder")
    parser.add_argument("--vocab", help="vocab.txt (default: the Chinese BERT vocab in ../shared/data)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--maxlen", type=int, default=128)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--train-limit", type=int, help="use only the first N training samples")
    args = parser.parse_args(argv)
    result = run(args.config, args.checkpoint, args.vocab, args.epochs, args.batch_size, args.maxlen, args.lr,
                 args.train_limit)
    print(result)


if __name__ == "__main__":
    main()
