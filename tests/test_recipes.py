"""The zoo's recipes in examples/ (SimBERT, T5-PEGASUS, GPT-2 continuation) run end to end with `--smoke` (tiny random
models on CPU) and their JSON output has the property each recipe promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO, in_subprocess, shared_path

pytestmark = pytest.mark.skipif(in_subprocess, reason="tensorflow run only: each recipe runs in its own process")


def run_recipe(script: str, *args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, str(REPO / "examples" / script), "--smoke", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{script} failed:\n{(proc.stdout + proc.stderr)[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_gpt2_continuation():
    shared_path("vocab", "bert_chinese", "vocab.txt")
    out = run_recipe("gpt2_continuation.py", "--samples", "3", "--prompt", "今天天气不错")
    samples = out["samples"]
    assert len(samples) == 3
    for sample in samples:
        assert 0 < len(sample["ids"]) <= 16 and all(0 <= i < 21128 for i in sample["ids"])
        assert sample["text"]
    assert len({tuple(s["ids"]) for s in samples}) > 1, "the rows of one batch are sampled independently"


def test_simbert_generation_and_retrieval():
    shared_path("datasets", "sentence_pairs", "LCQMC", "dev.txt")
    out = run_recipe("simbert.py")
    assert out["corpus"] > 50 and len(out["results"]) == 2
    for result in out["results"]:
        # A corpus sentence used as the query retrieves itself first, at cosine 1.
        first = result["retrieved"][0]
        assert first["text"] == result["query"] and first["cosine"] == pytest.approx(1.0, abs=1e-4)
        cosines = [r["cosine"] for r in result["retrieved"]]
        assert cosines == sorted(cosines, reverse=True) and cosines[1] < 1.0
        generated = [g["cosine"] for g in result["generated"]]
        assert generated and generated == sorted(generated, reverse=True)


def test_t5_pegasus_titles():
    shared_path("datasets", "summarization", "csl_title", "dev.tsv")
    out = run_recipe("t5_pegasus.py")
    assert out["eval_samples"] == 8 and out["train_samples"] == 32
    assert 0.0 <= out["rouge_l"] <= 1.0 and np.isfinite(out["final_train_loss"])
    assert 4 < out["vocab_size"] < 21128  # the BERT vocabulary cut to the training texts' tokens
    assert len(out["examples"]) == 3 and all(isinstance(e["generated"], str) for e in out["examples"])


def test_t5_pegasus_tokenizer_keeps_jieba_words_of_the_vocabulary(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "examples"))
    from t5_pegasus import pegasus_tokenizer

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "我", "爱", "北", "京", "北京"]) + "\n",
                     encoding="utf-8")
    tokenizer = pegasus_tokenizer(str(vocab))
    assert tokenizer.tokenize("我爱北京") == ["[CLS]", "我", "爱", "北京", "[SEP]"]  # jieba: 我 / 爱 / 北京
    # Cut to the training texts: ids renumbered, the word kept whole.
    cut = pegasus_tokenizer(str(vocab), ["我爱北京"])
    assert cut.vocab_size == 7 and cut.tokenize("我爱北京") == ["[CLS]", "我", "爱", "北京", "[SEP]"]
