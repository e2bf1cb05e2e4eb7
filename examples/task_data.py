"""Data readers and small shared pieces of the seed-task examples (NER, sentence pairs, STS-B, FewCLUE, sentiment).

Every reader takes data from `<repo>/../shared/data` and raises FileNotFoundError naming the file when it is absent.
"""

from __future__ import annotations

import json
import os
import platform
import zipfile
from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CHINESE_VOCAB = SHARED_DATA / "vocab" / "bert_chinese" / "vocab.txt"

# A small BERT trained from scratch by default; real checkpoints bring their own config (--config).
TINY_CONFIG = {
    "vocab_size": 21128, "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "intermediate_size": 256, "hidden_act": "gelu", "max_position_embeddings": 512, "type_vocab_size": 2,
    "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
}


def small_vocab_tokenizer(texts, vocab_path=CHINESE_VOCAB, extra_tokens=()):
    """For models trained from scratch: a tokenizer over only the tokens `texts` use (plus specials and
    `extra_tokens`), and the `keep_tokens` ids of those rows in the full vocabulary (for real checkpoints)."""
    from bert4x.tokenizers import Tokenizer, load_vocab

    full = Tokenizer(str(vocab_path), do_lower_case=True)
    token_dict = load_vocab(str(vocab_path))
    used = {t for text in texts for t in full.tokenize(text)}
    fixed = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *extra_tokens]
    missing = [t for t in fixed if t not in token_dict]
    if missing:
        raise ValueError(f"{vocab_path} lacks the tokens {missing}.")
    kept = fixed + sorted(used - set(fixed), key=token_dict.get)
    return Tokenizer({t: i for i, t in enumerate(kept)}, do_lower_case=True), [token_dict[t] for t in kept]


def _require(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found (the examples read ../shared/data beside the repository).")
    return path


def hardware() -> str:
    """A one-line description of where this ran (for RESULTS.md)."""
    import keras

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, keras {keras.__version__} backend {keras.backend.backend()}"


# ------------------------------------------------------------------------------------------ NER
PEOPLEDAILY_TYPES = ["LOC", "ORG", "PER"]
CLUENER_TYPES = ["address", "book", "company", "game", "government", "movie", "name", "organization", "position",
                 "scene"]


def load_peopledaily(split: str) -> list[tuple[str, list[tuple[str, int, int]]]]:
    """(text, [(type, start_char, end_char inclusive)]) from peopledaily.zip's train.txt or dev.txt ('char TAG' lines).

    Only `datasets/ner/peopledaily.zip` is read: the china-people-daily-ner-corpus files overlap its train split.
    """
    from bert4x.snippets import bio_to_spans

    if split not in ("train", "dev"):
        raise ValueError(f"People's Daily splits are 'train' and 'dev', got {split!r}.")
    path = _require(SHARED_DATA / "datasets" / "ner" / "peopledaily.zip")
    with zipfile.ZipFile(path) as z:
        text = z.read(f"{split}.txt").decode("utf-8")
    samples = []
    for block in text.split("\n\n"):
        chars, tags = [], []
        for line in block.split("\n"):
            if not line.strip():
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise ValueError(f"{path}:{split}.txt: line {line!r} is not 'char TAG'.")
            chars.append(parts[0])
            tags.append(parts[1])
        if chars:
            samples.append(("".join(chars), bio_to_spans(tags)))
    return samples


def load_cluener(split: str) -> list[tuple[str, list[tuple[str, int, int]]]]:
    """(text, [(type, start_char, end_char inclusive)]) from CLUENER train.json / dev.json."""
    path = _require(SHARED_DATA / "datasets" / "ner" / "cluener" / f"{split}.json")
    samples = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            spans = [(kind, s, e) for kind, mentions in record.get("label", {}).items()
                     for positions in mentions.values() for s, e in positions]
            samples.append((record["text"], sorted(spans, key=lambda x: (x[1], x[2]))))
    return samples


def align_spans(tokenizer, text: str, spans, maxlen: int):
    """Tokenizes `text` and maps char spans to token spans. Returns (token_ids, token_spans, mapping, dropped):
    `dropped` counts entities that cannot be aligned (cut by maxlen, or not on token boundaries)."""
    tokens = tokenizer.tokenize(text, maxlen=maxlen)
    mapping = tokenizer.rematch(text, tokens)
    starts = {m[0]: i for i, m in enumerate(mapping) if m}
    ends = {m[-1]: i for i, m in enumerate(mapping) if m}
    token_spans, dropped = [], 0
    for kind, s, e in spans:
        if s in starts and e in ends:
            token_spans.append((kind, starts[s], ends[e]))
        else:
            dropped += 1
    return tokenizer.tokens_to_ids(tokens), token_spans, mapping, dropped


def token_spans_to_chars(spans, mapping):
    """Token spans -> char spans via `rematch`'s mapping (spans over [CLS]/[SEP] are skipped)."""
    out = []
    for kind, i, j in spans:
        if i < len(mapping) and j < len(mapping) and mapping[i] and mapping[j]:
            out.append((kind, mapping[i][0], mapping[j][-1]))
    return out


# ------------------------------------------------------------------------------------------ sentence pairs
def load_sentence_pairs(dataset: str, split: str) -> list[tuple[str, str, int]]:
    """(s1, s2, label) from AFQMC (train/dev) or LCQMC (dev/test: the shared data has no LCQMC train split)."""
    folder = {"afqmc": "AFQMC", "lcqmc": "LCQMC"}.get(dataset)
    if folder is None:
        raise ValueError(f"dataset must be 'afqmc' or 'lcqmc', got {dataset!r}.")
    path = _require(SHARED_DATA / "datasets" / "sentence_pairs" / folder / f"{split}.txt")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 3:
                raise ValueError(f"{path}:{n}: expected 's1<TAB>s2<TAB>label', got {line!r}.")
            rows.append((parts[0], parts[1], int(parts[2])))
    return rows


def load_stsb(split: str) -> list[tuple[str, str, float]]:
    """(s1, s2, score 0-5) from Chinese STS-B sts-b-{train,dev,test}.txt."""
    path = _require(SHARED_DATA / "datasets" / "sentence_pairs" / "Chinese-STS-B" / f"sts-b-{split}.txt")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 3:
                raise ValueError(f"{path}:{n}: expected 's1<TAB>s2<TAB>score', got {line!r}.")
            rows.append((parts[0], parts[1], float(parts[2])))
    return rows


# ------------------------------------------------------------------------------------------ FewCLUE
FEWCLUE_FILES = {"train": "train_few_all.json", "dev": "dev_few_all.json", "test": "test_public.json"}


def load_fewclue(task: str, split: str) -> list[tuple[str, str]]:
    """(sentence, label) from FewCLUE eprstmt ('Positive'/'Negative') or tnews (label ids as strings, e.g. '100')."""
    if task not in ("eprstmt", "tnews"):
        raise ValueError(f"task must be 'eprstmt' or 'tnews', got {task!r}.")
    path = _require(SHARED_DATA / "datasets" / "clue_fewclue" / task / FEWCLUE_FILES[split])
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [(r["sentence"], str(r["label"])) for r in records]


def tnews_labels() -> list[tuple[str, str]]:
    """(label id, Chinese name) of the 15 tnews classes, e.g. ('100', '故事')."""
    path = _require(SHARED_DATA / "datasets" / "clue_fewclue" / "tnews" / "label_index2en2zh.json")
    with open(path, encoding="utf-8") as f:
        return [(r["label"], r["label_zh"]) for r in (json.loads(line) for line in f if line.strip())]


# ------------------------------------------------------------------------------------------ sentiment
def load_bert4keras_sentiment(split: str) -> list[tuple[str, int]]:
    """(text, label) of bert4keras's sentiment data: sentiment.{train,valid,test}.data ('text\\tlabel' lines)."""
    path = _require(SHARED_DATA / "datasets" / "sentiment" / "bert4keras_sentiment.zip")
    with zipfile.ZipFile(path) as z:
        name = next((n for n in z.namelist() if n.endswith(f"{split}.data")), None)
        if name is None:
            raise ValueError(f"{path} has no *{split}.data member; members: {z.namelist()}")
        rows = []
        for n, line in enumerate(z.read(name).decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            text, _, label = line.rpartition("\t")
            if not text or label not in ("0", "1"):
                raise ValueError(f"{path}:{name}:{n}: expected 'text<TAB>0|1', got {line[:60]!r}.")
            rows.append((text, int(label)))
    return rows


# ------------------------------------------------------------------------------------------ batching
class BucketBatches:
    """Batches of samples of similar length, padded to a few fixed lengths (one XLA compilation per length).

    `make_batch(indices, length)` builds one batch. Each epoch shuffles samples within their length bucket and the
    order of the batches. Use `as_dataset()` for `model.fit`.
    """

    def __init__(self, lengths, make_batch, batch_size: int, bucket: int = 32, maxlen: int = 128, shuffle=True,
                 seed: int = 0):
        import numpy as np

        self.make_batch, self.batch_size, self.shuffle = make_batch, batch_size, shuffle
        self.rng = np.random.default_rng(seed)
        padded = np.minimum(-(-np.asarray(lengths) // bucket) * bucket, maxlen)
        self.buckets = {int(p): np.flatnonzero(padded == p) for p in np.unique(padded)}
        self.on_epoch_end()

    def on_epoch_end(self):
        batches = []
        for length, indices in self.buckets.items():
            indices = self.rng.permutation(indices) if self.shuffle else indices
            batches += [(indices[i:i + self.batch_size], length) for i in range(0, len(indices), self.batch_size)]
        if self.shuffle:
            batches = [batches[i] for i in self.rng.permutation(len(batches))]
        # Keras's tensorflow adapter infers the input signature from the first 2 batches: give them different
        # lengths so that the length axis is dynamic (XLA still compiles once per length).
        other = next((i for i, (_, length) in enumerate(batches) if length != batches[0][1]), None)
        if other is not None and batches[1][1] == batches[0][1]:
            batches[1], batches[other] = batches[other], batches[1]
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        indices, length = self.batches[i]
        return self.make_batch(indices, length)

    def as_dataset(self):
        """A `keras.utils.PyDataset` view for `model.fit` (reads batches in order; reshuffles each epoch)."""
        import keras

        outer = self

        class _Dataset(keras.utils.PyDataset):
            def __len__(self):
                return len(outer)

            def __getitem__(self, i):
                return outer[i]

            def on_epoch_end(self):
                outer.on_epoch_end()

        return _Dataset()
