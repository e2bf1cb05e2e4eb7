"""Pretraining from scratch: corpus -> packed token files -> masked / causal / UniLM batches -> checkpoints.

Steps (see examples/pretrain.py):
1. `iter_corpus_sentences(globs)` streams sentences out of text, zip, tsv, csv and json files;
2. `preprocess_corpus(sentences, tokenizer, prefix, seq_len)` packs them into memory-mapped rows on disk, with
   jieba word boundaries for whole-word masking;
3. `PretrainingDataset(prefix, batch_size, objective, seed)` yields shuffled, seeded batches for 'mlm'
   (whole-word masking, 15%, 80/10/10), 'lm' (causal) or 'unilm';
4. `build_pretraining_model` + `compile_for_pretraining`, then `model.fit` with `PretrainingLogger` (CSV curve,
   held-out MLM accuracy), `CheckpointSaver` (bert4x, Google and Hugging Face formats) and `TimeBudget`.
"""

from bert4x.pretraining.corpus import (  # noqa: F401
    count_chinese,
    expand_corpus_paths,
    iter_corpus_sentences,
    iter_corpus_texts,
    split_sentences,
)
from bert4x.pretraining.data import OBJECTIVES, PackedCorpus, PretrainingDataset, preprocess_corpus, split_rows  # noqa: F401
from bert4x.pretraining.masking import WordPieceEncoder, jieba_words, whole_word_mask  # noqa: F401
from bert4x.pretraining.training import (  # noqa: F401
    APPLICATIONS,
    CHECKPOINT_FORMATS,
    CheckpointSaver,
    PretrainingLogger,
    TimeBudget,
    build_pretraining_model,
    compile_for_pretraining,
    save_checkpoints,
)
